// Launch plans of the streamed forward kernel: any hidden size, and float64.
#include <algorithm>

#include "fwd_kernels.cuh"
#include "launch.h"

namespace residual_fused {
namespace {

constexpr int kBlock = 512;

template <int VEC, typename acc_t>
LaunchPlan streamed_plan(const AddNormFwdParams& p, const Variant& v) {
  LaunchPlan plan;
  plan.kernel = reinterpret_cast<const void*>(&add_norm_fwd_streamed_kernel<VEC, acc_t, kBlock>);
  plan.block = kBlock;
  // Persistent CTAs: as many as fit at once (or ctas_per_sm), each looping over rows.
  plan.grid = persistent_grid(plan, p.rows, v.ctas_per_sm);
  plan.variant.family = Family::kStreamed;
  plan.variant.ctas_per_sm = v.ctas_per_sm;
  return plan;
}

}  // namespace

LaunchPlan plan_fwd_streamed(const AddNormFwdParams& p, int vec, const Variant& v) {
  if (p.x_dtype == DType::kFloat64) return streamed_plan<1, double>(p, v);
  return vec == 8 ? streamed_plan<8, float>(p, v) : streamed_plan<1, float>(p, v);
}

}  // namespace residual_fused
