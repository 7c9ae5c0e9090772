// Embedding gather: out[t][j] = table[ids[t]][j] widened to f32 (ids beyond
// the vocabulary give zeros; the engine never sends them).
template <typename W>
__device__ void embedding(const W* __restrict__ table, const unsigned int* __restrict__ ids,
                          float* __restrict__ out, int m, int hidden, int vocab) {
  size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= (size_t)m * hidden) return;
  int t = (int)(idx / hidden), j = (int)(idx % hidden);
  unsigned int id = ids[t];
  out[idx] = id < (unsigned int)vocab ? ld1(table, (size_t)id * hidden + j) : 0.0f;
}

extern "C" __global__ void embedding_f32(const float* table, const unsigned int* ids, float* out, int m, int hidden, int vocab) {
  embedding(table, ids, out, m, hidden, vocab);
}
extern "C" __global__ void embedding_f16(const h16* table, const unsigned int* ids, float* out, int m, int hidden, int vocab) {
  embedding(table, ids, out, m, hidden, vocab);
}
extern "C" __global__ void embedding_bf16(const b16* table, const unsigned int* ids, float* out, int m, int hidden, int vocab) {
  embedding(table, ids, out, m, hidden, vocab);
}
