// RMSNorm as transformers' LlamaRMSNorm computes it: in f32, `x * rsqrt(mean(x²) + eps)` rounded to the input
// dtype, then times the (frozen) weight. One block per row; the threads stride over the row.
#include "common.cuh"

// y = w · round(x · rstd),  rstd = 1 / sqrt(mean(x²) + eps)
template <typename T>
KTO_DEVICE void rmsnorm_fwd(const T* __restrict__ x, const T* __restrict__ weight, T* __restrict__ y, int rows,
                            int dim, float eps) {
  KTO_SHARED(float, scratch, 32);
  const int row = blockIdx.x;
  const T* xr = x + size_t(row) * dim;
  T* yr = y + size_t(row) * dim;
  float squares = 0.f;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) {
    float v = to_f32(xr[i]);
    squares += v * v;
  }
  const float rstd = rsqrtf(block_sum(squares, scratch) / float(dim) + eps);
  for (int i = threadIdx.x; i < dim; i += blockDim.x)
    yr[i] = from_f32<T>(to_f32(weight[i]) * round_to<T>(to_f32(xr[i]) * rstd));
}

// dx = rstd · (g' − n · mean(g' · n)),  g' = g · w,  n = x · rstd   (the weight takes no gradient)
template <typename T>
KTO_DEVICE void rmsnorm_bwd(const T* __restrict__ x, const T* __restrict__ weight, const T* __restrict__ grad,
                            T* __restrict__ dx, int rows, int dim, float eps) {
  KTO_SHARED(float, scratch, 32);
  const int row = blockIdx.x;
  const T* xr = x + size_t(row) * dim;
  const T* gr = grad + size_t(row) * dim;
  T* dr = dx + size_t(row) * dim;
  float squares = 0.f, dot = 0.f;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) {
    float v = to_f32(xr[i]);
    squares += v * v;
    dot += to_f32(gr[i]) * to_f32(weight[i]) * v;
  }
  const float rstd = rsqrtf(block_sum(squares, scratch) / float(dim) + eps);
  // mean(g' · n) = rstd · Σ g'·x / dim
  const float mean_gn = block_sum(dot, scratch) * rstd / float(dim);
  for (int i = threadIdx.x; i < dim; i += blockDim.x) {
    float g = to_f32(gr[i]) * to_f32(weight[i]);
    float n = to_f32(xr[i]) * rstd;
    dr[i] = from_f32<T>(rstd * (g - n * mean_gn));
  }
}

#define RMSNORM_ENTRIES(T, suffix)                                                                               \
  KTO_GLOBAL void rmsnorm_fwd_##suffix(const T* x, const T* weight, T* y, int rows, int dim, float eps) {        \
    rmsnorm_fwd<T>(x, weight, y, rows, dim, eps);                                                                \
  }                                                                                                              \
  KTO_GLOBAL void rmsnorm_bwd_##suffix(const T* x, const T* weight, const T* grad, T* dx, int rows, int dim,     \
                                       float eps) {                                                              \
    rmsnorm_bwd<T>(x, weight, grad, dx, rows, dim, eps);                                                         \
  }                                                                                                              \
  KTO_EXPORT(rmsnorm_fwd_##suffix)                                                                               \
  KTO_EXPORT(rmsnorm_bwd_##suffix)

RMSNORM_ENTRIES(float, f32)
RMSNORM_ENTRIES(bf16, bf16)
RMSNORM_ENTRIES(f16, f16)
