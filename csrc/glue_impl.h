// Torch-side preparation of the ops, written once for two tensor APIs: ATen's
// (AtenBackend, csrc/glue.h and glue.cpp; used by the CPU ops, csrc/add_norm_cpu.cpp,
// and on torch < 2.10 by the CUDA ops, csrc/cuda/add_norm_cuda.cpp) and LibTorch's
// stable ABI (csrc/stable/: the CUDA ops built once for every torch >= 2.10).
//
// A backend B provides:
//   using Tensor, OptTensor, ScalarType;
//   static DType dtype(ScalarType, const char* name);       // throws if unsupported
//   static ScalarType stats_type(ScalarType);               // fp64 -> fp64, else fp32
//   static bool same_device(const Tensor&, const Tensor&);
//   static std::string device_name(const Tensor&);
//   static Tensor contiguous(const Tensor&);
//   static Tensor empty(const std::vector<int64_t>& sizes, ScalarType, const Tensor& like);
//   static void zero(Tensor&);
//   [[noreturn]] static void fail(const std::string& message);
// This header includes no torch header, so it compiles against either.
#pragma once

#include <array>
#include <cmath>
#include <cstdint>
#include <optional>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "kernels/params.h"

namespace residual_fused {

// A [..., hidden] tensor seen as [rows, hidden] with one row stride. Copy-free when
// the last dim is contiguous and the leading dims collapse (e.g. t[:, :hidden] of a
// wider tensor); anything else is made contiguous first (t keeps that copy alive).
template <class Tensor>
struct RowsOf {
  Tensor t;
  int64_t row_stride = 0;
  DType dtype = DType::kFloat32;
};

// A [hidden] parameter (weight or bias); t is empty when absent.
template <class Tensor>
struct VectorArgOf {
  std::optional<Tensor> t;
  const void* ptr = nullptr;
  DType dtype = DType::kFloat32;
};

// One forward call: its params and the tensors they point into.
template <class Tensor>
struct FwdCallOf {
  AddNormFwdParams params;
  std::optional<RowsOf<Tensor>> x, residual;
  VectorArgOf<Tensor> weight, bias;
  std::optional<Tensor> y, residual_out, rstd, mean;  // mean: a placeholder unless stored
};

// One backward call. The workspace (params.dweight_partial/dbias_partial) is left to
// the device code, which alone knows how many partial rows its plan needs.
template <class Tensor>
struct BwdCallOf {
  AddNormBwdParams params;
  std::optional<RowsOf<Tensor>> dy, dresidual_out, saved;
  std::optional<Tensor> rstd, mean;
  VectorArgOf<Tensor> weight, bias;
  std::optional<Tensor> dx, dresidual, dweight, dbias;
  std::optional<Tensor> dweight_partial, dbias_partial;  // the workspace, once allocated
};

template <class B>
struct Glue {
  using Tensor = typename B::Tensor;
  using OptTensor = typename B::OptTensor;
  using ScalarType = typename B::ScalarType;
  using Rows = RowsOf<Tensor>;
  using VectorArg = VectorArgOf<Tensor>;
  using FwdCall = FwdCallOf<Tensor>;
  using BwdCall = BwdCallOf<Tensor>;

  template <class... Parts>
  static void check(bool ok, const Parts&... parts) {
    if (ok) return;
    std::ostringstream message;
    (message << ... << parts);
    B::fail(message.str());
  }

  static std::vector<int64_t> sizes(const Tensor& t) {
    std::vector<int64_t> out(static_cast<size_t>(t.dim()));
    for (int64_t d = 0; d < t.dim(); ++d) out[static_cast<size_t>(d)] = t.size(d);
    return out;
  }

  static bool same_sizes(const Tensor& a, const Tensor& b) {
    if (a.dim() != b.dim()) return false;
    for (int64_t d = 0; d < a.dim(); ++d) {
      if (a.size(d) != b.size(d)) return false;
    }
    return true;
  }

  static std::string shape(const Tensor& t) {
    std::ostringstream s;
    s << "[";
    for (int64_t d = 0; d < t.dim(); ++d) s << (d ? ", " : "") << t.size(d);
    s << "]";
    return s.str();
  }

  static void check_same_device(const Tensor& t, const Tensor& x, const char* name) {
    // Messages are formatted only on failure: this runs for every tensor of every call.
    if (B::same_device(t, x)) return;
    check(false, name, " is on ", B::device_name(t), " but x is on ", B::device_name(x),
          "; all tensors must be on the same device");
  }

  static Rows as_rows(const Tensor& t, int64_t hidden, DType dtype) {
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
    return {B::contiguous(t), hidden, dtype};
  }

