// Host-side interface between the nvcc-compiled kernels and the pybind11 bindings.
//
// Plain C++ only (no CUDA or torch headers), so bindings.cpp builds with the host compiler alone. Tensors
// cross as raw device pointers and element strides; the CUDA stream as its handle cast to an integer.
#pragma once

#include <cstdint>
#include <string>

namespace effdecode {

// Logits dtypes the kernels are instantiated for; the Python wrapper maps torch dtypes onto these codes.
enum DTypeCode : int {
  kFloat32 = 0,
  kFloat16 = 1,
  kBFloat16 = 2,
};

// Greedy speculative verification, one batch. See effdecode/ops/verify.py for the semantics.
struct VerifyGreedyArgs {
  const void* logits;            // [batch, num_cols, vocab], last dim contiguous
  int64_t logits_stride_b;       // in elements
  int64_t logits_stride_t;       // in elements
  const int64_t* input_ids;      // [batch, num_cols]
  int64_t input_ids_stride_b;    // in elements
  int64_t input_ids_stride_t;    // in elements
  const int32_t* q_lens;         // [batch], contiguous
  const uint8_t* finished;       // [batch] torch.bool, contiguous
  const int64_t* eos_token_ids;  // [num_eos], contiguous (may be null when num_eos == 0)
  int32_t* num_emitted;          // [batch] out
  int64_t* emitted;              // [batch, num_cols] out, contiguous
  uint8_t* finished_out;         // [batch] out (may alias `finished`)
  int64_t batch;
  int64_t num_cols;
  int64_t vocab;
  int64_t num_eos;
  int dtype;                     // DTypeCode
};

// Enqueues the kernel on `stream` without synchronizing. Returns "" on success, else the error text.
std::string verify_greedy_launch(const VerifyGreedyArgs& args, uintptr_t stream);

// Number of visible CUDA devices; 0 where there is no driver or device (never throws).
int cuda_device_count();

// CUDART_VERSION the extension was compiled against (e.g. 13000); needs no driver.
int cuda_runtime_version();

}  // namespace effdecode
