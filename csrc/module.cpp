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
#include <ATen/core/dispatch/Dispatcher.h>
#include <Python.h>
#include <torch/csrc/Dtype.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

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

PyMethodDef methods[] = {
    {"add_norm", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&add_norm)), METH_FASTCALL,
     "torch.ops.residual_fused.add_norm through the C++ dispatcher (positional arguments)"},
    {"add_norm_fwd_out", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&add_norm_fwd_out)),
     METH_FASTCALL, "torch.ops.residual_fused.add_norm_fwd_out through the C++ dispatcher"},
    {"add_norm_fwd_inplace", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&add_norm_fwd_inplace)),
     METH_FASTCALL, "torch.ops.residual_fused.add_norm_fwd_inplace through the C++ dispatcher"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef residual_fused_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C() { return PyModule_Create(&residual_fused_c_module); }
