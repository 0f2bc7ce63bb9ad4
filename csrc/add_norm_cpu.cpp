// Torch glue for the CPU kernels (csrc/cpu): the CPU range of the normalized size,
// the choice of kernel for this CPU, and registration of the CPU implementations of
// the ops whose schemas live in residual_fused/ops.py. They take precedence over the
// pure-PyTorch reference (registered as CompositeExplicitAutograd) on CPU tensors.
#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <limits>
#include <string>
#include <tuple>

#include "cpu/kernels.h"
#include "glue.h"

namespace residual_fused {
namespace {

using at::Tensor;

int64_t checked_hidden(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor for the CPU kernel, got ",
              t.device());
  TORCH_CHECK(t.dim() >= 1, name, " must have at least one dim");
  const int64_t hidden = t.size(-1);
  TORCH_CHECK(hidden >= 1 && hidden <= std::numeric_limits<int>::max(), name,
              ": the normalized size ", hidden, " is outside the CPU kernels' range [1, ",
              std::numeric_limits<int>::max(), "]");
  return hidden;
}

struct Kernels {
  void (*fwd)(const AddNormFwdParams&);
  void (*bwd)(const AddNormBwdParams&);
};

// The widest variant this CPU runs, decided once, as ATen decides for its own kernels
// (ATEN_CPU_CAPABILITY=default in the environment forces the portable one).
const Kernels& kernels() {
  static const Kernels chosen = [] {
#ifdef RESIDUAL_FUSED_CPU_AVX2
    const std::string capability = at::get_cpu_capability();
    if (capability == "AVX2" || capability == "AVX512") {
      return Kernels{&cpu::AVX2::add_norm_fwd_kernel, &cpu::AVX2::add_norm_bwd_kernel};
    }
#endif
    return Kernels{&cpu::DEFAULT::add_norm_fwd_kernel, &cpu::DEFAULT::add_norm_bwd_kernel};
  }();
  return chosen;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> add_norm_fwd_cpu(
    const Tensor& x, const OptTensor& residual, const OptTensor& weight, const OptTensor& bias,
    double eps, bool is_rms_norm, bool store_residual_out, at::ScalarType residual_out_dtype,
    double weight_offset, bool store_mean) {
  const int64_t hidden = checked_hidden(x, "x");
  FwdCall call = AtenGlue::prepare_fwd(x, residual, weight, bias, eps, is_rms_norm,
                                       store_residual_out, residual_out_dtype, weight_offset,
                                       store_mean, hidden);
  kernels().fwd(call.params);
  return {*call.y, *call.residual_out, *call.rstd, *call.mean};
}

// The inference forms: y into `out`, x + residual into `residual_out` (in its dtype).
void add_norm_fwd_out_cpu(const Tensor& x, const OptTensor& residual, const OptTensor& weight,
                          const OptTensor& bias, double eps, bool is_rms_norm, double weight_offset,
                          const Tensor& out, const OptTensor& residual_out) {
  const int64_t hidden = checked_hidden(x, "x");
  // No rstd: the CPU kernels skip it where it is not returned.
  FwdCall call = AtenGlue::prepare_fwd_into(x, residual, weight, bias, eps, is_rms_norm, weight_offset, out,
                                            residual_out, "out", "residual_out", hidden, /*keep_rstd=*/false);
  kernels().fwd(call.params);
}

// residual := x + residual, x := norm(residual) (the vLLM form).
void add_norm_fwd_inplace_cpu(const Tensor& x, const Tensor& residual, const OptTensor& weight,
                              const OptTensor& bias, double eps, bool is_rms_norm, double weight_offset) {
  const int64_t hidden = checked_hidden(x, "x");
  FwdCall call = AtenGlue::prepare_fwd_into(x, residual, weight, bias, eps, is_rms_norm, weight_offset, x,
                                            residual, "x", "residual", hidden, /*keep_rstd=*/false);
  kernels().fwd(call.params);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> add_norm_bwd_cpu(
    const Tensor& dy, const OptTensor& dresidual_out, const Tensor& saved, const Tensor& rstd,
    const OptTensor& weight, const OptTensor& bias, bool is_rms_norm, bool memory_efficient,
    std::optional<at::ScalarType> dresidual_dtype, double weight_offset,
    const OptTensor& mean) {
  const int64_t hidden = checked_hidden(dy, "dy");
  BwdCall call = AtenGlue::prepare_bwd(dy, dresidual_out, saved, rstd, weight, bias, is_rms_norm,
                                       memory_efficient, dresidual_dtype, weight_offset, mean, hidden);
  if (call.params.rows > 0) {
    AtenGlue::allocate_workspace(
        call, cpu::bwd_partial_rows(call.params.rows, hidden, at::get_num_threads()));
    kernels().bwd(call.params);
  }
  return {*call.dx, *call.dresidual, *call.dweight, *call.dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(residual_fused, CPU, m) {
  m.impl("add_norm_fwd", &add_norm_fwd_cpu);
  m.impl("add_norm_bwd", &add_norm_bwd_cpu);
  m.impl("add_norm_fwd_out", &add_norm_fwd_out_cpu);
  m.impl("add_norm_fwd_inplace", &add_norm_fwd_inplace_cpu);
}

}  // namespace residual_fused
