// CUDA's execution model on the CPU, so the kernels in ../*.cu compile as
// C++ (g++) and run in tests without a GPU (tests/kernels_cpu.rs).
//
// - A grid's blocks run on a few OS worker threads (blocks in a shuffled
//   order in checking mode); all threads of one block run on one worker as
//   fibers (ucontext), each CUDA thread its own stack and registers.
// - A fiber runs until it reaches a synchronization point (__syncthreads, a
//   warp shuffle/ballot/vote, __syncwarp) or exits; the block's scheduler
//   releases a barrier when every live thread (every lane of the mask) has
//   arrived. A barrier that can never complete (lanes of one warp waiting
//   at a shuffle while others wait at __syncthreads, a shuffle whose mask
//   names exited or absent lanes, __syncthreads reached from two different
//   places) fails the launch with the reason, as it is undefined on a GPU.
// - Warps are 32 consecutive threads (threadIdx linearized x-fastest);
//   shuffles exchange through a per-warp buffer behind the warp barrier.
// - Static shared memory (CH_SHARED) is carved per block from a block-local
//   arena on first use; dynamic shared memory (CH_DYN_SHARED) ends at a page
//   boundary followed by an inaccessible page, so an overrun faults. In
//   checking mode both are filled with NaN before each block and the order
//   in which threads run between barriers is shuffled (seeded), so a read
//   of unwritten shared memory or a missing barrier changes the result.
// - Launches fail, as on a GPU, when a block has more than 1024 threads or
//   static + dynamic shared memory exceeds the launch's limit.
// - __half / __nv_bfloat16 are 16-bit patterns with exact software
//   conversions (round to nearest even), atomics are GCC __atomic builtins.
//
// The kernels must declare shared memory with CH_SHARED / CH_DYN_SHARED
// (common.cuh maps them to __shared__ for NVRTC); a bare __shared__ does
// not compile here.
#pragma once
#define CUSIM 1

#include <math.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <functional>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#ifndef __CUDA_ARCH__
#error "compile with -D__CUDA_ARCH__=600 (or 610, 700, 800, ...)"
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __launch_bounds__(...)

using std::isfinite;
using std::isinf;
using std::isnan;

// ---- vector and index types -------------------------------------------------
struct uint3 { unsigned int x, y, z; };
struct dim3 {
  unsigned int x, y, z;
  dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) uint4 { unsigned int x, y, z, w; };
struct alignas(8) int2 { int x, y; };
struct alignas(16) int4 { int x, y, z, w; };

// ---- bit casts ------------------------------------------------------------------
template <typename To, typename From>
inline To cusim_bits(From f) {
  static_assert(sizeof(To) == sizeof(From), "size");
  To t;
  memcpy(&t, &f, sizeof t);
  return t;
}
inline float __int_as_float(int i) { return cusim_bits<float>(i); }
inline float __uint_as_float(unsigned int u) { return cusim_bits<float>(u); }
inline int __float_as_int(float f) { return cusim_bits<int>(f); }
inline unsigned int __float_as_uint(float f) { return cusim_bits<unsigned int>(f); }
inline double __longlong_as_double(long long i) { return cusim_bits<double>(i); }
inline long long __double_as_longlong(double d) { return cusim_bits<long long>(d); }

// ---- integer/float helpers CUDA provides -----------------------------------------
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned int min(unsigned int a, unsigned int b) { return a < b ? a : b; }
inline unsigned int max(unsigned int a, unsigned int b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
// Round-to-nearest arithmetic that nvcc never contracts into an FMA (g++
// for x86-64 without -mfma never contracts either).
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
inline int __popc(unsigned int x) { return __builtin_popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned int)x); }
inline int __dp4a(int a, int b, int c) {
  const signed char* x = reinterpret_cast<const signed char*>(&a);
  const signed char* y = reinterpret_cast<const signed char*>(&b);
  return c + x[0] * y[0] + x[1] * y[1] + x[2] * y[2] + x[3] * y[3];
}

// ---- half and bfloat16 ------------------------------------------------------------
struct __half { unsigned short x; };
struct alignas(4) __half2 { __half x, y; };
struct __nv_bfloat16 { unsigned short x; };
struct alignas(4) __nv_bfloat162 { __nv_bfloat16 x, y; };

