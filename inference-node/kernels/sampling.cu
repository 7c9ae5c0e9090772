// Token choice on the device, one block (1024 threads) per logits row, so
// only token ids cross PCIe. Mirrors sampling.rs:
//   argmax: largest logit, ties to the lowest id (NaN never wins).
//   sample: v = logit / temperature over finite logits; p = exp(v - max) / Z
//   (f64); top-p keeps the smallest prefix (by descending v) whose mass
//   reaches top_p; min-p keeps p >= p_max * min_p; the draw walks the kept
//   tokens by descending v (ties by ascending id) until the running mass
//   exceeds u * kept_mass, with u in [0, 1) from the host's seeded generator.
// No sort: both the top-p boundary and the drawn token are found by
// bisection over the order-preserving integer image of v (32 block
// reductions each). top-k is not done here (the engine samples such
// requests on the host).

// Order-preserving map of a float to an unsigned int.
__device__ __forceinline__ unsigned int fkey(float v) {
  unsigned int u = __float_as_uint(v);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ int block_argmax(const float* l, int vocab) {
  float best = CH_NEG_INF;
  int bi = -1;
  // Each thread visits ids in increasing order, so its first hit of its
  // maximum is its lowest id.
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
    float v = l[i];
    if (v == v && (bi < 0 || v > best)) {
      best = v;
      bi = i;
    }
  }
  float mx = block_max(bi >= 0 ? best : CH_NEG_INF);
  int cand = (bi >= 0 && best == mx) ? bi : -1;
  // The lowest id holding the maximum (a thread's own first hit is its lowest).
  int r = block_min_index(cand);
  return r < 0 ? 0 : r;
}

extern "C" __global__ void argmax_rows(const float* __restrict__ logits, int vocab, int* __restrict__ out) {
  const float* l = logits + (size_t)blockIdx.x * vocab;
  int r = block_argmax(l, vocab);
  if (threadIdx.x == 0) out[blockIdx.x] = r;
}

extern "C" __global__ void sample_rows(const float* __restrict__ logits, int vocab,
                                       const float* __restrict__ temperature,
                                       const float* __restrict__ top_p,
                                       const float* __restrict__ min_p,
                                       const double* __restrict__ uniform, int* __restrict__ out) {
  const int row = blockIdx.x;
  const float* l = logits + (size_t)row * vocab;
  const float t = temperature[row];
  // The CPU divides: v = logit / t. Multiplying by 1/t would round differently.
  float mx = CH_NEG_INF;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
    float x = l[i];
    if (isfinite(x)) mx = fmaxf(mx, x / t);
  }
  mx = block_max(mx);
  if (mx == CH_NEG_INF) {  // nothing finite: argmax, as the CPU does
    int r = block_argmax(l, vocab);
    if (threadIdx.x == 0) out[row] = r;
    return;
  }
  double z = 0.0;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
    float x = l[i];
    if (isfinite(x)) z += exp((double)(x / t - mx));
  }
  z = block_sum_d(z);
  // Fallback if rounding leaves no token above the draw: the best one.
  const int top = block_argmax(l, vocab);
  // Top-p boundary: the largest key whose mass (all tokens at or above it)
  // still reaches top_p.
  unsigned int kp = 0;
  const float tp = top_p[row];
  if (tp < 1.0f) {
    unsigned int lo = 0, hi = fkey(mx) + 1u;  // mass(lo) = 1 >= top_p; mass(hi) = 0
    while (hi - lo > 1u) {
      unsigned int mid = lo + (hi - lo) / 2u;
      double s = 0.0;
      for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        float x = l[i];
        if (!isfinite(x)) continue;
        float v = x / t;
        if (fkey(v) >= mid) s += exp((double)(v - mx)) / z;
      }
      s = block_sum_d(s);
      if (s >= (double)tp) lo = mid; else hi = mid;
    }
    kp = lo;
  }
  const double cut = (1.0 / z) * (double)min_p[row];
  // Kept mass and the draw.
  double total = 0.0;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
    float x = l[i];
    if (!isfinite(x)) continue;
    float v = x / t;
    double p = exp((double)(v - mx)) / z;
    if (fkey(v) >= kp && p >= cut) total += p;
  }
  total = block_sum_d(total);
  const double r = uniform[row] * total;
  // Largest key K with kept mass at or above K strictly greater than r.
  unsigned int lo = 0, hi = fkey(mx) + 1u;
  while (hi - lo > 1u) {
    unsigned int mid = lo + (hi - lo) / 2u;
    double s = 0.0;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
      float x = l[i];
      if (!isfinite(x)) continue;
      float v = x / t;
      double p = exp((double)(v - mx)) / z;
      if (fkey(v) >= mid && fkey(v) >= kp && p >= cut) s += p;
    }
    s = block_sum_d(s);
    if (s > r) lo = mid; else hi = mid;
  }
  // lo is now the chosen value's key (or 0 if rounding left nothing above r).
  // Mass strictly above it, then walk the tied tokens by id.
  double above = 0.0;
  int ties = 0, first = -1;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
    float x = l[i];
    if (!isfinite(x)) continue;
    float v = x / t;
    double p = exp((double)(v - mx)) / z;
    unsigned int kv = fkey(v);
    if (kv < kp || p < cut) continue;
    if (kv > lo) above += p;
    else if (kv == lo) {
      ties += 1;
      if (first < 0) first = i;
    }
  }
  above = block_sum_d(above);
  int nties = (int)block_sum((float)ties);
  int chosen = block_min_index(first);
  if (threadIdx.x == 0) {
    if (nties > 1) {
      double rr = r - above;
      int last = chosen;
      for (int i = 0; i < vocab; ++i) {
        float x = l[i];
        if (!isfinite(x)) continue;
        float v = x / t;
        double p = exp((double)(v - mx)) / z;
        if (fkey(v) != lo || p < cut) continue;
        last = i;
        rr -= p;
        if (rr < 0.0) break;
      }
      chosen = last;
    }
    if (chosen < 0) chosen = top;
    out[row] = chosen;
  }
}
