// CUDA ops against LibTorch's stable ABI: one binary for every torch from
// TORCH_TARGET_VERSION (2.10) on, of the CUDA major version it was built with.
//
// Only torch/csrc/stable and torch/headeronly are included (TORCH_STABLE_ONLY makes
// any other torch header an error), so the library calls torch through its versioned
// C shim alone and survives torch upgrades. It holds no Python code either: Python
// loads it with torch.ops.load_library. The op preparation is csrc/glue_impl.h,
// shared with the ATen build; the kernels are csrc/kernels.
// Before any torch header: the oldest torch this binary must load under, and no
// header outside the stable ABI. USE_CUDA exposes the shim's CUDA stream call.
#ifndef TORCH_TARGET_VERSION
#define TORCH_TARGET_VERSION (((0ULL + 2) << 56) | ((0ULL + 10) << 48))
#endif
#define TORCH_STABLE_ONLY
#ifndef USE_CUDA
#define USE_CUDA
#endif

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>

#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "glue_impl.h"
#include "kernels/add_norm.h"

namespace residual_fused {
namespace {

using torch::stable::Tensor;
using torch::headeronly::ScalarType;

struct StableBackend {
  using Tensor = torch::stable::Tensor;
  using OptTensor = std::optional<Tensor>;
  using ScalarType = torch::headeronly::ScalarType;

