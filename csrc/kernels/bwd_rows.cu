// Launch plans of the backward rows kernels. Each plan is persistent (as many CTAs as
// fit at once), so the dweight/dbias workspace has one row per CTA.
#include <algorithm>

#include "bwd_kernels.cuh"
#include "launch.h"

namespace residual_fused {
namespace {

template <int ROW_THREADS, int CHUNKS, int VEC, int MAX_BLOCK>
LaunchPlan rows_plan(const AddNormBwdParams& p, int block) {
  const bool whole = ROW_THREADS == kWholeBlock;
  const int rows_per_cta = whole ? 1 : block / ROW_THREADS;
  LaunchPlan plan;
  plan.kernel = reinterpret_cast<const void*>(&add_norm_bwd_rows_kernel<ROW_THREADS, CHUNKS, VEC, MAX_BLOCK>);
  plan.block = block;
  plan.smem = sizeof(float) * 2 * block * (CHUNKS * VEC + (whole ? 1 : 0));
  plan.grid = std::min<int64_t>(ceil_div(p.rows, rows_per_cta),
                                int64_t{sm_count()} * max_ctas_per_sm(plan));
  return plan;
}

}  // namespace

LaunchPlan plan_bwd_rows_vec8(const AddNormBwdParams& p) {
  const int h = p.hidden;
  if (h <= 64) return rows_plan<8, 1, 8, 128>(p, 128);
  if (h <= 128) return rows_plan<16, 1, 8, 128>(p, 128);
  if (h <= 256) return rows_plan<32, 1, 8, 128>(p, 128);
  if (h <= 512) return rows_plan<32, 2, 8, 128>(p, 128);
  return rows_plan<kWholeBlock, 4, 8, 512>(p, round_up(static_cast<int>(ceil_div(h, 32)), 32));
}

LaunchPlan plan_bwd_rows_vec1(const AddNormBwdParams& p) {
  const int h = p.hidden;
  if (h <= 64) return rows_plan<32, 2, 1, 128>(p, 128);
  if (h <= 256) return rows_plan<32, 8, 1, 128>(p, 128);
  return rows_plan<kWholeBlock, 4, 1, 1024>(p, round_up(static_cast<int>(ceil_div(h, 4)), 32));
}

}  // namespace residual_fused
