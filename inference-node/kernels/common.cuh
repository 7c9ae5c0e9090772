// Shared helpers, prepended to every kernel program (see src/cuda/kernels.rs).
//
// Conventions: activations are f32; weights are f32, f16 (`h16`) or bf16
// (`b16`), kept as raw 16-bit patterns so no program depends on the half
// headers' operator overloads; all accumulation is f32 (attention softmax
// sums and sampling masses in f64 where the CPU engine uses f64).
//
// Architecture guards: bf16 intrinsics are used only for __CUDA_ARCH__ >= 800
// (below that bf16 is widened with a shift, which is exact); __dp4a only for
// __CUDA_ARCH__ >= 610.
//
// Shared memory is declared with CH_SHARED(type, name, dims) and
// CH_DYN_SHARED(type, name): __shared__ for NVRTC, block-local buffers in
// the CPU simulator (kernels/cpu-sim/cuda_cpu.h), which defines CUSIM.
#ifndef CUSIM
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#define CH_SHARED(T, name, dims) __shared__ T name dims
#define CH_DYN_SHARED(T, name) extern __shared__ T name[]
#endif

#define CH_INF __int_as_float(0x7f800000)
#define CH_NEG_INF __int_as_float(0xff800000)

struct h16 { unsigned short b; };
struct b16 { unsigned short b; };

// ---- loads: one element, or eight contiguous (16-byte aligned) ------------
__device__ __forceinline__ float ld1(const float* p, size_t i) { return p[i]; }
__device__ __forceinline__ float ld1(const h16* p, size_t i) {
  return __half2float(__ushort_as_half(p[i].b));
}
__device__ __forceinline__ float bf16_bits_to_f32(unsigned int bits) {
  return __uint_as_float(bits << 16);
}
__device__ __forceinline__ float ld1(const b16* p, size_t i) {
#if __CUDA_ARCH__ >= 800
  return __bfloat162float(__ushort_as_bfloat16(p[i].b));
#else
  return bf16_bits_to_f32(p[i].b);
#endif
}

__device__ __forceinline__ void ld8(const float* p, float* o) {
  float4 a = *reinterpret_cast<const float4*>(p);
  float4 b = *reinterpret_cast<const float4*>(p + 4);
  o[0] = a.x; o[1] = a.y; o[2] = a.z; o[3] = a.w;
  o[4] = b.x; o[5] = b.y; o[6] = b.z; o[7] = b.w;
}
__device__ __forceinline__ void ld8(const h16* p, float* o) {
  uint4 u = *reinterpret_cast<const uint4*>(p);
  const __half2* h = reinterpret_cast<const __half2*>(&u);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    float2 f = __half22float2(h[j]);
    o[2 * j] = f.x;
    o[2 * j + 1] = f.y;
  }
}
__device__ __forceinline__ void ld8(const b16* p, float* o) {
  uint4 u = *reinterpret_cast<const uint4*>(p);
#if __CUDA_ARCH__ >= 800
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    float2 f = __bfloat1622float2(h[j]);
    o[2 * j] = f.x;
    o[2 * j + 1] = f.y;
  }
#else
  unsigned int w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    o[2 * j] = __uint_as_float(w[j] << 16);
    o[2 * j + 1] = __uint_as_float(w[j] & 0xffff0000u);
  }
#endif
}

// ---- stores ---------------------------------------------------------------
__device__ __forceinline__ void st1(float* p, size_t i, float v) { p[i] = v; }
__device__ __forceinline__ void st1(h16* p, size_t i, float v) {
  p[i].b = __half_as_ushort(__float2half_rn(v));
}
__device__ __forceinline__ unsigned short f32_to_bf16_bits(float v) {
#if __CUDA_ARCH__ >= 800
  return __bfloat16_as_ushort(__float2bfloat16_rn(v));
#else
  unsigned int u = __float_as_uint(v);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);                      // round to nearest even
  return (unsigned short)(u >> 16);
#endif
}
__device__ __forceinline__ void st1(b16* p, size_t i, float v) { p[i].b = f32_to_bf16_bits(v); }

// ---- reductions -------------------------------------------------------------
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ double warp_sum_d(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Block-wide sum/max (any block size up to 1024); every thread gets the result.
__device__ float block_sum(float v) {
  CH_SHARED(float, red, [32]);
  CH_SHARED(float, result, );
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  if (warp == 0) {
    int nw = (blockDim.x + 31) >> 5;
    float x = lane < nw ? red[lane] : 0.0f;
    x = warp_sum(x);
    if (lane == 0) result = x;
  }
  __syncthreads();
  return result;
}
__device__ float block_max(float v) {
  CH_SHARED(float, red, [32]);
  CH_SHARED(float, result, );
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  if (warp == 0) {
    int nw = (blockDim.x + 31) >> 5;
    float x = lane < nw ? red[lane] : CH_NEG_INF;
    x = warp_max(x);
    if (lane == 0) result = x;
  }
  __syncthreads();
  return result;
}
__device__ double block_sum_d(double v) {
  CH_SHARED(double, red, [32]);
  CH_SHARED(double, result, );
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum_d(v);
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  if (warp == 0) {
    int nw = (blockDim.x + 31) >> 5;
    double x = lane < nw ? red[lane] : 0.0;
    x = warp_sum_d(x);
    if (lane == 0) result = x;
  }
  __syncthreads();
  return result;
}
// Smallest index among threads holding `key`, -1 if none holds one (key < 0).
__device__ int block_min_index(int idx) {
  CH_SHARED(int, red, [32]);
  CH_SHARED(int, result, );
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  unsigned int v = (unsigned int)idx;  // -1 becomes the largest value
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = min(v, __shfl_xor_sync(0xffffffffu, v, o));
  __syncthreads();
  if (lane == 0) red[warp] = (int)v;
  __syncthreads();
  if (warp == 0) {
    int nw = (blockDim.x + 31) >> 5;
    unsigned int x = lane < nw ? (unsigned int)red[lane] : 0xffffffffu;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = min(x, __shfl_xor_sync(0xffffffffu, x, o));
    if (lane == 0) result = (int)x;
  }
  __syncthreads();
  return result;
}

// ---- int8 dot product of four packed bytes ------------------------------------
__device__ __forceinline__ int dot4_i8(int a, int b, int c) {
#if __CUDA_ARCH__ >= 610
  return __dp4a(a, b, c);
#else
  const signed char* x = reinterpret_cast<const signed char*>(&a);
  const signed char* y = reinterpret_cast<const signed char*>(&b);
  return c + x[0] * y[0] + x[1] * y[1] + x[2] * y[2] + x[3] * y[3];
#endif
}
