// The CPU kernels for any CPU: at::vec's portable Vectorized, which the compiler
// vectorises for the baseline instruction set.
#define CPU_CAPABILITY DEFAULT
#include "cpu/add_norm_kernel.h"
