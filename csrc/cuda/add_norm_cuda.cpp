// Torch glue for the CUDA kernels: the CUDA range of the normalized size, device
// guard, current stream, and registration of the CUDA implementations of the ops
// whose schemas live in residual_fused/ops.py. Checks and allocation shared with the
// CPU kernels are in csrc/glue_impl.h (ATen's side: csrc/glue.h); no kernel code here.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "glue.h"
#include "kernels/add_norm.h"

namespace residual_fused {
namespace {

using at::Tensor;

// The normalized size of a CUDA tensor [..., hidden], checked against the kernels' range.
int64_t checked_hidden(const Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor for the CUDA kernel, got ", t.device());
  TORCH_CHECK(t.dim() >= 1, name, " must have at least one dim");
  const int64_t hidden = t.size(-1);
  TORCH_CHECK(hidden >= 1 && hidden <= kMaxHidden, name, ": the normalized size ", hidden,
              " is outside the CUDA kernels' range [1, ", kMaxHidden, "]");
  return hidden;
}

// A refusal before any launch (a tuning variant that cannot run the call) says why.
void check_launch(cudaError_t err, const char* op) {
  const char* refusal = last_refusal();
  TORCH_CHECK(err == cudaSuccess, "residual_fused::", op, ": kernel launch failed: ",
              *refusal != '\0' ? refusal : cudaGetErrorString(err));
}

std::tuple<Tensor, Tensor, Tensor, Tensor> add_norm_fwd_cuda(
    const Tensor& x, const OptTensor& residual, const OptTensor& weight, const OptTensor& bias,
    double eps, bool is_rms_norm, bool store_residual_out, at::ScalarType residual_out_dtype,
    double weight_offset, bool store_mean) {
  const int64_t hidden = checked_hidden(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  FwdCall call = AtenGlue::prepare_fwd(x, residual, weight, bias, eps, is_rms_norm,
                                       store_residual_out, residual_out_dtype, weight_offset,
                                       store_mean, hidden);
  check_launch(launch_add_norm_fwd(call.params, c10::cuda::getCurrentCUDAStream()),
               "add_norm_fwd");
  return {*call.y, *call.residual_out, *call.rstd, *call.mean};
}

// The inference forms: y into `out`, x + residual into `residual_out` (in its dtype).
void add_norm_fwd_out_cuda(const Tensor& x, const OptTensor& residual, const OptTensor& weight,
                           const OptTensor& bias, double eps, bool is_rms_norm, double weight_offset,
                           const Tensor& out, const OptTensor& residual_out) {
  const int64_t hidden = checked_hidden(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  FwdCall call = AtenGlue::prepare_fwd_into(x, residual, weight, bias, eps, is_rms_norm, weight_offset,
                                            out, residual_out, "out", "residual_out", hidden);
  check_launch(launch_add_norm_fwd(call.params, c10::cuda::getCurrentCUDAStream()), "add_norm_fwd_out");
}

// residual := x + residual, x := norm(residual) (the vLLM form).
void add_norm_fwd_inplace_cuda(const Tensor& x, const Tensor& residual, const OptTensor& weight,
                               const OptTensor& bias, double eps, bool is_rms_norm, double weight_offset) {
  const int64_t hidden = checked_hidden(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  FwdCall call = AtenGlue::prepare_fwd_into(x, residual, weight, bias, eps, is_rms_norm, weight_offset,
                                            x, residual, "x", "residual", hidden);
  check_launch(launch_add_norm_fwd(call.params, c10::cuda::getCurrentCUDAStream()), "add_norm_fwd_inplace");
}

std::tuple<Tensor, Tensor, Tensor, Tensor> add_norm_bwd_cuda(
    const Tensor& dy, const OptTensor& dresidual_out, const Tensor& saved, const Tensor& rstd,
    const OptTensor& weight, const OptTensor& bias, bool is_rms_norm, bool memory_efficient,
    std::optional<at::ScalarType> dresidual_dtype, double weight_offset,
    const OptTensor& mean) {
  const int64_t hidden = checked_hidden(dy, "dy");
  const c10::cuda::CUDAGuard guard(dy.device());
  BwdCall call = AtenGlue::prepare_bwd(dy, dresidual_out, saved, rstd, weight, bias, is_rms_norm,
                                       memory_efficient, dresidual_dtype, weight_offset, mean, hidden);
  if (call.params.rows > 0) {
    // Planned once: the workspace is sized from the plan that is launched.
    const AddNormBwdPlan plan = plan_add_norm_bwd(call.params);
    AtenGlue::allocate_workspace(call, plan.partial_rows);
    check_launch(launch_add_norm_bwd(call.params, plan, c10::cuda::getCurrentCUDAStream()),
                 "add_norm_bwd");
  }
  return {*call.dx, *call.dresidual, *call.dweight, *call.dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(residual_fused, CUDA, m) {
  m.impl("add_norm_fwd", &add_norm_fwd_cuda);
  m.impl("add_norm_bwd", &add_norm_bwd_cuda);
  m.impl("add_norm_fwd_out", &add_norm_fwd_out_cuda);
  m.impl("add_norm_fwd_inplace", &add_norm_fwd_inplace_cuda);
}

}  // namespace residual_fused
