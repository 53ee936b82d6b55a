// The portable subset every kernel of this crate is written in.
//
// Under nvcc this header maps to CUDA and adds nothing. Compiled as plain C++ with KTO_SIMT_EMULATION (the test
// builds), it maps the same names to the fiber runtime in ../emulation/runtime.cpp: the threads of a block run one at
// a time between synchronisation points, in ascending or descending order, so a missing barrier or a read before
// the write it needs gives different results in the two orders instead of depending on luck.
//
// The subset: warp size 32; `__syncthreads`, `__syncwarp`, `__shfl_{sync,xor_sync,down_sync,up_sync}`,
// `__ballot_sync`/`__any_sync`/`__all_sync`; `__shared__` arrays and KTO_DYNAMIC_SHARED; atomics on global memory;
// `__nv_bfloat16`/`__half` through their conversion functions only; no inline asm; every kernel an
// `extern "C"` entry declared with KTO_GLOBAL and listed with KTO_EXPORT. A barrier must be reached by every thread of
// the block (no early return before one): the emulation reports a divergent barrier as an error.
#pragma once

#if defined(__CUDACC__)

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#define KTO_DEVICE __device__ __forceinline__
#define KTO_GLOBAL extern "C" __global__
// Dynamic shared memory as a typed pointer (one extern array for every type: nvcc requires a single declaration).
#define KTO_DYNAMIC_SHARED(T, name)                                    \
  extern __shared__ __align__(16) unsigned char kto_dynamic_shared_[]; \
  T* name = reinterpret_cast<T*>(kto_dynamic_shared_)
#define KTO_EXPORT(name)
// Static shared memory: `KTO_SHARED(float, scratch, 32);` is `__shared__ float scratch[32];` (a pointer under the
// emulation, which poisons it at each block start like dynamic shared memory).
#define KTO_SHARED(T, name, count) __shared__ T name[count]

#else  // CPU emulation

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#define KTO_DEVICE inline
#define KTO_GLOBAL extern "C"
#define __device__
#define __global__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __launch_bounds__(...)
// Static shared memory is declared with KTO_SHARED: the block's own bytes, poisoned (0xff: NaN / -1) at each block
// start, so a read before the write that should precede it in the same block, or a value left by the previous
// block, shows. A plain `__shared__` declaration does not compile here.
#define __shared__ _Pragma("GCC error \"declare static shared memory with KTO_SHARED(T, name, count)\"")
#define KTO_SHARED(T, name, count)                  \
  static const char kto_shared_site_##name = 0;     \
  T* name = static_cast<T*>(::simt::static_shared(&kto_shared_site_##name, sizeof(T) * size_t(count)))

struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace simt {
const uint3& thread_idx();
const uint3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();
void* dynamic_shared();
// The running block's static shared array declared at `site` (one per KTO_SHARED declaration and instantiation).
void* static_shared(const void* site, size_t bytes);
void syncthreads(const char* file, int line);
// Deposits `value` for the lanes in `mask`, waits until all of them have, and returns the 32 deposited values.
const uint64_t* warp_exchange(unsigned mask, uint64_t value, const char* file, int line);
unsigned lane();
[[noreturn]] void trap(const char* file, int line);
}  // namespace simt

#define threadIdx (::simt::thread_idx())
#define blockIdx (::simt::block_idx())
#define blockDim (::simt::block_dim())
#define gridDim (::simt::grid_dim())
#define warpSize 32
#define KTO_DYNAMIC_SHARED(T, name) T* name = reinterpret_cast<T*>(::simt::dynamic_shared())

inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::simt::syncthreads(file, line);
}
inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(),
                       int line = __builtin_LINE()) {
  ::simt::warp_exchange(mask, 0, file, line);
}
inline void __threadfence() {}
inline void __threadfence_block() {}
[[noreturn]] inline void __trap(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::simt::trap(file, line);
}

