// Launch plans of the streamed backward kernel (any hidden size, float64) and of the
// deterministic partial-sum reduction.
#include <algorithm>

#include "bwd_kernels.cuh"
#include "launch.h"

namespace residual_fused {
namespace {

constexpr int kBlock = 512;

template <int VEC, typename acc_t>
LaunchPlan streamed_plan(const AddNormBwdParams& p) {
  LaunchPlan plan;
  plan.kernel = reinterpret_cast<const void*>(&add_norm_bwd_streamed_kernel<VEC, acc_t, kBlock>);
  plan.block = kBlock;
  // Every CTA must own at least one row: its partial row is written, not accumulated,
  // on its first row.
  plan.grid = std::min<int64_t>(p.rows, int64_t{sm_count()} * max_ctas_per_sm(plan));
  return plan;
}

}  // namespace

LaunchPlan plan_bwd_streamed(const AddNormBwdParams& p, int vec) {
  if (p.dy_dtype == DType::kFloat64) return streamed_plan<1, double>(p);
  return vec == 8 ? streamed_plan<8, float>(p) : streamed_plan<1, float>(p);
}

LaunchPlan plan_reduce_partials(const AddNormBwdParams& p) {
  LaunchPlan plan;
  if (p.partial_rows <= kReduceColumnsMaxRows) {
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
