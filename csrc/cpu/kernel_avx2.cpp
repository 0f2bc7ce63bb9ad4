// The CPU kernels with AVX2 and FMA (256-bit Vectorized). setup.py compiles this
// file alone with -mavx2 -mfma -mf16c and defines RESIDUAL_FUSED_CPU_AVX2 for the
// whole extension; csrc/add_norm_cpu.cpp runs it only where ATen reports AVX2 (or
// better), so the binary still runs on CPUs without it.
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "cpu/add_norm_kernel.h"
