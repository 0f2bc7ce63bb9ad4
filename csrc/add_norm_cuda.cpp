// Torch glue for the CUDA kernels: argument checks, layouts, allocation, device
// guard, current stream, and registration of the CUDA implementations of the ops
// whose schemas live in residual_fused/ops.py. No kernel code here.
// Per-operator ATen headers, not ATen/ATen.h: the glue compiles in a fraction of the
// time (the whole extension builds in under a minute on 2 cores).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "kernels/add_norm.h"

namespace residual_fused {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

DType to_dtype(at::ScalarType t, const char* name) {
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

void check_same_device(const Tensor& t, const Tensor& x, const char* name) {
  TORCH_CHECK(t.device() == x.device(), name, " is on ", t.device(), " but x is on ", x.device(),
              "; all tensors must be on the same device");
}

// A [..., hidden] tensor seen as [rows, hidden] with one row stride. Copy-free when
// the last dim is contiguous and the leading dims collapse (e.g. t[:, :hidden] of a
// wider tensor); anything else is made contiguous first.
struct Rows {
  Tensor t;
  int64_t row_stride;
};

Rows as_rows(const Tensor& t, int64_t hidden) {
  const int64_t nd = t.dim();
  bool ok = hidden == 1 || t.stride(nd - 1) == 1;
  int64_t row_stride = hidden;
  int64_t inner = -1;  // innermost leading dim of size > 1 seen so far
  for (int64_t d = nd - 2; ok && d >= 0; --d) {
    if (t.size(d) == 1) continue;
    if (inner < 0) {
      row_stride = t.stride(d);
    } else {
      ok = t.stride(d) == t.stride(inner) * t.size(inner);
    }
    inner = d;
  }
  if (ok) return {t, row_stride};
  return {t.contiguous(), hidden};
}

// The normalized size of a CUDA tensor [..., hidden], checked against the kernels' range.
int64_t checked_hidden(const Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor for the CUDA kernel, got ", t.device());
  TORCH_CHECK(t.dim() >= 1, name, " must have at least one dim");
  const int64_t hidden = t.size(-1);
  TORCH_CHECK(hidden >= 1 && hidden <= kMaxHidden, name, ": the normalized size ", hidden,
              " is outside the CUDA kernels' range [1, ", kMaxHidden, "]");
  return hidden;
}

// A [..., hidden] input with the shape and device of `like`, as kernel arguments.
struct RowsArg {
  Rows rows;
  DType dtype;
};

RowsArg rows_arg(const Tensor& t, const Tensor& like, int64_t hidden, const char* name) {
  check_same_device(t, like, name);
  TORCH_CHECK(t.sizes() == like.sizes(), name, ": shape ", t.sizes(), " must equal ", like.sizes());
  return {as_rows(t, hidden), to_dtype(t.scalar_type(), name)};
}

// A [hidden] parameter (weight or bias) as kernel arguments; undefined when absent.
struct VectorArg {
  Tensor t;
  const void* ptr = nullptr;
  DType dtype = DType::kFloat32;
};

VectorArg vector_arg(const OptTensor& p, const Tensor& x, int64_t hidden, const char* name) {
  if (!p.has_value()) return {};
  check_same_device(*p, x, name);
  TORCH_CHECK(p->dim() == 1 && p->size(0) == hidden, name, ": shape ", p->sizes(),
              " must be [", hidden, "], the size of the normalized dim");
  const Tensor t = p->contiguous();
  return {t, t.data_ptr(), to_dtype(t.scalar_type(), name)};
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "residual_fused::", op, ": kernel launch failed: ",
              cudaGetErrorString(err));
}

std::tuple<Tensor, Tensor, Tensor> add_norm_fwd_cuda(const Tensor& x, const OptTensor& residual,
                                                     const OptTensor& weight,
                                                     const OptTensor& bias, double eps,
                                                     bool is_rms_norm, bool store_residual_out,
                                                     at::ScalarType residual_out_dtype) {
  const int64_t hidden = checked_hidden(x, "x");
  TORCH_CHECK(!is_rms_norm || !bias.has_value(), "bias: RMSNorm has no bias");
  TORCH_CHECK(eps >= 0, "eps must be non-negative, got ", eps);
  const c10::cuda::CUDAGuard guard(x.device());

  AddNormFwdParams p;
  p.hidden = static_cast<int>(hidden);
  p.rows = x.numel() / hidden;
  p.is_rms_norm = is_rms_norm;
  p.eps = eps;
  const RowsArg xa = rows_arg(x, x, hidden, "x");
  p.x = xa.rows.t.data_ptr();
  p.x_row_stride = xa.rows.row_stride;
  p.x_dtype = xa.dtype;
  RowsArg ra{};
  if (residual.has_value()) {
    ra = rows_arg(*residual, x, hidden, "residual");
    p.residual = ra.rows.t.data_ptr();
    p.residual_row_stride = ra.rows.row_stride;
    p.residual_dtype = ra.dtype;
  }
  const VectorArg w = vector_arg(weight, x, hidden, "weight");
  const VectorArg b = vector_arg(bias, x, hidden, "bias");
  p.weight = w.ptr;
  p.weight_dtype = w.dtype;
  p.bias = b.ptr;
  p.bias_dtype = b.dtype;

  Tensor y = at::empty(x.sizes(), x.options());
  Tensor residual_out = store_residual_out
                            ? at::empty(x.sizes(), x.options().dtype(residual_out_dtype))
                            : at::empty({0}, x.options());
  const at::ScalarType stats = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  Tensor rstd = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(stats));
  p.y = y.data_ptr();
  if (store_residual_out) {
    p.residual_out = residual_out.data_ptr();
    p.residual_out_dtype = to_dtype(residual_out_dtype, "residual_out_dtype");
  }
  p.rstd = rstd.data_ptr();
  check_launch(launch_add_norm_fwd(p, c10::cuda::getCurrentCUDAStream()), "add_norm_fwd");
  return {y, residual_out, rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> add_norm_bwd_cuda(
    const Tensor& dy, const OptTensor& dresidual_out, const Tensor& saved, const Tensor& rstd,
    const OptTensor& weight, const OptTensor& bias, bool is_rms_norm, bool memory_efficient,
    std::optional<at::ScalarType> dresidual_dtype) {
  const int64_t hidden = checked_hidden(dy, "dy");
  check_same_device(rstd, dy, "rstd");
  const at::ScalarType stats = dy.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(rstd.scalar_type() == stats && rstd.numel() * hidden == dy.numel(),
              "rstd must hold one ", stats, " per row");
  const c10::cuda::CUDAGuard guard(dy.device());

  AddNormBwdParams p;
  p.hidden = static_cast<int>(hidden);
  p.rows = dy.numel() / hidden;
  p.is_rms_norm = is_rms_norm;
  p.memory_efficient = memory_efficient;
  const RowsArg dya = rows_arg(dy, dy, hidden, "dy");
  p.dy = dya.rows.t.data_ptr();
  p.dy_row_stride = dya.rows.row_stride;
  p.dy_dtype = dya.dtype;
  const RowsArg sa = rows_arg(saved, dy, hidden, "saved");
  p.saved = sa.rows.t.data_ptr();
  p.saved_row_stride = sa.rows.row_stride;
  p.saved_dtype = sa.dtype;
  RowsArg da{};
  if (dresidual_out.has_value()) {
    da = rows_arg(*dresidual_out, dy, hidden, "dresidual_out");
    p.dresidual_out = da.rows.t.data_ptr();
    p.dresidual_out_row_stride = da.rows.row_stride;
    p.dresidual_out_dtype = da.dtype;
  }
  const Tensor rstd_c = rstd.contiguous();
  p.rstd = rstd_c.data_ptr();
  const VectorArg w = vector_arg(weight, dy, hidden, "weight");
  const VectorArg b = vector_arg(bias, dy, hidden, "bias");
  p.weight = w.ptr;
  p.weight_dtype = w.dtype;
  p.bias = b.ptr;
  p.bias_dtype = b.dtype;

  Tensor dx = at::empty(dy.sizes(), dy.options());
  Tensor dresidual = dresidual_dtype.has_value()
                         ? at::empty(dy.sizes(), dy.options().dtype(*dresidual_dtype))
                         : at::empty({0}, dy.options());
  Tensor dweight = w.ptr ? at::empty(w.t.sizes(), w.t.options()) : at::empty({0}, dy.options());
  Tensor dbias = b.ptr ? at::empty(b.t.sizes(), b.t.options()) : at::empty({0}, dy.options());
  p.dx = dx.data_ptr();
  if (dresidual_dtype.has_value()) {
    p.dresidual = dresidual.data_ptr();
    p.dresidual_dtype = to_dtype(*dresidual_dtype, "dresidual_dtype");
  }
  if (w.ptr) p.dweight = dweight.data_ptr();
  if (b.ptr) p.dbias = dbias.data_ptr();
  if (p.rows == 0) {  // the column sums over no rows
    dweight.zero_();
    dbias.zero_();
    return {dx, dresidual, dweight, dbias};
  }

  // Planned once: the workspace is sized from the plan that is launched.
  const AddNormBwdPlan plan = plan_add_norm_bwd(p);
  p.partial_rows = plan.partial_rows;
  Tensor dweight_partial, dbias_partial;
  if (w.ptr) {
    dweight_partial = at::empty({plan.partial_rows, hidden}, dy.options().dtype(stats));
    p.dweight_partial = dweight_partial.data_ptr();
  }
  if (b.ptr) {
    dbias_partial = at::empty({plan.partial_rows, hidden}, dy.options().dtype(stats));
    p.dbias_partial = dbias_partial.data_ptr();
  }
  check_launch(launch_add_norm_bwd(p, plan, c10::cuda::getCurrentCUDAStream()), "add_norm_bwd");
  return {dx, dresidual, dweight, dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(residual_fused, CUDA, m) {
  m.impl("add_norm_fwd", &add_norm_fwd_cuda);
  m.impl("add_norm_bwd", &add_norm_bwd_cuda);
}

}  // namespace residual_fused
