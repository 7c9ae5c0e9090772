// GEMV for decode: y[r][j] = sum_k x[r][k] * W[j][k] (+ bias[j]) for up to
// GEMV_MAX_ROWS activation rows at once (each weight row is read once for
// all of them). W is row-major [n][k] in its stored dtype; the arithmetic is
// f32 on every architecture (on sm_60/61 this is the fast path: P40's fp16
// rate is 1/64). One warp per output row; with k % 8 == 0 every lane reads
// 16 bytes of weights per step (8 halves / two float4), then a warp shuffle
// reduction.
#define GEMV_MAX_ROWS 8

// One warp's output row `row` of y = x·Wᵀ (+ bias) for m activation rows.
template <typename W>
__device__ void gemv_row(const float* __restrict__ x, const W* __restrict__ w,
                         const float* __restrict__ bias, float* __restrict__ y, int m, int n, int k,
                         int row) {
  int lane = threadIdx.x & 31;
  const W* wr = w + (size_t)row * k;
  float acc[GEMV_MAX_ROWS];
#pragma unroll
  for (int r = 0; r < GEMV_MAX_ROWS; ++r) acc[r] = 0.0f;
  if ((k & 7) == 0) {
    int kk = lane * 8;
    // Unrolled by two: both 16-byte weight loads are issued before the
    // FMAs use either, so each lane keeps 32 bytes in flight. The
    // accumulation order is the plain loop's (kk, then kk + 256).
    for (; kk + 256 < k; kk += 512) {
      float w0[8], w1[8];
      ld8(wr + kk, w0);
      ld8(wr + kk + 256, w1);
#pragma unroll
      for (int r = 0; r < GEMV_MAX_ROWS; ++r) {
        if (r < m) {
          float x0[8], x1[8];
          ld8(x + (size_t)r * k + kk, x0);
          ld8(x + (size_t)r * k + kk + 256, x1);
#pragma unroll
          for (int j = 0; j < 8; ++j) acc[r] = fmaf(x0[j], w0[j], acc[r]);
#pragma unroll
          for (int j = 0; j < 8; ++j) acc[r] = fmaf(x1[j], w1[j], acc[r]);
        }
      }
    }
    if (kk < k) {
      float wv[8];
      ld8(wr + kk, wv);
#pragma unroll
      for (int r = 0; r < GEMV_MAX_ROWS; ++r) {
        if (r < m) {
          float xv[8];
          ld8(x + (size_t)r * k + kk, xv);
#pragma unroll
          for (int j = 0; j < 8; ++j) acc[r] = fmaf(xv[j], wv[j], acc[r]);
        }
      }
    }
  } else {
    for (int kk = lane; kk < k; kk += 32) {
      float wv = ld1(wr, kk);
#pragma unroll
      for (int r = 0; r < GEMV_MAX_ROWS; ++r)
        if (r < m) acc[r] = fmaf(x[(size_t)r * k + kk], wv, acc[r]);
    }
  }
#pragma unroll
  for (int r = 0; r < GEMV_MAX_ROWS; ++r) acc[r] = warp_sum(acc[r]);
  if (lane == 0) {
    float b = bias ? bias[row] : 0.0f;
#pragma unroll
    for (int r = 0; r < GEMV_MAX_ROWS; ++r)
      if (r < m) y[(size_t)r * n + row] = acc[r] + b;
  }
}

template <typename W>
__device__ void gemv(const float* __restrict__ x, const W* __restrict__ w,
                     const float* __restrict__ bias, float* __restrict__ y, int m, int n, int k) {
  int row = (int)((blockIdx.x * (size_t)blockDim.x + threadIdx.x) >> 5);
  if (row >= n) return;
  gemv_row(x, w, bias, y, m, n, k, row);
}

// Up to three projections of the same activations in one launch (decode's
// q/k/v, or gate/up with n2 = 0): warps [0, n0) compute y0 from w0, the
// next n1 warps y1 from w1, the next n2 y2 from w2, each row exactly as
// gemv does. One launch instead of three, and the activations are read
// while still in L1/L2.
template <typename W>
__device__ void gemv3(const float* __restrict__ x, const W* w0, const float* b0, float* y0, int n0,
                      const W* w1, const float* b1, float* y1, int n1, const W* w2,
                      const float* b2, float* y2, int n2, int m, int k) {
  int row = (int)((blockIdx.x * (size_t)blockDim.x + threadIdx.x) >> 5);
  if (row < n0) {
    gemv_row(x, w0, b0, y0, m, n0, k, row);
  } else if (row - n0 < n1) {
    gemv_row(x, w1, b1, y1, m, n1, k, row - n0);
  } else if (row - n0 - n1 < n2) {
    gemv_row(x, w2, b2, y2, m, n2, k, row - n0 - n1);
  }
}

