// Completion log-probs over the vocabulary, straight from the LM head's logits [rows, vocab] in their own dtype:
// per row log p(target), the softmax entropy and the mean logit (TRL's `entropy` and `logits/*` metrics), and the
// gradient of log p(target). No [rows × vocab] f32 tensor exists at any point.
#include "common.cuh"

KTO_DEVICE float quiet_nan() { return __int_as_float(0x7fc00000); }
KTO_DEVICE float minus_infinity() { return __int_as_float(int(0xff800000u)); }

// The softmax sums of a set of logits, relative to their largest one m (-inf while the set is empty):
//   s = Σ exp(x − m),  t = Σ exp(x − m)·(x − m).
// Then lse = m + log s and the entropy lse − Σ p·x = log s − t/s; keeping t relative to m avoids the cancellation
// of lse − Σ p·x when the logits are large and the entropy small.
struct SoftmaxSums {
  float m, s, t;
};

// Re-expresses sums kept relative to `from` relative to the larger `to`: s·f and f·(t + (from − to)·s),
// f = exp(from − to). An empty set (from = -inf) or one that underflows contributes nothing (no 0·inf).
KTO_DEVICE void rebase(float from, float to, float s, float t, float& s_out, float& t_out) {
  const float d = from - to;
  const float f = __expf(d);
  s_out = s * f;
  t_out = f == 0.f ? 0.f : f * (t + d * s);
}

// Adds one logit. A -inf logit contributes nothing (a masked entry); a NaN reaches s and so every result.
KTO_DEVICE void absorb(SoftmaxSums& a, float x) {
  if (x == minus_infinity()) return;
  if (x > a.m) {  // a new maximum: what came before is rescaled (rare after the first few elements)
    rebase(a.m, x, a.s, a.t, a.s, a.t);
    a.s += 1.f;
    a.m = x;
  } else {
    const float d = x - a.m;
    const float e = __expf(d);
    a.s += e;
    a.t += e * d;
  }
}

// The union of two sets. Symmetric in its arguments, so both lanes of a butterfly get the same bits.
KTO_DEVICE SoftmaxSums merge(SoftmaxSums a, SoftmaxSums b) {
  SoftmaxSums r;
  r.m = fmaxf(a.m, b.m);
  if (r.m == minus_infinity()) {  // both empty
    r.s = 0.f;
    r.t = 0.f;
    return r;
  }
  float sa, ta, sb, tb;
  rebase(a.m, r.m, a.s, a.t, sa, ta);
  rebase(b.m, r.m, b.s, b.t, sb, tb);
  r.s = sa + sb;
  r.t = ta + tb;
  return r;
}

KTO_DEVICE SoftmaxSums warp_merge(SoftmaxSums v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    SoftmaxSums other;
    other.m = __shfl_xor_sync(0xffffffffu, v.m, offset);
    other.s = __shfl_xor_sync(0xffffffffu, v.s, offset);
    other.t = __shfl_xor_sync(0xffffffffu, v.t, offset);
    v = merge(v, other);
  }
  return v;
}

