// Paged attention over the engine's KV block tables (layers.rs is the
// reference). Per layer the cache is [block][slot][kv_head][head_dim] in the
// KV dtype (f32 or f16); token t of a sequence lives at slot
// table[pos / block_size] * block_size + pos % block_size. A query at
// position `pos` attends to positions [start, pos], start = pos + 1 - window
// with a sliding window (clamped at 0), else 0. GQA: query head h reads KV
// head h / (heads / kv_heads).
//
// Token metadata (per batch token t): tok_pos[t], tok_table[t] (offset of
// its sequence's table in the flattened `tables`).

// Writes this step's K and V rows ([m][row], row = kv_heads * head_dim) to
// their slots.
template <typename KV>
__device__ void kv_write(const float* __restrict__ k, const float* __restrict__ v, KV* __restrict__ kc,
                         KV* __restrict__ vc, const int* __restrict__ slots, int m, int row) {
  size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= (size_t)m * row) return;
  size_t t = i / row, j = i % row;
  size_t s = (size_t)slots[t];
  st1(kc, s * row + j, k[i]);
  st1(vc, s * row + j, v[i]);
}

// ---- decode: one query token per sequence, split-K over the context ----------
// grid = (decode tokens, kv_heads, partitions); block = 128 threads.
// Dynamic shared memory: (G * head_dim + G * part_size) floats, G = heads / kv_heads.
// With one partition the result goes straight to `out`; otherwise each
// partition writes its unnormalized output, max and sum to the part_*
// buffers and attention_reduce combines them.
template <typename KV>
__device__ void attention_decode(const float* __restrict__ q, const KV* __restrict__ kc,
                                 const KV* __restrict__ vc, float* __restrict__ out,
                                 const int* __restrict__ tokens, const int* __restrict__ tok_pos,
                                 const int* __restrict__ tok_table, const int* __restrict__ tables,
                                 int heads, int kv_heads, int head_dim, int block_size, int window,
                                 int part_size, float scale, float* __restrict__ part_out,
                                 float* __restrict__ part_max, float* __restrict__ part_sum) {
  CH_DYN_SHARED(float, smem);
  const int G = heads / kv_heads;
  float* qs = smem;                    // [G][head_dim]
  float* sc = smem + G * head_dim;     // [G][part_size]
  CH_SHARED(float, gmax, [64]);
  CH_SHARED(float, gsum, [64]);
  const int bi = blockIdx.x, kvh = blockIdx.y, part = blockIdx.z, nparts = gridDim.z;
  const int t = tokens[bi];
  const int pos = tok_pos[t];
  const int start = window > 0 ? max(0, pos + 1 - window) : 0;
  const int p0 = start + part * part_size;
  const int p1 = min(p0 + part_size, pos + 1);
  const int* table = tables + tok_table[t];
  const int h0 = kvh * G;
  const int row = kv_heads * head_dim;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;

  for (int e = threadIdx.x; e < G * head_dim; e += blockDim.x)
    qs[e] = q[((size_t)t * heads + h0) * head_dim + e];
  __syncthreads();

  if (p0 >= p1) {  // this partition is past the end of a shorter context
    for (int e = threadIdx.x; e < G * head_dim; e += blockDim.x) {
      int g = e / head_dim, d = e % head_dim;
      size_t pi = ((size_t)bi * heads + h0 + g) * nparts + part;
      part_out[pi * head_dim + d] = 0.0f;
      if (d == 0) {
        part_max[pi] = CH_NEG_INF;
        part_sum[pi] = 0.0f;
      }
    }
    return;
  }
  const int n = p1 - p0;
  // Scores: one warp per position; the K row is read once for all G heads.
  for (int p = p0 + warp; p < p1; p += nwarps) {
    size_t slot = (size_t)table[p / block_size] * block_size + p % block_size;
    const KV* kr = kc + slot * row + (size_t)kvh * head_dim;
    float kreg[8];
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      int d = lane + 32 * c;
      kreg[c] = d < head_dim ? ld1(kr, d) : 0.0f;
    }
    for (int g = 0; g < G; ++g) {
      float dot = 0.0f;
#pragma unroll
      for (int c = 0; c < 8; ++c) {
        int d = lane + 32 * c;
        if (d < head_dim) dot = fmaf(qs[g * head_dim + d], kreg[c], dot);
      }
      dot = warp_sum(dot);
      if (lane == 0) sc[g * part_size + (p - p0)] = dot * scale;
    }
  }
  __syncthreads();
  // Softmax pieces per head: one warp per head.
  for (int g = warp; g < G; g += nwarps) {
    float mx = CH_NEG_INF;
    for (int i = lane; i < n; i += 32) mx = fmaxf(mx, sc[g * part_size + i]);
    mx = warp_max(mx);
    float s = 0.0f;
    for (int i = lane; i < n; i += 32) {
      float e = expf(sc[g * part_size + i] - mx);
      sc[g * part_size + i] = e;
      s += e;
    }
    s = warp_sum(s);
    if (lane == 0) {
      gmax[g] = mx;
      gsum[g] = s;
    }
  }
  __syncthreads();
  // Weighted sum of V: thread per (head, dim), positions in order.
  for (int e = threadIdx.x; e < G * head_dim; e += blockDim.x) {
    int g = e / head_dim, d = e % head_dim;
    float acc = 0.0f;
    for (int i = 0; i < n; ++i) {
      int p = p0 + i;
      size_t slot = (size_t)table[p / block_size] * block_size + p % block_size;
      acc = fmaf(sc[g * part_size + i], ld1(vc, slot * row + (size_t)kvh * head_dim + d), acc);
    }
    if (nparts == 1) {
      out[((size_t)t * heads + h0 + g) * head_dim + d] = acc / gsum[g];
    } else {
      size_t pi = ((size_t)bi * heads + h0 + g) * nparts + part;
      part_out[pi * head_dim + d] = acc;
      if (d == 0) {
        part_max[pi] = gmax[g];
        part_sum[pi] = gsum[g];
      }
    }
  }
}