inline float cusim_half_to_float(unsigned short h) {
  unsigned int sign = (unsigned int)(h & 0x8000u) << 16;
  unsigned int exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  if (exp == 0x1f) return cusim_bits<float>(sign | 0x7f800000u | (man << 13));
  if (exp == 0) {
    float f = (float)man * 5.9604644775390625e-8f;  // man * 2^-24, exact
    return sign ? -f : f;
  }
  return cusim_bits<float>(sign | ((exp + 112u) << 23) | (man << 13));
}
inline unsigned short cusim_float_to_half_rn(float f) {
  unsigned int u = cusim_bits<unsigned int>(f);
  unsigned int sign = (u >> 16) & 0x8000u;
  unsigned int a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return (unsigned short)(sign | 0x7e00u);  // NaN
  if (a >= 0x477ff000u) return (unsigned short)(sign | 0x7c00u);  // rounds to inf
  if (a < 0x38800000u) {  // below the smallest normal: subnormal or zero
    float m = cusim_bits<float>(a) * 16777216.0f;  // exact scale by 2^24
    unsigned int r = (unsigned int)nearbyintf(m);    // round to nearest even
    return (unsigned short)(sign | r);
  }
  unsigned int e = (a >> 23) - 112u, man = a & 0x7fffffu;
  unsigned int h = (e << 10) | (man >> 13);
  unsigned int rest = man & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) h += 1;
  return (unsigned short)(sign | h);
}
inline float cusim_bf16_to_float(unsigned short b) { return cusim_bits<float>((unsigned int)b << 16); }
inline unsigned short cusim_float_to_bf16_rn(float f) {
  unsigned int u = cusim_bits<unsigned int>(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  u += 0x7fffu + ((u >> 16) & 1u);
  return (unsigned short)(u >> 16);
}

inline __half __ushort_as_half(unsigned short b) { return __half{b}; }
inline unsigned short __half_as_ushort(__half h) { return h.x; }
inline float __half2float(__half h) { return cusim_half_to_float(h.x); }
inline __half __float2half_rn(float f) { return __half{cusim_float_to_half_rn(f)}; }
inline __half __float2half(float f) { return __float2half_rn(f); }
inline float2 __half22float2(__half2 h) { return float2{__half2float(h.x), __half2float(h.y)}; }
inline __half2 __floats2half2_rn(float a, float b) { return __half2{__float2half_rn(a), __float2half_rn(b)}; }
inline __half __hadd(__half a, __half b) { return __float2half_rn(__half2float(a) + __half2float(b)); }
inline __half __hmul(__half a, __half b) { return __float2half_rn(__half2float(a) * __half2float(b)); }
inline bool __hisinf(__half h) { return (h.x & 0x7fffu) == 0x7c00u; }
inline bool __hisnan(__half h) { return (h.x & 0x7fffu) > 0x7c00u; }

inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short b) { return __nv_bfloat16{b}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.x; }
inline float __bfloat162float(__nv_bfloat16 h) { return cusim_bf16_to_float(h.x); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16{cusim_float_to_bf16_rn(f)}; }
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
inline float2 __bfloat1622float2(__nv_bfloat162 h) {
  return float2{__bfloat162float(h.x), __bfloat162float(h.y)};
}

