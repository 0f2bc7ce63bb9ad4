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

template <class MIX, int CHUNKS, int VEC, int MAX_BLOCK>
LaunchPlan rows_plan(const AddNormFwdParams& p) {
  const int row_threads = row_threads_for(p.hidden, CHUNKS * VEC);
  const int rows_per_cta = std::max(1, kFwdTargetBlock / row_threads);
  LaunchPlan plan;
  plan.kernel = reinterpret_cast<const void*>(&add_norm_fwd_rows_kernel<MIX, CHUNKS, VEC, MAX_BLOCK>);
  plan.block = rows_per_cta * row_threads;
  plan.smem = param_bytes(p.weight, p.weight_dtype, p.hidden) + param_bytes(p.bias, p.bias_dtype, p.hidden);
  plan.grid = persistent_grid(plan, ceil_div(p.rows, rows_per_cta));
  return plan;
}

template <int CHUNKS, int VEC, int MAX_BLOCK>
LaunchPlan rows_plan_for_mix(const AddNormFwdParams& p) {
  return plan_for_mix(p, FastMixes{}, [&](auto mix) { return rows_plan<decltype(mix), CHUNKS, VEC, MAX_BLOCK>(p); });
}

template <int CHUNKS, int VEC, int MAX_BLOCK>
LaunchPlan staged_plan(const AddNormFwdParams& p, int block) {
  LaunchPlan plan;
  plan.kernel = reinterpret_cast<const void*>(&add_norm_fwd_staged_kernel<CHUNKS, VEC, MAX_BLOCK>);
  plan.block = block;
  plan.smem = sizeof(float) * block * (CHUNKS * VEC + 1);
  plan.grid = std::min<int64_t>(p.rows, int64_t{1} << 30);
  return plan;
}

}  // namespace

LaunchPlan plan_fwd_rows_vec8(const AddNormFwdParams& p) {
  const int h = p.hidden;
  // 16 elements per thread: 64 B of each input in flight per thread, registers low
  // enough for 1024+ threads per SM.
  if (h <= kFwdRegs16MaxVec8) return rows_plan_for_mix<2, 8, 512>(p);
  if (h <= kFwdRegsMaxVec8) return rows_plan_for_mix<4, 8, 512>(p);
  // Wider rows: sixteen vectors per thread, parked in shared memory.
  return staged_plan<16, 8, 512>(p, round_up(static_cast<int>(ceil_div(h, 128)), 32));
}

LaunchPlan plan_fwd_rows_vec1(const AddNormFwdParams& p) {
  return rows_plan<AnyMix, 4, 1, 1024>(p);
}

}  // namespace residual_fused
