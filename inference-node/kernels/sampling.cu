// Token choice on the device, one block (1024 threads) per logits row, so
// only token ids cross PCIe. Mirrors sampling.rs:
//   argmax: largest logit, ties to the lowest id (NaN never wins).
//   sample: v = logit / temperature over finite logits, taken in the CPU's
//   order (descending v, ties by ascending id); top-k keeps the first k;
//   p = exp(v - max) / Z over those (f64); top-p keeps the shortest prefix
//   whose mass reaches top_p; min-p keeps p >= p_max * min_p; the draw walks
//   the kept tokens in that order until the running mass exceeds u * kept
//   mass, with u in [0, 1) from the host's seeded generator.
// No sort: each cut (the k-th token, the top-p boundary, the drawn token) is
// a radix select over the order-preserving integer image of v, 8 bits a
// pass (4 passes of a shared-memory histogram of counts or masses), then a
// walk by id only when several tokens share the selected value. About a
// dozen passes over the row in all, each with one exp.

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

// The radix histograms (one set per block, shared by every select).
__device__ double* radix_mass() {
  CH_SHARED(double, mass, [256]);
  return mass;
}
__device__ unsigned int* radix_count() {
  CH_SHARED(unsigned int, count, [256]);
  return count;
}
__device__ double* radix_result() {
  CH_SHARED(double, res, [3]);  // bin, weight above it, tokens in it
  return res;
}

struct RadixPick {
  unsigned int key;  // the selected key K
  double above;      // weight of the admitted tokens with keys above K
  unsigned int ties; // admitted tokens with key K
};

// MSB-first radix select over the keys of the tokens `admit(i, &key)`
// accepts: K is the key of the token at which the running weight (tokens by
// descending key) first reaches `target` (>=, or > when `strict`). When
// no token reaches it (rounding): the lowest admitted key. At least one
// token must be admitted.
template <typename Admit, typename Weight>
__device__ RadixPick radix_select(int vocab, Admit admit, Weight weight, double target, bool strict) {
  double* mass = radix_mass();
  unsigned int* count = radix_count();
  double* res = radix_result();
  unsigned int prefix = 0, mask = 0;
  double above = 0.0;
  unsigned int ties = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int b = threadIdx.x; b < 256; b += blockDim.x) {
      mass[b] = 0.0;
      count[b] = 0u;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
      unsigned int k;
      if (!admit(i, &k) || (k & mask) != prefix) continue;
      unsigned int b = (k >> shift) & 255u;
      atomicAdd(&mass[b], weight(i));
      atomicAdd(&count[b], 1u);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int chosen = -1, last = -1;
      double a = above;
      for (int b = 255; b >= 0; --b) {
        if (count[b] == 0u) continue;
        last = b;
        double s = a + mass[b];
        if (strict ? s > target : s >= target) {
          chosen = b;
          break;
        }
        a = s;
      }
      if (chosen < 0) {
        chosen = last < 0 ? 0 : last;
        a -= last < 0 ? 0.0 : mass[last];
      }
      res[0] = (double)chosen;
      res[1] = a;
      res[2] = (double)count[chosen];
    }
    __syncthreads();
    prefix |= (unsigned int)res[0] << shift;
    mask |= 255u << shift;
    above = res[1];
    ties = (unsigned int)res[2];
    __syncthreads();
  }
  return RadixPick{prefix, above, ties};
}

// Among the tokens `at(i)` accepts (those at one key), by ascending id: the
// first at which the running weight from `above` reaches `target` (>=, or >
// when `strict`), else the last one. One thread walks the row: used only
// when several tokens share the selected key.
template <typename At, typename Weight>
__device__ int tie_walk(int vocab, At at, Weight weight, double above, double target, bool strict) {
  double* res = radix_result();
  if (threadIdx.x == 0) {
    double acc = above;
    int chosen = -1, last = -1;
    for (int i = 0; i < vocab; ++i) {
      if (!at(i)) continue;
      last = i;
      acc += weight(i);
      if (strict ? acc > target : acc >= target) {
        chosen = i;
        break;
      }
    }
    res[0] = (double)(chosen >= 0 ? chosen : last);
  }
  __syncthreads();
  int r = (int)res[0];
  __syncthreads();
  return r;
}