#define GEMV3_ENTRY(SUFFIX, W)                                                                  \
  extern "C" __global__ void gemv3_##SUFFIX(const float* x, const W* w0, const float* b0,      \
                                            float* y0, int n0, const W* w1, const float* b1,   \
                                            float* y1, int n1, const W* w2, const float* b2,   \
                                            float* y2, int n2, int m, int k) {                 \
    gemv3(x, w0, b0, y0, n0, w1, b1, y1, n1, w2, b2, y2, n2, m, k);                            \
  }
GEMV3_ENTRY(f32, float)
GEMV3_ENTRY(f16, h16)
GEMV3_ENTRY(bf16, b16)

extern "C" __global__ void gemv_f32(const float* x, const float* w, const float* bias, float* y, int m, int n, int k) {
  gemv(x, w, bias, y, m, n, k);
}
extern "C" __global__ void gemv_f16(const float* x, const h16* w, const float* bias, float* y, int m, int n, int k) {
  gemv(x, w, bias, y, m, n, k);
}
extern "C" __global__ void gemv_bf16(const float* x, const b16* w, const float* bias, float* y, int m, int n, int k) {
  gemv(x, w, bias, y, m, n, k);
}

// Int8 weights (one f32 scale per output row) times an int8-quantized
// activation row (one scale): y[j] = xscale * wscale[j] * sum xq*wq. Uses
// __dp4a on sm_61+ (4 multiply-adds per instruction); on sm_60 the same sum
// unpacked. For quantized checkpoints (not loaded yet); k % 4 == 0.
extern "C" __global__ void gemv_q8(const int* __restrict__ xq, float xscale, const int* __restrict__ wq,
                                   const float* __restrict__ wscale, float* __restrict__ y, int n, int k) {
  int row = (int)((blockIdx.x * (size_t)blockDim.x + threadIdx.x) >> 5);
  int lane = threadIdx.x & 31;
  if (row >= n) return;
  int words = k / 4;
  const int* wr = wq + (size_t)row * words;
  int acc = 0;
  for (int i = lane; i < words; i += 32) acc = dot4_i8(xq[i], wr[i], acc);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  if (lane == 0) y[row] = (float)acc * xscale * wscale[row];
}

// ---- GGUF Q8_0 blocks --------------------------------------------------------
// A Q8_0 weight row of k values is k/32 blocks of 34 bytes: an f16 scale,
// then 32 int8. The product is llama.cpp's (and the CPU backend's,
// src/cpu/matmul/qdot.rs): the activations are quantized per 32 values to
// int8 with an f16-rounded scale, each block contributes an exact integer
// dot product times (weight scale · activation scale), and the f32 sum over
// blocks is the only rounding that differs from the CPU (its order). The
// activations are quantized by the lane that uses them, so the kernel has
// gemv_f16's signature and needs no scratch buffer (a decode graph captures
// it as it is).

// llama.cpp's quantize_row_q8_0 on one block of 32 activations: d = amax /
// 127, q = round(x / d) with the unrounded reciprocal, four int8 per int;
// returns the scale rounded to f16 (as an f32), as the CPU stores it.
__device__ __forceinline__ float quant_block_q8_0(const float* __restrict__ x, int* q) {
  float v[32];
#pragma unroll
  for (int j = 0; j < 32; j += 8) ld8(x + j, v + j);
  float amax = 0.0f;
#pragma unroll
  for (int j = 0; j < 32; ++j) amax = fmaxf(amax, fabsf(v[j]));
  float d = amax / 127.0f;
  float id = d != 0.0f ? 1.0f / d : 0.0f;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    unsigned int w = 0;
#pragma unroll
    for (int b = 0; b < 4; ++b)
      w |= (unsigned int)(unsigned char)(signed char)roundf(v[4 * j + b] * id) << (8 * b);
    q[j] = (int)w;
  }
  return __half2float(__float2half_rn(d));
}