// ---- the runtime --------------------------------------------------------------------
namespace cusim {

/// One launch's settings, from the C ABI (tests/kernels_cpu.rs mirrors it).
struct Cfg {
  unsigned int grid[3];
  unsigned int block[3];
  unsigned int dyn_smem;    // bytes of dynamic shared memory
  unsigned int smem_limit;  // static + dynamic may not exceed this (48 KiB default)
  unsigned long long seed;  // thread and block order in checking mode
  unsigned int check;       // 1: NaN-filled shared memory, shuffled order
  unsigned int workers;     // OS threads running blocks (0: 2)
};

/// What the last launch reported (read through sim_last_*).
struct Report {
  std::string error;
  unsigned int static_smem = 0;  // most static shared bytes any block used
  unsigned long long barriers = 0;
  unsigned long long shuffles = 0;
  unsigned long long exp_calls = 0;  // exp(double) evaluations (sampling's cost)
};

enum class St { Ready, BlockBar, WarpBar, Done };

struct Fiber {
  ucontext_t ctx;
  char* stack = nullptr;
  uint3 tid;
  unsigned int linear = 0;
  St st = St::Ready;
};

struct Warp {
  unsigned int present = 0;  // lanes that exist (block size not a multiple of 32)
  unsigned int live = 0;     // lanes not exited
  unsigned int waiting = 0;  // lanes at the warp barrier
  unsigned int mask = 0;     // the mask the first arriving lane named
  unsigned long long buf[2][32];
  unsigned int gen = 0;      // parity of the exchange buffer in use
};

constexpr size_t kStack = 256 * 1024;
constexpr size_t kStaticArena = 64 * 1024;

struct Block {
  const Cfg* cfg = nullptr;
  uint3 bid;
  uint3 bdim;
  uint3 gdim;
  std::vector<Fiber>* fibers = nullptr;
  unsigned int nthreads = 0;
  unsigned int live = 0;
  unsigned int at_bar = 0;
  int bar_line = -1;
  const char* bar_file = nullptr;
  std::vector<Warp> warps;
  ucontext_t sched;
  Fiber* cur = nullptr;
  const std::function<void()>* body = nullptr;
  std::string error;
  // shared memory
  unsigned char* dyn = nullptr;
  unsigned char* arena = nullptr;
  size_t arena_used = 0;
  std::vector<std::pair<const void*, size_t>> statics;
  unsigned long long barriers = 0, shuffles = 0;
};

/// Per worker thread: its fiber stacks, shared memory, the block it runs.
struct Worker {
  std::vector<Fiber> fibers;
  unsigned char* dyn_map = nullptr;
  size_t dyn_map_len = 0;
  std::vector<unsigned char> arena = std::vector<unsigned char>(kStaticArena);
  Block* blk = nullptr;

