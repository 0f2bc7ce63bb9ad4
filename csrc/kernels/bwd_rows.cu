// Launch plans of the backward rows kernels. Each plan is persistent (at most as many
// CTAs as fit at once), so the dweight/dbias workspace has one row per CTA; CTAs of
// several rows keep that count near the SM count even for small hidden sizes.
#include <algorithm>

#include "bwd_kernels.cuh"
#include "launch.h"
#include "mixes.h"

namespace residual_fused {
namespace {

// Threads per CTA the plans aim for when a row needs fewer.
constexpr int kBwdTargetBlock = 512;

template <class MIX, int CHUNKS, int VEC, int MAX_BLOCK, int STAGES>
LaunchPlan rows_plan(const AddNormBwdParams& p, const Variant& v) {
  const int row_threads = row_threads_for(p.hidden, CHUNKS * VEC);
  const int target = v.target_block != 0 ? v.target_block : kBwdTargetBlock;
  if (row_threads > MAX_BLOCK) return refused(kRowsTooWide);
  if (target > MAX_BLOCK) return refused(kRowsBlockTooLarge);
  const int rows_per_cta = std::max(1, target / row_threads);
  LaunchPlan plan;
  plan.kernel = reinterpret_cast<const void*>(&add_norm_bwd_rows_kernel<MIX, CHUNKS, VEC, MAX_BLOCK, STAGES>);
  plan.block = rows_per_cta * row_threads;
  plan.smem = bwd_rows_smem<CHUNKS, VEC, STAGES>(p, plan.block);
  plan.grid = persistent_grid(plan, ceil_div(p.rows, rows_per_cta), v.ctas_per_sm);
  // tb as launched (rows per CTA x threads per row): one name per plan
  plan.variant = {Family::kRows, VEC == 8 ? CHUNKS * VEC : 0, plan.block, v.ctas_per_sm, 0, v.reduce, STAGES};
  return plan;
}

template <int CHUNKS, int VEC, int MAX_BLOCK, int STAGES = 1>
LaunchPlan rows_plan_for_mix(const AddNormBwdParams& p, const Variant& v) {
  return plan_for_mix(p, FastMixes{},
                      [&](auto mix) { return rows_plan<decltype(mix), CHUNKS, VEC, MAX_BLOCK, STAGES>(p, v); });
}

}  // namespace

LaunchPlan plan_bwd_rows_vec8(const AddNormBwdParams& p, const Variant& v) {
  const int per_thread = v.per_thread != 0 ? v.per_thread : p.hidden <= kBwdRegs16MaxVec8 ? 16 : 32;
  // The rule keeps each row's loads in registers (stages 1) until a GPU has timed the
  // ring (bench/NOTES.md, "Kernel variants").
  if (v.stages == 2) {
    if (per_thread != 16) return refused(kRowsRingNeedsPt16);
    return rows_plan_for_mix<2, 8, 512, 2>(p, v);
  }
  return per_thread == 16 ? rows_plan_for_mix<2, 8, 512>(p, v) : rows_plan_for_mix<4, 8, 512>(p, v);
}

LaunchPlan plan_bwd_rows_vec1(const AddNormBwdParams& p, const Variant& v) {
  if (v.per_thread != 0) return refused(kRowsPtNeedsVec8);
  if (v.stages == 2) return refused(kRowsRingNeedsVec8);
  return rows_plan<AnyMix, 4, 1, 1024, 1>(p, v);
}

}  // namespace residual_fused