// One block per row (blockDim.x whole warps, ≤ 1024): each thread folds a strided slice of the row into its sums in
// one pass, warps merge by butterfly, then thread 0 merges the warps in index order (deterministic) and writes
//   stats[row] = (logp = x_t − lse, entropy = lse − Σ p·x, mean logit = Σ x / vocab, lse).
// An out-of-range target makes the whole row NaN (the host checks where it can; nothing is read out of bounds).
template <typename T>
KTO_DEVICE void logprob_fwd(const T* __restrict__ logits, const unsigned* __restrict__ targets,
                            float* __restrict__ stats, int rows, int vocab) {
  KTO_SHARED(float, part_m, 32);
  KTO_SHARED(float, part_s, 32);
  KTO_SHARED(float, part_t, 32);
  KTO_SHARED(float, part_sum, 32);
  const int row = blockIdx.x;
  const T* xr = logits + size_t(row) * vocab;
  const int stride = blockDim.x;
  SoftmaxSums sums = {minus_infinity(), 0.f, 0.f};
  float sum = 0.f;
  int i = threadIdx.x;
  // Four loads in flight per thread, then the remainder.
  for (; i + 3 * stride < vocab; i += 4 * stride) {
    const float x0 = to_f32(xr[i]), x1 = to_f32(xr[i + stride]);
    const float x2 = to_f32(xr[i + 2 * stride]), x3 = to_f32(xr[i + 3 * stride]);
    absorb(sums, x0);
    absorb(sums, x1);
    absorb(sums, x2);
    absorb(sums, x3);
    sum += (x0 + x1) + (x2 + x3);
  }
  for (; i < vocab; i += stride) {
    const float x = to_f32(xr[i]);
    absorb(sums, x);
    sum += x;
  }
  sums = warp_merge(sums);
  sum = warp_sum(sum);
  const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
  if (lane == 0) {
    part_m[warp] = sums.m;
    part_s[warp] = sums.s;
    part_t[warp] = sums.t;
    part_sum[warp] = sum;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    SoftmaxSums total = {part_m[0], part_s[0], part_t[0]};
    float row_sum = part_sum[0];
    for (unsigned w = 1; w < (blockDim.x >> 5); ++w) {
      SoftmaxSums part = {part_m[w], part_s[w], part_t[w]};
      total = merge(total, part);
      row_sum += part_sum[w];
    }
    const unsigned target = targets[row];
    const float log_s = logf(total.s);
    const float lse = total.m + log_s;
    float* out = stats + size_t(row) * 4;
    if (target < unsigned(vocab)) {
      out[0] = to_f32(xr[target]) - lse;
      out[1] = log_s - total.t / total.s;
      out[2] = row_sum / float(vocab);
      out[3] = lse;
    } else {
      out[0] = out[1] = out[2] = out[3] = quiet_nan();
    }
  }
}

// Elements per thread of the backward (a block covers blockDim.x · 4 consecutive columns of one row).
#define LOGPROB_BWD_ELEMENTS 4

// d logits = g · (onehot(target) − exp(x − lse)), in the logits' dtype. Grid (rows, column blocks): elementwise,
// so short batches still fill the GPU. An out-of-range target makes the row NaN, as in the forward.
template <typename T>
KTO_DEVICE void logprob_bwd(const T* __restrict__ logits, const unsigned* __restrict__ targets,
                            const float* __restrict__ lse, const float* __restrict__ grad, T* __restrict__ dlogits,
                            int rows, int vocab) {
  const int row = blockIdx.x;
  const size_t base = size_t(row) * vocab;
  const unsigned target = targets[row];
  const float l = lse[row], g = grad[row];
  const bool valid = target < unsigned(vocab);
  const int first = blockIdx.y * (blockDim.x * LOGPROB_BWD_ELEMENTS) + threadIdx.x;
#pragma unroll
  for (int k = 0; k < LOGPROB_BWD_ELEMENTS; ++k) {
    const int i = first + k * blockDim.x;
    if (i < vocab) {
      const float p = __expf(to_f32(logits[base + i]) - l);
      const float onehot = unsigned(i) == target ? 1.f : 0.f;
      dlogits[base + i] = from_f32<T>(valid ? g * (onehot - p) : quiet_nan());
    }
  }
}

#define LOGPROB_ENTRIES(T, suffix)                                                                               \
  KTO_GLOBAL void logprob_fwd_##suffix(const T* logits, const unsigned* targets, float* stats, int rows,         \
                                       int vocab) {                                                              \
    logprob_fwd<T>(logits, targets, stats, rows, vocab);                                                         \
  }                                                                                                              \
  KTO_GLOBAL void logprob_bwd_##suffix(const T* logits, const unsigned* targets, const float* lse,              \
                                       const float* grad, T* dlogits, int rows, int vocab) {                     \
    logprob_bwd<T>(logits, targets, lse, grad, dlogits, rows, vocab);                                            \
  }                                                                                                              \
  KTO_EXPORT(logprob_fwd_##suffix)                                                                               \
  KTO_EXPORT(logprob_bwd_##suffix)

LOGPROB_ENTRIES(float, f32)
LOGPROB_ENTRIES(bf16, bf16)
LOGPROB_ENTRIES(f16, f16)
