// Kernels that exist to test the emulation harness itself (tests/harness.rs): each correct kernel has a broken twin
// with one classic bug, and the harness must catch every bug. Compiled in emulation builds only (build.rs).
#include "common.cuh"

// Σx and Σx² of one row per block, with two block reductions sharing one scratch buffer.
KTO_GLOBAL void harness_two_sums_f32(const float* x, float* out, int dim) {
  KTO_SHARED(float, scratch, 32);
  const float* row = x + size_t(blockIdx.x) * dim;
  float s = 0.f, q = 0.f;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) {
    s += row[i];
    q += row[i] * row[i];
  }
  s = block_sum(s, scratch);
  q = block_sum(q, scratch);
  if (threadIdx.x == 0) {
    out[2 * blockIdx.x] = s;
    out[2 * blockIdx.x + 1] = q;
  }
}

// Bug: the reduction lacks its closing barrier, so a warp that runs ahead overwrites the scratch with the second sum
// while slower warps still read the first.
KTO_DEVICE float block_sum_missing_barrier(float v, float* scratch) {
  const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = 0.f;
  for (unsigned w = 0; w < (blockDim.x >> 5); ++w) total += scratch[w];
  return total;
}

KTO_GLOBAL void harness_two_sums_missing_barrier_f32(const float* x, float* out, int dim) {
  KTO_SHARED(float, scratch, 32);
  const float* row = x + size_t(blockIdx.x) * dim;
  float s = 0.f, q = 0.f;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) {
    s += row[i];
    q += row[i] * row[i];
  }
  s = block_sum_missing_barrier(s, scratch);
  q = block_sum_missing_barrier(q, scratch);
  if (threadIdx.x == 0) {
    out[2 * blockIdx.x] = s;
    out[2 * blockIdx.x + 1] = q;
  }
}

// Bug: `<=` instead of `<` reads one element past each row (the next row's first; past the buffer for the last).
KTO_GLOBAL void harness_two_sums_off_by_one_f32(const float* x, float* out, int dim) {
  KTO_SHARED(float, scratch, 32);
  const float* row = x + size_t(blockIdx.x) * dim;
  float s = 0.f, q = 0.f;
  for (int i = threadIdx.x; i <= dim; i += blockDim.x) {
    s += row[i];
    q += row[i] * row[i];
  }
  s = block_sum(s, scratch);
  q = block_sum(q, scratch);
  if (threadIdx.x == 0) {
    out[2 * blockIdx.x] = s;
    out[2 * blockIdx.x + 1] = q;
  }
}

// Each lane of a warp swaps values with its neighbour through shared memory: `sync` = 0 leaves out the __syncwarp
// between the write and the read of another lane's slot.
KTO_GLOBAL void harness_neighbour_swap_f32(const float* x, float* out, int sync) {
  KTO_DYNAMIC_SHARED(float, slots);
  const unsigned t = threadIdx.x;
  slots[t] = x[blockIdx.x * blockDim.x + t];
  if (sync) __syncwarp();
  out[blockIdx.x * blockDim.x + t] = slots[t ^ 1u];
}

// Bug: only the first warp reaches the barrier; the others exit.
KTO_GLOBAL void harness_divergent_barrier_f32(float* out) {
  if (threadIdx.x < 32) {
    __syncthreads();
    out[threadIdx.x] = 1.f;
  }
}

// Bug: the two halves of the block wait at different barriers.
KTO_GLOBAL void harness_split_barrier_f32(float* out) {
  if (threadIdx.x < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.f;
}

// Bug: lane 0 returns before the warp shuffle its neighbours need it for.
KTO_GLOBAL void harness_shuffle_after_exit_f32(float* out) {
  float v = float(threadIdx.x);
  if (threadIdx.x != 0) {
    v = warp_sum(v);
    out[threadIdx.x] = v;
  }
}

// Bug: only block 0 writes the static shared value every block reads. On a GPU each block has its own shared
// memory, so the other blocks read garbage (on the emulation: the 0xff poison, NaN), never block 0's value.
KTO_GLOBAL void harness_shared_from_another_block_f32(float* out) {
  KTO_SHARED(float, value, 1);
  if (blockIdx.x == 0 && threadIdx.x == 0) value[0] = 7.f;
  __syncthreads();
  if (threadIdx.x == 0) out[blockIdx.x] = value[0];
}

KTO_EXPORT(harness_two_sums_f32)
KTO_EXPORT(harness_shared_from_another_block_f32)
KTO_EXPORT(harness_two_sums_missing_barrier_f32)
KTO_EXPORT(harness_two_sums_off_by_one_f32)
KTO_EXPORT(harness_neighbour_swap_f32)
KTO_EXPORT(harness_divergent_barrier_f32)
KTO_EXPORT(harness_split_barrier_f32)
KTO_EXPORT(harness_shuffle_after_exit_f32)
