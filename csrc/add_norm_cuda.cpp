// Torch glue for the CUDA kernels: argument checks, layouts, allocation, device
// guard, current stream, and registration of the CUDA implementations of the ops
// whose schemas live in residual_fused/ops.py. No kernel code here.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
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

Tensor vector_param(const OptTensor& p, const Tensor& x, int64_t hidden, const char* name) {
  if (!p.has_value()) return Tensor();
  check_same_device(*p, x, name);
  TORCH_CHECK(p->dim() == 1 && p->size(0) == hidden, name, ": shape ", p->sizes(),
              " must be [", hidden, "], the size of the normalized dim");
  to_dtype(p->scalar_type(), name);
  return p->contiguous();
}

const void* ptr_or_null(const Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "residual_fused::", op, ": kernel launch failed: ",
              cudaGetErrorString(err));
}

std::tuple<Tensor, Tensor, Tensor> add_norm_fwd_cuda(const Tensor& x, const OptTensor& residual,
                                                     const OptTensor& weight,
                                                     const OptTensor& bias, double eps,
                                                     bool is_rms_norm, bool store_residual_out,
                                                     at::ScalarType residual_out_dtype) {
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor for the CUDA kernel, got ", x.device());
  TORCH_CHECK(x.dim() >= 1, "x must have at least one dim");
  const int64_t hidden = x.size(-1);
  TORCH_CHECK(hidden >= 1 && hidden <= kMaxHidden, "x: the normalized size ", hidden,
              " is outside the CUDA kernels' range [1, ", kMaxHidden, "]");
  TORCH_CHECK(!is_rms_norm || !bias.has_value(), "bias: RMSNorm has no bias");
  TORCH_CHECK(eps >= 0, "eps must be non-negative, got ", eps);
  const c10::cuda::CUDAGuard guard(x.device());

  AddNormFwdParams p;
  p.hidden = static_cast<int>(hidden);
  p.rows = x.numel() / hidden;
  p.is_rms_norm = is_rms_norm;
  p.eps = eps;
  const Rows xr = as_rows(x, hidden);
  p.x = xr.t.data_ptr();
  p.x_row_stride = xr.row_stride;
  p.x_dtype = to_dtype(x.scalar_type(), "x");
  Rows rr{Tensor(), 0};
  if (residual.has_value()) {
    check_same_device(*residual, x, "residual");
    TORCH_CHECK(residual->sizes() == x.sizes(), "residual: shape ", residual->sizes(),
                " must equal x's shape ", x.sizes());
    rr = as_rows(*residual, hidden);
    p.residual = rr.t.data_ptr();
    p.residual_row_stride = rr.row_stride;
    p.residual_dtype = to_dtype(residual->scalar_type(), "residual");
  }
  const Tensor w = vector_param(weight, x, hidden, "weight");
  const Tensor b = vector_param(bias, x, hidden, "bias");
  p.weight = ptr_or_null(w);
  p.bias = ptr_or_null(b);
  if (w.defined()) p.weight_dtype = to_dtype(w.scalar_type(), "weight");
  if (b.defined()) p.bias_dtype = to_dtype(b.scalar_type(), "bias");

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
  check_launch(launch_add_norm_fwd(p, at::cuda::getCurrentCUDAStream()), "add_norm_fwd");
  return {y, residual_out, rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> add_norm_bwd_cuda(
    const Tensor& dy, const OptTensor& dresidual_out, const Tensor& saved, const Tensor& rstd,
    const OptTensor& weight, const OptTensor& bias, bool is_rms_norm, bool memory_efficient,
    std::optional<at::ScalarType> dresidual_dtype) {
  TORCH_CHECK(dy.is_cuda(), "dy must be a CUDA tensor for the CUDA kernel, got ", dy.device());
  TORCH_CHECK(dy.dim() >= 1, "dy must have at least one dim");
  const int64_t hidden = dy.size(-1);
  TORCH_CHECK(hidden >= 1 && hidden <= kMaxHidden, "dy: the normalized size ", hidden,
              " is outside the CUDA kernels' range [1, ", kMaxHidden, "]");
  TORCH_CHECK(saved.sizes() == dy.sizes(), "saved: shape ", saved.sizes(),
              " must equal dy's shape ", dy.sizes());
  check_same_device(saved, dy, "saved");
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
  const Rows dyr = as_rows(dy, hidden);
  p.dy = dyr.t.data_ptr();
  p.dy_row_stride = dyr.row_stride;
  p.dy_dtype = to_dtype(dy.scalar_type(), "dy");
  const Rows sr = as_rows(saved, hidden);
  p.saved = sr.t.data_ptr();
  p.saved_row_stride = sr.row_stride;
  p.saved_dtype = to_dtype(saved.scalar_type(), "saved");
  Rows dr{Tensor(), 0};
  if (dresidual_out.has_value()) {
    check_same_device(*dresidual_out, dy, "dresidual_out");
    TORCH_CHECK(dresidual_out->sizes() == dy.sizes(), "dresidual_out: shape ",
                dresidual_out->sizes(), " must equal dy's shape ", dy.sizes());
    dr = as_rows(*dresidual_out, hidden);
    p.dresidual_out = dr.t.data_ptr();
    p.dresidual_out_row_stride = dr.row_stride;
    p.dresidual_out_dtype = to_dtype(dresidual_out->scalar_type(), "dresidual_out");
  }
  const Tensor rstd_c = rstd.contiguous();
  p.rstd = rstd_c.data_ptr();
  const Tensor w = vector_param(weight, dy, hidden, "weight");
  const Tensor b = vector_param(bias, dy, hidden, "bias");
  p.weight = ptr_or_null(w);
  p.bias = ptr_or_null(b);
  if (w.defined()) p.weight_dtype = to_dtype(w.scalar_type(), "weight");
  if (b.defined()) p.bias_dtype = to_dtype(b.scalar_type(), "bias");

  Tensor dx = at::empty(dy.sizes(), dy.options());
  Tensor dresidual = dresidual_dtype.has_value()
                         ? at::empty(dy.sizes(), dy.options().dtype(*dresidual_dtype))
                         : at::empty({0}, dy.options());
  Tensor dweight = w.defined() ? at::empty(w.sizes(), w.options()) : at::empty({0}, dy.options());
  Tensor dbias = b.defined() ? at::empty(b.sizes(), b.options()) : at::empty({0}, dy.options());
  p.dx = dx.data_ptr();
  if (dresidual_dtype.has_value()) {
    p.dresidual = dresidual.data_ptr();
    p.dresidual_dtype = to_dtype(*dresidual_dtype, "dresidual_dtype");
  }
  if (w.defined()) p.dweight = dweight.data_ptr();
  if (b.defined()) p.dbias = dbias.data_ptr();
  if (p.rows == 0) {  // the column sums over no rows
    dweight.zero_();
    dbias.zero_();
    return {dx, dresidual, dweight, dbias};
  }

  const int64_t partial_rows = add_norm_bwd_partial_rows(p);
  Tensor dweight_partial, dbias_partial;
  if (w.defined()) dweight_partial = at::empty({partial_rows, hidden}, dy.options().dtype(stats));
  if (b.defined()) dbias_partial = at::empty({partial_rows, hidden}, dy.options().dtype(stats));
  p.dweight_partial = w.defined() ? dweight_partial.data_ptr() : nullptr;
  p.dbias_partial = b.defined() ? dbias_partial.data_ptr() : nullptr;
  check_launch(launch_add_norm_bwd(p, at::cuda::getCurrentCUDAStream()), "add_norm_bwd");
  return {dx, dresidual, dweight, dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(residual_fused, CUDA, m) {
  m.impl("add_norm_fwd", &add_norm_fwd_cuda);
  m.impl("add_norm_bwd", &add_norm_bwd_cuda);
}

}  // namespace residual_fused
