// Kernels for the simulator's own tests (tests/kernels_cpu.rs): three are
// wrong on purpose, and the simulator must catch each; one counts with
// atomics from every thread of many blocks. Not compiled by NVRTC.

// A block sum whose second phase reads the warps' partial sums without the
// __syncthreads that must separate the phases.
extern "C" __global__ void selftest_missing_barrier(const float* x, float* out) {
  CH_SHARED(float, part, [32]);
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float v = warp_sum(x[blockIdx.x * blockDim.x + threadIdx.x]);
  if (lane == 0) part[warp] = v;
  if (threadIdx.x == 0) {
    float s = 0.0f;
    for (int w = 0; w < (int)(blockDim.x / 32); ++w) s += part[w];
    out[blockIdx.x] = s;
  }
}

// A full-warp shuffle after one lane has returned.
extern "C" __global__ void selftest_shuffle_after_exit(float* out) {
  if (threadIdx.x == 5) return;
  float v = __shfl_xor_sync(0xffffffffu, (float)threadIdx.x, 1);
  out[threadIdx.x] = v;
}

// __syncthreads in both branches of a divergent if.
extern "C" __global__ void selftest_divergent_barrier(float* out) {
  if (threadIdx.x < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.0f;
}

// Every thread of every block adds one; ballots count the odd lanes.
extern "C" __global__ void selftest_atomics(int* count, unsigned int* odd_lanes) {
  atomicAdd(count, 1);
  unsigned int b = __ballot_sync(0xffffffffu, threadIdx.x & 1);
  if ((threadIdx.x & 31) == 0) atomicAdd(odd_lanes, (unsigned int)__popc(b));
}
