// The templated half of an emulated kernel launch (see cuda_emulation.h): the
// kernel's parameters are copied once, as the hardware copies them to constant
// memory, and every fiber runs the kernel on that copy.
#pragma once

#include <functional>

namespace emu {

// cluster: CTAs per thread-block cluster (1: none); cluster_attribute: the launch
// names a cluster dimension (cudaLaunchKernelExC), which needs a GPU with clusters
// even when it is 1.
cudaError_t launch(const void* func, dim3 grid, dim3 block, size_t smem,
                   const std::function<void()>& body, int cluster = 1, bool cluster_attribute = false);

template <typename Params>
cudaError_t launch_kernel(const void* func, dim3 grid, dim3 block, void** args, size_t smem) {
  const auto kernel = reinterpret_cast<void (*)(Params)>(const_cast<void*>(func));
  const Params params = *static_cast<const Params*>(args[0]);
  return launch(func, grid, block, smem, [kernel, &params] { kernel(params); });
}

// cudaLaunchKernelExC: the cluster dimension is the one launch attribute emulated.
template <typename Params>
cudaError_t launch_kernel_ex(const cudaLaunchConfig_t* config, const void* func, void** args) {
  int cluster = 1;
  const bool cluster_attribute = config->numAttrs > 0;
  for (unsigned i = 0; i < config->numAttrs; ++i) {
    const cudaLaunchAttribute& a = config->attrs[i];
    if (a.id != cudaLaunchAttributeClusterDimension || a.val.clusterDim.y != 1 || a.val.clusterDim.z != 1) {
      return cudaErrorNotSupported;
    }
    cluster = static_cast<int>(a.val.clusterDim.x);
  }
  const auto kernel = reinterpret_cast<void (*)(Params)>(const_cast<void*>(func));
  const Params params = *static_cast<const Params*>(args[0]);
  return launch(func, config->gridDim, config->blockDim, config->dynamicSmemBytes,
                [kernel, &params] { kernel(params); }, cluster, cluster_attribute);
}

}  // namespace emu