// Four int8 of a Q8_0 block as one int for dot4_i8. Blocks are 34 bytes,
// so their quants are only 2-byte aligned: two 16-bit loads.
__device__ __forceinline__ int ld_q8x4(const unsigned char* p) {
  const unsigned short* s = reinterpret_cast<const unsigned short*>(p);
  return (int)((unsigned int)s[0] | ((unsigned int)s[1] << 16));
}

// One warp's output row of y = x·Wᵀ (+ bias) for Q8_0 weights, m <=
// GEMV_MAX_ROWS rows, k % 32 == 0. Lane l takes blocks l, l + 32, …: it
// quantizes each activation row's block and sums dot4_i8 (__dp4a on sm_61
// and newer, unpacked bytes on sm_60) times the two scales.
__device__ void gemv_row_q8_0(const float* __restrict__ x, const unsigned char* __restrict__ w,
                              const float* __restrict__ bias, float* __restrict__ y, int m, int n,
                              int k, int row) {
  int lane = threadIdx.x & 31;
  int nb = k >> 5;
  const unsigned char* wr = w + (size_t)row * nb * 34;
  float acc[GEMV_MAX_ROWS];
#pragma unroll
  for (int r = 0; r < GEMV_MAX_ROWS; ++r) acc[r] = 0.0f;
  for (int b = lane; b < nb; b += 32) {
    const unsigned char* blk = wr + (size_t)b * 34;
    float wd = __half2float(__ushort_as_half(*reinterpret_cast<const unsigned short*>(blk)));
    int wv[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) wv[j] = ld_q8x4(blk + 2 + 4 * j);
#pragma unroll
    for (int r = 0; r < GEMV_MAX_ROWS; ++r) {
      if (r < m) {
        int xv[8];
        float xd = quant_block_q8_0(x + (size_t)r * k + (size_t)b * 32, xv);
        int s = 0;
#pragma unroll
        for (int j = 0; j < 8; ++j) s = dot4_i8(xv[j], wv[j], s);
        acc[r] += (float)s * (wd * xd);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < GEMV_MAX_ROWS; ++r) acc[r] = warp_sum(acc[r]);
  if (lane == 0) {
    float bv = bias ? bias[row] : 0.0f;
#pragma unroll
    for (int r = 0; r < GEMV_MAX_ROWS; ++r)
      if (r < m) y[(size_t)r * n + row] = acc[r] + bv;
  }
}

extern "C" __global__ void gemv_q8_0(const float* __restrict__ x, const unsigned char* __restrict__ w,
                                     const float* __restrict__ bias, float* __restrict__ y, int m,
                                     int n, int k) {
  int row = (int)((blockIdx.x * (size_t)blockDim.x + threadIdx.x) >> 5);
  if (row >= n) return;
  gemv_row_q8_0(x, w, bias, y, m, n, k, row);
}

// gemv3 for Q8_0 weights (decode's q/k/v, gate/up), each row as gemv_q8_0.
extern "C" __global__ void gemv3_q8_0(const float* x, const unsigned char* w0, const float* b0,
                                      float* y0, int n0, const unsigned char* w1, const float* b1,
                                      float* y1, int n1, const unsigned char* w2, const float* b2,
                                      float* y2, int n2, int m, int k) {
  int row = (int)((blockIdx.x * (size_t)blockDim.x + threadIdx.x) >> 5);
  if (row < n0) {
    gemv_row_q8_0(x, w0, b0, y0, m, n0, k, row);
  } else if (row - n0 < n1) {
    gemv_row_q8_0(x, w1, b1, y1, m, n1, k, row - n0);
  } else if (row - n0 - n1 < n2) {
    gemv_row_q8_0(x, w2, b2, y2, m, n2, k, row - n0 - n1);
  }
}

// Q8_0 blocks to f16 for the prefill GEMMs (cuBLAS): element i of n is
// f16(scale · q), the CPU's dequantized f32 value rounded once. One thread
// per element.
extern "C" __global__ void dequant_q8_0_f16(const unsigned char* __restrict__ w, h16* __restrict__ y,
                                            size_t n) {
  size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
  if (i >= n) return;
  const unsigned char* blk = w + (i >> 5) * 34;
  float d = __half2float(__ushort_as_half(*reinterpret_cast<const unsigned short*>(blk)));
  st1(y, i, d * (float)(signed char)blk[2 + (i & 31)]);
}
