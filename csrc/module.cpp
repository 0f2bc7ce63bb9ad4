// The Python module residual_fused._C. Importing it loads this library, whose static
// initialisers (TORCH_LIBRARY_IMPL in add_norm_cpu.cpp and, in CUDA builds,
// cuda/add_norm_cuda.cpp) register the kernels with the dispatcher; it exposes
// nothing else.
#include <Python.h>

static PyModuleDef residual_fused_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C() { return PyModule_Create(&residual_fused_c_module); }
