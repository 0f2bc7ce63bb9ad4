// Launch plans (LaunchPlan, add_norm.h): which kernel, grid, block and dynamic shared
// memory a call uses. Each family's .cu file turns params into a plan; dispatch.cu
// picks the family and launches. The backward's workspace is sized from the very plan
// it launches (AddNormBwdPlan).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "add_norm.h"

namespace residual_fused {

// Multiprocessor count of the current device (cached per device).
int sm_count();
// CTAs of `plan.kernel` that fit on one SM at `plan.block` threads and `plan.smem`
// bytes (1 for a plan that does not fit on the device at all).
int max_ctas_per_sm(const LaunchPlan& plan);
// Whether the plan's dynamic plus the kernel's static shared memory fit in one block.
bool fits_on_device(const LaunchPlan& plan);
// Clusters of plan.cluster CTAs of the plan that can be resident at once: 0 when the
// device cannot launch clusters, the kernel's code was compiled for a target without
// them (PTX version below 9.0), or one cluster does not fit.
int max_active_clusters(const LaunchPlan& plan);

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int round_up(int a, int b) { return static_cast<int>(ceil_div(a, b) * b); }

// CTAs for `work` independent units (rows or row groups): all of them when they fit
// in one wave of the device, else as many as are resident at once, at most
// ctas_per_sm per SM when that is given (persistent CTAs loop over the rest). One
// wave or fewer skips the occupancy query.
int64_t persistent_grid(const LaunchPlan& plan, int64_t work, int ctas_per_sm = 0);

// Why a rows variant cannot run a call (the same in both directions).
constexpr const char* kRowsTooWide = "rows: the row needs more than the kernel's threads per CTA (pt too small)";
constexpr const char* kRowsBlockTooLarge =
    "rows: tb exceeds the kernel's threads per CTA (512 vectorised, 1024 element-wise)";
constexpr const char* kRowsPtNeedsVec8 = "rows: pt applies to vectorised rows (hidden % 8 == 0, 16-byte aligned)";
constexpr const char* kRowsRingNeedsVec8 = "rows: st=2 needs vectorised rows (hidden % 8 == 0, 16-byte aligned)";
constexpr const char* kRowsRingNeedsPt16 =
    "rows: st=2 needs 16 elements per thread (pt=16; at 32 the partials take the shared memory)";

// A plan that runs nothing: `why` the requested variant cannot run the call.
inline LaunchPlan refused(const char* why) {
  LaunchPlan plan;
  plan.why = why;
  return plan;
}

// Hidden-size limits of the on-chip kernels; larger rows are streamed. The rows
// kernels hold 16 elements per thread up to k*Regs16MaxVec8 and 32 beyond, with at
// most 512 threads per row; the forward stages still wider rows in shared memory
// (when the device has enough of it). Element-wise rows hold 4 per thread, 1024
// threads at most.
constexpr int kFwdRegs16MaxVec8 = 8192;   // 512 threads x 2 x 8
constexpr int kFwdRegsMaxVec8 = 16384;    // 512 threads x 4 x 8
constexpr int kFwdRowsMaxVec8 = 49152;    // staged: 384 threads x 16 x 8, 192 KB of fp32
constexpr int kFwdRowsMaxVec1 = 4096;     // 1024 threads x 4 x 1
constexpr int kBwdRegs16MaxVec8 = 8192;   // 512 threads x 2 x 8
constexpr int kBwdRowsMaxVec8 = 16384;    // 512 threads x 4 x 8
constexpr int kBwdRowsMaxVec1 = 4096;     // 1024 threads x 4 x 1

// Rows wider than kClusterMinHidden, split across a thread-block cluster (sm_90):
// up to 16384 one CTA's rows kernel measured faster on an H200 than a cluster of two
// (backward 58% of copy bandwidth against 40% at 16384). A plan with grid 0 when the
// device or the build has no clusters, or none fits.
constexpr int kClusterMinHidden = kFwdRegsMaxVec8;
//
// Each family's plan takes the variant's choices (variant.h; 0 / auto: the family's
// default) and returns a refused plan (null kernel, `why` set) for a call they cannot
// run. The rule in dispatch.cu calls them with default choices.
LaunchPlan plan_fwd_cluster(const AddNormFwdParams& p, const Variant& v);
LaunchPlan plan_bwd_cluster(const AddNormBwdParams& p, const Variant& v);

LaunchPlan plan_fwd_rows_vec8(const AddNormFwdParams& p, const Variant& v);
LaunchPlan plan_fwd_rows_vec1(const AddNormFwdParams& p, const Variant& v);
LaunchPlan plan_fwd_staged(const AddNormFwdParams& p);
LaunchPlan plan_fwd_streamed(const AddNormFwdParams& p, int vec, const Variant& v);  // vec 8 or 1; fp64 -> 1

LaunchPlan plan_bwd_rows_vec8(const AddNormBwdParams& p, const Variant& v);
LaunchPlan plan_bwd_rows_vec1(const AddNormBwdParams& p, const Variant& v);
LaunchPlan plan_bwd_streamed(const AddNormBwdParams& p, int vec, const Variant& v);
// The weight-gradient reduction, columns or sliced (plan_add_norm_bwd resolves auto:
// columns, a thread per column, for at most kReduceColumnsMaxRows partial rows).
constexpr int64_t kReduceColumnsMaxRows = 32;
LaunchPlan plan_reduce_partials(const AddNormBwdParams& p, Reduce reduce);

}  // namespace residual_fused
