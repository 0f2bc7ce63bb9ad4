// The ATen backend's out-of-line parts. Per-operator ATen headers, not ATen/ATen.h:
// the glue compiles in a fraction of the time.
#include "glue.h"

#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

namespace residual_fused {

DType AtenBackend::dtype(at::ScalarType t, const char* name) {
  switch (t) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kDouble:
      return DType::kFloat64;
    default:
      break;
  }
  TORCH_CHECK(false, name, ": dtype ", t, " is not supported; use float16, bfloat16, float32 or float64");
}

at::Tensor AtenBackend::empty(const std::vector<int64_t>& sizes, at::ScalarType dtype,
                              const at::Tensor& like) {
  return at::empty(sizes, like.options().dtype(dtype));
}

void AtenBackend::fail(const std::string& message) { TORCH_CHECK(false, message); }

}  // namespace residual_fused
