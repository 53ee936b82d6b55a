// SwiGLU over one fused gate/up projection: out = silu(gate) · up, with gate the first and up the second half of
// each row of `gate_up` [rows, 2·inner]. Rounded as transformers does it in bf16/f16: silu in f32 rounded to the
// dtype (torch's silu on a bf16 tensor), then the product of the two dtype values in f32, rounded once more.
//
// Purely elementwise, so a 2D grid: blockIdx.x·blockDim.x + threadIdx.x is the column, blockIdx.y strides over the
// rows (gridDim.y is capped: MAX_ROW_BLOCKS in swiglu.rs). No division per element; consecutive threads touch
// consecutive columns.
#include "common.cuh"

// Internal linkage: the emulation links every kernel file into one library, where a same-named inline helper of
// another op would silently replace these.
namespace {

// σ(x) = 1 / (1 + e^−x): e^−x overflows to inf for x < −88, which gives σ = 0 (not NaN), as the limit wants.
KTO_DEVICE float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }

// The same expression as torch's silu kernel (and the CPU twin), so f32 results agree to the last bit in emulation.
KTO_DEVICE float silu(float x) { return x / (1.f + expf(-x)); }

template <typename T>
KTO_DEVICE void swiglu_fwd(const T* __restrict__ gate_up, T* __restrict__ out, int rows, int inner) {
  const unsigned col = blockIdx.x * blockDim.x + threadIdx.x;
  if (col < unsigned(inner)) {
    for (size_t row = blockIdx.y; row < size_t(rows); row += gridDim.y) {
      const T* in = gate_up + row * 2 * size_t(inner);
      const float gate = to_f32(in[col]);
      const float up = to_f32(in[size_t(inner) + col]);
      out[row * size_t(inner) + col] = from_f32<T>(round_to<T>(silu(gate)) * up);
    }
  }
}

// d gate = g · up · σ(gate) · (1 + gate · (1 − σ(gate))),  d up = g · silu(gate)   (f32 math, one rounding each)
template <typename T>
KTO_DEVICE void swiglu_bwd(const T* __restrict__ gate_up, const T* __restrict__ grad, T* __restrict__ d_gate_up,
                           int rows, int inner) {
  const unsigned col = blockIdx.x * blockDim.x + threadIdx.x;
  if (col < unsigned(inner)) {
    for (size_t row = blockIdx.y; row < size_t(rows); row += gridDim.y) {
      const size_t at = row * 2 * size_t(inner) + col;
      const float gate = to_f32(gate_up[at]);
      const float up = to_f32(gate_up[at + size_t(inner)]);
      const float g = to_f32(grad[row * size_t(inner) + col]);
      const float s = sigmoid(gate);
      d_gate_up[at] = from_f32<T>(g * up * s * (1.f + gate * (1.f - s)));
      d_gate_up[at + size_t(inner)] = from_f32<T>(g * (gate * s));
    }
  }
}

}  // namespace

#define SWIGLU_ENTRIES(T, suffix)                                                                                \
  KTO_GLOBAL void swiglu_fwd_##suffix(const T* gate_up, T* out, int rows, int inner) {                          \
    swiglu_fwd<T>(gate_up, out, rows, inner);                                                                    \
  }                                                                                                              \
  KTO_GLOBAL void swiglu_bwd_##suffix(const T* gate_up, const T* grad, T* d_gate_up, int rows, int inner) {      \
    swiglu_bwd<T>(gate_up, grad, d_gate_up, rows, inner);                                                        \
  }                                                                                                              \
  KTO_EXPORT(swiglu_fwd_##suffix)                                                                                \
  KTO_EXPORT(swiglu_bwd_##suffix)

SWIGLU_ENTRIES(float, f32)
SWIGLU_ENTRIES(bf16, bf16)
SWIGLU_ENTRIES(f16, f16)
