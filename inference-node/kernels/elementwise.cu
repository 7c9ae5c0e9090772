// Small elementwise kernels: SwiGLU, residual add, row gather, dtype casts.

// SwiGLU: g = silu(g) * u, in place over n elements.
extern "C" __global__ void silu_mul(float* __restrict__ g, const float* __restrict__ u, size_t n) {
  size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  float x = g[i];
  g[i] = x / (1.0f + expf(-x)) * u[i];
}

// x += d over n elements.
extern "C" __global__ void add_inplace(float* __restrict__ x, const float* __restrict__ d, size_t n) {
  size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) x[i] += d[i];
}

// dst[r] = src[rows[r]] for rows of width d.
extern "C" __global__ void gather_rows(const float* __restrict__ src, const int* __restrict__ rows,
                                       float* __restrict__ dst, int nrows, int d) {
  size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= (size_t)nrows * d) return;
  size_t r = i / d, j = i % d;
  dst[i] = src[(size_t)rows[r] * d + j];
}

// f32 activations to the weight dtype, for tensor-core GEMMs through cuBLAS.
// f16's range ends at 65504: activations of bf16-trained models can pass it
// (down_proj inputs). A finite value that rounds to infinity sets *overflow
// (when not null); the backend then keeps that projection in f32 and runs
// the step again.
extern "C" __global__ void cast_f32_f16(const float* __restrict__ x, h16* __restrict__ y, size_t n,
                                        int* __restrict__ overflow) {
  size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  float v = x[i];
  unsigned short b = __half_as_ushort(__float2half_rn(v));
  y[i].b = b;
  if (overflow && (b & 0x7fffu) == 0x7c00u && isfinite(v)) atomicOr(overflow, 1);
}
extern "C" __global__ void cast_f32_bf16(const float* __restrict__ x, b16* __restrict__ y, size_t n) {
  size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) st1(y, i, x[i]);
}

// y[r][j] += bias[j] (after a cuBLAS GEMM).
extern "C" __global__ void add_bias(float* __restrict__ y, const float* __restrict__ bias, int m, int n) {
  size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < (size_t)m * n) y[i] += bias[i % n];
}