extern "C" __global__ void sample_rows(const float* __restrict__ logits, int vocab,
                                       const float* __restrict__ temperature,
                                       const int* __restrict__ top_k,
                                       const float* __restrict__ top_p,
                                       const float* __restrict__ min_p,
                                       const double* __restrict__ uniform, int* __restrict__ out) {
  const int row = blockIdx.x;
  const float* l = logits + (size_t)row * vocab;
  // The CPU divides: v = logit / t. Multiplying by 1/t would round differently.
  const float t = temperature[row];
  float mx = CH_NEG_INF;
  float nfin = 0.0f;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
    float x = l[i];
    if (isfinite(x)) {
      mx = fmaxf(mx, x / t);
      nfin += 1.0f;
    }
  }
  mx = block_max(mx);
  const int nfinite = (int)block_sum(nfin);
  if (mx == CH_NEG_INF) {  // nothing finite: argmax, as the CPU does
    int r = block_argmax(l, vocab);
    if (threadIdx.x == 0) out[row] = r;
    return;
  }
  auto key = [&](int i, unsigned int* k) -> bool {
    float x = l[i];
    if (!isfinite(x)) return false;
    *k = fkey(x / t);
    return true;
  };
  auto one = [](int) -> double { return 1.0; };
  // Top-k: tokens above the k-th key, and at it those up to id kcut.
  const int k = top_k[row];
  unsigned int kk = 0u;
  int kcut = vocab;
  if (k > 0 && k < nfinite) {
    RadixPick r = radix_select(vocab, key, one, (double)k, false);
    kk = r.key;
    if (r.ties > 1u) {
      auto at = [&](int i) -> bool {
        unsigned int q;
        return key(i, &q) && q == kk;
      };
      kcut = tie_walk(vocab, at, one, r.above, (double)k, false);
    }
  }
  auto in_k = [&](int i, unsigned int* q) -> bool {
    return key(i, q) && (*q > kk || (*q == kk && i <= kcut));
  };
  double z = 0.0;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
    unsigned int q;
    if (in_k(i, &q)) z += exp((double)(l[i] / t - mx));
  }
  z = block_sum_d(z);
  auto prob = [&](int i) -> double { return exp((double)(l[i] / t - mx)) / z; };
  // Top-p: tokens above the boundary key, and at it those up to id pcut.
  const float tp = top_p[row];
  unsigned int pk = 0u;
  int pcut = vocab;
  if (tp < 1.0f) {
    RadixPick r = radix_select(vocab, in_k, prob, (double)tp, false);
    pk = r.key;
    if (r.ties > 1u) {
      auto at = [&](int i) -> bool {
        unsigned int q;
        return in_k(i, &q) && q == pk;
      };
      pcut = tie_walk(vocab, at, prob, r.above, (double)tp, false);
    }
  }
  const double cut = (1.0 / z) * (double)min_p[row];
  auto kept = [&](int i, unsigned int* q) -> bool {
    return in_k(i, q) && (*q > pk || (*q == pk && i <= pcut)) && prob(i) >= cut;
  };
  double total = 0.0;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
    unsigned int q;
    if (kept(i, &q)) total += prob(i);
  }
  total = block_sum_d(total);
  const double r = uniform[row] * total;
  // The drawn token: the first (in the CPU's order) where the running kept
  // mass exceeds r.
  RadixPick d = radix_select(vocab, kept, prob, r, true);
  int chosen;
  if (d.ties > 1u) {
    auto at = [&](int i) -> bool {
      unsigned int q;
      return kept(i, &q) && q == d.key;
    };
    chosen = tie_walk(vocab, at, prob, d.above, r, true);
  } else {
    int first = -1;
    for (int i = threadIdx.x; i < vocab && first < 0; i += blockDim.x) {
      unsigned int q;
      if (kept(i, &q) && q == d.key) first = i;
    }
    chosen = block_min_index(first);
  }
  if (chosen < 0) chosen = block_argmax(l, vocab);  // nothing kept (min_p > 1)
  if (threadIdx.x == 0) out[row] = chosen;
}