  // A [..., hidden] input with the shape and device of `like`.
  static Rows rows_arg(const Tensor& t, const Tensor& like, int64_t hidden, const char* name) {
    check_same_device(t, like, name);
    if (!same_sizes(t, like)) check(false, name, ": shape ", shape(t), " must equal ", shape(like));
    return as_rows(t, hidden, B::dtype(t.scalar_type(), name));
  }

  // Points a params struct's (pointer, row stride, dtype) of one input at `rows`.
  static void bind(const Rows& rows, const void*& ptr, int64_t& row_stride, DType& dtype) {
    ptr = rows.t.data_ptr();
    row_stride = rows.row_stride;
    dtype = rows.dtype;
  }

  static VectorArg vector_arg(const OptTensor& p, const Tensor& x, int64_t hidden,
                              const char* name) {
    if (!p.has_value()) return {};
    check_same_device(*p, x, name);
    if (!(p->dim() == 1 && p->size(0) == hidden)) check(false, name, ": shape ", shape(*p), " must be [",
          hidden, "], the size of the normalized dim");
    const Tensor t = B::contiguous(*p);
    return {t, t.data_ptr(), B::dtype(t.scalar_type(), name)};
  }

  // Binds the optional [hidden] weight and bias into either op's call and params.
  template <class Call>
  static void bind_affine(Call& call, const OptTensor& weight, const OptTensor& bias,
                          const Tensor& like, int64_t hidden) {
    call.weight = vector_arg(weight, like, hidden, "weight");
    call.bias = vector_arg(bias, like, hidden, "bias");
    call.params.weight = call.weight.ptr;
    call.params.weight_dtype = call.weight.dtype;
    call.params.bias = call.bias.ptr;
    call.params.bias_dtype = call.bias.dtype;
  }

  static void check_weight_offset(double weight_offset, const OptTensor& weight) {
    check(std::isfinite(weight_offset), "weight_offset must be finite, got ", weight_offset);
    check(weight_offset == 0 || weight.has_value(),
          "weight_offset: an offset is added to the weight, so it needs a weight");
  }

  static Tensor placeholder(const Tensor& like) { return B::empty({0}, like.scalar_type(), like); }

  // A forward call's inputs bound into its params; its outputs are left to the caller.
  // `hidden` is x.size(-1), already checked against the device's range by the caller.
  static FwdCall fwd_inputs(const Tensor& x, const OptTensor& residual, const OptTensor& weight,
                            const OptTensor& bias, double eps, bool is_rms_norm, double weight_offset,
                            int64_t hidden) {
    check(!is_rms_norm || !bias.has_value(), "bias: RMSNorm has no bias");
    check(eps >= 0, "eps must be non-negative, got ", eps);
    check_weight_offset(weight_offset, weight);
    FwdCall call;
    AddNormFwdParams& p = call.params;
    p.hidden = static_cast<int>(hidden);
    p.rows = x.numel() / hidden;
    p.is_rms_norm = is_rms_norm;
    p.eps = eps;
    call.x = rows_arg(x, x, hidden, "x");
    bind(*call.x, p.x, p.x_row_stride, p.x_dtype);
    if (residual.has_value()) {
      call.residual = rows_arg(*residual, x, hidden, "residual");
      bind(*call.residual, p.residual, p.residual_row_stride, p.residual_dtype);
    }
    bind_affine(call, weight, bias, x, hidden);
    p.weight_offset = weight_offset;
    return call;
  }

  static std::vector<int64_t> row_shape(const Tensor& x) {
    std::vector<int64_t> shape = sizes(x);
    shape.pop_back();
    return shape;
  }

  static FwdCall prepare_fwd(const Tensor& x, const OptTensor& residual, const OptTensor& weight,
                             const OptTensor& bias, double eps, bool is_rms_norm,
                             bool store_residual_out, ScalarType residual_out_dtype,
                             double weight_offset, bool store_mean, int64_t hidden) {
    check(!store_mean || !is_rms_norm, "store_mean: RMSNorm has no row mean");
    FwdCall call = fwd_inputs(x, residual, weight, bias, eps, is_rms_norm, weight_offset, hidden);
    AddNormFwdParams& p = call.params;
    call.y = B::empty(sizes(x), x.scalar_type(), x);
    if (store_residual_out) {
      p.residual_out_dtype = B::dtype(residual_out_dtype, "residual_out_dtype");
      call.residual_out = B::empty(sizes(x), residual_out_dtype, x);
      p.residual_out = call.residual_out->data_ptr();
    } else {
      call.residual_out = placeholder(x);
    }
    call.rstd = B::empty(row_shape(x), B::stats_type(x.scalar_type()), x);
    if (store_mean) {
      call.mean = B::empty(row_shape(x), B::stats_type(x.scalar_type()), x);
      p.mean = call.mean->data_ptr();
    } else {
      call.mean = placeholder(x);
    }
    p.y = call.y->data_ptr();
    p.rstd = call.rstd->data_ptr();
    return call;
  }

