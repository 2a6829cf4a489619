// Decode attention on the CPU over each row's own cache length (effdecode::cpu_decode_attention).
//
// One query column per row (a plain decode step), grouped-query heads, keys and values read in place from
// the slot cache: row b attends to the first lens[b] entries of slot rows[b]. A compiled step's inline
// attention reads its whole KV bucket for every row instead; with rows of different lengths (continuous
// batching, static batches whose rows finished at different steps) that is up to twice the bytes, and at
// decode sizes attention on a CPU is bound by those bytes.
//
// Built at first use by inductor's C++ code cache (the compiler and flags torch.compile uses on this
// machine), called through ctypes: no build step at install time.

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace {

using at::vec::Vectorized;

// query, out: [batch, kv_heads, group, dim] contiguous. Entry (slot, head, j) of a cache starts at
// slot * slot_stride + head * head_stride + j * dim (dim contiguous). softcap > 0 caps the scaled logits
// (softcap * tanh(logit / softcap)); window > 0 keeps the last `window` entries of a row (a sliding window
// ending at the query); sinks, if not null, holds a logit per query head ([kv_heads * group]) that joins
// each softmax with no value behind it.
template <typename T>
void decode_attention(const T* query, const T* key_cache, const T* value_cache, const int32_t* rows,
                      const int32_t* lens, T* out, int64_t batch, int64_t kv_heads, int64_t group,
                      int64_t dim, int64_t slot_stride, int64_t head_stride, double scale, double softcap,
                      int64_t window, const T* sinks, int threads) {
  using Vec = Vectorized<T>;
  const int64_t width = Vec::size();
  const T scale_t = static_cast<T>(scale);
  const T cap = static_cast<T>(softcap);
#pragma omp parallel for num_threads(threads) collapse(2) schedule(static)
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t h = 0; h < kv_heads; ++h) {
      const int64_t first = window > 0 && lens[b] > window ? lens[b] - window : 0;
      const int64_t len = lens[b] - first;  // entries first .. lens[b] - 1
      const int64_t base = rows[b] * slot_stride + h * head_stride + first * dim;
      const T* keys = key_cache + base;
      const T* values = value_cache + base;
      const T* q = query + (b * kv_heads + h) * group * dim;
      T* result = out + (b * kv_heads + h) * group * dim;
      for (int64_t i = 0; i < group * dim; ++i) result[i] = T(0);
      if (len <= 0) continue;  // a padding row's unused slot: nothing to attend (its output is dropped)
      std::vector<T> scores(len * group);
      // Scores: each key row is read once for the group's queries.
      for (int64_t j = 0; j < len; ++j) {
        const T* key = keys + j * dim;
        for (int64_t g = 0; g < group; ++g) {
          const T* qg = q + g * dim;
          Vec acc(T(0));
          int64_t d = 0;
          for (; d + width <= dim; d += width) acc = at::vec::fmadd(Vec::loadu(qg + d), Vec::loadu(key + d), acc);
          T dot = at::vec::vec_reduce_all<T>([](Vec& x, Vec& y) { return x + y; }, acc);
          for (; d < dim; ++d) dot += qg[d] * key[d];
          dot *= scale_t;
          scores[g * len + j] = cap > T(0) ? cap * std::tanh(dot / cap) : dot;
        }
      }
      // Softmax per query, then the weighted sum of the values.
      for (int64_t g = 0; g < group; ++g) {
        T* s = scores.data() + g * len;
        T best = at::vec::reduce_all<T>([](Vec& x, Vec& y) { return at::vec::maximum(x, y); }, s, len);
        const T sink = sinks != nullptr ? sinks[h * group + g] : T(0);
        if (sinks != nullptr && sink > best) best = sink;
        at::vec::map([best](Vec x) { return (x - Vec(best)).exp(); }, s, s, len);
        T total = at::vec::reduce_all<T>([](Vec& x, Vec& y) { return x + y; }, s, len);
        if (sinks != nullptr) total += std::exp(sink - best);
        T* r = result + g * dim;
        for (int64_t j = 0; j < len; ++j) {
          const T* value = values + j * dim;
          const T weight = s[j] / total;
          int64_t d = 0;
          for (; d + width <= dim; d += width)
            at::vec::fmadd(Vec(weight), Vec::loadu(value + d), Vec::loadu(r + d)).store(r + d);
          for (; d < dim; ++d) r[d] += weight * value[d];
        }
      }
    }
  }
}

}  // namespace

#define EFFDECODE_DECODE_ATTENTION(NAME, T)                                                              \
  extern "C" void NAME(const T* query, const T* key_cache, const T* value_cache, const int32_t* rows,     \
                       const int32_t* lens, T* out, int64_t batch, int64_t kv_heads, int64_t group,      \
                       int64_t dim, int64_t slot_stride, int64_t head_stride, double scale,              \
                       double softcap, int64_t window, const T* sinks, int threads) {                    \
    decode_attention<T>(query, key_cache, value_cache, rows, lens, out, batch, kv_heads, group, dim,     \
                        slot_stride, head_stride, scale, softcap, window, sinks, threads);               \
  }

EFFDECODE_DECODE_ATTENTION(effdecode_decode_attention_f32, float)
EFFDECODE_DECODE_ATTENTION(effdecode_decode_attention_f64, double)