  ~Worker() {
    for (auto& f : fibers)
      if (f.stack) munmap(f.stack, kStack);
    if (dyn_map) munmap(dyn_map, dyn_map_len);
  }
  void ensure_fibers(unsigned int n) {
    while (fibers.size() < n) {
      fibers.emplace_back();
      void* s = mmap(nullptr, kStack, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (s == MAP_FAILED) throw std::bad_alloc();
      fibers.back().stack = static_cast<char*>(s);
    }
  }
  /// Dynamic shared memory of `bytes`, ending where an inaccessible page starts.
  unsigned char* dyn_smem(size_t bytes) {
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    size_t need = (bytes + page - 1) / page * page + page;
    if (need > dyn_map_len) {
      if (dyn_map) munmap(dyn_map, dyn_map_len);
      void* m = mmap(nullptr, need, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (m == MAP_FAILED) throw std::bad_alloc();
      dyn_map = static_cast<unsigned char*>(m);
      dyn_map_len = need;
      mprotect(dyn_map + need - page, page, PROT_NONE);
    }
    return dyn_map + dyn_map_len - page - bytes;
  }
};

inline Worker& worker() {
  static thread_local Worker w;
  return w;
}
inline Block& blk() { return *worker().blk; }

inline void fill_nan(void* p, size_t bytes) {
  const unsigned int nan = 0x7fc00000u;
  unsigned char* b = static_cast<unsigned char*>(p);
  for (size_t i = 0; i + 4 <= bytes; i += 4) memcpy(b + i, &nan, 4);
  for (size_t i = bytes & ~size_t(3); i < bytes; ++i) b[i] = 0xff;
}

/// Leaves the current fiber for the scheduler.
inline void yield() {
  Block& b = blk();
  Fiber* f = b.cur;
  swapcontext(&f->ctx, &b.sched);
}

/// Fails the launch from inside a fiber: records why, parks the fiber.
[[noreturn]] inline void fail(const std::string& why) {
  Block& b = blk();
  if (b.error.empty()) b.error = why;
  for (;;) yield();  // the scheduler stops running fibers once an error is set
}

inline void syncthreads(const char* file, int line) {
  Block& b = blk();
  Fiber* f = b.cur;
  if (b.at_bar == 0) {
    b.bar_file = file;
    b.bar_line = line;
  } else if (b.bar_line != line || strcmp(b.bar_file, file) != 0) {
    fail("__syncthreads reached from two places in one block: " + std::string(b.bar_file) + ":" +
         std::to_string(b.bar_line) + " and " + file + ":" + std::to_string(line));
  }
  b.at_bar++;
  f->st = St::BlockBar;
  yield();
}

inline unsigned int lane_of(const Fiber* f) { return f->linear & 31u; }
inline Warp& warp_of(const Fiber* f) { return blk().warps[f->linear >> 5]; }

/// Every lane of `mask` passes this point together; returns the exchange
/// buffer this round uses (each lane has written its slot before).
inline unsigned long long* warp_exchange(unsigned int mask, unsigned long long value, const char* what) {
  Block& b = blk();
  Fiber* f = b.cur;
  Warp& w = warp_of(f);
  unsigned int lane = lane_of(f);
  if (!(mask & (1u << lane))) fail(std::string(what) + " called by a lane outside its mask");
  if ((mask & w.live) != mask) {
    fail(std::string(what) + " with mask " + std::to_string(mask) + " names lanes that " +
         ((mask & w.present) != mask ? "do not exist (block size not a multiple of 32)"
                                     : "have exited"));
  }
  if (w.waiting == 0) {
    w.mask = mask;
  } else if (w.mask != mask) {
    fail(std::string(what) + ": lanes of one warp name different masks");
  }
  unsigned int g = w.gen;
  w.buf[g][lane] = value;
  w.waiting |= 1u << lane;
  f->st = St::WarpBar;
  yield();
  return w.buf[g];
}

template <typename T>
inline unsigned long long to_bits(T v) {
  static_assert(sizeof(T) <= 8, "shuffle of a type over 8 bytes");
  unsigned long long u = 0;
  memcpy(&u, &v, sizeof(T));
  return u;
}
template <typename T>
inline T from_bits(unsigned long long u) {
  T v;
  memcpy(&v, &u, sizeof(T));
  return v;
}

inline void* static_shared(const void* tag, size_t bytes, size_t align) {
  Block& b = blk();
  for (auto& s : b.statics)
    if (s.first == tag) return b.arena + s.second;
  size_t off = (b.arena_used + align - 1) / align * align;
  if (off + bytes > kStaticArena) fail("static shared memory over the simulator's 64 KiB arena");
  b.statics.emplace_back(tag, off);
  b.arena_used = off + bytes;
  if (b.cfg->check) fill_nan(b.arena + off, bytes);
  return b.arena + off;
}
inline void* dynamic_shared() { return blk().dyn; }

inline uint3 thread_idx() { return blk().cur->tid; }
inline uint3 block_idx() { return blk().bid; }
inline uint3 block_dim() { return blk().bdim; }
inline uint3 grid_dim() { return blk().gdim; }

inline void fiber_main() {
  Block& b = blk();
  (*b.body)();
  b.cur->st = St::Done;
  // returns to b.sched through uc_link
}

/// Releases whatever barrier is complete; false if none could be.
inline bool release(Block& b) {
  bool any = false;
  for (auto& w : b.warps) {
    if (w.waiting && (w.waiting & w.mask) == w.mask) {
      size_t wi = (size_t)(&w - b.warps.data());
      for (unsigned int l = 0; l < 32; ++l)
        if (w.waiting & (1u << l)) (*b.fibers)[wi * 32 + l].st = St::Ready;
      w.waiting = 0;
      w.gen ^= 1u;
      b.shuffles++;
      any = true;
    }
  }
  if (!any && b.at_bar && b.at_bar == b.live) {
    for (unsigned int i = 0; i < b.nthreads; ++i)
      if ((*b.fibers)[i].st == St::BlockBar) (*b.fibers)[i].st = St::Ready;
    b.at_bar = 0;
    b.barriers++;
    any = true;
  }
  return any;
}

/// Runs one block to completion (or to its first error).
inline void run_block(Block& b, std::mt19937_64* rng) {
  Worker& wk = worker();
  wk.blk = &b;
  std::vector<unsigned int> order(b.nthreads);
  for (unsigned int i = 0; i < b.nthreads; ++i) order[i] = i;
  for (unsigned int i = 0; i < b.nthreads; ++i) {
    Fiber& f = (*b.fibers)[i];
    f.linear = i;
    f.tid = uint3{i % b.bdim.x, (i / b.bdim.x) % b.bdim.y, i / (b.bdim.x * b.bdim.y)};
    f.st = St::Ready;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kStack;
    f.ctx.uc_link = &b.sched;
    makecontext(&f.ctx, fiber_main, 0);
  }
  while (b.live > 0 && b.error.empty()) {
    if (rng) std::shuffle(order.begin(), order.end(), *rng);
    bool ran = false;
    for (unsigned int i : order) {
      Fiber& f = (*b.fibers)[i];
      if (f.st != St::Ready) continue;
      b.cur = &f;
      swapcontext(&b.sched, &f.ctx);
      ran = true;
      if (!b.error.empty()) break;
      if (f.st == St::Done) {
        b.live--;
        Warp& w = b.warps[i >> 5];
        w.live &= ~(1u << (i & 31u));
        if (w.waiting && (w.mask & ~w.live)) {
          b.error = "a lane exited while others of its warp wait for it at a shuffle";
        }
      }
    }
    if (!b.error.empty()) break;
    if (b.live == 0) break;
    if (!release(b) && !ran) {
      b.error = "deadlock: threads wait at barriers that can never complete (" +
                std::to_string(b.at_bar) + " of " + std::to_string(b.live) +
                " live threads at __syncthreads, the rest at warp operations)";
    }
  }
  wk.blk = nullptr;
}

inline std::mutex& report_lock() {
  static std::mutex m;
  return m;
}
inline Report& report() {
  static Report r;
  return r;
}

/// Runs `body` as a kernel over the grid of `c`; 0 on success, else -1 with
/// the reason in report().error.
inline std::atomic<unsigned long long>& exp_counter() {
  static std::atomic<unsigned long long> n{0};
  return n;
}
inline double counted_exp(double x) {
  exp_counter().fetch_add(1, std::memory_order_relaxed);
  return std::exp(x);
}
inline float counted_exp(float x) { return std::exp(x); }

inline int launch(const Cfg& c, const std::function<void()>& body) {
  Report& rep = report();
  rep = Report{};
  exp_counter().store(0);
  unsigned int nthreads = c.block[0] * c.block[1] * c.block[2];
  unsigned long long nblocks = (unsigned long long)c.grid[0] * c.grid[1] * c.grid[2];
  if (nthreads == 0 || nthreads > 1024) {
    rep.error = "invalid block of " + std::to_string(nthreads) + " threads (1 to 1024)";
    return -1;
  }
  unsigned int limit = c.smem_limit ? c.smem_limit : 48 * 1024;
  if (c.dyn_smem > limit) {
    rep.error = "dynamic shared memory " + std::to_string(c.dyn_smem) + " B over the limit " + std::to_string(limit);
    return -1;
  }
  std::vector<unsigned long long> blocks(nblocks);
  for (unsigned long long i = 0; i < nblocks; ++i) blocks[i] = i;
  if (c.check) {
    std::mt19937_64 r(c.seed ^ 0x9e3779b97f4a7c15ull);
    std::shuffle(blocks.begin(), blocks.end(), r);
  }
  std::atomic<unsigned long long> next{0};
  std::mutex err_lock;
  std::string first_error;
  unsigned int static_max = 0;
  unsigned long long barriers = 0, shuffles = 0;
  auto work = [&](unsigned int wid) {
    Worker& wk = worker();
    wk.ensure_fibers(nthreads);
    std::mt19937_64 rng(c.seed * 7919u + wid);
    for (;;) {
      unsigned long long k = next.fetch_add(1);
      if (k >= nblocks) break;
      {
        std::lock_guard<std::mutex> g(err_lock);
        if (!first_error.empty()) break;
      }
      unsigned long long id = blocks[k];
      Block b;
      b.cfg = &c;
      b.bid = uint3{(unsigned int)(id % c.grid[0]), (unsigned int)(id / c.grid[0] % c.grid[1]),
                    (unsigned int)(id / ((unsigned long long)c.grid[0] * c.grid[1]))};
      b.bdim = uint3{c.block[0], c.block[1], c.block[2]};
      b.gdim = uint3{c.grid[0], c.grid[1], c.grid[2]};
      b.fibers = &wk.fibers;
      b.nthreads = b.live = nthreads;
      b.warps.resize((nthreads + 31) / 32);
      for (unsigned int w = 0; w < b.warps.size(); ++w) {
        unsigned int n = std::min(32u, nthreads - 32 * w);
        b.warps[w].present = b.warps[w].live = n == 32 ? 0xffffffffu : ((1u << n) - 1u);
      }
      b.body = &body;
      b.dyn = wk.dyn_smem(c.dyn_smem);
      b.arena = wk.arena.data();
      if (c.check) {
        fill_nan(b.dyn, c.dyn_smem);
        fill_nan(b.arena, kStaticArena);
      }
      run_block(b, c.check ? &rng : nullptr);
      std::lock_guard<std::mutex> g(err_lock);
      static_max = std::max(static_max, (unsigned int)b.arena_used);
      barriers += b.barriers;
      shuffles += b.shuffles;
      if (b.error.empty() && b.arena_used + c.dyn_smem > limit) {
        b.error = "too much shared memory: " + std::to_string(b.arena_used) + " B static + " +
                  std::to_string(c.dyn_smem) + " B dynamic > " + std::to_string(limit) + " B";
      }
      if (!b.error.empty() && first_error.empty()) {
        first_error = "block (" + std::to_string(b.bid.x) + "," + std::to_string(b.bid.y) + "," +
                      std::to_string(b.bid.z) + "): " + b.error;
      }
    }
  };
  unsigned int nw = c.workers ? c.workers : 2;
  nw = (unsigned int)std::min<unsigned long long>(nw, std::max(1ull, nblocks));
  if (nw <= 1) {
    work(0);
  } else {
    std::vector<std::thread> ts;
    for (unsigned int w = 0; w < nw; ++w) ts.emplace_back(work, w);
    for (auto& t : ts) t.join();
  }
  rep.static_smem = static_max;
  rep.exp_calls = exp_counter().load();
  rep.barriers = barriers;
  rep.shuffles = shuffles;
  rep.error = first_error;
  return first_error.empty() ? 0 : -1;
}

}  // namespace cusim

// ---- what kernels see ---------------------------------------------------------------
#define threadIdx (::cusim::thread_idx())
#define blockIdx (::cusim::block_idx())
#define blockDim (::cusim::block_dim())
#define gridDim (::cusim::grid_dim())
#define warpSize 32
#define __syncthreads() ::cusim::syncthreads(__FILE__, __LINE__)
// exp(double) is counted (kernels included after this header only).
#define exp(x) ::cusim::counted_exp(x)

#define CH_SHARED(T, name, dims)                                                           \
  static const char cusim_tag_##name = 0;                                                  \
  T(&name) dims = *reinterpret_cast<T(*) dims>(                                            \
      ::cusim::static_shared(&cusim_tag_##name, sizeof(T dims), alignof(T)))
#define CH_DYN_SHARED(T, name) T* name = reinterpret_cast<T*>(::cusim::dynamic_shared())

inline void __syncwarp(unsigned int mask = 0xffffffffu) { ::cusim::warp_exchange(mask, 0, "__syncwarp"); }
template <typename T>
inline T __shfl_sync(unsigned int mask, T v, int src, int width = 32) {
  unsigned int lane = ::cusim::lane_of(::cusim::blk().cur);
  unsigned long long* buf = ::cusim::warp_exchange(mask, ::cusim::to_bits(v), "__shfl_sync");
  unsigned int base = lane & ~(unsigned int)(width - 1);
  return ::cusim::from_bits<T>(buf[base + ((unsigned int)src & (unsigned int)(width - 1))]);
}
template <typename T>
inline T __shfl_xor_sync(unsigned int mask, T v, int lane_mask, int width = 32) {
  unsigned int lane = ::cusim::lane_of(::cusim::blk().cur);
  unsigned long long* buf = ::cusim::warp_exchange(mask, ::cusim::to_bits(v), "__shfl_xor_sync");
  unsigned int src = lane ^ (unsigned int)lane_mask;
  if ((src & ~(unsigned int)(width - 1)) != (lane & ~(unsigned int)(width - 1))) src = lane;
  return ::cusim::from_bits<T>(buf[src]);
}
template <typename T>
inline T __shfl_down_sync(unsigned int mask, T v, unsigned int delta, int width = 32) {
  unsigned int lane = ::cusim::lane_of(::cusim::blk().cur);
  unsigned long long* buf = ::cusim::warp_exchange(mask, ::cusim::to_bits(v), "__shfl_down_sync");
  unsigned int seg = lane % (unsigned int)width;
  unsigned int src = seg + delta < (unsigned int)width ? lane + delta : lane;
  return ::cusim::from_bits<T>(buf[src]);
}
template <typename T>
inline T __shfl_up_sync(unsigned int mask, T v, unsigned int delta, int width = 32) {
  unsigned int lane = ::cusim::lane_of(::cusim::blk().cur);
  unsigned long long* buf = ::cusim::warp_exchange(mask, ::cusim::to_bits(v), "__shfl_up_sync");
  unsigned int seg = lane % (unsigned int)width;
  unsigned int src = seg >= delta ? lane - delta : lane;
  return ::cusim::from_bits<T>(buf[src]);
}
inline unsigned int __ballot_sync(unsigned int mask, int pred) {
  unsigned long long* buf = ::cusim::warp_exchange(mask, pred ? 1 : 0, "__ballot_sync");
  unsigned int r = 0;
  for (unsigned int l = 0; l < 32; ++l)
    if ((mask & (1u << l)) && buf[l]) r |= 1u << l;
  return r;
}
inline int __any_sync(unsigned int mask, int pred) { return __ballot_sync(mask, pred) != 0; }
inline int __all_sync(unsigned int mask, int pred) { return __ballot_sync(mask, pred) == mask; }

// ---- atomics (relaxed on the GPU too; sequentially consistent here) -----------------
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline unsigned int atomicAdd(unsigned int* p, unsigned int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
}
inline float atomicAdd(float* p, float v) {
  float old;
  __atomic_load(p, &old, __ATOMIC_SEQ_CST);
  for (;;) {
    float nv = old + v;
    if (__atomic_compare_exchange(p, &old, &nv, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) return old;
  }
}
inline double atomicAdd(double* p, double v) {
  double old;
  __atomic_load(p, &old, __ATOMIC_SEQ_CST);
  for (;;) {
    double nv = old + v;
    if (__atomic_compare_exchange(p, &old, &nv, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) return old;
  }
}
inline int atomicMax(int* p, int v) {
  int old = __atomic_load_n(p, __ATOMIC_SEQ_CST);
  while (old < v && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
  }
  return old;
}
inline unsigned int atomicMax(unsigned int* p, unsigned int v) {
  unsigned int old = __atomic_load_n(p, __ATOMIC_SEQ_CST);
  while (old < v && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
  }
  return old;
}
inline int atomicMin(int* p, int v) {
  int old = __atomic_load_n(p, __ATOMIC_SEQ_CST);
  while (old > v && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
  }
  return old;
}
inline int atomicOr(int* p, int v) { return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }
inline unsigned int atomicOr(unsigned int* p, unsigned int v) { return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }
inline int atomicExch(int* p, int v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
inline int atomicCAS(int* p, int cmp, int v) {
  __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return cmp;
}
inline unsigned int atomicCAS(unsigned int* p, unsigned int cmp, unsigned int v) {
  __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return cmp;
}
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

// ---- C ABI launchers ------------------------------------------------------------------
#define CUSIM_UNPAREN(...) __VA_ARGS__
/// `sim_NAME(const cusim::Cfg*, params...)`: runs kernel NAME; 0 or -1.
#define CUSIM_KERNEL(name, params, args)                                          \
  extern "C" int sim_##name(const ::cusim::Cfg* cusim_cfg, CUSIM_UNPAREN params) { \
    return ::cusim::launch(*cusim_cfg, [=] { name args; });                      \
  }
