// Greedy verification for speculative decoding: fused argmax over the vocabulary plus the acceptance scan.
//
// One block per row. The row's valid columns are visited left to right; for each one the whole block
// computes the argmax of that column's logits, then thread 0 decides whether the next draft is accepted.
// The walk stops at the first rejection, at the bonus column, or at an EOS token, so columns after a
// rejected draft are never read (with low acceptance most of the logits traffic is skipped).
//
// Every emitted token equals the prediction at its column: an accepted draft equals the prediction before
// it by definition, and the final token is the correction or bonus. Hence emitted[j] = argmax(column s+j).
//
// Argmax order follows torch.argmax exactly: NaN ranks above every number (the first NaN wins), equal
// values go to the lowest index. Build without --use_fast_math: -ftz would flush subnormal logits to zero
// and merge distinct values into ties.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <string>

#include "ops.h"

namespace effdecode {
namespace {

constexpr int kMaxThreads = 1024;
constexpr int kWarpSize = 32;
constexpr int kUnroll = 4;  // 16-byte loads in flight per thread per iteration
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kNoIndex = INT_MAX;  // identity of the reduction; only survives if every logit is -inf

struct Best {
  float value;
  int index;
};

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// Strict total order of torch.argmax on (value, index) pairs: does (v, i) beat (bv, bi)?
__device__ __forceinline__ bool beats(float v, int i, float bv, int bi) {
  const bool v_nan = isnan(v);
  const bool b_nan = isnan(bv);
  if (v_nan || b_nan) return v_nan && (!b_nan || i < bi);
  return v > bv || (v == bv && i < bi);
}

// Within one thread indices only grow, so a later element wins iff it is strictly greater, or is the
// first NaN. Cheaper than `beats` in the hot loop.
__device__ __forceinline__ void consider(Best& best, float v, int i) {
  if (!(v <= best.value) && !isnan(best.value)) {
    best.value = v;
    best.index = i;
  }
}

// Butterfly reduction: every lane ends with the warp's winner.
__device__ __forceinline__ Best warp_argmax(Best b) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    const float v = __shfl_xor_sync(kFullMask, b.value, offset);
    const int i = __shfl_xor_sync(kFullMask, b.index, offset);
    if (beats(v, i, b.value, b.index)) b = {v, i};
  }
  return b;
}

// This thread's best element of one column. 16-byte vector loads cover the aligned body; the few
// elements before the first 16-byte boundary and after the last full vector are loaded one by one, so
// any vocab size and any element-aligned column start work.
template <typename scalar_t>
__device__ __forceinline__ Best thread_argmax(const scalar_t* __restrict__ column, int vocab) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  const int tid = threadIdx.x;
  const int num_threads = blockDim.x;
  Best best{-INFINITY, kNoIndex};

  const uintptr_t address = reinterpret_cast<uintptr_t>(column);
  const int head = min(static_cast<int>(((16 - (address & 15)) & 15) / sizeof(scalar_t)), vocab);
  if (tid < head) consider(best, to_float(column[tid]), tid);

  const int num_vecs = (vocab - head) / kVec;
  const uint4* vecs = reinterpret_cast<const uint4*>(column + head);
  for (int base = tid; base < num_vecs; base += kUnroll * num_threads) {
    // Issue all loads before consuming any, so kUnroll requests are outstanding at once.
    uint4 raw[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int k = base + u * num_threads;
      if (k < num_vecs) raw[u] = __ldcs(vecs + k);  // streamed: each logit is read once
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int k = base + u * num_threads;
      if (k < num_vecs) {
        const scalar_t* values = reinterpret_cast<const scalar_t*>(&raw[u]);
        const int first = head + k * kVec;
#pragma unroll
        for (int e = 0; e < kVec; ++e) consider(best, to_float(values[e]), first + e);
      }
    }
  }

  const int tail = head + num_vecs * kVec + tid;  // fewer than kVec (<= 8) elements remain
  if (tail < vocab) consider(best, to_float(column[tail]), tail);
  return best;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kMaxThreads) verify_greedy_kernel(const VerifyGreedyArgs args) {
  __shared__ Best warp_best[kMaxThreads / kWarpSize];
  __shared__ int stop;
  __shared__ int emitted_count;

  const int64_t row = blockIdx.x;
  const int tid = threadIdx.x;
  const int lane = tid % kWarpSize;
  const int warp = tid / kWarpSize;
  const int num_warps = blockDim.x / kWarpSize;
  const int num_cols = static_cast<int>(args.num_cols);
  const int vocab = static_cast<int>(args.vocab);

  const bool was_finished = args.finished[row] != 0;
  const int q_len = min(max(args.q_lens[row], 0), num_cols);
  const int start = num_cols - q_len;  // column of the last accepted token
  const int num_drafts = q_len - 1;
  const scalar_t* logits = static_cast<const scalar_t*>(args.logits) + row * args.logits_stride_b;
  const int64_t* input_ids = args.input_ids + row * args.input_ids_stride_b;
  int64_t* emitted = args.emitted + row * num_cols;

  // Only thread 0's copies are meaningful.
  int count = 0;
  bool hit_eos = false;

  if (!was_finished && q_len > 0) {
    for (int j = 0;; ++j) {
      const int col = start + j;
      // Fetch the draft this prediction is checked against now, so its latency hides behind the scan.
      int64_t next_draft = -1;
      if (tid == 0 && j < num_drafts) next_draft = input_ids[(col + 1) * args.input_ids_stride_t];

      Best best = warp_argmax(thread_argmax(logits + col * args.logits_stride_t, vocab));
      if (lane == 0) warp_best[warp] = best;
      __syncthreads();
      if (warp == 0) {
        best = lane < num_warps ? warp_best[lane] : Best{-INFINITY, kNoIndex};
        best = warp_argmax(best);
        if (lane == 0) {
          const int64_t prediction = best.index == kNoIndex ? 0 : best.index;  // all -inf: torch gives 0
          emitted[j] = prediction;
          count = j + 1;
          for (int64_t e = 0; e < args.num_eos; ++e) hit_eos |= args.eos_token_ids[e] == prediction;
          stop = hit_eos || j >= num_drafts || next_draft != prediction;
        }
      }
      // Publishes `stop`; also keeps warp_best from being overwritten before warp 0 has read it.
      __syncthreads();
      if (stop) break;
    }
  }

  if (tid == 0) {
    args.num_emitted[row] = count;
    args.finished_out[row] = was_finished || hit_eos;
    emitted_count = count;
  }
  __syncthreads();
  for (int j = emitted_count + tid; j < num_cols; j += blockDim.x) emitted[j] = -1;
}

