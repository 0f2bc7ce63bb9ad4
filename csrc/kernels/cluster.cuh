// Thread-block cluster primitives (sm_90): a CTA's rank in its cluster, the cluster
// barrier, and the address of a peer CTA's shared memory (distributed shared memory).
// Under tools/emulator the same names are provided by cuda_emulation.h.
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

#endif

}  // namespace residual_fused
