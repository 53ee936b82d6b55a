// Rotate-half RoPE as transformers' Llama computes it, with the layout change attention wants in the same pass.
//
// Forward:  out = x·cos + rotate_half(x)·sin,   rotate_half(x) = [−x2, x1]  (x1, x2 the halves of head_dim)
// Backward: dx  = g·cos − rotate_half(g)·sin    (the inverse rotation: the forward with sin negated)
// cos and sin of `position · inv_freq[i]` are computed in f32 and rounded to T, each product is rounded to T and
// so is the sum — the roundings of transformers' bf16/f16 tensor ops; in f32 it is plain f32 math.
//
// One thread per (row, token, pair i): it computes its cos/sin once and rotates the pair (i, i + half) of every
// head. Input and output are both addressed by (row, token, head) strides with contiguous head_dim, so the forward
// reads a strided [rows, tokens, heads, d] view (a narrow of a fused q|k|v projection) and writes contiguous
// [rows, heads, tokens, d], and the backward does the reverse. Consecutive threads take consecutive pairs, then
// consecutive tokens: for one head a warp reads and writes whole head_dim runs.
#include "common.cuh"

// A product never contracted into an FMA with the sum that follows, so the f32 result is the unfused one
// transformers gets. (A helper of this op only: common.cuh has no such shim.)
KTO_DEVICE float unfused_mul(float a, float b) {
#if defined(__CUDACC__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

// SIN_SIGN = +1 rotates forward, −1 backward.
template <typename T, int SIN_SIGN>
KTO_DEVICE void rope_rotate(const T* __restrict__ input, const unsigned* __restrict__ positions,
                            const float* __restrict__ inv_freq, T* __restrict__ out, int rows, int tokens, int heads,
                            int head_dim, int in_row_stride, int in_token_stride, int in_head_stride,
                            int out_row_stride, int out_token_stride, int out_head_stride) {
  const int half = head_dim / 2;
  const size_t pairs = size_t(rows) * size_t(tokens) * size_t(half);
  const size_t index = size_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index < pairs) {
    const int i = int(index % size_t(half));
    const size_t row_token = index / size_t(half);  // row · tokens + token: the index into positions
    const int token = int(row_token % size_t(tokens));
    const int row = int(row_token / size_t(tokens));
    const float angle = float(positions[row_token]) * inv_freq[i];
    const float c = round_to<T>(cosf(angle));
    const float s = float(SIN_SIGN) * round_to<T>(sinf(angle));
    const T* src = input + size_t(row) * in_row_stride + size_t(token) * in_token_stride + i;
    T* dst = out + size_t(row) * out_row_stride + size_t(token) * out_token_stride + i;
#pragma unroll 4
    for (int h = 0; h < heads; ++h) {
      const float a = to_f32(src[size_t(h) * in_head_stride]);
      const float b = to_f32(src[size_t(h) * in_head_stride + half]);
      dst[size_t(h) * out_head_stride] = from_f32<T>(round_to<T>(unfused_mul(a, c)) - round_to<T>(unfused_mul(b, s)));
      dst[size_t(h) * out_head_stride + half] =
          from_f32<T>(round_to<T>(unfused_mul(b, c)) + round_to<T>(unfused_mul(a, s)));
    }
  }
}

#define ROPE_ENTRY(T, suffix, direction, sign)                                                                      \
  KTO_GLOBAL void rope_##direction##_##suffix(const T* input, const unsigned* positions, const float* inv_freq,     \
                                              T* out, int rows, int tokens, int heads, int head_dim,                 \
                                              int in_row_stride, int in_token_stride, int in_head_stride,           \
                                              int out_row_stride, int out_token_stride, int out_head_stride) {      \
    rope_rotate<T, sign>(input, positions, inv_freq, out, rows, tokens, heads, head_dim, in_row_stride,             \
                         in_token_stride, in_head_stride, out_row_stride, out_token_stride, out_head_stride);       \
  }                                                                                                                 \
  KTO_EXPORT(rope_##direction##_##suffix)

#define ROPE_ENTRIES(T, suffix) \
  ROPE_ENTRY(T, suffix, fwd, 1) \
  ROPE_ENTRY(T, suffix, bwd, -1)

ROPE_ENTRIES(float, f32)
ROPE_ENTRIES(bf16, bf16)
ROPE_ENTRIES(f16, f16)