  // ---- outputs the caller owns: the out= and in-place forms ---------------------------
  // An output the caller passes may be exactly an input (the same first byte, dtype and
  // shape, both contiguous): every kernel, CPU and CUDA, reads each element of a row
  // before it writes that element, and only the thread that read it writes it. Any
  // other overlap with an input or the other output would read what was written.

  // The bytes [first, last] a tensor's elements span; false when it has none.
  static bool byte_span(const Tensor& t, uintptr_t& first, uintptr_t& last) {
    if (t.numel() == 0) return false;
    int64_t far = 0;  // torch strides are non-negative
    for (int64_t d = 0; d < t.dim(); ++d) far += (t.size(d) - 1) * t.stride(d);
    const int64_t size = static_cast<int64_t>(t.element_size());
    first = reinterpret_cast<uintptr_t>(t.data_ptr());
    last = first + static_cast<uintptr_t>(far * size + size - 1);
    return true;
  }

  static bool overlap(const Tensor& a, const Tensor& b) {
    uintptr_t a0, a1, b0, b1;
    return byte_span(a, a0, a1) && byte_span(b, b0, b1) && a0 <= b1 && b0 <= a1;
  }

  static bool contiguous_rows(const Tensor& t) {
    int64_t expected = 1;
    for (int64_t d = t.dim() - 1; d >= 0; --d) {
      if (t.size(d) != 1 && t.stride(d) != expected) return false;
      expected *= t.size(d);
    }
    return true;
  }

  static bool same_elements(const Tensor& a, const Tensor& b) {
    return a.data_ptr() == b.data_ptr() && a.scalar_type() == b.scalar_type() && same_sizes(a, b) &&
           contiguous_rows(a) && contiguous_rows(b);
  }

  // Checks an output buffer `out` (named `name`) of x's shape: on x's device,
  // contiguous, and either one of the inputs `same` exactly or clear of them all.
  using NamedInputs = std::array<std::pair<const Tensor*, const char*>, 4>;  // x, residual, weight, bias

  static void check_output(const Tensor& out, const char* name, const Tensor& x, const NamedInputs& inputs) {
    check_same_device(out, x, name);
    if (!same_sizes(out, x)) check(false, name, ": shape ", shape(out), " must equal x's ", shape(x));
    check(contiguous_rows(out), name, ": must be contiguous (the kernels write whole rows densely)");
    for (const auto& input : inputs) {
      if (input.first == nullptr || !overlap(out, *input.first)) continue;
      check(same_elements(out, *input.first), name, " overlaps ", input.second, " without being ",
            input.second, " itself: pass a separate buffer, or ", input.second,
            " itself (contiguous, of the same dtype) to write over it in place");
    }
  }

  // A forward writing y into `out` and x + residual into `residual_out` (when given,
  // in its dtype). `names` are the arguments as the caller knows them ({"out",
  // "residual_out"}, or {"x", "residual"} in place). The forms return no rstd: it is
  // allocated only for kernels that write it anyway (`keep_rstd`; the CUDA kernels),
  // and left null for those that skip it (the CPU kernels).
  static FwdCall prepare_fwd_into(const Tensor& x, const OptTensor& residual, const OptTensor& weight,
                                  const OptTensor& bias, double eps, bool is_rms_norm,
                                  double weight_offset, const Tensor& out, const OptTensor& residual_out,
                                  const char* out_name, const char* residual_out_name, int64_t hidden,
                                  bool keep_rstd = true) {
    check(out.scalar_type() == x.scalar_type(), out_name, ": dtype must be x's (the normalized output has x's dtype)");
    const auto or_null = [](const OptTensor& t) { return t.has_value() ? &*t : nullptr; };
    const NamedInputs inputs = {{
        {&x, "x"}, {or_null(residual), "residual"}, {or_null(weight), "weight"}, {or_null(bias), "bias"}}};
    check_output(out, out_name, x, inputs);
    if (residual_out.has_value()) {
      check_output(*residual_out, residual_out_name, x, inputs);
      check(!overlap(out, *residual_out), out_name, " and ", residual_out_name,
            " overlap: the two outputs need separate memory");
    }
    FwdCall call = fwd_inputs(x, residual, weight, bias, eps, is_rms_norm, weight_offset, hidden);
    AddNormFwdParams& p = call.params;
    call.y = out;
    p.y = out.data_ptr();
    if (residual_out.has_value()) {
      p.residual_out_dtype = B::dtype(residual_out->scalar_type(), residual_out_name);
      call.residual_out = *residual_out;
      p.residual_out = residual_out->data_ptr();
    }
    if (keep_rstd) {
      call.rstd = B::empty(row_shape(x), B::stats_type(x.scalar_type()), x);
      p.rstd = call.rstd->data_ptr();
    }
    return call;
  }