int element_size(int dtype) {
  switch (dtype) {
    case kFloat32:
      return 4;
    case kFloat16:
    case kBFloat16:
      return 2;
    default:
      return 0;
  }
}

}  // namespace

std::string verify_greedy_launch(const VerifyGreedyArgs& args, uintptr_t stream) {
  const int elem = element_size(args.dtype);
  if (elem == 0) return "verify_greedy: unsupported logits dtype code " + std::to_string(args.dtype);
  if (args.batch < 0 || args.batch > INT_MAX) return "verify_greedy: batch size out of range";
  if (args.num_cols < 1 || args.num_cols > INT_MAX / 2) return "verify_greedy: num_cols out of range";
  if (args.vocab < 1 || args.vocab >= kNoIndex) return "verify_greedy: vocab size out of range";
  if (args.num_eos < 0 || (args.num_eos > 0 && args.eos_token_ids == nullptr)) {
    return "verify_greedy: bad eos_token_ids";
  }
  if (reinterpret_cast<uintptr_t>(args.logits) % elem != 0) return "verify_greedy: misaligned logits";
  if (args.batch == 0) return "";

  // Enough threads for kUnroll vectors each over the vocabulary, in whole warps, capped at kMaxThreads:
  // 64 threads for a 1000-entry fp32 vocab, 1024 for 151,936.
  const int64_t num_vecs = (args.vocab * elem + 15) / 16;
  const int64_t wanted = (num_vecs + kUnroll - 1) / kUnroll;
  const int threads = static_cast<int>(
      std::min<int64_t>(kMaxThreads, std::max<int64_t>(kWarpSize, (wanted + kWarpSize - 1) / kWarpSize * kWarpSize)));
  const dim3 grid(static_cast<unsigned>(args.batch));
  auto* cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  cudaGetLastError();  // drop a stale error of an earlier runtime call, so the check below is this launch's

  switch (args.dtype) {
    case kFloat32:
      verify_greedy_kernel<float><<<grid, threads, 0, cuda_stream>>>(args);
      break;
    case kFloat16:
      verify_greedy_kernel<__half><<<grid, threads, 0, cuda_stream>>>(args);
      break;
    case kBFloat16:
      verify_greedy_kernel<__nv_bfloat16><<<grid, threads, 0, cuda_stream>>>(args);
      break;
  }
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return std::string("verify_greedy: ") + cudaGetErrorString(err);
  return "";
}

int cuda_device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear it, or the next launch's error check would report it
    return 0;
  }
  return count;
}

int cuda_runtime_version() { return CUDART_VERSION; }

}  // namespace effdecode
