// AdamW over every trainable tensor in one launch, and the sum of squares of every gradient in one launch.
//
// Both kernels read a descriptor table in global memory: one row of u64 words per (non-empty) tensor,
//   adamw:      [numel, first_block, param, grad, exp_avg, exp_avg_sq]
//   grad_sumsq: [numel, first_block, grad]
// Tensor t owns the blocks first_block .. first_block + ceil(numel / chunk); block b updates elements
// [(b − first_block) · chunk, … + chunk) of its tensor, so tiny and large tensors share one grid.
#include "common.cuh"

#if !defined(__CUDACC__)
// The emulation must round every product and sum like the GPU's _rn intrinsics: no fused multiply-adds.
#pragma STDC FP_CONTRACT OFF
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#endif
#endif

namespace adamw_kernels {

// IEEE f32 operations, each rounded to nearest: nvcc would otherwise fuse `a * b + c` into one FMA, and the update
// must round exactly where the stock optimizer (one candle op per step, testing/stock_adamw.rs) rounds.
#if defined(__CUDACC__)
KTO_DEVICE float mul(float a, float b) { return __fmul_rn(a, b); }
KTO_DEVICE float add(float a, float b) { return __fadd_rn(a, b); }
KTO_DEVICE float sub(float a, float b) { return __fsub_rn(a, b); }
KTO_DEVICE float div(float a, float b) { return __fdiv_rn(a, b); }
#else
KTO_DEVICE float mul(float a, float b) { return a * b; }
KTO_DEVICE float add(float a, float b) { return a + b; }
KTO_DEVICE float sub(float a, float b) { return a - b; }
KTO_DEVICE float div(float a, float b) { return a / b; }
#endif

// candle's `affine(x, mul, 0.0)`: `x · mul + 0` (the `+ 0` turns −0 into +0, so it stays).
KTO_DEVICE float scale(float x, float s) { return add(mul(x, s), 0.0f); }

// The row of the tensor that owns `block`: the last row whose first block is ≤ block (rows are in block order).
KTO_DEVICE const unsigned long long* owner(const unsigned long long* table, int stride, int rows, unsigned block) {
  int lo = 0, hi = rows - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (table[size_t(mid) * stride + 1] <= block)
      lo = mid;
    else
      hi = mid - 1;
  }
  return table + size_t(lo) * stride;
}

template <typename T>
KTO_DEVICE T* address(unsigned long long word) {
  return reinterpret_cast<T*>(static_cast<uintptr_t>(word));
}

}  // namespace adamw_kernels

// One AdamW step (torch's single-tensor AdamW, in the stock optimizer's op order), elementwise:
//   g = g · grad_scale                          (clip_grad_norm_'s `mul_`)
//   p = p · decay                               (only if weight_decay ≠ 0)
//   m = lerp(m, g, 1 − β1)                      (from the start or the end, as torch picks by the weight)
//   v = v · β2 + (g · (1 − β2)) · g
//   p = p + (m · −step_size) / (sqrt(v) / sqrt(bias_correction2) + eps)
KTO_GLOBAL void adamw_f32(const unsigned long long* table, int tensors, int chunk, float grad_scale, int apply_decay,
                          float decay, int lerp_from_end, float lerp_weight, float beta2, float one_minus_beta2,
                          float bias_correction2_sqrt, float eps, float neg_step_size) {
  using namespace adamw_kernels;
  const unsigned long long* row = owner(table, 6, tensors, blockIdx.x);
  const size_t numel = row[0];
  const size_t start = size_t(blockIdx.x - row[1]) * size_t(chunk);
  const size_t end = start + size_t(chunk) < numel ? start + size_t(chunk) : numel;
  float* __restrict__ param = address<float>(row[2]);
  const float* __restrict__ grad = address<const float>(row[3]);
  float* __restrict__ exp_avg = address<float>(row[4]);
  float* __restrict__ exp_avg_sq = address<float>(row[5]);
  for (size_t i = start + threadIdx.x; i < end; i += blockDim.x) {
    const float g = scale(grad[i], grad_scale);
    float p = param[i];
    if (apply_decay) p = scale(p, decay);
    float m = exp_avg[i];
    const float step = scale(sub(g, m), lerp_weight);
    m = lerp_from_end ? sub(g, step) : add(m, step);
    const float v = add(scale(exp_avg_sq[i], beta2), mul(scale(g, one_minus_beta2), g));
    // `affine(1, eps)` multiplies by one, which changes nothing: only the `+ eps` remains.
    const float denom = add(div(__fsqrt_rn(v), bias_correction2_sqrt), eps);
    param[i] = add(p, div(scale(m, neg_step_size), denom));
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
  }
}
KTO_EXPORT(adamw_f32)

// Σ g² over each block's chunk of its tensor, accumulated in f32, one partial per block: the host adds a tensor's
// partials in block order (f64), so the result does not depend on scheduling.
KTO_GLOBAL void grad_sumsq_f32(const unsigned long long* table, int tensors, int chunk, float* partials) {
  using namespace adamw_kernels;
  KTO_SHARED(float, scratch, 32);
  const unsigned long long* row = owner(table, 3, tensors, blockIdx.x);
  const size_t numel = row[0];
  const size_t start = size_t(blockIdx.x - row[1]) * size_t(chunk);
  const size_t end = start + size_t(chunk) < numel ? start + size_t(chunk) : numel;
  const float* __restrict__ grad = address<const float>(row[2]);
  float squares = 0.f;
  for (size_t i = start + threadIdx.x; i < end; i += blockDim.x) {
    const float g = grad[i];
    squares += g * g;
  }
  const float total = block_sum(squares, scratch);
  if (threadIdx.x == 0) partials[blockIdx.x] = total;
}
KTO_EXPORT(grad_sumsq_f32)
