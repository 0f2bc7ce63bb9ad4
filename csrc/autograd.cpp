// Autograd of the library's ops, in the per-torch library (_C), for every device (the
// Autograd alias key: the stable-ABI CUDA library's kernels are reached through it).
//
// - add_norm, the differentiable Add & Norm the functional API calls: a C++ autograd
//   function over add_norm_fwd / add_norm_bwd, so a call with grad costs no Python
//   autograd.Function. It saves what the backward op needs (the sum, or y when memory
//   efficient; rstd; LayerNorm's row mean as the backward's shift).
// - add_norm_fwd_out / add_norm_fwd_inplace (the inference forms) record no gradient:
//   where one would be needed they refuse the call with the rule; the tensors they
//   write get a new version (ADInplaceOrView), as torch's in-place ops do.
//
// Without this library residual_fused/ops.py registers the same in Python
// (AddNormFunction and the same refusal, with the same words).
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/library.h>

#include <algorithm>
#include <initializer_list>
#include <optional>
#include <tuple>

namespace residual_fused {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr const char* kDoubleBackward =
    "residual_fused: double backward (differentiating the gradients of add_layer_norm or add_rms_norm "
    "again, as after autograd.grad(..., create_graph=True)) is not supported by the fused ops; use "
    "residual_fused.reference.add_layer_norm / add_rms_norm, plain differentiable PyTorch, where "
    "higher-order gradients are needed";

using FwdSig = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const OptTensor&, const OptTensor&,
                                                         const OptTensor&, double, bool, bool, at::ScalarType,
                                                         double, bool);
using BwdSig = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const OptTensor&, const Tensor&,
                                                         const Tensor&, const OptTensor&, const OptTensor&, bool,
                                                         bool, std::optional<at::ScalarType>, double,
                                                         const OptTensor&);

const c10::TypedOperatorHandle<FwdSig>& fwd_op() {
  static const auto handle =
      c10::Dispatcher::singleton().findSchemaOrThrow("residual_fused::add_norm_fwd", "").typed<FwdSig>();
  return handle;
}

const c10::TypedOperatorHandle<BwdSig>& bwd_op() {
  static const auto handle =
      c10::Dispatcher::singleton().findSchemaOrThrow("residual_fused::add_norm_bwd", "").typed<BwdSig>();
  return handle;
}

