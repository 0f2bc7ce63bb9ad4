// Thread-block cluster primitives (sm_90): a CTA's rank in its cluster, the cluster
// barrier, and the address of a peer CTA's shared memory (distributed shared memory);
// and asynchronous global-to-shared copies (cp.async), with which a thread fetches
// the next row while it computes on the current one. Under tests/emulator the same
// names are provided by cuda_emulation.h.
#pragma once

#include "common.cuh"

#ifndef RESIDUAL_FUSED_HOST_EMULATION
#include <cooperative_groups.h>
#endif

namespace residual_fused {

// Whether this compilation pass has clusters. The cluster kernels are compiled for
// every target, but their bodies only where this is true; the host never launches
// them on code compiled without it (dispatch.cu checks the kernel's PTX version).
#if defined(RESIDUAL_FUSED_HOST_EMULATION) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900)
#define RESIDUAL_FUSED_HAS_CLUSTERS 1
#else
#define RESIDUAL_FUSED_HAS_CLUSTERS 0
#endif

#if RESIDUAL_FUSED_HAS_CLUSTERS && !defined(RESIDUAL_FUSED_HOST_EMULATION)
__device__ __forceinline__ int cluster_rank() {
  return static_cast<int>(cooperative_groups::this_cluster().block_rank());
}
__device__ __forceinline__ int cluster_size() {
  return static_cast<int>(cooperative_groups::this_cluster().num_blocks());
}
// Every thread of every CTA of the cluster arrives; shared-memory writes before it are
// visible to every CTA of the cluster after it (release/acquire at cluster scope).
__device__ __forceinline__ void cluster_sync() { cooperative_groups::this_cluster().sync(); }
// The address of `p` (this CTA's shared memory) in the CTA of rank `rank`.
template <typename T>
__device__ __forceinline__ T* cluster_map(T* p, int rank) {
  return cooperative_groups::this_cluster().map_shared_rank(p, static_cast<unsigned>(rank));
}

// Starts copying 16 bytes from global `src` to shared `dst` (both 16-byte aligned)
// without waiting; the copy belongs to the thread's next committed group.
__device__ __forceinline__ void async_copy16(void* dst, const void* src) {
  const unsigned shared = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(shared), "l"(src) : "memory");
}
// Closes the thread's current group of copies.
__device__ __forceinline__ void async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Waits until at most N of the thread's committed groups are still in flight; what
// the completed ones wrote is then visible to this thread.
template <int N>
__device__ __forceinline__ void async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
#endif

}  // namespace residual_fused
