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

#include "kernels/args.h"

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

// One forward call: its params and the tensors they point into (weight and bias:
// contiguous, empty when absent).
template <class Tensor>
struct FwdCallOf {
  AddNormFwdParams params;
  std::optional<RowsOf<Tensor>> x, residual;
  std::optional<Tensor> weight, bias;
  std::optional<Tensor> y, residual_out, rstd, mean;  // mean: a placeholder unless stored
};

// One backward call. The workspace (params.dweight_partial/dbias_partial) is left to
// the device code, which alone knows how many partial rows its plan needs.
template <class Tensor>
struct BwdCallOf {
  AddNormBwdParams params;
  std::optional<RowsOf<Tensor>> dy, dresidual_out, saved;
  std::optional<Tensor> rstd, mean, weight, bias;
  std::optional<Tensor> dx, dresidual, dweight, dbias;
  std::optional<Tensor> dweight_partial, dbias_partial;  // the workspace, once allocated
};

template <class B>
struct Glue {
  using Tensor = typename B::Tensor;
  using OptTensor = typename B::OptTensor;
  using ScalarType = typename B::ScalarType;
  using Rows = RowsOf<Tensor>;
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

  // ---- binding tensors into the params (kernels/params.h: the argument lists) ----------
  // A tensor is named by its index (FwdArg::x, BwdArg::dy, ...); its table entry says
  // which fields it has, and gives the name every message about it uses.

  // Binds tensor A (not a [rows, hidden] input) to t: its pointer, and its dtype where
  // it has a dtype field of its own (an unsupported one refused under `name`: the
  // argument the caller chose it with; the tensor's own name by default).
  template <auto A, class P>
  static void bind_tensor(P& p, const Tensor& t, const char* name = nullptr) {
    constexpr TensorArg a = arg_info(A);
    static_assert(a.kind != ArgKind::kRowsIn, "a [rows, hidden] input has a row stride: bind_rows");
    const DType dtype = a.has_own_dtype() ? B::dtype(t.scalar_type(), name ? name : a.name) : DType::kFloat32;
    bind_arg(p, a, t.data_ptr(), 0, dtype);
  }

  // Checks the [..., hidden] input t against `like` (rows_arg), keeps it (or its
  // contiguous copy) in `slot` and binds input A to it: pointer, row stride, dtype.
  template <auto A, class P>
  static void bind_rows(std::optional<Rows>& slot, P& p, const Tensor& t, const Tensor& like, int64_t hidden) {
    constexpr TensorArg a = arg_info(A);
    static_assert(a.kind == ArgKind::kRowsIn, "only a [rows, hidden] input has a row stride");
    slot = rows_arg(t, like, hidden, a.name);
    bind_arg(p, a, slot->t.data_ptr(), slot->row_stride, slot->dtype);
  }

  // Checks the optional [hidden] parameter t (on like's device, of size hidden), keeps
  // it contiguous in `slot` and binds input A to it.
  template <auto A, class P>
  static void bind_vector(std::optional<Tensor>& slot, P& p, const OptTensor& t, const Tensor& like,
                          int64_t hidden) {
    constexpr TensorArg a = arg_info(A);
    static_assert(a.kind == ArgKind::kVecIn, "not a [hidden] input");
    if (!t.has_value()) return;
    check_same_device(*t, like, a.name);
    if (!(t->dim() == 1 && t->size(0) == hidden)) check(false, a.name, ": shape ", shape(*t), " must be [",
          hidden, "], the size of the normalized dim");
    slot = B::contiguous(*t);
    bind_tensor<A>(p, *slot);
  }

