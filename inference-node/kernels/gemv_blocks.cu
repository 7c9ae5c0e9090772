// GEMV and f16 dequantization on GGUF Q4_0, Q4_K, Q5_K and Q6_K blocks
// (Q8_0 is in gemv.cu), as the CPU backend computes them
// (src/cpu/matmul/qdot.rs, llama.cpp's vec_dot): each activation row is
// quantized to 8 bits per block (Q8_0's 32 values with an f16-rounded scale
// against Q4_0; Q8_K's 256 values with an f32 scale against the K-quants),
// every weight block contributes an exact integer dot product times its
// scales, and the f32 sum over blocks runs in block order.
//
// One warp per output row; the warp takes 256 values of k at a time, eight
// consecutive values per lane (one K-quant block, or eight Q4_0 blocks of
// four lanes each). Each lane quantizes its eight activations (the scale
// needs the block's maximum: a shuffle reduction over the block's lanes),
// unpacks its eight weights to bytes and takes dot4_i8 (__dp4a on sm_61 and
// newer, bytes on sm_60). The integer sums are reduced over the block's
// lanes (exact), the per-block float products are formed with __fmul_rn
// (no FMA contraction, as the CPU's Rust does not contract), and added to
// the row's sum one block after another. So a row's result has the CPU's
// bits and never depends on the other rows of the batch. No scratch buffer:
// a decode graph captures the kernels as they are.
#define QB_MAX_ROWS 8

// Four bytes at a 2-byte aligned address (Q4_0 and Q6_K blocks, 18 and 210
// bytes, are only 2-byte aligned).
__device__ __forceinline__ unsigned int ld_u32_a2(const unsigned char* p) {
  const unsigned short* s = reinterpret_cast<const unsigned short*>(p);
  return (unsigned int)s[0] | ((unsigned int)s[1] << 16);
}

__device__ __forceinline__ float ld_f16_at(const unsigned char* p) {
  return __half2float(__ushort_as_half(*reinterpret_cast<const unsigned short*>(p)));
}

// Eight int8 packed into two ints.
__device__ __forceinline__ void pack8(const int* q, int* o) {
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    unsigned int w = 0;
#pragma unroll
    for (int b = 0; b < 4; ++b) w |= (unsigned int)(unsigned char)(signed char)q[4 * j + b] << (8 * b);
    o[j] = (int)w;
  }
}

