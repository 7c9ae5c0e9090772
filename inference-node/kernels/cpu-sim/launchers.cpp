// Every kernel of ../*.cu behind a C ABI launcher `sim_<entry>(cfg, args)`,
// built by tests/kernels_cpu.rs with g++ into a shared library (one per
// __CUDA_ARCH__ it tests). The argument lists are the .cu signatures.
#include "cuda_cpu.h"

#include "../common.cuh"
#include "../embedding.cu"
#include "../norm.cu"
#include "../rope.cu"
#include "../elementwise.cu"
#include "../gemv.cu"
#include "../gemv_blocks.cu"
#include "../attention.cu"
#include "../sampling.cu"

extern "C" const char* sim_last_error() { return ::cusim::report().error.c_str(); }
extern "C" unsigned int sim_last_static_smem() { return ::cusim::report().static_smem; }
extern "C" unsigned long long sim_last_barriers() { return ::cusim::report().barriers; }
extern "C" unsigned int sim_cuda_arch() { return __CUDA_ARCH__; }
extern "C" unsigned long long sim_last_exp_calls() { return ::cusim::report().exp_calls; }

#define H16 const h16*
#define B16 const b16*

CUSIM_KERNEL(embedding_f32, (const float* t, const unsigned int* ids, float* out, int m, int hidden, int vocab), (t, ids, out, m, hidden, vocab))
CUSIM_KERNEL(embedding_f16, (H16 t, const unsigned int* ids, float* out, int m, int hidden, int vocab), (t, ids, out, m, hidden, vocab))
CUSIM_KERNEL(embedding_bf16, (B16 t, const unsigned int* ids, float* out, int m, int hidden, int vocab), (t, ids, out, m, hidden, vocab))

CUSIM_KERNEL(add_rmsnorm, (float* x, const float* delta, const float* w, float* out, int d, float eps), (x, delta, w, out, d, eps))

CUSIM_KERNEL(rope_table, (const int* pos, const double* inv_freq, float* c, float* s, int m, int half), (pos, inv_freq, c, s, m, half))
CUSIM_KERNEL(rope_apply, (float* x, const float* c, const float* s, int m, int heads, int head_dim, int interleaved), (x, c, s, m, heads, head_dim, interleaved))

CUSIM_KERNEL(silu_mul, (float* g, const float* u, size_t n), (g, u, n))
CUSIM_KERNEL(add_inplace, (float* x, const float* d, size_t n), (x, d, n))
CUSIM_KERNEL(gather_rows, (const float* src, const int* rows, float* dst, int nrows, int d), (src, rows, dst, nrows, d))
CUSIM_KERNEL(cast_f32_f16, (const float* x, h16* y, size_t n, int* overflow), (x, y, n, overflow))
CUSIM_KERNEL(cast_f32_bf16, (const float* x, b16* y, size_t n), (x, y, n))
CUSIM_KERNEL(add_bias, (float* y, const float* bias, int m, int n), (y, bias, m, n))

CUSIM_KERNEL(gemv_f32, (const float* x, const float* w, const float* bias, float* y, int m, int n, int k), (x, w, bias, y, m, n, k))
CUSIM_KERNEL(gemv_f16, (const float* x, H16 w, const float* bias, float* y, int m, int n, int k), (x, w, bias, y, m, n, k))
CUSIM_KERNEL(gemv_bf16, (const float* x, B16 w, const float* bias, float* y, int m, int n, int k), (x, w, bias, y, m, n, k))
#define GEMV3_LAUNCHER(SFX, W)                                                                          \
  CUSIM_KERNEL(gemv3_##SFX,                                                                              \
               (const float* x, const W* w0, const float* b0, float* y0, int n0, const W* w1,           \
                const float* b1, float* y1, int n1, const W* w2, const float* b2, float* y2, int n2,    \
                int m, int k),                                                                           \
               (x, w0, b0, y0, n0, w1, b1, y1, n1, w2, b2, y2, n2, m, k))
