// Launch plans of the streamed backward kernel (any hidden size, float64) and of the
// deterministic partial-sum reduction.
#include <algorithm>

#include "bwd_kernels.cuh"
#include "launch.h"

namespace residual_fused {
namespace {

constexpr int kBlock = 512;

template <int VEC, typename acc_t>
LaunchPlan streamed_plan(const AddNormBwdParams& p, const Variant& v) {
  LaunchPlan plan;
  plan.kernel = reinterpret_cast<const void*>(&add_norm_bwd_streamed_kernel<VEC, acc_t, kBlock>);
  plan.block = kBlock;
  // Every CTA must own at least one row: its partial row is written, not accumulated,
  // on its first row.
  plan.grid = persistent_grid(plan, p.rows, v.ctas_per_sm);
  plan.variant.family = Family::kStreamed;
  plan.variant.ctas_per_sm = v.ctas_per_sm;
  plan.variant.reduce = v.reduce;
  return plan;
}

}  // namespace

LaunchPlan plan_bwd_streamed(const AddNormBwdParams& p, int vec, const Variant& v) {
  if (p.dy_dtype == DType::kFloat64) return streamed_plan<1, double>(p, v);
  return vec == 8 ? streamed_plan<8, float>(p, v) : streamed_plan<1, float>(p, v);
}

LaunchPlan plan_reduce_partials(const AddNormBwdParams& p, Reduce reduce) {
  LaunchPlan plan;
  if (reduce == Reduce::kColumns) {
    plan.kernel = p.dy_dtype == DType::kFloat64
                      ? reinterpret_cast<const void*>(&reduce_partial_columns_kernel<double>)
                      : reinterpret_cast<const void*>(&reduce_partial_columns_kernel<float>);
    plan.grid = 2 * ceil_div(p.hidden, kReduceColumnsBlock);
    plan.block = kReduceColumnsBlock;
    return plan;
  }
  plan.kernel = p.dy_dtype == DType::kFloat64
                    ? reinterpret_cast<const void*>(&reduce_partials_kernel<double>)
                    : reinterpret_cast<const void*>(&reduce_partials_kernel<float>);
  plan.grid = 2 * ceil_div(p.hidden, 32);
  plan.block = kReduceBlock;
  return plan;
}

}  // namespace residual_fused
