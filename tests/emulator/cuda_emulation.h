// Host emulation of the small part of CUDA the kernels in csrc/kernels use, so that
// their code runs unchanged on a CPU (g++ -include cuda_emulation.h -x c++ file.cu).
//
// A launch runs the grid's blocks one after another; the threads of a block are
// cooperative fibers, __syncthreads is a block-wide barrier and __shfl_xor_sync
// exchanges values through a per-warp buffer between two warp-wide barriers. __shared__ arrays
// become function-local statics (one block runs at a time) and `extern __shared__`
// memory is emulator.cpp's residual_fused::dyn_smem. This checks indexing, coverage,
// synchronisation structure and arithmetic; it says nothing about speed.
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
extern dim3 threadIdx, blockIdx, blockDim, gridDim;  // of the running fiber
void syncthreads();
double shfl_xor(double v, int lane_mask, int width);
template <typename T>
T shfl_xor_sync(unsigned, T v, int lane_mask, int width = 32) {
  return static_cast<T>(shfl_xor(static_cast<double>(v), lane_mask, width));
}
}  // namespace emu

using emu::blockDim;
using emu::blockIdx;
using emu::gridDim;
using emu::threadIdx;
#define __syncthreads() ::emu::syncthreads()
#define __shfl_xor_sync(...) ::emu::shfl_xor_sync(__VA_ARGS__)

inline float rsqrtf(float v) { return 1.0f / std::sqrt(v); }

// CUDA runtime calls made by csrc/kernels/dispatch.cu.
namespace emu {
cudaError_t get_device(int* device);
cudaError_t device_attribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t func_set_attribute(const void* func, cudaFuncAttribute attr, int value);
cudaError_t occupancy(int* ctas, const void* func, int block, size_t smem);
cudaError_t func_attributes(cudaFuncAttributes* attr, const void* func);
cudaError_t get_last_error();
template <typename Params>
cudaError_t launch_kernel(const void* func, dim3 grid, dim3 block, void** args, size_t smem);
}  // namespace emu
#define cudaGetDevice(d) ::emu::get_device(d)
#define cudaDeviceGetAttribute(v, a, d) ::emu::device_attribute(v, a, d)
#define cudaFuncSetAttribute(f, a, v) ::emu::func_set_attribute(f, a, v)
#define cudaOccupancyMaxActiveBlocksPerMultiprocessor(c, f, b, s) ::emu::occupancy(c, f, b, s)
#define cudaFuncGetAttributes(a, f) ::emu::func_attributes(a, f)
#define cudaGetLastError() ::emu::get_last_error()
// Expands inside dispatch.cu's `template <typename Params> launch(...)`.
#define cudaLaunchKernel(f, g, b, a, s, st) ::emu::launch_kernel<Params>(f, g, b, a, s)

#include "emulator_launch.h"