GEMV3_LAUNCHER(f32, float)
GEMV3_LAUNCHER(f16, h16)
GEMV3_LAUNCHER(bf16, b16)
CUSIM_KERNEL(gemv_q8, (const int* xq, float xscale, const int* wq, const float* wscale, float* y, int n, int k), (xq, xscale, wq, wscale, y, n, k))
CUSIM_KERNEL(gemv_q8_0, (const float* x, const unsigned char* w, const float* bias, float* y, int m, int n, int k), (x, w, bias, y, m, n, k))
CUSIM_KERNEL(gemv3_q8_0,
             (const float* x, const unsigned char* w0, const float* b0, float* y0, int n0, const unsigned char* w1,
              const float* b1, float* y1, int n1, const unsigned char* w2, const float* b2, float* y2, int n2, int m, int k),
             (x, w0, b0, y0, n0, w1, b1, y1, n1, w2, b2, y2, n2, m, k))
CUSIM_KERNEL(dequant_q8_0_f16, (const unsigned char* w, h16* y, size_t n), (w, y, n))
#define BLOCK_LAUNCHERS(SFX)                                                                              \
  CUSIM_KERNEL(gemv_##SFX, (const float* x, const unsigned char* w, const float* bias, float* y, int m, int n, int k), \
               (x, w, bias, y, m, n, k))                                                                 \
  CUSIM_KERNEL(gemv3_##SFX,                                                                              \
               (const float* x, const unsigned char* w0, const float* b0, float* y0, int n0,            \
                const unsigned char* w1, const float* b1, float* y1, int n1, const unsigned char* w2,    \
                const float* b2, float* y2, int n2, int m, int k),                                       \
               (x, w0, b0, y0, n0, w1, b1, y1, n1, w2, b2, y2, n2, m, k))                                \
  CUSIM_KERNEL(dequant_##SFX##_f16, (const unsigned char* w, h16* y, size_t n), (w, y, n))
BLOCK_LAUNCHERS(q4_0)
BLOCK_LAUNCHERS(q4_k)
BLOCK_LAUNCHERS(q5_k)
BLOCK_LAUNCHERS(q6_k)

#define ATTN_LAUNCHERS(SFX, KV)                                                                           \
  CUSIM_KERNEL(kv_write_##SFX, (const float* k, const float* v, KV* kc, KV* vc, const int* slots, int m, int row), \
               (k, v, kc, vc, slots, m, row))                                                             \
  CUSIM_KERNEL(attention_decode_##SFX,                                                                    \
               (const float* q, const KV* kc, const KV* vc, float* out, const int* tokens, const int* tok_pos, \
                const int* tok_table, const int* tables, int heads, int kv_heads, int head_dim, int block_size, \
                int window, int part_size, float scale, float* part_out, float* part_max, float* part_sum),   \
               (q, kc, vc, out, tokens, tok_pos, tok_table, tables, heads, kv_heads, head_dim, block_size,   \
                window, part_size, scale, part_out, part_max, part_sum))                                  \
  CUSIM_KERNEL(attention_prefill_##SFX,                                                                   \
               (const float* q, const KV* kc, const KV* vc, float* out, const int* tiles, const int* tok_pos, \
                const int* tok_table, const int* tables, int heads, int kv_heads, int head_dim, int block_size, \
                int window, int tq, int tk, float scale),                                                 \
               (q, kc, vc, out, tiles, tok_pos, tok_table, tables, heads, kv_heads, head_dim, block_size,    \
                window, tq, tk, scale))
ATTN_LAUNCHERS(f32, float)
ATTN_LAUNCHERS(f16, h16)
CUSIM_KERNEL(attention_reduce, (const float* po, const float* pm, const float* ps, float* out, const int* tokens, int heads, int head_dim, int nparts), (po, pm, ps, out, tokens, heads, head_dim, nparts))

CUSIM_KERNEL(argmax_rows, (const float* logits, int vocab, int* out), (logits, vocab, out))
CUSIM_KERNEL(sample_rows, (const float* logits, int vocab, const float* t, const int* top_k, const float* top_p, const float* min_p, const double* u, int* out), (logits, vocab, t, top_k, top_p, min_p, u, out))

#include "selftest.cu"
CUSIM_KERNEL(selftest_missing_barrier, (const float* x, float* out), (x, out))
CUSIM_KERNEL(selftest_shuffle_after_exit, (float* out), (out))
CUSIM_KERNEL(selftest_divergent_barrier, (float* out), (out))
CUSIM_KERNEL(selftest_atomics, (int* count, unsigned int* odd), (count, odd))