namespace simt {
template <typename T>
inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8, "warp exchange of at most 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <typename T>
inline T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}
// CUDA's rule: a lane reading outside its `width`-lane segment gets its own value.
template <typename T>
inline T shuffle(unsigned mask, T v, int src_in_segment, bool own, int width, const char* file, int line) {
  const uint64_t* slots = warp_exchange(mask, to_bits(v), file, line);
  unsigned me = lane();
  if (own) return v;
  unsigned base = me & ~unsigned(width - 1);
  unsigned src = base + (unsigned(src_in_segment) & unsigned(width - 1));
  if (!(mask >> src & 1u)) trap(file, line);  // reading a lane that does not take part: undefined in CUDA
  return from_bits<T>(slots[src]);
}
}  // namespace simt

template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32, const char* file = __builtin_FILE(),
                     int line = __builtin_LINE()) {
  return ::simt::shuffle(mask, v, src, false, width, file, line);
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32, const char* file = __builtin_FILE(),
                         int line = __builtin_LINE()) {
  unsigned me = ::simt::lane() & unsigned(width - 1);
  unsigned src = me ^ unsigned(lane_mask);
  return ::simt::shuffle(mask, v, int(src), src >= unsigned(width), width, file, line);
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32, const char* file = __builtin_FILE(),
                          int line = __builtin_LINE()) {
  unsigned me = ::simt::lane() & unsigned(width - 1);
  return ::simt::shuffle(mask, v, int(me + delta), me + delta >= unsigned(width), width, file, line);
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32, const char* file = __builtin_FILE(),
                        int line = __builtin_LINE()) {
  unsigned me = ::simt::lane() & unsigned(width - 1);
  return ::simt::shuffle(mask, v, int(me - delta), me < delta, width, file, line);
}
inline unsigned __ballot_sync(unsigned mask, int pred, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
  const uint64_t* slots = ::simt::warp_exchange(mask, pred ? 1 : 0, file, line);
  unsigned bits = 0;
  for (unsigned l = 0; l < 32; ++l)
    if ((mask >> l & 1u) && slots[l]) bits |= 1u << l;
  return bits;
}
inline int __any_sync(unsigned mask, int pred, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return __ballot_sync(mask, pred, file, line) != 0;
}
inline int __all_sync(unsigned mask, int pred, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return __ballot_sync(mask, pred, file, line) == mask;
}

// Atomics: the fibers of a launch share one OS thread and switch only at synchronisation points, so a plain
// read-modify-write is atomic here.
template <typename T>
inline T atomicAdd(T* p, T v) {
  T old = *p;
  *p = old + v;
  return old;
}
template <typename T>
inline T atomicMax(T* p, T v) {
  T old = *p;
  if (v > old) *p = v;
  return old;
}
template <typename T>
inline T atomicMin(T* p, T v) {
  T old = *p;
  if (v < old) *p = v;
  return old;
}
template <typename T>
inline T atomicExch(T* p, T v) {
  T old = *p;
  *p = v;
  return old;
}
template <typename T>
inline T atomicCAS(T* p, T compare, T v) {
  T old = *p;
  if (old == compare) *p = v;
  return old;
}

// Device math with the names CUDA gives it.
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
inline void __sincosf(float x, float* s, float* c) { ::sincosf(x, s, c); }
inline unsigned __float_as_uint(float x) { return ::simt::from_bits<unsigned>(::simt::to_bits(x)); }
inline float __uint_as_float(unsigned x) { return ::simt::from_bits<float>(::simt::to_bits(x)); }
inline int __float_as_int(float x) { return ::simt::from_bits<int>(::simt::to_bits(x)); }
inline float __int_as_float(int x) { return ::simt::from_bits<float>(::simt::to_bits(x)); }
template <typename T>
inline T __ldg(const T* p) { return *p; }
template <typename T>
inline T min(T a, T b) { return b < a ? b : a; }
template <typename T>
inline T max(T a, T b) { return a < b ? b : a; }

// bfloat16 and half: storage types with CUDA's conversion functions (round to nearest even).
struct __nv_bfloat16 {
  uint16_t bits;
};
struct __half {
  uint16_t bits;
};

