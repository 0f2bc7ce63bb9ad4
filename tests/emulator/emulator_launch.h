// The templated half of an emulated kernel launch (see cuda_emulation.h): the
// kernel's parameters are copied once, as the hardware copies them to constant
// memory, and every fiber runs the kernel on that copy.
#pragma once

#include <functional>

namespace emu {

cudaError_t launch(const void* func, dim3 grid, dim3 block, size_t smem,
                   const std::function<void()>& body);

template <typename Params>
cudaError_t launch_kernel(const void* func, dim3 grid, dim3 block, void** args, size_t smem) {
  const auto kernel = reinterpret_cast<void (*)(Params)>(const_cast<void*>(func));
  const Params params = *static_cast<const Params*>(args[0]);
  return launch(func, grid, block, smem, [kernel, &params] { kernel(params); });
}

}  // namespace emu
