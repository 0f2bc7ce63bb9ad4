// Plain C++ interface between the torch glue (csrc/cuda/*.cpp) and the CUDA kernels
// (csrc/kernels/*.cu). It includes no torch headers, so nvcc compiles the kernels
// on their own in seconds.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "params.h"
#include "variant.h"

namespace residual_fused {

// Largest normalized size the kernels accept (kept in step with
// residual_fused/support.py: MAX_CUDA_HIDDEN_SIZE).
constexpr int kMaxHidden = 262144;

// One kernel launch: which kernel, grid, block and dynamic shared memory.
struct LaunchPlan {
  const void* kernel = nullptr;  // a __global__ function taking the params struct by value
  int64_t grid = 0;
  int block = 0;
  size_t smem = 0;  // dynamic shared memory, bytes
  int cluster = 1;  // CTAs per thread-block cluster (1: launched without clusters)
  Variant variant;  // the point of the variant space it is (variant.h), every choice filled in
  const char* why = nullptr;  // kernel null: why the requested variant cannot run the call
};

// The backward of one call, planned once: the caller sizes the workspace from it and
// hands the same plan to launch_add_norm_bwd, so what is launched is what was sized
// (a second planning could see a different occupancy, e.g. after a failed attribute
// call, and launch more CTAs than there are workspace rows).
struct AddNormBwdPlan {
  LaunchPlan main;           // the backward kernel (persistent: one partial row per CTA or cluster)
  int64_t partial_rows = 0;  // workspace rows: main.grid / main.cluster, or 0 without weight and bias
};

// Launch the forward on `stream`. Returns the launch status; never synchronises.
// cudaErrorInvalidValue when the tuning override (variant.h) cannot run the call;
// last_refusal() then says why.
cudaError_t launch_add_norm_fwd(const AddNormFwdParams& params, cudaStream_t stream);

// The backward's plan for `params` on the current device.
AddNormBwdPlan plan_add_norm_bwd(const AddNormBwdParams& params);

// Launch the backward (and the partial-sum reduction) of `plan` on `stream`.
// params.partial_rows must equal plan.partial_rows, with workspace pointers for the
// gradients present; anything else is refused (cudaErrorInvalidValue) before any
// launch. A failed launch leaves no error pending for a later call to report.
cudaError_t launch_add_norm_bwd(const AddNormBwdParams& params, const AddNormBwdPlan& plan,
                                cudaStream_t stream);

// Why this thread's last launch was refused before reaching the GPU (a variant that
// cannot run the call, an unparsable RESIDUAL_FUSED_VARIANT), or "" if it was not.
const char* last_refusal();

}  // namespace residual_fused
