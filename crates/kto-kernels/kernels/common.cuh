// Helpers shared by the kernels: element conversion (all arithmetic in f32) and warp/block reductions.
#pragma once
#include "simt.hpp"

typedef __nv_bfloat16 bf16;
typedef __half f16;

template <typename T>
KTO_DEVICE float to_f32(T v);
template <>
KTO_DEVICE float to_f32<float>(float v) { return v; }
template <>
KTO_DEVICE float to_f32<bf16>(bf16 v) { return __bfloat162float(v); }
template <>
KTO_DEVICE float to_f32<f16>(f16 v) { return __half2float(v); }

template <typename T>
KTO_DEVICE T from_f32(float v);
template <>
KTO_DEVICE float from_f32<float>(float v) { return v; }
template <>
KTO_DEVICE bf16 from_f32<bf16>(float v) { return __float2bfloat16(v); }
template <>
KTO_DEVICE f16 from_f32<f16>(float v) { return __float2half(v); }

// `v` rounded to T and back: the value a tensor of dtype T would hold.
template <typename T>
KTO_DEVICE float round_to(float v) { return to_f32<T>(from_f32<T>(v)); }

KTO_DEVICE float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

KTO_DEVICE float warp_max(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Sum over the block, returned to every thread. blockDim.x a multiple of 32 (≤ 1024), blockDim.y = blockDim.z = 1.
// `scratch` holds 32 floats of shared memory; every thread of the block must call it (it holds barriers).
KTO_DEVICE float block_sum(float v, float* scratch) {
  const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  const unsigned warps = blockDim.x >> 5;
  float total = 0.f;
  for (unsigned w = 0; w < warps; ++w) total += scratch[w];  // the same order in every thread: one result
  __syncthreads();  // the scratch may be reused by the next reduction
  return total;
}

KTO_DEVICE float block_max(float v, float* scratch) {
  const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
  v = warp_max(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  const unsigned warps = blockDim.x >> 5;
  float m = scratch[0];
  for (unsigned w = 1; w < warps; ++w) m = fmaxf(m, scratch[w]);
  __syncthreads();
  return m;
}
