// Rotary position embeddings. Every scaling the engine supports (default,
// linear, llama3) is folded into `inv_freq` on the host (ModelConfig::
// inv_freq, rounded to the checkpoint dtype as HF does), so the device needs
// one table kernel and one rotation kernel with two layouts:
//   interleaved = 0: rotate-half (HF Llama/Mistral/Qwen2, "neox"): pairs (i, i + half)
//   interleaved = 1: GPT-J style: pairs (2i, 2i + 1)

// cos/sin per (token, frequency), angles in f64 like the CPU engine.
extern "C" __global__ void rope_table(const int* __restrict__ pos, const double* __restrict__ inv_freq,
                                      float* __restrict__ cos_out, float* __restrict__ sin_out,
                                      int m, int half) {
  int idx = blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= m * half) return;
  int t = idx / half, i = idx % half;
  double a = (double)pos[t] * inv_freq[i];
  cos_out[idx] = (float)cos(a);
  sin_out[idx] = (float)sin(a);
}

// Rotates `heads` heads of every token of x ([m][heads][head_dim]) in place.
extern "C" __global__ void rope_apply(float* __restrict__ x, const float* __restrict__ cos_t,
                                      const float* __restrict__ sin_t, int m, int heads,
                                      int head_dim, int interleaved) {
  int half = head_dim / 2;
  size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= (size_t)m * heads * half) return;
  int i = (int)(idx % half);
  size_t th = idx / half;  // token * heads + head
  int t = (int)(th / heads);
  float* v = x + th * head_dim;
  float c = cos_t[(size_t)t * half + i], s = sin_t[(size_t)t * half + i];
  int ia = interleaved ? 2 * i : i;
  int ib = interleaved ? 2 * i + 1 : i + half;
  float a = v[ia], b = v[ib];
  v[ia] = a * c - b * s;
  v[ib] = b * c + a * s;
}
