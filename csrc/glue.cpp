// Per-operator ATen headers, not ATen/ATen.h: the glue compiles in a fraction of the
// time.
#include "glue.h"

#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

namespace residual_fused {
namespace {

using at::Tensor;

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

Rows as_rows(const Tensor& t, int64_t hidden, DType dtype) {
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
  if (ok) return {t, row_stride, dtype};
  return {t.contiguous(), hidden, dtype};
}

// A [..., hidden] input with the shape and device of `like`.
Rows rows_arg(const Tensor& t, const Tensor& like, int64_t hidden, const char* name) {
  check_same_device(t, like, name);
  TORCH_CHECK(t.sizes() == like.sizes(), name, ": shape ", t.sizes(), " must equal ", like.sizes());
  return as_rows(t, hidden, to_dtype(t.scalar_type(), name));
}

// Points a params struct's (pointer, row stride, dtype) of one input at `rows`.
void bind(const Rows& rows, const void*& ptr, int64_t& row_stride, DType& dtype) {
  ptr = rows.t.data_ptr();
  row_stride = rows.row_stride;
  dtype = rows.dtype;
}

VectorArg vector_arg(const OptTensor& p, const Tensor& x, int64_t hidden, const char* name) {
  if (!p.has_value()) return {};
  check_same_device(*p, x, name);
  TORCH_CHECK(p->dim() == 1 && p->size(0) == hidden, name, ": shape ", p->sizes(),
              " must be [", hidden, "], the size of the normalized dim");
  const Tensor t = p->contiguous();
  return {t, t.data_ptr(), to_dtype(t.scalar_type(), name)};
}

Tensor placeholder(const Tensor& like) { return at::empty({0}, like.options()); }

}  // namespace

at::ScalarType stats_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

FwdCall prepare_add_norm_fwd(const Tensor& x, const OptTensor& residual, const OptTensor& weight,
                             const OptTensor& bias, double eps, bool is_rms_norm,
                             bool store_residual_out, at::ScalarType residual_out_dtype,
                             int64_t hidden) {
  TORCH_CHECK(!is_rms_norm || !bias.has_value(), "bias: RMSNorm has no bias");
  TORCH_CHECK(eps >= 0, "eps must be non-negative, got ", eps);
  FwdCall call;
  AddNormFwdParams& p = call.params;
  p.hidden = static_cast<int>(hidden);
  p.rows = x.numel() / hidden;
  p.is_rms_norm = is_rms_norm;
  p.eps = eps;
  call.x = rows_arg(x, x, hidden, "x");
  bind(call.x, p.x, p.x_row_stride, p.x_dtype);
  if (residual.has_value()) {
    call.residual = rows_arg(*residual, x, hidden, "residual");
    bind(call.residual, p.residual, p.residual_row_stride, p.residual_dtype);
  }
  call.weight = vector_arg(weight, x, hidden, "weight");
  call.bias = vector_arg(bias, x, hidden, "bias");
  p.weight = call.weight.ptr;
  p.weight_dtype = call.weight.dtype;
  p.bias = call.bias.ptr;
  p.bias_dtype = call.bias.dtype;

  call.y = at::empty(x.sizes(), x.options());
  if (store_residual_out) {
    p.residual_out_dtype = to_dtype(residual_out_dtype, "residual_out_dtype");
    call.residual_out = at::empty(x.sizes(), x.options().dtype(residual_out_dtype));
    p.residual_out = call.residual_out.data_ptr();
  } else {
    call.residual_out = placeholder(x);
  }
  call.rstd = at::empty(x.sizes().slice(0, x.dim() - 1),
                        x.options().dtype(stats_dtype(x.scalar_type())));
  p.y = call.y.data_ptr();
  p.rstd = call.rstd.data_ptr();
  return call;
}

BwdCall prepare_add_norm_bwd(const Tensor& dy, const OptTensor& dresidual_out, const Tensor& saved,
                             const Tensor& rstd, const OptTensor& weight, const OptTensor& bias,
                             bool is_rms_norm, bool memory_efficient,
                             std::optional<at::ScalarType> dresidual_dtype, int64_t hidden) {
  check_same_device(rstd, dy, "rstd");
  const at::ScalarType stats = stats_dtype(dy.scalar_type());
  TORCH_CHECK(rstd.scalar_type() == stats && rstd.numel() * hidden == dy.numel(),
              "rstd must hold one ", stats, " per row");
  BwdCall call;
  AddNormBwdParams& p = call.params;
  p.hidden = static_cast<int>(hidden);
  p.rows = dy.numel() / hidden;
  p.is_rms_norm = is_rms_norm;
  p.memory_efficient = memory_efficient;
  call.dy = rows_arg(dy, dy, hidden, "dy");
  bind(call.dy, p.dy, p.dy_row_stride, p.dy_dtype);
  call.saved = rows_arg(saved, dy, hidden, "saved");
  bind(call.saved, p.saved, p.saved_row_stride, p.saved_dtype);
  if (dresidual_out.has_value()) {
    call.dresidual_out = rows_arg(*dresidual_out, dy, hidden, "dresidual_out");
    bind(call.dresidual_out, p.dresidual_out, p.dresidual_out_row_stride, p.dresidual_out_dtype);
  }
  call.rstd = rstd.contiguous();
  p.rstd = call.rstd.data_ptr();
  call.weight = vector_arg(weight, dy, hidden, "weight");
  call.bias = vector_arg(bias, dy, hidden, "bias");
  p.weight = call.weight.ptr;
  p.weight_dtype = call.weight.dtype;
  p.bias = call.bias.ptr;
  p.bias_dtype = call.bias.dtype;

  call.dx = at::empty(dy.sizes(), dy.options());
  p.dx = call.dx.data_ptr();
  if (dresidual_dtype.has_value()) {
    p.dresidual_dtype = to_dtype(*dresidual_dtype, "dresidual_dtype");
    call.dresidual = at::empty(dy.sizes(), dy.options().dtype(*dresidual_dtype));
    p.dresidual = call.dresidual.data_ptr();
  } else {
    call.dresidual = placeholder(dy);
  }
  call.dweight = p.weight ? at::empty(call.weight.t.sizes(), call.weight.t.options()) : placeholder(dy);
  call.dbias = p.bias ? at::empty(call.bias.t.sizes(), call.bias.t.options()) : placeholder(dy);
  if (p.weight) p.dweight = call.dweight.data_ptr();
  if (p.bias) p.dbias = call.dbias.data_ptr();
  if (p.rows == 0) {  // the column sums over no rows
    call.dweight.zero_();
    call.dbias.zero_();
  }
  return call;
}

void allocate_bwd_workspace(BwdCall& call, int64_t partial_rows) {
  AddNormBwdParams& p = call.params;
  p.partial_rows = partial_rows;
  const auto options = call.dx.options().dtype(stats_dtype(call.dx.scalar_type()));
  // Tensors, so the caching allocators (CPU and CUDA) recycle them across calls;
  // kept alive by the call until the kernels that use them were launched.
  if (p.weight) {
    call.dweight_partial = at::empty({partial_rows, p.hidden}, options);
    p.dweight_partial = call.dweight_partial.data_ptr();
  }
  if (p.bias) {
    call.dbias_partial = at::empty({partial_rows, p.hidden}, options);
    p.dbias_partial = call.dbias_partial.data_ptr();
  }
}

}  // namespace residual_fused
