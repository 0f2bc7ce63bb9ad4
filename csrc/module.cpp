// The Python module residual_fused._C. Importing it loads this library, whose static
// initialisers (TORCH_LIBRARY_IMPL in add_norm_cpu.cpp, autograd.cpp and, in CUDA
// builds, cuda/add_norm_cuda.cpp) register the kernels with the dispatcher.
//
// It also exposes the ops the functional API calls (add_norm and the inference forms')
// as plain functions: each calls its op through the
// C++ dispatcher, so every dispatch key still applies (the CPU and CUDA kernels, the
// stable-ABI CUDA library's, autograd, autocast, tensor subclasses and modes that work
// through __torch_dispatch__, fake tensors), but the call skips what torch.ops does
// in Python for a custom op: matching arguments to its schema one by one, which costs
// more at small sizes than the kernel. What that layer alone provides, the
// __torch_function__ protocol, is checked by the caller (residual_fused/ops.py: such
// calls, and those under torch.compile, take torch.ops).
//
// functional_add_norm and functional_add_norm_ go one step further: they are the
// functional API's common case (residual_fused/functional.py, _add_norm and _add_norm_)
// in one C call, its argument checks included, and return NotImplemented for any call
// outside it, which the Python path then checks in full and explains.
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <c10/core/GradMode.h>
#include <Python.h>
#include <torch/csrc/Dtype.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <cmath>
#include <initializer_list>
#include <limits>
#include <optional>
#include <tuple>

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

Tensor tensor_arg(PyObject* o, const char* name) {
  TORCH_CHECK_TYPE(THPVariable_Check(o), name, " must be a torch.Tensor");
  return THPVariable_Unpack(o);
}

OptTensor optional_tensor_arg(PyObject* o, const char* name) {
  if (o == Py_None) return std::nullopt;
  return tensor_arg(o, name);
}

double double_arg(PyObject* o) {
  const double v = PyFloat_AsDouble(o);
  if (v == -1.0 && PyErr_Occurred()) throw python_error();
  return v;
}

bool bool_arg(PyObject* o) {
  const int v = PyObject_IsTrue(o);
  if (v < 0) throw python_error();
  return v != 0;
}

at::ScalarType dtype_arg(PyObject* o, const char* name) {
  TORCH_CHECK_TYPE(THPDtype_Check(o), name, " must be a torch.dtype");
  return reinterpret_cast<THPDtype*>(o)->scalar_type;
}

void check_count(Py_ssize_t n, Py_ssize_t want, const char* fn) {
  TORCH_CHECK_TYPE(n == want, fn, "() takes ", want, " positional arguments but ", n, " were given");
}

// The four tensors every op starts with: x, residual, weight, bias (the last three optional).
struct Inputs {
  Tensor x;
  OptTensor residual, weight, bias;
  explicit Inputs(PyObject* const* a)
      : x(tensor_arg(a[0], "x")),
        residual(optional_tensor_arg(a[1], "residual")),
        weight(optional_tensor_arg(a[2], "weight")),
        bias(optional_tensor_arg(a[3], "bias")) {}
};

// A tuple of tensors as a Python tuple.
template <class... T>
PyObject* wrap(std::tuple<T...>&& out) {
  PyObject* result = PyTuple_New(sizeof...(T));
  if (result == nullptr) return nullptr;
  Py_ssize_t k = 0;
  std::apply([&](auto&... t) { ((PyTuple_SET_ITEM(result, k++, THPVariable_Wrap(std::move(t)))), ...); }, out);
  return result;
}

template <class Sig>
c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

using AddNormSig = std::tuple<Tensor, Tensor>(const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                                              double, bool, bool, at::ScalarType, bool, double);
using FwdOutSig = void(const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, double, bool, double,
                       const Tensor&, const OptTensor&);
using FwdInplaceSig = void(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, double, bool, double);