OptTensor opt(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

bool requires_grad(const Tensor& t) { return t.defined() && t.requires_grad(); }

// The forward with no graph: y, and residual_out (a placeholder unless prenorm).
std::tuple<Tensor, Tensor> forward_only(const Tensor& x, const OptTensor& residual, const OptTensor& weight,
                                        const OptTensor& bias, double eps, bool is_rms_norm, bool prenorm,
                                        at::ScalarType residual_out_dtype, bool memory_efficient,
                                        double weight_offset) {
  (void)memory_efficient;  // what to save for a backward: nothing here
  at::AutoDispatchBelowADInplaceOrView below;
  auto out = fwd_op().call(x, residual, weight, bias, eps, is_rms_norm, prenorm, residual_out_dtype,
                           weight_offset, false);
  return {std::move(std::get<0>(out)), std::move(std::get<1>(out))};
}

// Flags kept for the backward, in one saved integer (bits 8-15: x's dtype, 16-23: the
// residual's where it has its own gradient dtype).
enum Flag : int64_t { kRms = 1, kMemoryEfficient = 2, kHasResidual = 4, kHasDresidualDtype = 8 };

struct AddNormFunction : torch::autograd::Function<AddNormFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const OptTensor& residual_arg,
                               const OptTensor& weight_arg, const OptTensor& bias_arg, double eps,
                               bool is_rms_norm, bool prenorm, at::ScalarType residual_out_dtype,
                               bool memory_efficient, double weight_offset) {
    // Absent tensors as undefined ones from here on.
    const Tensor residual = residual_arg.value_or(Tensor()), weight = weight_arg.value_or(Tensor()),
                 bias = bias_arg.value_or(Tensor());
    // Post-norm without a residual normalizes x itself, so x is what backward needs.
    const bool store = prenorm || (residual.defined() && !memory_efficient);
    // LayerNorm's row mean, for the backward's shift where it rebuilds xhat from the sum.
    const bool store_mean = !is_rms_norm && !memory_efficient;
    Tensor y, residual_out, rstd, mean;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      std::tie(y, residual_out, rstd, mean) = fwd_op().call(x, opt(residual), opt(weight), opt(bias), eps,
                                                            is_rms_norm, store, residual_out_dtype,
                                                            weight_offset, store_mean);
    }
    const Tensor& saved = memory_efficient ? y : (store ? residual_out : x);
    ctx->save_for_backward({saved, rstd, weight, bias, store_mean ? mean : Tensor()});
    const bool own_dresidual = residual.defined() && residual.scalar_type() != x.scalar_type();
    // One saved integer (flags and the two dtypes) and the offset: each entry of
    // saved_data is a hash-map insertion on every call.
    ctx->saved_data["f"] = (is_rms_norm ? kRms : 0) | (memory_efficient ? kMemoryEfficient : 0) |
                           (residual.defined() ? kHasResidual : 0) | (own_dresidual ? kHasDresidualDtype : 0) |
                           static_cast<int64_t>(x.scalar_type()) << 8 |
                           (own_dresidual ? static_cast<int64_t>(residual.scalar_type()) << 16 : 0);
    ctx->saved_data["o"] = weight_offset;
    ctx->set_materialize_grads(false);
    if (!prenorm) {  // post-norm returns y alone: the second output is a placeholder
      residual_out = at::empty({0}, x.options());
      ctx->mark_non_differentiable({residual_out});
    }
    return {y, residual_out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // Unpacked once: non-reentrant checkpointing recomputes a saved tensor on its first
    // unpack and refuses a second.
    const variable_list saved = ctx->get_saved_variables();
    variable_list out(10);  // one per input of forward
    Tensor dy = grads[0];
    const Tensor& dresidual_out = grads[1];
    if (!dy.defined() && !dresidual_out.defined()) return out;
    const int64_t flags = ctx->saved_data["f"].toInt();
    if (!dy.defined()) {  // only residual_out was used: y's gradient is zero
      dy = at::zeros(saved[0].sizes(), saved[0].options().dtype(static_cast<at::ScalarType>((flags >> 8) & 0xff)));
    }
    std::optional<at::ScalarType> dresidual_dtype;
    if (flags & kHasDresidualDtype) dresidual_dtype = static_cast<at::ScalarType>((flags >> 16) & 0xff);
    Tensor dx, dresidual, dweight, dbias;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      std::tie(dx, dresidual, dweight, dbias) =
          bwd_op().call(dy, opt(dresidual_out), saved[0], saved[1], opt(saved[2]), opt(saved[3]),
                        (flags & kRms) != 0, (flags & kMemoryEfficient) != 0, dresidual_dtype,
                        ctx->saved_data["o"].toDouble(), opt(saved[4]));
    }
    out[0] = dx;
    if (flags & kHasResidual) out[1] = dresidual_dtype ? dresidual : dx;
    if (saved[2].defined()) out[2] = dweight;
    if (saved[3].defined()) out[3] = dbias;
    // The gradients depend on the incoming grads and on the saved tensors: where the
    // caller asked for a graph and either needs one, a second derivative could flow
    // here and must raise, never come out silently zero.
    if (c10::GradMode::is_enabled() &&
        (requires_grad(grads[0]) || requires_grad(grads[1]) ||
         std::any_of(saved.begin(), saved.end(), requires_grad))) {
      variable_list defined;
      for (const Tensor& t : out) {
        if (t.defined()) defined.push_back(t.detach().requires_grad_(true));
      }
      variable_list raising =
          torch::autograd::DelayedError(kDoubleBackward, static_cast<int64_t>(defined.size())).apply(std::move(defined));
      size_t k = 0;
      for (Tensor& t : out) {
        if (t.defined()) t = raising[k++];
      }
    }
    return out;
  }
};

std::tuple<Tensor, Tensor> add_norm_autograd(const Tensor& x, const OptTensor& residual, const OptTensor& weight,
                                             const OptTensor& bias, double eps, bool is_rms_norm, bool prenorm,
                                             at::ScalarType residual_out_dtype, bool memory_efficient,
                                             double weight_offset) {
  const auto needs = [](const OptTensor& t) { return t.has_value() && requires_grad(*t); };
  if (!c10::GradMode::is_enabled() || !(x.requires_grad() || needs(residual) || needs(weight) || needs(bias))) {
    return forward_only(x, residual, weight, bias, eps, is_rms_norm, prenorm, residual_out_dtype,
                        memory_efficient, weight_offset);
  }
  variable_list out = AddNormFunction::apply(x, residual, weight, bias, eps, is_rms_norm, prenorm,
                                             residual_out_dtype, memory_efficient, weight_offset);
  return {std::move(out[0]), std::move(out[1])};
}

// ---- the inference forms ------------------------------------------------------------------
using FwdOutSig = void(const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, double, bool, double,
                       const Tensor&, const OptTensor&);
