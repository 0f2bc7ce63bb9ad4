// Launch plans of the streamed forward kernel: any hidden size, and float64.
#include <algorithm>

#include "fwd_kernels.cuh"
#include "launch.h"

namespace residual_fused {
namespace {

constexpr int kBlock = 512;

template <int VEC, typename acc_t>
LaunchPlan streamed_plan(const AddNormFwdParams& p) {
  LaunchPlan plan;
  plan.kernel = reinterpret_cast<const void*>(&add_norm_fwd_streamed_kernel<VEC, acc_t, kBlock>);
  plan.block = kBlock;
  // Persistent CTAs: as many as fit at once, each looping over rows.
  plan.grid = std::min<int64_t>(p.rows, int64_t{sm_count()} * max_ctas_per_sm(plan));
  return plan;
}

}  // namespace

LaunchPlan plan_fwd_streamed(const AddNormFwdParams& p, int vec) {
  if (p.x_dtype == DType::kFloat64) return streamed_plan<1, double>(p);
  return vec == 8 ? streamed_plan<8, float>(p) : streamed_plan<1, float>(p);
}

}  // namespace residual_fused