  // What both ops' params begin with: the shape (first: x or dy), the norm, the
  // optional [hidden] weight and bias, and the offset added to the weight.
  template <class Call>
  static void bind_common(Call& call, const Tensor& first, int64_t hidden, bool is_rms_norm,
                          const OptTensor& weight, const OptTensor& bias, double weight_offset) {
    using Arg = typename ArgsOf<decltype(call.params)>::Arg;
    auto& p = call.params;
    p.hidden = static_cast<int>(hidden);
    p.rows = first.numel() / hidden;
    p.is_rms_norm = is_rms_norm;
    p.weight_offset = weight_offset;
    bind_vector<Arg::weight>(call.weight, p, weight, first, hidden);
    bind_vector<Arg::bias>(call.bias, p, bias, first, hidden);
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
    p.eps = eps;
    bind_rows<FwdArg::x>(call.x, p, x, x, hidden);
    if (residual.has_value()) bind_rows<FwdArg::residual>(call.residual, p, *residual, x, hidden);
    bind_common(call, x, hidden, is_rms_norm, weight, bias, weight_offset);
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
    bind_tensor<FwdArg::y>(p, *call.y);
    if (store_residual_out) {
      call.residual_out = B::empty(sizes(x), residual_out_dtype, x);
      bind_tensor<FwdArg::residual_out>(p, *call.residual_out, "residual_out_dtype");
    } else {
      call.residual_out = placeholder(x);
    }
    call.rstd = B::empty(row_shape(x), B::stats_type(x.scalar_type()), x);
    bind_tensor<FwdArg::rstd>(p, *call.rstd);
    if (store_mean) {
      call.mean = B::empty(row_shape(x), B::stats_type(x.scalar_type()), x);
      bind_tensor<FwdArg::mean>(p, *call.mean);
    } else {
      call.mean = placeholder(x);
    }
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
    bind_tensor<FwdArg::y>(p, out);
    if (residual_out.has_value()) {
      call.residual_out = *residual_out;
      bind_tensor<FwdArg::residual_out>(p, *residual_out, residual_out_name);
    }
    if (keep_rstd) {
      call.rstd = B::empty(row_shape(x), B::stats_type(x.scalar_type()), x);
      bind_tensor<FwdArg::rstd>(p, *call.rstd);
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
    p.memory_efficient = memory_efficient;
    bind_rows<BwdArg::dy>(call.dy, p, dy, dy, hidden);
    bind_rows<BwdArg::saved>(call.saved, p, saved, dy, hidden);
    if (dresidual_out.has_value()) bind_rows<BwdArg::dresidual_out>(call.dresidual_out, p, *dresidual_out, dy, hidden);
    call.rstd = B::contiguous(rstd);
    bind_tensor<BwdArg::rstd>(p, *call.rstd);
    if (mean.has_value()) {
      call.mean = B::contiguous(*mean);
      bind_tensor<BwdArg::mean>(p, *call.mean);
    }
    bind_common(call, dy, hidden, is_rms_norm, weight, bias, weight_offset);

    call.dx = B::empty(sizes(dy), dy.scalar_type(), dy);
    bind_tensor<BwdArg::dx>(p, *call.dx);
    if (dresidual_dtype.has_value()) {
      call.dresidual = B::empty(sizes(dy), *dresidual_dtype, dy);
      bind_tensor<BwdArg::dresidual>(p, *call.dresidual, "dresidual_dtype");
    } else {
      call.dresidual = placeholder(dy);
    }
    call.dweight = call.weight ? B::empty({hidden}, call.weight->scalar_type(), dy) : placeholder(dy);
    call.dbias = call.bias ? B::empty({hidden}, call.bias->scalar_type(), dy) : placeholder(dy);
    if (call.weight) bind_tensor<BwdArg::dweight>(p, *call.dweight);
    if (call.bias) bind_tensor<BwdArg::dbias>(p, *call.dbias);
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
    if (call.weight) {
      call.dweight_partial = B::empty({partial_rows, p.hidden}, stats, *call.dx);
      bind_tensor<BwdArg::dweight_partial>(p, *call.dweight_partial);
    }
    if (call.bias) {
      call.dbias_partial = B::empty({partial_rows, p.hidden}, stats, *call.dx);
      bind_tensor<BwdArg::dbias_partial>(p, *call.dbias_partial);
    }
  }
};

}  // namespace residual_fused