using FwdInplaceSig = void(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, double, bool, double);

const c10::TypedOperatorHandle<FwdOutSig>& fwd_out_op() {
  static const auto handle =
      c10::Dispatcher::singleton().findSchemaOrThrow("residual_fused::add_norm_fwd_out", "").typed<FwdOutSig>();
  return handle;
}

const c10::TypedOperatorHandle<FwdInplaceSig>& fwd_inplace_op() {
  static const auto handle = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("residual_fused::add_norm_fwd_inplace", "")
                                 .typed<FwdInplaceSig>();
  return handle;
}

void refuse_gradients(const char* op, std::initializer_list<const OptTensor*> tensors) {
  if (!c10::GradMode::is_enabled()) return;
  for (const OptTensor* t : tensors) {
    TORCH_CHECK(!(t->has_value() && (*t)->requires_grad()), op,
                ": a tensor requires grad: the out= and in-place forms write into buffers and record no "
                "gradient; call them under torch.no_grad() or torch.inference_mode(), or use the functional "
                "form without out= for training");
  }
}

// Autograd: refused where a gradient would be needed, else the kernels below autograd.
void fwd_out_autograd(c10::DispatchKeySet keys, const Tensor& x, const OptTensor& residual, const OptTensor& weight,
                      const OptTensor& bias, double eps, bool is_rms_norm, double weight_offset, const Tensor& out,
                      const OptTensor& residual_out) {
  const OptTensor x_ = x, out_ = out;
  refuse_gradients("residual_fused::add_norm_fwd_out", {&x_, &residual, &weight, &bias, &out_, &residual_out});
  fwd_out_op().redispatch(keys & c10::after_autograd_keyset, x, residual, weight, bias, eps, is_rms_norm,
                          weight_offset, out, residual_out);
}

void fwd_inplace_autograd(c10::DispatchKeySet keys, const Tensor& x, const Tensor& residual, const OptTensor& weight,
                          const OptTensor& bias, double eps, bool is_rms_norm, double weight_offset) {
  const OptTensor x_ = x, residual_ = residual;
  refuse_gradients("residual_fused::add_norm_fwd_inplace", {&x_, &residual_, &weight, &bias});
  fwd_inplace_op().redispatch(keys & c10::after_autograd_keyset, x, residual, weight, bias, eps, is_rms_norm,
                              weight_offset);
}

// ADInplaceOrView: each tensor the call wrote gets a new version, as after a torch
// in-place op, so autograd refuses a backward that saved one of them before (instead
// of differentiating with the new values). It runs outside autograd too (no_grad,
// inference_mode on ordinary tensors): that is where the inference forms run.
void fwd_out_ad_inplace_or_view(c10::DispatchKeySet keys, const Tensor& x, const OptTensor& residual,
                                const OptTensor& weight, const OptTensor& bias, double eps, bool is_rms_norm,
                                double weight_offset, const Tensor& out, const OptTensor& residual_out) {
  fwd_out_op().redispatch(keys & c10::after_ADInplaceOrView_keyset, x, residual, weight, bias, eps, is_rms_norm,
                          weight_offset, out, residual_out);
  torch::autograd::increment_version(out);
  if (residual_out.has_value()) torch::autograd::increment_version(*residual_out);
}

void fwd_inplace_ad_inplace_or_view(c10::DispatchKeySet keys, const Tensor& x, const Tensor& residual,
                                    const OptTensor& weight, const OptTensor& bias, double eps, bool is_rms_norm,
                                    double weight_offset) {
  fwd_inplace_op().redispatch(keys & c10::after_ADInplaceOrView_keyset, x, residual, weight, bias, eps,
                              is_rms_norm, weight_offset);
  torch::autograd::increment_version(x);
  torch::autograd::increment_version(residual);
}

}  // namespace

TORCH_LIBRARY_IMPL(residual_fused, Autograd, m) {
  m.impl("add_norm", &add_norm_autograd);
  m.impl("add_norm_fwd_out", &fwd_out_autograd);
  m.impl("add_norm_fwd_inplace", &fwd_inplace_autograd);
}

TORCH_LIBRARY_IMPL(residual_fused, ADInplaceOrView, m) {
  m.impl("add_norm_fwd_out", &fwd_out_ad_inplace_or_view);
  m.impl("add_norm_fwd_inplace", &fwd_inplace_ad_inplace_or_view);
}

// Below autograd (inference mode, tracing): the forward alone.
TORCH_LIBRARY_IMPL(residual_fused, CompositeExplicitAutograd, m) { m.impl("add_norm", &forward_only); }

}  // namespace residual_fused
