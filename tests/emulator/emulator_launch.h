// The templated half of the emulated kernel launch (see cuda_emulation.h).
#pragma once

#include <functional>

namespace emu {

cudaError_t run_grid(dim3 grid, dim3 block, size_t smem, const std::function<void()>& body);

template <typename Params>
cudaError_t launch_kernel(const void* func, dim3 grid, dim3 block, void** args, size_t smem) {
  const auto kernel = reinterpret_cast<void (*)(Params)>(const_cast<void*>(func));
  const Params params = *static_cast<const Params*>(args[0]);
  return run_grid(grid, block, smem, [&] { kernel(params); });
}

}  // namespace emu
