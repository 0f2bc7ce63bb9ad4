// Plain C++ interface between the torch glue (csrc/*.cpp) and the CUDA kernels
// (csrc/kernels/*.cu). It includes no torch headers, so nvcc compiles the kernels
// on their own in seconds.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace residual_fused {

// Element types of the tensors. Every tensor carries its own, so any mix works
// with one kernel instantiation; the compute type is float, or double when x is
// float64.
enum class DType : int8_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// Largest normalized size the kernels accept (kept in step with
// residual_fused/support.py: MAX_CUDA_HIDDEN_SIZE).
constexpr int kMaxHidden = 262144;

struct AddNormFwdParams {
  int64_t rows = 0;
  int hidden = 0;
  bool is_rms_norm = false;
  double eps = 0.0;

  const void* x = nullptr;             // [rows, hidden], row stride x_row_stride (elements)
  int64_t x_row_stride = 0;
  DType x_dtype = DType::kFloat32;     // also y's dtype; kFloat64 selects double compute
  const void* residual = nullptr;      // [rows, hidden] or null
  int64_t residual_row_stride = 0;
  DType residual_dtype = DType::kFloat32;
  const void* weight = nullptr;        // [hidden] or null
  DType weight_dtype = DType::kFloat32;
  const void* bias = nullptr;          // [hidden] or null (always null for RMSNorm)
  DType bias_dtype = DType::kFloat32;

  void* y = nullptr;                   // [rows, hidden], contiguous, x_dtype
  void* residual_out = nullptr;        // [rows, hidden], contiguous, or null: x + residual
  DType residual_out_dtype = DType::kFloat32;
  void* rstd = nullptr;                // [rows], float (double when x is float64)
};

struct AddNormBwdParams {
  int64_t rows = 0;
  int hidden = 0;
  bool is_rms_norm = false;
  bool memory_efficient = false;       // saved is y: xhat = (y - bias) / weight

  const void* dy = nullptr;            // [rows, hidden], row stride dy_row_stride
  int64_t dy_row_stride = 0;
  DType dy_dtype = DType::kFloat32;    // also dx's dtype; kFloat64 selects double compute
  const void* dresidual_out = nullptr; // [rows, hidden] or null (pre-norm: added to ds)
  int64_t dresidual_out_row_stride = 0;
  DType dresidual_out_dtype = DType::kFloat32;
  const void* saved = nullptr;         // [rows, hidden]: residual_out / x, or y if memory_efficient
  int64_t saved_row_stride = 0;
  DType saved_dtype = DType::kFloat32;
  const void* rstd = nullptr;          // [rows], compute type
  const void* weight = nullptr;        // [hidden] or null
  DType weight_dtype = DType::kFloat32;
  const void* bias = nullptr;          // [hidden] or null
  DType bias_dtype = DType::kFloat32;

  void* dx = nullptr;                  // [rows, hidden], contiguous, dy_dtype
  void* dresidual = nullptr;           // [rows, hidden], contiguous, or null (then dx serves)
  DType dresidual_dtype = DType::kFloat32;
  void* dweight = nullptr;             // [hidden], weight_dtype, or null
  void* dbias = nullptr;               // [hidden], bias_dtype, or null

  // Workspace of the backward's plan (AddNormBwdPlan::partial_rows rows): per-CTA
  // column sums of dy * xhat and dy, [partial_rows, hidden] in the compute type,
  // reduced in a fixed order by a second kernel so the weight gradients are bitwise
  // reproducible (no atomics).
  void* dweight_partial = nullptr;
  void* dbias_partial = nullptr;
  int64_t partial_rows = 0;            // rows of the workspace the caller allocated
};

// One kernel launch: which kernel, grid, block and dynamic shared memory.
struct LaunchPlan {
  const void* kernel = nullptr;  // a __global__ function taking the params struct by value
  int64_t grid = 0;
  int block = 0;
  size_t smem = 0;  // dynamic shared memory, bytes
  int cluster = 1;  // CTAs per thread-block cluster (1: launched without clusters)
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
cudaError_t launch_add_norm_fwd(const AddNormFwdParams& params, cudaStream_t stream);

// The backward's plan for `params` on the current device.
AddNormBwdPlan plan_add_norm_bwd(const AddNormBwdParams& params);

// Launch the backward (and the partial-sum reduction) of `plan` on `stream`.
// params.partial_rows must equal plan.partial_rows, with workspace pointers for the
// gradients present; anything else is refused (cudaErrorInvalidValue) before any
// launch. A failed launch leaves no error pending for a later call to report.
cudaError_t launch_add_norm_bwd(const AddNormBwdParams& params, const AddNormBwdPlan& plan,
                                cudaStream_t stream);

}  // namespace residual_fused