inline float __bfloat162float(__nv_bfloat16 h) {
  return __uint_as_float(uint32_t(h.bits) << 16);
}
inline __nv_bfloat16 __float2bfloat16(float f) {
  uint32_t u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{uint16_t((u >> 16) | 0x0040u)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return __nv_bfloat16{uint16_t(u >> 16)};
}
inline float __half2float(__half h) {
  uint32_t sign = uint32_t(h.bits & 0x8000u) << 16;
  uint32_t exp = (h.bits >> 10) & 0x1fu;
  uint32_t mant = h.bits & 0x3ffu;
  if (exp == 0x1f) return __uint_as_float(sign | 0x7f800000u | (mant << 13));
  if (exp == 0) {
    float m = std::ldexp(float(mant), -24);  // subnormal (or zero)
    return sign ? -m : m;
  }
  return __uint_as_float(sign | ((exp + 112u) << 23) | (mant << 13));
}
inline __half __float2half(float f) {
  uint32_t x = __float_as_uint(f);
  uint16_t sign = uint16_t((x >> 16) & 0x8000u);
  uint32_t exp = (x >> 23) & 0xffu;
  uint32_t mant = x & 0x7fffffu;
  if (exp == 0xff) return __half{uint16_t(sign | 0x7c00u | (mant ? 0x200u | (mant >> 13) : 0u))};
  int e = int(exp) - 127 + 15;
  if (e >= 31) return __half{uint16_t(sign | 0x7c00u)};
  if (e <= 0) {  // a half subnormal, or zero
    if (e < -10) return __half{sign};
    mant |= 0x800000u;
    unsigned shift = unsigned(14 - e);
    uint32_t m = mant >> shift, rest = mant & ((1u << shift) - 1u), halfway = 1u << (shift - 1u);
    if (rest > halfway || (rest == halfway && (m & 1u))) ++m;
    return __half{uint16_t(sign | m)};
  }
  uint32_t h = uint32_t(sign) | (uint32_t(e) << 10) | (mant >> 13);
  uint32_t rest = mant & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // a carry into the exponent is still right
  return __half{uint16_t(h)};
}

// Kernel entries as the Rust side calls them: each KTO_EXPORT(name) adds
//   kto_simt_entry_<name>(void** args)       — the kernel with its arguments unpacked from `args` (cuLaunchKernel's form)
//   kto_simt_signature_<name>(int*, int)     — the kind of each parameter, so every launch is checked against it
namespace simt {
enum ParamKind { KIND_PTR = 0, KIND_I32 = 1, KIND_U32 = 2, KIND_F32 = 3, KIND_I64 = 4, KIND_U64 = 5, KIND_F64 = 6 };
template <typename T>
struct kind_of;
template <typename T>
struct kind_of<T*> { static constexpr int value = KIND_PTR; };
template <>
struct kind_of<int> { static constexpr int value = KIND_I32; };
template <>
struct kind_of<unsigned> { static constexpr int value = KIND_U32; };
template <>
struct kind_of<float> { static constexpr int value = KIND_F32; };
template <>
struct kind_of<long long> { static constexpr int value = KIND_I64; };
template <>
struct kind_of<long> { static constexpr int value = KIND_I64; };
template <>
struct kind_of<unsigned long long> { static constexpr int value = KIND_U64; };
template <>
struct kind_of<unsigned long> { static constexpr int value = KIND_U64; };
template <>
struct kind_of<double> { static constexpr int value = KIND_F64; };

template <typename... A, std::size_t... I>
inline void invoke(void (*f)(A...), void** args, std::index_sequence<I...>) {
  f(*static_cast<std::remove_cv_t<std::remove_reference_t<A>>*>(args[I])...);
}
template <typename... A>
inline void invoke(void (*f)(A...), void** args) {
  invoke(f, args, std::index_sequence_for<A...>{});
}
template <typename... A>
inline int signature(void (*)(A...), int* kinds, int max) {
  const int all[] = {kind_of<std::remove_cv_t<A>>::value..., -1};
  int n = int(sizeof...(A));
  for (int i = 0; i < n && i < max; ++i) kinds[i] = all[i];
  return n;
}
}  // namespace simt

#define KTO_EXPORT(name)                                                                          \
  extern "C" void kto_simt_entry_##name(void** args) { ::simt::invoke(name, args); }              \
  extern "C" int kto_simt_signature_##name(int* kinds, int max) {                                 \
    return ::simt::signature(name, kinds, max);                                                   \
  }

#endif
