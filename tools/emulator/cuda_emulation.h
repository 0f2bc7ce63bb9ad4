// Host emulation of the part of CUDA that csrc/kernels uses, so that the kernels and
// their launch code compile unchanged for the CPU:
//   g++ -include cuda_emulation.h -x c++ csrc/kernels/fwd_rows.cu ...
//
// Threads are fibers scheduled by tools/emulator/scheduler.cpp under a choice of
// orders, and the CTAs of a wave run interleaved. __syncthreads and __shfl_xor_sync
// carry their call site, so the scheduler can check that every thread of a block
// reaches the same barrier and every lane of a mask the same shuffle. __shared__
// arrays are statics; the emulator finds each kernel's arrays by symbol and gives
// every CTA its own poisoned copy. The CUDA runtime calls of dispatch.cu go to
// device.cpp, which applies the launch rules of a chosen GPU. This checks indexing,
// coverage, synchronisation and launch configuration; it says nothing about speed.
#pragma once

#include <cuda_runtime.h>  // types (dim3, uint4, cudaError_t); its functions are replaced below
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __shared__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)

namespace emu {
// The mutant a mutant-schema build of the kernels runs (tests/mutants.py): its
// rewritten sources choose between the original code and mutant k at run time by
// comparing this with k. 0 (the default) runs the original code.
extern int mutant;

// Where a barrier or shuffle is called from, for the agreement checks.
struct Site {
  const char* file;
  int line;
};

extern dim3 threadIdx, blockIdx, blockDim, gridDim;  // of the running fiber
void syncthreads(Site site);
double shfl_xor(Site site, unsigned mask, double v, int lane_mask, int width);
template <typename T>
T shfl_xor_sync(Site site, unsigned mask, T v, int lane_mask, int width = 32) {
  // Through double: exact for the float, double and int values the kernels exchange.
  return static_cast<T>(shfl_xor(site, mask, static_cast<double>(v), lane_mask, width));
}
}  // namespace emu

using emu::blockDim;
using emu::blockIdx;
using emu::gridDim;
using emu::threadIdx;
#define __syncthreads() ::emu::syncthreads(::emu::Site{__FILE__, __LINE__})

// Thread-block clusters (csrc/kernels/cluster.cuh): a launch's CTAs come in groups of
// `cluster` that run together; the cluster barrier is checked like __syncthreads over
// every thread of the group, and a peer's shared memory is its dynamic shared memory
// (poisoned when it exits, so a read after its exit shows).
namespace emu {
int cluster_rank();
int cluster_size();
void cluster_sync(Site site);
void* cluster_map(const void* p, int rank);
}  // namespace emu
inline int cluster_rank() { return ::emu::cluster_rank(); }
inline int cluster_size() { return ::emu::cluster_size(); }
template <typename T>
T* cluster_map(T* p, int rank) {
  return static_cast<T*>(::emu::cluster_map(p, rank));
}
#define cluster_sync() ::emu::cluster_sync(::emu::Site{__FILE__, __LINE__})

// cp.async: a copy is recorded when issued (its destination poisoned at once) and
// performed when a wait retires its group, so a read that does not wait for it reads
// poison. Only 16-byte copies into the thread's own dynamic shared memory.
namespace emu {
void async_copy16(void* dst, const void* src);
void async_commit();
void async_wait(int n);
}  // namespace emu
inline void async_copy16(void* dst, const void* src) { ::emu::async_copy16(dst, src); }
inline void async_commit() { ::emu::async_commit(); }
template <int N>
void async_wait() {
  ::emu::async_wait(N);
}
#define __shfl_xor_sync(...) ::emu::shfl_xor_sync(::emu::Site{__FILE__, __LINE__}, __VA_ARGS__)

inline float rsqrtf(float v) { return 1.0f / std::sqrt(v); }

// CUDA runtime calls made by csrc/kernels/dispatch.cu (device.cpp).
namespace emu {
cudaError_t get_device(int* device);
cudaError_t device_attribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t device_properties(cudaDeviceProp* prop, int device);
cudaError_t func_set_attribute(const void* func, cudaFuncAttribute attr, int value);
cudaError_t occupancy(int* ctas, const void* func, int block, size_t smem);
cudaError_t occupancy_clusters(int* clusters, const void* func, const cudaLaunchConfig_t* config);
cudaError_t func_attributes(cudaFuncAttributes* attr, const void* func);
cudaError_t get_last_error();
template <typename Params>
cudaError_t launch_kernel(const void* func, dim3 grid, dim3 block, void** args, size_t smem);
template <typename Params>
cudaError_t launch_kernel_ex(const cudaLaunchConfig_t* config, const void* func, void** args);
}  // namespace emu
#define cudaGetDevice(d) ::emu::get_device(d)
#define cudaDeviceGetAttribute(v, a, d) ::emu::device_attribute(v, a, d)
#define cudaGetDeviceProperties(p, d) ::emu::device_properties(p, d)
#define cudaFuncSetAttribute(f, a, v) ::emu::func_set_attribute(f, a, v)
#define cudaOccupancyMaxActiveBlocksPerMultiprocessor(c, f, b, s) ::emu::occupancy(c, f, b, s)
#define cudaOccupancyMaxActiveClusters(n, f, c) ::emu::occupancy_clusters(n, f, c)
#define cudaFuncGetAttributes(a, f) ::emu::func_attributes(a, f)
#define cudaGetLastError() ::emu::get_last_error()
// Expands inside dispatch.cu's `template <typename Params> launch(...)`.
#define cudaLaunchKernel(f, g, b, a, s, st) ::emu::launch_kernel<Params>(f, g, b, a, s)
#define cudaLaunchKernelExC(c, f, a) ::emu::launch_kernel_ex<Params>(c, f, a)

#include "emulator_launch.h"
