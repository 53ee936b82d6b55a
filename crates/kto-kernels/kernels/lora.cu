// LoRA epilogue: out = round(base + scale · h · Bᵀ) over [rows, cols], with h = x·Aᵀ [rows, segments·rank] and
// B [cols, rank] in f32, the rank-term dot products accumulated in f32 and one rounding to the base dtype (PEFT's
// `result + lora_B(lora_A(x)) * scaling`, summed in f32, without the [rows, cols] f32 delta in memory).
//
// Segments let one launch finish a fused projection (q|k|v) whose adapters share one x·Aᵀ GEMM: output column n
// belongs to the last segment s whose start is ≤ n and uses h[:, s·rank .. (s+1)·rank]. At most four segments; the
// starts of segments 1..3 come as arguments (`cols` for those that do not exist).
//
// A block computes a 64×64 output tile with 256 threads; thread (tx, ty) = (t % 16, t / 16) owns rows ty + 16·i and
// columns tx + 16·j (i, j < 4): consecutive threads touch consecutive columns, so the base loads and output stores
// coalesce. The tile's B rows and h rows sit in shared memory transposed ([k][tile index], padded by one word) so
// that the inner loop reads consecutive words across a warp and the loads that fill them do not collide on a bank.
#include "common.cuh"

constexpr int kTileRows = 64;
constexpr int kTileCols = 64;
constexpr int kThreadsAcross = 16;  // threads along the columns of a tile (and along its rows)
constexpr int kPerThread = 4;       // rows and columns per thread: 4 × 4 outputs
constexpr int kPaddedRows = kTileRows + 1;
constexpr int kPaddedCols = kTileCols + 1;
constexpr int kRankChunk = 64;   // rank steps held in the shared tiles at once

KTO_DEVICE int segment_of(int n, int start1, int start2, int start3) {
  return int(n >= start1) + int(n >= start2) + int(n >= start3);
}

// Dynamic shared memory: min(rank, 64) · (65 + 65) floats. A rank above 64 is taken in chunks of 64 through the same
// tiles, summed into one accumulator per output in ascending k (the twin's order), so any rank fits the tiles.
template <typename T>
KTO_DEVICE void lora_epilogue(const T* __restrict__ base, const float* __restrict__ h, const float* __restrict__ b,
                              T* __restrict__ out, int rows, int cols, int rank, int segments, int start1,
                              int start2, int start3, float scale) {
  KTO_DYNAMIC_SHARED(float, shared);
  const int chunk = min(rank, kRankChunk);
  float* h_tile = shared;                          // h_tile[k · 65 + i] = h[row0 + i, seg · rank + k0 + k]
  float* b_tile = shared + chunk * kPaddedRows;    // b_tile[k · 65 + c] = B[col0 + c, k0 + k]
  const int row0 = blockIdx.x * kTileRows, col0 = blockIdx.y * kTileCols;
  const int tx = threadIdx.x % kThreadsAcross, ty = threadIdx.x / kThreadsAcross;
  const size_t h_stride = size_t(segments) * rank;

  int col_segment[kPerThread];
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) {
    const int n = col0 + tx + kThreadsAcross * j;
    col_segment[j] = n < cols ? segment_of(n, start1, start2, start3) : -1;
  }
  float acc[kPerThread][kPerThread];
#pragma unroll
  for (int i = 0; i < kPerThread; ++i)
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) acc[i][j] = 0.f;

  // One pass per segment the tile's columns touch (almost always one); every thread takes every pass.
  const int last_col = min(col0 + kTileCols, cols) - 1;
  const int first_seg = segment_of(col0, start1, start2, start3);
  const int last_seg = segment_of(last_col, start1, start2, start3);
  for (int seg = first_seg; seg <= last_seg; ++seg) {
    float part[kPerThread][kPerThread];
#pragma unroll
    for (int i = 0; i < kPerThread; ++i)
#pragma unroll
      for (int j = 0; j < kPerThread; ++j) part[i][j] = 0.f;
    for (int k0 = 0; k0 < rank; k0 += chunk) {
      const int width = min(chunk, rank - k0);
      __syncthreads();  // the previous chunk (or pass) no longer reads the tiles
      for (int i = threadIdx.x; i < kTileCols * width; i += blockDim.x) {
        const int c = i / width, k = i % width, n = col0 + c;
        b_tile[k * kPaddedCols + c] = n < cols ? b[size_t(n) * rank + k0 + k] : 0.f;
      }
      for (int i = threadIdx.x; i < kTileRows * width; i += blockDim.x) {
        const int r = i / width, k = i % width, m = row0 + r;
        h_tile[k * kPaddedRows + r] = m < rows ? h[size_t(m) * h_stride + size_t(seg) * rank + k0 + k] : 0.f;
      }
      __syncthreads();
      for (int k = 0; k < width; ++k) {
        float hv[kPerThread], bv[kPerThread];
#pragma unroll
        for (int i = 0; i < kPerThread; ++i) hv[i] = h_tile[k * kPaddedRows + ty + kThreadsAcross * i];
#pragma unroll
        for (int j = 0; j < kPerThread; ++j) bv[j] = b_tile[k * kPaddedCols + tx + kThreadsAcross * j];
#pragma unroll
        for (int i = 0; i < kPerThread; ++i)
#pragma unroll
          for (int j = 0; j < kPerThread; ++j) part[i][j] += hv[i] * bv[j];
      }
    }
    // Keep the sums of the columns in this segment (the others used the wrong h and are dropped).
#pragma unroll
    for (int j = 0; j < kPerThread; ++j)
      if (col_segment[j] == seg)
#pragma unroll
        for (int i = 0; i < kPerThread; ++i) acc[i][j] = part[i][j];
  }

#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int m = row0 + ty + kThreadsAcross * i;
    if (m < rows) {
#pragma unroll
      for (int j = 0; j < kPerThread; ++j) {
        const int n = col0 + tx + kThreadsAcross * j;
        if (n < cols) {
          const size_t at = size_t(m) * cols + n;
          out[at] = from_f32<T>(to_f32(base[at]) + scale * acc[i][j]);
        }
      }
    }
  }
}

#define LORA_ENTRIES(T, suffix)                                                                                  \
  KTO_GLOBAL void lora_epilogue_##suffix(const T* base, const float* h, const float* b, T* out, int rows,        \
                                         int cols, int rank, int segments, int start1, int start2, int start3,   \
                                         float scale) {                                                          \
    lora_epilogue<T>(base, h, b, out, rows, cols, rank, segments, start1, start2, start3, scale);                \
  }                                                                                                              \
  KTO_EXPORT(lora_epilogue_##suffix)

LORA_ENTRIES(float, f32)
LORA_ENTRIES(bf16, bf16)
LORA_ENTRIES(f16, f16)