  static DType dtype(ScalarType t, const char* name) {
    switch (t) {
      case ScalarType::Float:
        return DType::kFloat32;
      case ScalarType::Half:
        return DType::kFloat16;
      case ScalarType::BFloat16:
        return DType::kBFloat16;
      case ScalarType::Double:
        return DType::kFloat64;
      default:
        break;
    }
    fail(std::string(name) + ": dtype is not supported; use float16, bfloat16, float32 or float64");
  }
  static ScalarType stats_type(ScalarType t) {
    return t == ScalarType::Double ? ScalarType::Double : ScalarType::Float;
  }
  static bool same_device(const Tensor& a, const Tensor& b) {
    return a.is_cuda() == b.is_cuda() && a.get_device() == b.get_device();
  }
  static std::string device_name(const Tensor& t) {
    return t.is_cuda() ? "cuda:" + std::to_string(t.get_device()) : "a non-CUDA device";
  }
  static Tensor contiguous(const Tensor& t) { return torch::stable::contiguous(t); }
  static Tensor empty(const std::vector<int64_t>& sizes, ScalarType dtype, const Tensor& like) {
    return torch::stable::new_empty(like, sizes, dtype);
  }
  static void zero(Tensor& t) { torch::stable::zero_(t); }
  // A plain runtime_error: the stable ABI hands its message to torch, which raises it
  // as a RuntimeError (STD_TORCH_CHECK would prefix the function, file and line).
  [[noreturn]] static void fail(const std::string& message) { throw std::runtime_error(message); }
};

using StableGlue = Glue<StableBackend>;
using OptTensor = StableBackend::OptTensor;

// The normalized size of a CUDA tensor [..., hidden], checked against the kernels' range.
int64_t checked_hidden(const Tensor& t, const char* name) {
  StableGlue::check(t.is_cuda(), name, " must be a CUDA tensor for the CUDA kernel");
  StableGlue::check(t.dim() >= 1, name, " must have at least one dim");
  const int64_t hidden = t.size(t.dim() - 1);
  StableGlue::check(hidden >= 1 && hidden <= kMaxHidden, name, ": the normalized size ", hidden,
                    " is outside the CUDA kernels' range [1, ", kMaxHidden, "]");
  return hidden;
}

cudaStream_t current_stream(const Tensor& t) {
  void* stream = nullptr;
  StableGlue::check(
      aoti_torch_get_current_cuda_stream(t.get_device(), &stream) == AOTI_TORCH_SUCCESS,
      "residual_fused: could not get the current CUDA stream");
  return static_cast<cudaStream_t>(stream);
}

// A refusal before any launch (a tuning variant that cannot run the call) says why.
void check_launch(cudaError_t err, const char* op) {
  const char* refusal = last_refusal();
  StableGlue::check(err == cudaSuccess, "residual_fused::", op, ": kernel launch failed: ",
                    *refusal != '\0' ? refusal : cudaGetErrorString(err));
}

std::tuple<Tensor, Tensor, Tensor, Tensor> add_norm_fwd_cuda(
    Tensor x, OptTensor residual, OptTensor weight, OptTensor bias, double eps, bool is_rms_norm,
    bool store_residual_out, ScalarType residual_out_dtype, double weight_offset, bool store_mean) {
  const int64_t hidden = checked_hidden(x, "x");
  const torch::stable::accelerator::DeviceGuard guard(x.get_device());
  auto call = StableGlue::prepare_fwd(x, residual, weight, bias, eps, is_rms_norm,
                                      store_residual_out, residual_out_dtype, weight_offset,
                                      store_mean, hidden);
  check_launch(launch_add_norm_fwd(call.params, current_stream(x)), "add_norm_fwd");
  return {*call.y, *call.residual_out, *call.rstd, *call.mean};
}

// The inference forms: y into `out`, x + residual into `residual_out` (in its dtype).
void add_norm_fwd_out_cuda(Tensor x, OptTensor residual, OptTensor weight, OptTensor bias, double eps,
                           bool is_rms_norm, double weight_offset, Tensor out, OptTensor residual_out) {
  const int64_t hidden = checked_hidden(x, "x");
  const torch::stable::accelerator::DeviceGuard guard(x.get_device());
  auto call = StableGlue::prepare_fwd_into(x, residual, weight, bias, eps, is_rms_norm, weight_offset, out,
                                           residual_out, "out", "residual_out", hidden);
  check_launch(launch_add_norm_fwd(call.params, current_stream(x)), "add_norm_fwd_out");
}

// residual := x + residual, x := norm(residual) (the vLLM form).
void add_norm_fwd_inplace_cuda(Tensor x, Tensor residual, OptTensor weight, OptTensor bias, double eps,
                               bool is_rms_norm, double weight_offset) {
  const int64_t hidden = checked_hidden(x, "x");
  const torch::stable::accelerator::DeviceGuard guard(x.get_device());
  auto call = StableGlue::prepare_fwd_into(x, residual, weight, bias, eps, is_rms_norm, weight_offset, x,
                                           residual, "x", "residual", hidden);
  check_launch(launch_add_norm_fwd(call.params, current_stream(x)), "add_norm_fwd_inplace");
}

std::tuple<Tensor, Tensor, Tensor, Tensor> add_norm_bwd_cuda(
    Tensor dy, OptTensor dresidual_out, Tensor saved, Tensor rstd, OptTensor weight,
    OptTensor bias, bool is_rms_norm, bool memory_efficient,
    std::optional<ScalarType> dresidual_dtype, double weight_offset,
    OptTensor mean) {
  const int64_t hidden = checked_hidden(dy, "dy");
  const torch::stable::accelerator::DeviceGuard guard(dy.get_device());
  auto call = StableGlue::prepare_bwd(dy, dresidual_out, saved, rstd, weight, bias, is_rms_norm,
                                      memory_efficient, dresidual_dtype, weight_offset, mean, hidden);
  if (call.params.rows > 0) {
    // Planned once: the workspace is sized from the plan that is launched.
    const AddNormBwdPlan plan = plan_add_norm_bwd(call.params);
    StableGlue::allocate_workspace(call, plan.partial_rows);
    check_launch(launch_add_norm_bwd(call.params, plan, current_stream(dy)), "add_norm_bwd");
  }
  return {*call.dx, *call.dresidual, *call.dweight, *call.dbias};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(residual_fused, CUDA, m) {
  m.impl("add_norm_fwd", TORCH_BOX(&add_norm_fwd_cuda));
  m.impl("add_norm_bwd", TORCH_BOX(&add_norm_bwd_cuda));
  m.impl("add_norm_fwd_out", TORCH_BOX(&add_norm_fwd_out_cuda));
  m.impl("add_norm_fwd_inplace", TORCH_BOX(&add_norm_fwd_inplace_cuda));
}

}  // namespace residual_fused
