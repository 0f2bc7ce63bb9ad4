// The CPU kernels' entry points, one set per CPU capability: add_norm_kernel.h is
// compiled once per capability with that capability's compiler flags (the files
// kernel_<capability>.cpp; setup.py adds the flags), the way ATen compiles its own
// CPU kernels, and csrc/add_norm_cpu.cpp picks a set at run time from
// at::get_cpu_capability(). No torch headers here.
#pragma once

#include <cstdint>

#include "kernels/params.h"

namespace residual_fused::cpu {

// Rows per task below which a call is not worth another thread: about 32K elements
// per task, ATen's own grain (at::internal::GRAIN_SIZE).
inline int64_t grain_rows(int64_t hidden) {
  constexpr int64_t kGrainElements = 32768;
  return hidden >= kGrainElements ? 1 : kGrainElements / hidden;
}

// Workspace rows of the backward: one per task, at most one task per thread. The
// rows of task k are fixed by (rows, hidden, threads) alone, so the weight gradients
// are bitwise reproducible for a given thread count.
inline int64_t bwd_partial_rows(int64_t rows, int64_t hidden, int64_t threads) {
  const int64_t grain = grain_rows(hidden);
  const int64_t tasks = (rows + grain - 1) / grain;
  return tasks < threads ? tasks : threads;
}

#define RESIDUAL_FUSED_DECLARE_CPU_KERNELS(capability)                 \
  namespace capability {                                               \
  void add_norm_fwd_kernel(const AddNormFwdParams& p);                 \
  /* p.partial_rows must equal bwd_partial_rows(p.rows, p.hidden, t) */ \
  /* for the thread count t the call runs with (at::get_num_threads) */ \
  void add_norm_bwd_kernel(const AddNormBwdParams& p);                 \
  }

RESIDUAL_FUSED_DECLARE_CPU_KERNELS(DEFAULT)
#ifdef RESIDUAL_FUSED_CPU_AVX2
RESIDUAL_FUSED_DECLARE_CPU_KERNELS(AVX2)
#endif

#undef RESIDUAL_FUSED_DECLARE_CPU_KERNELS

}  // namespace residual_fused::cpu
