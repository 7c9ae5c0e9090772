// RMSNorm fused with the residual add: for each row,
//   if delta: x += delta   (x is the residual stream, updated in place)
//   out = w * (x / sqrt(mean(x^2) + eps))
// One block per row. `delta` may be null (first layer: plain RMSNorm).
extern "C" __global__ void add_rmsnorm(float* __restrict__ x, const float* __restrict__ delta,
                                       const float* __restrict__ w, float* __restrict__ out,
                                       int d, float eps) {
  size_t row = blockIdx.x;
  float* xr = x + row * d;
  const float* dr = delta ? delta + row * d : nullptr;
  float ss = 0.0f;
  for (int i = threadIdx.x; i < d; i += blockDim.x) {
    float v = xr[i];
    if (dr) {
      v += dr[i];
      xr[i] = v;
    }
    ss += v * v;
  }
  ss = block_sum(ss);
  float r = 1.0f / sqrtf(ss / (float)d + eps);
  float* o = out + row * d;
  for (int i = threadIdx.x; i < d; i += blockDim.x) o[i] = w[i] * (xr[i] * r);
}
