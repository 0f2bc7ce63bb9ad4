// Launch plans of the forward kernels that keep the row on chip: in registers up to
// kFwdRegsMaxVec8 (16 or 32 elements per thread), staged in shared memory beyond.
#include <algorithm>

#include "fwd_kernels.cuh"
#include "launch.h"
#include "mixes.h"

namespace residual_fused {
namespace {

// Threads per CTA the plans aim for when a row needs fewer: several rows per CTA
// share one staged copy of the parameters.
constexpr int kFwdTargetBlock = 256;

template <class MIX, int CHUNKS, int VEC, int MAX_BLOCK, int STAGES>
LaunchPlan rows_plan(const AddNormFwdParams& p, const Variant& v) {
  const int row_threads = row_threads_for(p.hidden, CHUNKS * VEC);
  const int target = v.target_block != 0 ? v.target_block : kFwdTargetBlock;
  if (row_threads > MAX_BLOCK) return refused(kRowsTooWide);
  if (target > MAX_BLOCK) return refused(kRowsBlockTooLarge);
  const int rows_per_cta = std::max(1, target / row_threads);
  LaunchPlan plan;
  plan.kernel = reinterpret_cast<const void*>(&add_norm_fwd_rows_kernel<MIX, CHUNKS, VEC, MAX_BLOCK, STAGES>);
  plan.block = rows_per_cta * row_threads;
  plan.smem = fwd_rows_smem<CHUNKS, VEC, STAGES>(p, plan.block);
  plan.grid = persistent_grid(plan, ceil_div(p.rows, rows_per_cta), v.ctas_per_sm);
  // tb as launched (rows per CTA x threads per row): one name per plan
  plan.variant = {Family::kRows, VEC == 8 ? CHUNKS * VEC : 0, plan.block, v.ctas_per_sm, 0, Reduce::kAuto, STAGES};
  return plan;
}

template <int CHUNKS, int VEC, int MAX_BLOCK, int STAGES = 1>
LaunchPlan rows_plan_for_mix(const AddNormFwdParams& p, const Variant& v) {
  return plan_for_mix(p, FastMixes{},
                      [&](auto mix) { return rows_plan<decltype(mix), CHUNKS, VEC, MAX_BLOCK, STAGES>(p, v); });
}

}  // namespace

LaunchPlan plan_fwd_rows_vec8(const AddNormFwdParams& p, const Variant& v) {
  // 16 elements per thread up to 8192 columns: 64 B of each input in flight per
  // thread, registers low enough for 1024+ threads per SM; 32 beyond.
  const int per_thread = v.per_thread != 0 ? v.per_thread : p.hidden <= kFwdRegs16MaxVec8 ? 16 : 32;
  // The rule loads each row straight to registers (stages 1) until a GPU has timed
  // the ring (bench/NOTES.md, "Kernel variants").
  if (v.stages == 2) {
    return per_thread == 16 ? rows_plan_for_mix<2, 8, 512, 2>(p, v) : rows_plan_for_mix<4, 8, 512, 2>(p, v);
  }
  return per_thread == 16 ? rows_plan_for_mix<2, 8, 512>(p, v) : rows_plan_for_mix<4, 8, 512>(p, v);
}

LaunchPlan plan_fwd_rows_vec1(const AddNormFwdParams& p, const Variant& v) {
  if (v.per_thread != 0) return refused(kRowsPtNeedsVec8);
  if (v.stages == 2) return refused(kRowsRingNeedsVec8);
  return rows_plan<AnyMix, 4, 1, 1024, 1>(p, v);
}

// Rows wider than registers hold: sixteen vectors per thread, parked in shared memory.
LaunchPlan plan_fwd_staged(const AddNormFwdParams& p) {
  constexpr int kChunks = 16, kVec = 8, kMaxBlock = 512;
  const int block = round_up(static_cast<int>(ceil_div(p.hidden, kChunks * kVec)), 32);
  if (block > kMaxBlock) return refused("staged: the row is wider than 512 x 128 columns");
  LaunchPlan plan;
  plan.kernel = reinterpret_cast<const void*>(&add_norm_fwd_staged_kernel<kChunks, kVec, kMaxBlock>);
  plan.block = block;
  plan.smem = sizeof(float) * block * (kChunks * kVec + 1);
  plan.grid = std::min<int64_t>(p.rows, int64_t{1} << 30);
  plan.variant.family = Family::kStaged;
  return plan;
}

}  // namespace residual_fused