  // `hidden` is dy.size(-1), already checked against the device's range by the caller.
  static BwdCall prepare_bwd(const Tensor& dy, const OptTensor& dresidual_out,
                             const Tensor& saved, const Tensor& rstd, const OptTensor& weight,
                             const OptTensor& bias, bool is_rms_norm, bool memory_efficient,
                             const std::optional<ScalarType>& dresidual_dtype,
                             double weight_offset, const OptTensor& mean, int64_t hidden) {
    check_weight_offset(weight_offset, weight);
    const ScalarType stats = B::stats_type(dy.scalar_type());
    const char* stats_name = stats == ScalarType::Double ? "float64" : "float32";
    check_same_device(rstd, dy, "rstd");
    check(rstd.scalar_type() == stats && rstd.numel() * hidden == dy.numel(),
          "rstd must hold one ", stats_name, " per row");
    if (mean.has_value()) {
      check(!is_rms_norm, "mean: RMSNorm has no row mean; pass None");
      check(!memory_efficient,
            "mean: the memory-efficient backward rebuilds xhat from y, whose mean is not the "
            "forward's; pass None");
      check_same_device(*mean, dy, "mean");
      check(mean->scalar_type() == stats && mean->numel() * hidden == dy.numel(),
            "mean must hold one ", stats_name, " per row (the forward's mean output)");
    }
    BwdCall call;
    AddNormBwdParams& p = call.params;
    p.hidden = static_cast<int>(hidden);
    p.rows = dy.numel() / hidden;
    p.is_rms_norm = is_rms_norm;
    p.memory_efficient = memory_efficient;
    call.dy = rows_arg(dy, dy, hidden, "dy");
    bind(*call.dy, p.dy, p.dy_row_stride, p.dy_dtype);
    call.saved = rows_arg(saved, dy, hidden, "saved");
    bind(*call.saved, p.saved, p.saved_row_stride, p.saved_dtype);
    if (dresidual_out.has_value()) {
      call.dresidual_out = rows_arg(*dresidual_out, dy, hidden, "dresidual_out");
      bind(*call.dresidual_out, p.dresidual_out, p.dresidual_out_row_stride,
           p.dresidual_out_dtype);
    }
    call.rstd = B::contiguous(rstd);
    p.rstd = call.rstd->data_ptr();
    if (mean.has_value()) {
      call.mean = B::contiguous(*mean);
      p.mean = call.mean->data_ptr();
    }
    bind_affine(call, weight, bias, dy, hidden);
    p.weight_offset = weight_offset;

    call.dx = B::empty(sizes(dy), dy.scalar_type(), dy);
    p.dx = call.dx->data_ptr();
    if (dresidual_dtype.has_value()) {
      p.dresidual_dtype = B::dtype(*dresidual_dtype, "dresidual_dtype");
      call.dresidual = B::empty(sizes(dy), *dresidual_dtype, dy);
      p.dresidual = call.dresidual->data_ptr();
    } else {
      call.dresidual = placeholder(dy);
    }
    call.dweight = p.weight ? B::empty({hidden}, call.weight.t->scalar_type(), dy) : placeholder(dy);
    call.dbias = p.bias ? B::empty({hidden}, call.bias.t->scalar_type(), dy) : placeholder(dy);
    if (p.weight) p.dweight = call.dweight->data_ptr();
    if (p.bias) p.dbias = call.dbias->data_ptr();
    if (p.rows == 0) {  // the column sums over no rows
      B::zero(*call.dweight);
      B::zero(*call.dbias);
    }
    return call;
  }

  // Allocates the [partial_rows, hidden] workspace of a backward call (nothing when
  // there is neither weight nor bias) and points the params at it.
  static void allocate_workspace(BwdCall& call, int64_t partial_rows) {
    AddNormBwdParams& p = call.params;
    p.partial_rows = partial_rows;
    const ScalarType stats = B::stats_type(call.dx->scalar_type());
    // Tensors, so the caching allocators (CPU and CUDA) recycle them across calls;
    // kept alive by the call until the kernels that use them were launched.
    if (p.weight) {
      call.dweight_partial = B::empty({partial_rows, p.hidden}, stats, *call.dx);
      p.dweight_partial = call.dweight_partial->data_ptr();
    }
    if (p.bias) {
      call.dbias_partial = B::empty({partial_rows, p.hidden}, stats, *call.dx);
      p.dbias_partial = call.dbias_partial->data_ptr();
    }
  }
};

}  // namespace residual_fused