// add_norm(x, residual, weight, bias, eps, is_rms_norm, prenorm, residual_out_dtype,
//          memory_efficient, weight_offset) -> (y, residual_out): differentiable
PyObject* add_norm(PyObject*, PyObject* const* a, Py_ssize_t n) {
  HANDLE_TH_ERRORS
  check_count(n, 10, "add_norm");
  static const auto handle = op<AddNormSig>("residual_fused::add_norm");
  const Inputs in(a);
  const double eps = double_arg(a[4]), weight_offset = double_arg(a[9]);
  const bool is_rms_norm = bool_arg(a[5]), prenorm = bool_arg(a[6]), memory_efficient = bool_arg(a[8]);
  const at::ScalarType residual_out_dtype = dtype_arg(a[7], "residual_out_dtype");
  std::tuple<Tensor, Tensor> out;
  {
    pybind11::gil_scoped_release no_gil;
    out = handle.call(in.x, in.residual, in.weight, in.bias, eps, is_rms_norm, prenorm, residual_out_dtype,
                      memory_efficient, weight_offset);
  }
  return wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

// add_norm_fwd_out(x, residual, weight, bias, eps, is_rms_norm, weight_offset, out, residual_out)
PyObject* add_norm_fwd_out(PyObject*, PyObject* const* a, Py_ssize_t n) {
  HANDLE_TH_ERRORS
  check_count(n, 9, "add_norm_fwd_out");
  static const auto handle = op<FwdOutSig>("residual_fused::add_norm_fwd_out");
  const Inputs in(a);
  const Tensor out = tensor_arg(a[7], "out");
  const OptTensor residual_out = optional_tensor_arg(a[8], "residual_out");
  const double eps = double_arg(a[4]), weight_offset = double_arg(a[6]);
  const bool is_rms_norm = bool_arg(a[5]);
  {
    pybind11::gil_scoped_release no_gil;
    handle.call(in.x, in.residual, in.weight, in.bias, eps, is_rms_norm, weight_offset, out, residual_out);
  }
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

// add_norm_fwd_inplace(x, residual, weight, bias, eps, is_rms_norm, weight_offset)
PyObject* add_norm_fwd_inplace(PyObject*, PyObject* const* a, Py_ssize_t n) {
  HANDLE_TH_ERRORS
  check_count(n, 7, "add_norm_fwd_inplace");
  static const auto handle = op<FwdInplaceSig>("residual_fused::add_norm_fwd_inplace");
  const Tensor x = tensor_arg(a[0], "x"), residual = tensor_arg(a[1], "residual");
  const OptTensor weight = optional_tensor_arg(a[2], "weight"), bias = optional_tensor_arg(a[3], "bias");
  const double eps = double_arg(a[4]), weight_offset = double_arg(a[6]);
  const bool is_rms_norm = bool_arg(a[5]);
  {
    pybind11::gil_scoped_release no_gil;
    handle.call(x, residual, weight, bias, eps, is_rms_norm, weight_offset);
  }
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

// ---- the functional API's common case ---------------------------------------------------
// residual_fused/functional.py checks a call in Python (_validation.py: every rule, each
// error naming the argument), once per call signature. At decode sizes that lookup
// alone costs as much as the kernel, so the common case is checked here instead:
//   - x, residual, weight, bias: None (all but x) or a plain torch.Tensor / nn.Parameter
//     (a subclass, DTensor included, and any __torch_function__ mode go through Python)
//     of a supported dtype, on x's device; x has a dim and a nonzero last one, residual
//     has x's shape;
//   - normalized_shape: None, or one size equal to x's last dim; weight and bias are
//     [H] (a multi-dim normalized_shape is folded in Python);
//   - eps: a float or int, finite and non-negative (None: RMSNorm's finfo(x.dtype).eps);
//   - weight_offset: a float or int, finite, zero unless there is a weight;
//   - residual_dtype: None or a supported dtype; no bias with RMSNorm.
// These accept a subset of what _validation.py accepts, with the same defaults
// (tests/test_call_path.py compares the two on random calls): any call outside it,
// valid or not, is declined with NotImplemented and takes the Python path. What the
// kernels need beyond this (contiguity, buffer overlaps) the ops check, as on that path.

bool supported(at::ScalarType s) {
  return s == at::kHalf || s == at::kBFloat16 || s == at::kFloat || s == at::kDouble;
}

// A tensor the common case takes: a plain Tensor or Parameter, of a supported dtype.
// Read in place (a reference into the Python object, which the caller keeps alive): a
// copy's first reference costs a Python-side reference count under the GIL.
const Tensor* plain_tensor(PyObject* o) {
  if (!THPVariable_CheckExact(o)) return nullptr;
  const Tensor& t = THPVariable_Unpack(o);
  return supported(t.scalar_type()) ? &t : nullptr;
}

bool plain_optional_tensor(PyObject* o, OptTensor& t) {
  if (o == Py_None) return true;
  const Tensor* v = plain_tensor(o);
  if (v == nullptr) return false;
  t = *v;
  return true;
}

// A Python float or int (not a bool, not a subclass) as float() gives it.
bool plain_number(PyObject* o, double& v) {
  if (PyFloat_CheckExact(o)) {
    v = PyFloat_AS_DOUBLE(o);
    return true;
  }
  if (PyLong_CheckExact(o)) {
    v = PyLong_AsDouble(o);
    if (v == -1.0 && PyErr_Occurred()) {  // too large for a double: Python says so
      PyErr_Clear();
      return false;
    }
    return true;
  }
  return false;
}

// torch.finfo(dtype).eps: RMSNorm's default eps.
double finfo_eps(at::ScalarType s) {
  switch (s) {
    case at::kHalf: return static_cast<double>(std::numeric_limits<at::Half>::epsilon());
    case at::kBFloat16: return static_cast<double>(std::numeric_limits<at::BFloat16>::epsilon());
    case at::kFloat: return std::numeric_limits<float>::epsilon();
    default: return std::numeric_limits<double>::epsilon();
  }
}

bool requires_grad(const OptTensor& t) { return t.has_value() && t->requires_grad(); }

// One functional call's common arguments, taken from
// (x, residual, weight, bias, eps, is_rms_norm) and normalized_shape, weight_offset;
// accepted() is false for a call outside the common case.
struct CommonCall {
  const Tensor* x_ = nullptr;
  OptTensor residual, weight, bias;
  double eps = 0.0, weight_offset = 0.0;
  bool is_rms_norm = false;
  bool ok = false;

  const Tensor& x() const { return *x_; }

  // Whether autograd would record this call: the inference forms decline it (the
  // Python path words the refusal), `more` being the caller's own buffers.
  bool grad_needed(std::initializer_list<const OptTensor*> more = {}) const {
    if (!c10::GradMode::is_enabled()) return false;
    bool any = x().requires_grad() || requires_grad(residual) || requires_grad(weight) || requires_grad(bias);
    for (const OptTensor* t : more) any = any || requires_grad(*t);
    return any;
  }

  CommonCall(PyObject* const* a, PyObject* normalized_shape, PyObject* weight_offset_arg) {
    ok = take(a, normalized_shape, weight_offset_arg);
  }

 private:
  bool take(PyObject* const* a, PyObject* normalized_shape, PyObject* weight_offset_arg) {
    if (at::impl::torch_function_mode_enabled()) return false;
    x_ = plain_tensor(a[0]);
    if (x_ == nullptr || !plain_optional_tensor(a[1], residual) ||
        !plain_optional_tensor(a[2], weight) || !plain_optional_tensor(a[3], bias)) {
      return false;
    }
    is_rms_norm = bool_arg(a[5]);
    const Tensor& x = *x_;
    if (x.dim() == 0 || (bias && is_rms_norm)) return false;
    const int64_t hidden = x.size(-1);
    if (hidden == 0) return false;  // normalized sizes are positive
    const at::Device device = x.device();
    if (residual && (residual->device() != device || residual->sizes() != x.sizes())) return false;
    for (const OptTensor* p : {&weight, &bias}) {
      if (*p && ((*p)->device() != device || (*p)->dim() != 1 || (*p)->size(0) != hidden)) return false;
    }
    if (normalized_shape != Py_None) {
      if (!PyTuple_Check(normalized_shape) && !PyList_Check(normalized_shape)) return false;
      if (PySequence_Fast_GET_SIZE(normalized_shape) != 1) return false;
      PyObject* size = PySequence_Fast_GET_ITEM(normalized_shape, 0);
      if (!PyLong_CheckExact(size)) return false;
      int overflow = 0;
      if (PyLong_AsLongLongAndOverflow(size, &overflow) != hidden || overflow != 0) return false;
    }
    if (a[4] == Py_None) {
      if (!is_rms_norm) return false;
      eps = finfo_eps(x.scalar_type());
    } else if (!plain_number(a[4], eps) || !(eps >= 0.0 && eps < std::numeric_limits<double>::infinity())) {
      return false;
    }
    if (!plain_number(weight_offset_arg, weight_offset) || !std::isfinite(weight_offset)) return false;
    return weight_offset == 0.0 || weight.has_value();
  }
};

PyObject* new_reference(PyObject* o) {
  Py_INCREF(o);
  return o;
}

PyObject* declined() { return new_reference(Py_NotImplemented); }

// functional_add_norm(x, residual, weight, bias, eps, is_rms_norm, prenorm, residual_dtype,
//                     memory_efficient, normalized_shape, weight_offset, out, residual_out)
//   -> y, or (y, residual_out) with prenorm; NotImplemented outside the common case.
// functional._add_norm's arguments and results: add_norm (differentiable) without
// out= / residual_out=, add_norm_fwd_out with them.
PyObject* functional_add_norm(PyObject*, PyObject* const* a, Py_ssize_t n) {
  HANDLE_TH_ERRORS
  check_count(n, 13, "functional_add_norm");
  static const auto add_norm_op = op<AddNormSig>("residual_fused::add_norm");
  static const auto fwd_out_op = op<FwdOutSig>("residual_fused::add_norm_fwd_out");
  const CommonCall call(a, a[9], a[10]);
  if (!call.ok) return declined();
  const bool prenorm = bool_arg(a[6]), memory_efficient = bool_arg(a[8]);
  at::ScalarType residual_out_dtype = call.residual ? call.residual->scalar_type() : call.x().scalar_type();
  if (a[7] != Py_None) {
    if (!THPDtype_Check(a[7])) return declined();
    residual_out_dtype = reinterpret_cast<THPDtype*>(a[7])->scalar_type;
    if (!supported(residual_out_dtype)) return declined();
  }
  PyObject *out_arg = a[11], *residual_out_arg = a[12];
  if (out_arg == Py_None && residual_out_arg == Py_None) {
    std::tuple<Tensor, Tensor> result;
    {
      pybind11::gil_scoped_release no_gil;
      result = add_norm_op.call(call.x(), call.residual, call.weight, call.bias, call.eps, call.is_rms_norm, prenorm,
                                residual_out_dtype, memory_efficient, call.weight_offset);
    }
    if (!prenorm) return THPVariable_Wrap(std::move(std::get<0>(result)));
    return wrap(std::move(result));
  }
  // out= / residual_out=: inference only, the buffers' rules as in functional._add_norm_into
  OptTensor out, residual_out;
  if (!plain_optional_tensor(out_arg, out) || !plain_optional_tensor(residual_out_arg, residual_out)) {
    return declined();
  }
  if (residual_out && (!prenorm || residual_out->scalar_type() != residual_out_dtype)) return declined();
  if (call.grad_needed({&out, &residual_out})) return declined();
  const bool new_out = !out, new_residual_out = prenorm && !residual_out;
  if (new_out) out = at::empty(call.x().sizes(), call.x().options());
  if (new_residual_out) residual_out = at::empty(call.x().sizes(), call.x().options().dtype(residual_out_dtype));
  {
    pybind11::gil_scoped_release no_gil;
    fwd_out_op.call(call.x(), call.residual, call.weight, call.bias, call.eps, call.is_rms_norm, call.weight_offset,
                    *out, residual_out);
  }
  // The caller's buffers come back as the objects passed.
  PyObject* y = new_out ? THPVariable_Wrap(std::move(*out)) : new_reference(out_arg);
  if (!prenorm) return y;
  PyObject* r = new_residual_out ? THPVariable_Wrap(std::move(*residual_out)) : new_reference(residual_out_arg);
  PyObject* result = PyTuple_Pack(2, y, r);
  Py_DECREF(y);
  Py_DECREF(r);
  return result;
  END_HANDLE_TH_ERRORS
}

// functional_add_norm_(x, residual, weight, bias, eps, is_rms_norm, normalized_shape, weight_offset)
//   -> (x, residual), updated in place; NotImplemented outside the common case (or
// where a tensor requires grad: the refusal is worded on the Python path).
PyObject* functional_add_norm_(PyObject*, PyObject* const* a, Py_ssize_t n) {
  HANDLE_TH_ERRORS
  check_count(n, 8, "functional_add_norm_");
  static const auto handle = op<FwdInplaceSig>("residual_fused::add_norm_fwd_inplace");
  const CommonCall call(a, a[6], a[7]);
  if (!call.ok || !call.residual || call.grad_needed()) return declined();
  {
    pybind11::gil_scoped_release no_gil;
    handle.call(call.x(), *call.residual, call.weight, call.bias, call.eps, call.is_rms_norm, call.weight_offset);
  }
  return PyTuple_Pack(2, a[0], a[1]);
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"add_norm", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&add_norm)), METH_FASTCALL,
     "torch.ops.residual_fused.add_norm through the C++ dispatcher (positional arguments)"},
    {"add_norm_fwd_out", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&add_norm_fwd_out)),
     METH_FASTCALL, "torch.ops.residual_fused.add_norm_fwd_out through the C++ dispatcher"},
    {"add_norm_fwd_inplace", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&add_norm_fwd_inplace)),
     METH_FASTCALL, "torch.ops.residual_fused.add_norm_fwd_inplace through the C++ dispatcher"},
    {"functional_add_norm", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&functional_add_norm)),
     METH_FASTCALL, "residual_fused.functional's common case, checked in C++; NotImplemented outside it"},
    {"functional_add_norm_", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&functional_add_norm_)),
     METH_FASTCALL, "the in-place functional forms' common case, checked in C++; NotImplemented outside it"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef residual_fused_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C() { return PyModule_Create(&residual_fused_c_module); }