// Integer sum over the lanes of groups of `width` lanes (exact).
__device__ __forceinline__ int group_sum_i(int v, int width) {
  for (int o = width >> 1; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// llama.cpp's quantize_row_q8_0 on the 32 values four lanes hold (eight
// each): d = amax / 127, q = round(x / d) with the unrounded reciprocal.
// Returns d rounded to f16 (as an f32), as the CPU keeps it.
__device__ __forceinline__ float quant8_q8_0(const float* v, int* q) {
  float amax = 0.0f;
#pragma unroll
  for (int j = 0; j < 8; ++j) amax = fmaxf(amax, fabsf(v[j]));
  amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
  amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
  float d = amax / 127.0f;
  float id = d != 0.0f ? 1.0f / d : 0.0f;
  int qi[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) qi[j] = (int)roundf(__fmul_rn(v[j], id));
  pack8(qi, q);
  return __half2float(__float2half_rn(d));
}

// llama.cpp's quantize_row_q8_K on the 256 values the warp holds (eight
// per lane): the value of largest magnitude (the first, on ties) gives
// iscale = -127 / max, q = min(round(iscale · x), 127), d = 1 / iscale.
__device__ __forceinline__ float quant8_q8_k(const float* v, int* q) {
  float best = 0.0f;
#pragma unroll
  for (int j = 0; j < 8; ++j)
    if (fabsf(v[j]) > fabsf(best)) best = v[j];
  float amax = warp_max(fabsf(best));
  unsigned int who = __ballot_sync(0xffffffffu, fabsf(best) == amax);
  float max = __shfl_sync(0xffffffffu, best, __ffs((int)who) - 1);
  int qi[8];
  if (max == 0.0f) {
#pragma unroll
    for (int j = 0; j < 8; ++j) qi[j] = 0;
    pack8(qi, q);
    return 0.0f;
  }
  float iscale = -127.0f / max;
#pragma unroll
  for (int j = 0; j < 8; ++j) qi[j] = min((int)roundf(__fmul_rn(iscale, v[j])), 127);
  pack8(qi, q);
  return 1.0f / iscale;
}

// Sum of the eight activations (the offsets and mins need it).
__device__ __forceinline__ int sum8(const int* a) {
  return dot4_i8(a[0], 0x01010101, dot4_i8(a[1], 0x01010101, 0));
}

__device__ __forceinline__ int dot8(const int* w, const int* a) {
  return dot4_i8(w[0], a[0], dot4_i8(w[1], a[1], 0));
}

// Scale and min of sub-block j from a K-quant's 12 packed 6-bit bytes.
__device__ __forceinline__ void scale_min_k4(int j, const unsigned char* q, int* sc, int* mn) {
  if (j < 4) {
    *sc = q[j] & 63;
    *mn = q[j + 4] & 63;
  } else {
    *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    *mn = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

// ---- one lane's eight weights of one block step ------------------------------
// Each format's `Lane` holds what the lane needs of the weights (bytes
// packed in two ints, and the scales) and computes, for one activation row,
// the block's f32 contribution from its quantized activations.

// Q4_0: 18-byte blocks of 32 (f16 d, 16 bytes: value j low nibble, j + 16
// high), w = d · (q − 8). Lane t: block 8·step + t/4, values 8·(t%4)…+7.
struct LaneQ4_0 {
  int w[2];
  float d;
  bool live;
  static constexpr int kBlock = 32, kBytes = 18;
  __device__ void load(const unsigned char* row, int step, int nb, int lane) {
    int b = 8 * step + (lane >> 2), part = lane & 3;
    live = b < nb;
    if (!live) {
      w[0] = w[1] = 0;
      d = 0.0f;
      return;
    }
    const unsigned char* blk = row + (size_t)b * 18;
    d = ld_f16_at(blk);
    const unsigned char* qs = blk + 2 + 8 * (part & 1);
    int shift = 4 * (part >> 1);
    w[0] = (int)((ld_u32_a2(qs) >> shift) & 0x0F0F0F0Fu);
    w[1] = (int)((ld_u32_a2(qs + 4) >> shift) & 0x0F0F0F0Fu);
  }
  // Row r's activations at value offset 256·step + 8·lane; the sum over
  // the step's blocks in block order.
  __device__ float step_sum(const float* x, int step, int k, int lane, float acc) const {
    int base = 256 * step + 8 * lane;
    float v[8];
    if (live) {
      ld8(x + base, v);
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j) v[j] = 0.0f;
    }
    int a[2];
    float xd = quant8_q8_0(v, a);
    int s = group_sum_i(dot8(w, a) - 8 * sum8(a), 4);
    float p = __fmul_rn((float)s, __fmul_rn(d, xd));
#pragma unroll
    for (int b = 0; b < 8; ++b) {
      float pb = __shfl_sync(0xffffffffu, p, 4 * b);
      if (256 * step + 32 * b < k) acc = __fadd_rn(acc, pb);
    }
    return acc;
  }
};

// Q4_K (144 bytes) and Q5_K (176 bytes) blocks of 256: f16 d and dmin,
// 12 bytes of 6-bit scales and mins for 8 sub-blocks of 32, (Q5_K: 32
// bytes of fifth bits), 128 bytes of nibbles (pair j of sub-blocks: low
// nibbles of bytes 32j…+31, then the high ones); w = d·sc·q − dmin·m.
// Lane t: sub-block t/4, values 8·(t%4)…+7 of it.
template <bool kFive>
struct LaneQ45K {
  int w[2];
  int sc, mn;
  float d, dmin;
  static constexpr int kBlock = 256, kBytes = kFive ? 176 : 144;
  __device__ void load(const unsigned char* row, int step, int, int lane) {
    const unsigned char* blk = row + (size_t)step * kBytes;
    d = ld_f16_at(blk);
    dmin = ld_f16_at(blk + 2);
    int sub = lane >> 2, l0 = 8 * (lane & 3);
    scale_min_k4(sub, blk + 4, &sc, &mn);
    const unsigned int* qs = reinterpret_cast<const unsigned int*>(
        blk + (kFive ? 48 : 16) + 32 * (sub >> 1) + l0);
    int shift = 4 * (sub & 1);
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      unsigned int q = (qs[j] >> shift) & 0x0F0F0F0Fu;
      if (kFive) {
        const unsigned int* qh = reinterpret_cast<const unsigned int*>(blk + 16 + l0);
        q |= ((qh[j] >> sub) & 0x01010101u) << 4;
      }
      w[j] = (int)q;
    }
  }
  __device__ float step_sum(const float* x, int step, int, int lane, float acc) const {
    float v[8];
    ld8(x + 256 * step + 8 * lane, v);
    int a[2];
    float xd = quant8_q8_k(v, a);
    int sumi = group_sum_i(sc * dot8(w, a), 32);
    int summ = group_sum_i(mn * sum8(a), 32);
    float p = __fsub_rn(__fmul_rn(__fmul_rn(d, xd), (float)sumi),
                        __fmul_rn(__fmul_rn(dmin, xd), (float)summ));
    return __fadd_rn(acc, p);
  }
};

// Q6_K blocks of 256 (210 bytes): 128 bytes of low nibbles, 64 of high
// bit pairs, 16 int8 scales (one per 16 values), f16 d; w = d·sc·(q − 32).
// Half n (128 values) = four parts of 32: part p's low nibbles are byte
// (p&1)·32 + i of the half's 64, shifted by 4·(p>>1); its high pair is bits
// 2p of byte i of the half's 32. Lane t: half t/16, part (t/4)%4, values
// 8·(t%4)…+7 of the part.
struct LaneQ6K {
  int w[2];
  int sc;
  float d;
  static constexpr int kBlock = 256, kBytes = 210;
  __device__ void load(const unsigned char* row, int step, int, int lane) {
    const unsigned char* blk = row + (size_t)step * kBytes;
    int n = lane >> 4, part = (lane >> 2) & 3, l0 = 8 * (lane & 3);
    d = ld_f16_at(blk + 208);
    sc = (int)(signed char)blk[192 + 8 * n + 2 * part + (l0 >> 4)];
    const unsigned char* ql = blk + 64 * n + 32 * (part & 1) + l0;
    const unsigned char* qh = blk + 128 + 32 * n + l0;
    int shift = 4 * (part >> 1);
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      unsigned int lo = (ld_u32_a2(ql + 4 * j) >> shift) & 0x0F0F0F0Fu;
      unsigned int hi = (ld_u32_a2(qh + 4 * j) >> (2 * part)) & 0x03030303u;
      w[j] = (int)(lo | (hi << 4));
    }
  }
  __device__ float step_sum(const float* x, int step, int, int lane, float acc) const {
    float v[8];
    ld8(x + 256 * step + 8 * lane, v);
    int a[2];
    float xd = quant8_q8_k(v, a);
    int sumi = group_sum_i(sc * (dot8(w, a) - 32 * sum8(a)), 32);
    return __fadd_rn(acc, __fmul_rn(__fmul_rn(d, xd), (float)sumi));
  }
};

// One warp's output row of y = x·Wᵀ (+ bias) for m <= QB_MAX_ROWS rows;
// k % 32 == 0 (Q4_0) or k % 256 == 0 (K-quants).
template <typename L>
__device__ void gemv_row_blocks(const float* __restrict__ x, const unsigned char* __restrict__ w,
                                const float* __restrict__ bias, float* __restrict__ y, int m,
                                int n, int k, int row) {
  int lane = threadIdx.x & 31;
  int nb = k / L::kBlock;
  const unsigned char* wr = w + (size_t)row * nb * L::kBytes;
  float acc[QB_MAX_ROWS];
#pragma unroll
  for (int r = 0; r < QB_MAX_ROWS; ++r) acc[r] = 0.0f;
  int steps = (k + 255) / 256;
  for (int s = 0; s < steps; ++s) {
    L lw;
    lw.load(wr, s, nb, lane);
#pragma unroll
    for (int r = 0; r < QB_MAX_ROWS; ++r)
      if (r < m) acc[r] = lw.step_sum(x + (size_t)r * k, s, k, lane, acc[r]);
  }
  if (lane == 0) {
    float bv = bias ? bias[row] : 0.0f;
#pragma unroll
    for (int r = 0; r < QB_MAX_ROWS; ++r)
      if (r < m) y[(size_t)r * n + row] = acc[r] + bv;
  }
}

template <typename L>
__device__ void gemv_blocks(const float* x, const unsigned char* w, const float* bias, float* y,
                            int m, int n, int k) {
  int row = (int)((blockIdx.x * (size_t)blockDim.x + threadIdx.x) >> 5);
  if (row >= n) return;
  gemv_row_blocks<L>(x, w, bias, y, m, n, k, row);
}

// Up to three projections of the same activations in one launch (decode's
// q/k/v, or gate/up with n2 = 0), each row exactly as gemv_<fmt> does.
template <typename L>
__device__ void gemv3_blocks(const float* x, const unsigned char* w0, const float* b0, float* y0,
                             int n0, const unsigned char* w1, const float* b1, float* y1, int n1,
                             const unsigned char* w2, const float* b2, float* y2, int n2, int m,
                             int k) {
  int row = (int)((blockIdx.x * (size_t)blockDim.x + threadIdx.x) >> 5);
  if (row < n0) {
    gemv_row_blocks<L>(x, w0, b0, y0, m, n0, k, row);
  } else if (row - n0 < n1) {
    gemv_row_blocks<L>(x, w1, b1, y1, m, n1, k, row - n0);
  } else if (row - n0 - n1 < n2) {
    gemv_row_blocks<L>(x, w2, b2, y2, m, n2, k, row - n0 - n1);
  }
}

// ---- dequantization to f16 for the prefill GEMMs (cuBLAS) --------------------
// Element i of n is f16 of the CPU's dequantized f32 value (the same
// products, unfused), rounded once. One thread per element.

__device__ __forceinline__ float dq_q4_0(const unsigned char* w, size_t i) {
  const unsigned char* blk = w + (i >> 5) * 18;
  int l = (int)(i & 31);
  int q = (blk[2 + (l & 15)] >> (4 * (l >> 4))) & 0xF;
  return __fmul_rn(ld_f16_at(blk), (float)(q - 8));
}

template <bool kFive>
__device__ __forceinline__ float dq_q45_k(const unsigned char* w, size_t i) {
  const unsigned char* blk = w + (i >> 8) * (kFive ? 176 : 144);
  int l = (int)(i & 255), sub = l >> 5, li = l & 31;
  int sc, mn;
  scale_min_k4(sub, blk + 4, &sc, &mn);
  int q = (blk[(kFive ? 48 : 16) + 32 * (sub >> 1) + li] >> (4 * (sub & 1))) & 0xF;
  if (kFive) q |= ((blk[16 + li] >> sub) & 1) << 4;
  float d1 = __fmul_rn(ld_f16_at(blk), (float)sc), m1 = __fmul_rn(ld_f16_at(blk + 2), (float)mn);
  return __fsub_rn(__fmul_rn(d1, (float)q), m1);
}

__device__ __forceinline__ float dq_q6_k(const unsigned char* w, size_t i) {
  const unsigned char* blk = w + (i >> 8) * 210;
  int l = (int)(i & 255), n = l >> 7, part = (l >> 5) & 3, li = l & 31;
  int lo = (blk[64 * n + 32 * (part & 1) + li] >> (4 * (part >> 1))) & 0xF;
  int hi = (blk[128 + 32 * n + li] >> (2 * part)) & 3;
  int s = (int)(signed char)blk[192 + 8 * n + ((l & 127) >> 4)];
  return __fmul_rn(__fmul_rn(ld_f16_at(blk + 208), (float)s), (float)((lo | (hi << 4)) - 32));
}

// The entry points: gemv_<fmt>, gemv3_<fmt> and dequant_<fmt>_f16 per format.
#define QB_GEMV3_PARAMS                                                                   \
  const float *x, const unsigned char *w0, const float *b0, float *y0, int n0,          \
      const unsigned char *w1, const float *b1, float *y1, int n1, const unsigned char *w2, \
      const float *b2, float *y2, int n2, int m, int k
#define QB_GEMV3_ARGS x, w0, b0, y0, n0, w1, b1, y1, n1, w2, b2, y2, n2, m, k
extern "C" __global__ void gemv_q4_0(const float* x, const unsigned char* w, const float* bias,
                                     float* y, int m, int n, int k) {
  gemv_blocks<LaneQ4_0>(x, w, bias, y, m, n, k);
}
extern "C" __global__ void gemv3_q4_0(QB_GEMV3_PARAMS) { gemv3_blocks<LaneQ4_0>(QB_GEMV3_ARGS); }
extern "C" __global__ void dequant_q4_0_f16(const unsigned char* w, h16* y, size_t n) {
  size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
  if (i < n) st1(y, i, dq_q4_0(w, i));
}
extern "C" __global__ void gemv_q4_k(const float* x, const unsigned char* w, const float* bias,
                                     float* y, int m, int n, int k) {
  gemv_blocks<LaneQ45K<false>>(x, w, bias, y, m, n, k);
}
extern "C" __global__ void gemv3_q4_k(QB_GEMV3_PARAMS) { gemv3_blocks<LaneQ45K<false>>(QB_GEMV3_ARGS); }
extern "C" __global__ void dequant_q4_k_f16(const unsigned char* w, h16* y, size_t n) {
  size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
  if (i < n) st1(y, i, dq_q45_k<false>(w, i));
}
extern "C" __global__ void gemv_q5_k(const float* x, const unsigned char* w, const float* bias,
                                     float* y, int m, int n, int k) {
  gemv_blocks<LaneQ45K<true>>(x, w, bias, y, m, n, k);
}
extern "C" __global__ void gemv3_q5_k(QB_GEMV3_PARAMS) { gemv3_blocks<LaneQ45K<true>>(QB_GEMV3_ARGS); }
extern "C" __global__ void dequant_q5_k_f16(const unsigned char* w, h16* y, size_t n) {
  size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
  if (i < n) st1(y, i, dq_q45_k<true>(w, i));
}
extern "C" __global__ void gemv_q6_k(const float* x, const unsigned char* w, const float* bias,
                                     float* y, int m, int n, int k) {
  gemv_blocks<LaneQ6K>(x, w, bias, y, m, n, k);
}
extern "C" __global__ void gemv3_q6_k(QB_GEMV3_PARAMS) { gemv3_blocks<LaneQ6K>(QB_GEMV3_ARGS); }
extern "C" __global__ void dequant_q6_k_f16(const unsigned char* w, h16* y, size_t n) {
  size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
  if (i < n) st1(y, i, dq_q6_k(w, i));
}
