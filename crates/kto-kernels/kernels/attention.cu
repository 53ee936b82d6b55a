// The attention softmax: each score row is one query against every key, and the query sees only the keys of its
// range [first, end) in `key_ranges` ([batch rows, queries, 2] u32); the others get probability 0, and a query that
// sees nothing gets a row of zeros. Score row r belongs to batch row r / batch_rows and to query r % queries (GQA
// stacks the n_rep query heads of a KV head as n_rep blocks of `queries` rows).
//
// Launch shapes: short rows take one warp each (`rows_per_block` warps per block, warp reductions, no barrier);
// long rows take a whole block (`rows_per_block` = 1, block reductions). The choice is uniform over a block.
#include "common.cuh"

// The lowest finite float: a running maximum that starts here never makes exp(m − x) a NaN.
#define KTO_LOWEST_FLOAT (-3.402823466e+38f)

template <bool WARP>
KTO_DEVICE float row_sum(float v, float* scratch) {
  if constexpr (WARP) return warp_sum(v);
  else return block_sum(v, scratch);
}

template <bool WARP>
KTO_DEVICE float row_max(float v, float* scratch) {
  if constexpr (WARP) return warp_max(v);
  else return block_max(v, scratch);
}

// p = softmax over [first, end) of scale · s, computed in f32 with the maximum subtracted; 0 outside.
// `lane` / `threads`: this thread's place among the threads sharing the row.
template <typename T, bool WARP>
KTO_DEVICE void softmax_row(const T* __restrict__ scores, const unsigned* __restrict__ key_ranges,
                            T* __restrict__ probs, int row, int lane, int threads, int batch_rows, int queries,
                            int keys, float scale, float* scratch) {
  const T* s = scores + size_t(row) * keys;
  T* p = probs + size_t(row) * keys;
  const unsigned* range = key_ranges + (size_t(row / batch_rows) * queries + row % queries) * 2;
  const int end = int(min(range[1], unsigned(keys)));
  const int first = int(min(range[0], unsigned(end)));
  // Online softmax: one pass gives this thread's maximum m and Σ exp(x − m) over its keys.
  float m = KTO_LOWEST_FLOAT, sum = 0.f;
  for (int k = first + lane; k < end; k += threads) {
    const float x = scale * to_f32(s[k]);
    if (x > m) {
      sum = sum * __expf(m - x) + 1.f;
      m = x;
    } else {
      sum += __expf(x - m);
    }
  }
  const float top = row_max<WARP>(m, scratch);
  // Rescaled to the row's maximum; a thread without visible keys contributes 0 · exp(lowest − top) = 0.
  const float inv_total = 1.f / row_sum<WARP>(sum * __expf(m - top), scratch);
  for (int k = lane; k < keys; k += threads) {
    float v = 0.f;
    if (k >= first && k < end) v = __expf(scale * to_f32(s[k]) - top) * inv_total;
    p[k] = from_f32<T>(v);
  }
}

// dS = scale · P ⊙ (dP − Σ dP ⊙ P): keys outside the range have P = 0 and get 0.
template <typename T, bool WARP>
KTO_DEVICE void softmax_backward_row(const T* __restrict__ probs, const T* __restrict__ grad,
                                     T* __restrict__ grad_scores, int row, int lane, int threads, int keys,
                                     float scale, float* scratch) {
  const T* p = probs + size_t(row) * keys;
  const T* g = grad + size_t(row) * keys;
  T* d = grad_scores + size_t(row) * keys;
  float dot = 0.f;
  for (int k = lane; k < keys; k += threads) dot += to_f32(p[k]) * to_f32(g[k]);
  dot = row_sum<WARP>(dot, scratch);
  for (int k = lane; k < keys; k += threads) d[k] = from_f32<T>(scale * to_f32(p[k]) * (to_f32(g[k]) - dot));
}

template <typename T>
KTO_DEVICE void masked_softmax_fwd(const T* __restrict__ scores, const unsigned* __restrict__ key_ranges,
                                   T* __restrict__ probs, int rows, int batch_rows, int queries, int keys,
                                   float scale, int rows_per_block) {
  KTO_SHARED(float, scratch, 32);
  if (rows_per_block == 1) {
    softmax_row<T, false>(scores, key_ranges, probs, blockIdx.x, threadIdx.x, blockDim.x, batch_rows, queries,
                          keys, scale, scratch);
  } else {
    const int row = blockIdx.x * rows_per_block + int(threadIdx.x >> 5);
    if (row < rows)  // the whole warp agrees: its shuffles stay full-mask
      softmax_row<T, true>(scores, key_ranges, probs, row, threadIdx.x & 31, 32, batch_rows, queries, keys, scale,
                           scratch);
  }
}

template <typename T>
KTO_DEVICE void masked_softmax_bwd(const T* __restrict__ probs, const T* __restrict__ grad,
                                   T* __restrict__ grad_scores, int rows, int keys, float scale, int rows_per_block) {
  KTO_SHARED(float, scratch, 32);
  if (rows_per_block == 1) {
    softmax_backward_row<T, false>(probs, grad, grad_scores, blockIdx.x, threadIdx.x, blockDim.x, keys, scale,
                                   scratch);
  } else {
    const int row = blockIdx.x * rows_per_block + int(threadIdx.x >> 5);
    if (row < rows) softmax_backward_row<T, true>(probs, grad, grad_scores, row, threadIdx.x & 31, 32, keys, scale,
                                                  scratch);
  }
}

#define ATTENTION_ENTRIES(T, suffix)                                                                               \
  KTO_GLOBAL void masked_softmax_fwd_##suffix(const T* scores, const unsigned* key_ranges, T* probs, int rows,     \
                                              int batch_rows, int queries, int keys, float scale,                  \
                                              int rows_per_block) {                                                \
    masked_softmax_fwd<T>(scores, key_ranges, probs, rows, batch_rows, queries, keys, scale, rows_per_block);      \
  }                                                                                                                \
  KTO_GLOBAL void masked_softmax_bwd_##suffix(const T* probs, const T* grad, T* grad_scores, int rows, int keys,   \
                                              float scale, int rows_per_block) {                                   \
    masked_softmax_bwd<T>(probs, grad, grad_scores, rows, keys, scale, rows_per_block);                            \
  }                                                                                                                \
  KTO_EXPORT(masked_softmax_fwd_##suffix)                                                                          \
  KTO_EXPORT(masked_softmax_bwd_##suffix)

ATTENTION_ENTRIES(float, f32)
ATTENTION_ENTRIES(bf16, bf16)
ATTENTION_ENTRIES(f16, f16)