// Combines split-K partitions: grid = (decode tokens, heads), block = 128.
extern "C" __global__ void attention_reduce(const float* __restrict__ part_out,
                                            const float* __restrict__ part_max,
                                            const float* __restrict__ part_sum, float* __restrict__ out,
                                            const int* __restrict__ tokens, int heads, int head_dim,
                                            int nparts) {
  const int bi = blockIdx.x, h = blockIdx.y;
  const size_t base = ((size_t)bi * heads + h) * nparts;
  float mx = CH_NEG_INF;
  for (int p = 0; p < nparts; ++p)
    if (part_sum[base + p] > 0.0f) mx = fmaxf(mx, part_max[base + p]);
  float total = 0.0f;
  for (int p = 0; p < nparts; ++p)
    if (part_sum[base + p] > 0.0f) total += part_sum[base + p] * expf(part_max[base + p] - mx);
  const int t = tokens[bi];
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float acc = 0.0f;
    for (int p = 0; p < nparts; ++p)
      if (part_sum[base + p] > 0.0f)
        acc += part_out[(base + p) * head_dim + d] * expf(part_max[base + p] - mx);
    out[((size_t)t * heads + h) * head_dim + d] = acc / total;
  }
}

// ---- prefill: tiles of consecutive query tokens of one sequence ----------------
// grid = (tiles, heads); block = 128 threads. tiles[2i] = first batch token,
// tiles[2i+1] = count (<= tq). K/V are streamed through shared memory in
// chunks of tk positions with an online softmax (running max and sum per
// query row), so the context length is unbounded. Requires
// tq * head_dim <= 16 * blockDim.x. Query and key rows are stored with a
// stride of head_dim + 1 floats (plan::prefill_qk_stride): in the score
// loop the 32 lanes of a warp read 32 different key rows at the same d,
// which with a stride of head_dim (a multiple of 32) all fall in one bank.
// Dynamic shared memory (plan::prefill_smem):
// ((tq + tk) * (head_dim + 1) + tk * head_dim + tq * tk) floats.
#define PREFILL_ACC 16
template <typename KV>
__device__ void attention_prefill(const float* __restrict__ q, const KV* __restrict__ kc,
                                  const KV* __restrict__ vc, float* __restrict__ out,
                                  const int* __restrict__ tiles, const int* __restrict__ tok_pos,
                                  const int* __restrict__ tok_table, const int* __restrict__ tables,
                                  int heads, int kv_heads, int head_dim, int block_size, int window,
                                  int tq, int tk, float scale) {
  CH_DYN_SHARED(float, smem);
  const int ld = head_dim + 1;         // padded row stride of qs and ks
  float* qs = smem;                    // [tq][ld]
  float* ks = qs + tq * ld;            // [tk][ld]
  float* vs = ks + tk * ld;            // [tk][head_dim]
  float* sc = vs + tk * head_dim;      // [tq][tk]
  CH_SHARED(float, row_m, [32]);
  CH_SHARED(float, row_l, [32]);
  CH_SHARED(float, row_a, [32]);
  CH_SHARED(int, row_pos, [32]);
  CH_SHARED(int, row_start, [32]);
  const int t0 = tiles[2 * blockIdx.x], cnt = tiles[2 * blockIdx.x + 1];
  const int h = blockIdx.y, kvh = h / (heads / kv_heads);
  const int row = kv_heads * head_dim;
  const int* table = tables + tok_table[t0];

  for (int e = threadIdx.x; e < tq * head_dim; e += blockDim.x) {
    int i = e / head_dim, d = e % head_dim;
    qs[i * ld + d] = i < cnt ? q[((size_t)(t0 + i) * heads + h) * head_dim + d] : 0.0f;
  }
  if (threadIdx.x < tq) {
    int i = threadIdx.x;
    int p = i < cnt ? tok_pos[t0 + i] : -1;
    row_pos[i] = p;
    row_start[i] = window > 0 ? max(0, p + 1 - window) : 0;
    row_m[i] = CH_NEG_INF;
    row_l[i] = 0.0f;
  }
  float acc[PREFILL_ACC];
#pragma unroll
  for (int r = 0; r < PREFILL_ACC; ++r) acc[r] = 0.0f;
  __syncthreads();
  const int lo = row_start[0];
  const int hi = row_pos[cnt - 1];
  for (int kb = lo; kb <= hi; kb += tk) {
    for (int e = threadIdx.x; e < tk * head_dim; e += blockDim.x) {
      int j = e / head_dim, d = e % head_dim, p = kb + j;
      float kv = 0.0f, vv = 0.0f;
      if (p <= hi) {
        size_t slot = (size_t)table[p / block_size] * block_size + p % block_size;
        size_t off = slot * row + (size_t)kvh * head_dim + d;
        kv = ld1(kc, off);
        vv = ld1(vc, off);
      }
      ks[j * ld + d] = kv;
      vs[e] = vv;
    }
    __syncthreads();
    for (int e = threadIdx.x; e < tq * tk; e += blockDim.x) {
      int i = e / tk, j = e % tk, p = kb + j;
      float s = CH_NEG_INF;
      if (i < cnt && p <= row_pos[i] && p >= row_start[i]) {
        float dot = 0.0f;
        for (int d = 0; d < head_dim; ++d) dot = fmaf(qs[i * ld + d], ks[j * ld + d], dot);
        s = dot * scale;
      }
      sc[e] = s;
    }
    __syncthreads();
    if (threadIdx.x < tq) {
      int i = threadIdx.x;
      float mx = row_m[i];
      for (int j = 0; j < tk; ++j) mx = fmaxf(mx, sc[i * tk + j]);
      if (mx == CH_NEG_INF) {
        row_a[i] = 1.0f;  // nothing visible yet: weights stay zero
      } else {
        float a = expf(row_m[i] - mx);  // exp(-inf) = 0 on the first visible chunk
        float l = row_l[i] * a;
        for (int j = 0; j < tk; ++j) {
          float pj = expf(sc[i * tk + j] - mx);
          sc[i * tk + j] = pj;
          l += pj;
        }
        row_a[i] = a;
        row_l[i] = l;
        row_m[i] = mx;
      }
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < PREFILL_ACC; ++r) {
      int e = threadIdx.x + r * blockDim.x;
      if (e < tq * head_dim) {
        int i = e / head_dim, d = e % head_dim;
        if (row_m[i] != CH_NEG_INF) {
          float a = acc[r] * row_a[i];
          for (int j = 0; j < tk; ++j) a = fmaf(sc[i * tk + j], vs[j * head_dim + d], a);
          acc[r] = a;
        }
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int r = 0; r < PREFILL_ACC; ++r) {
    int e = threadIdx.x + r * blockDim.x;
    if (e < tq * head_dim) {
      int i = e / head_dim, d = e % head_dim;
      if (i < cnt) out[((size_t)(t0 + i) * heads + h) * head_dim + d] = acc[r] / row_l[i];
    }
  }
}

#define ATTN_INSTANTIATE(SUFFIX, KV)                                                            \
  extern "C" __global__ void kv_write_##SUFFIX(const float* k, const float* v, KV* kc, KV* vc,  \
                                               const int* slots, int m, int row) {              \
    kv_write(k, v, kc, vc, slots, m, row);                                                      \
  }                                                                                             \
  extern "C" __global__ void attention_decode_##SUFFIX(                                         \
      const float* q, const KV* kc, const KV* vc, float* out, const int* tokens,                \
      const int* tok_pos, const int* tok_table, const int* tables, int heads, int kv_heads,     \
      int head_dim, int block_size, int window, int part_size, float scale, float* part_out,    \
      float* part_max, float* part_sum) {                                                       \
    attention_decode(q, kc, vc, out, tokens, tok_pos, tok_table, tables, heads, kv_heads,       \
                     head_dim, block_size, window, part_size, scale, part_out, part_max,        \
                     part_sum);                                                                 \
  }                                                                                             \
  extern "C" __global__ void attention_prefill_##SUFFIX(                                        \
      const float* q, const KV* kc, const KV* vc, float* out, const int* tiles,                 \
      const int* tok_pos, const int* tok_table, const int* tables, int heads, int kv_heads,     \
      int head_dim, int block_size, int window, int tq, int tk, float scale) {                  \
    attention_prefill(q, kc, vc, out, tiles, tok_pos, tok_table, tables, heads, kv_heads,       \
                      head_dim, block_size, window, tq, tk, scale);                             \
  }

ATTN_INSTANTIATE(f32, float)
ATTN_INSTANTIATE(f16, h16)
