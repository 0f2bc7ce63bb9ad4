// Launch plans of the forward kernels that keep the row on chip: in registers (at most
// 32 fp32 values per thread) up to kFwdRegsMaxVec8, staged in shared memory beyond.
#include <algorithm>

#include "fwd_kernels.cuh"
#include "launch.h"

namespace residual_fused {
namespace {

template <int ROW_THREADS, int CHUNKS, int VEC, int MAX_BLOCK>
LaunchPlan rows_plan(const AddNormFwdParams& p, int block) {
  const int rows_per_cta = ROW_THREADS == kWholeBlock ? 1 : block / ROW_THREADS;
  LaunchPlan plan;
  plan.kernel = reinterpret_cast<const void*>(&add_norm_fwd_rows_kernel<ROW_THREADS, CHUNKS, VEC, MAX_BLOCK>);
  plan.block = block;
  plan.grid = std::min<int64_t>(ceil_div(p.rows, rows_per_cta), int64_t{1} << 30);
  return plan;
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
  // Small rows: a row per group of 8-32 lanes, several rows per 128-thread CTA.
  if (h <= 64) return rows_plan<8, 1, 8, 128>(p, 128);
  if (h <= 128) return rows_plan<16, 1, 8, 128>(p, 128);
  if (h <= 256) return rows_plan<32, 1, 8, 128>(p, 128);
  if (h <= 512) return rows_plan<32, 2, 8, 128>(p, 128);
  if (h <= 1024) return rows_plan<32, 4, 8, 128>(p, 128);
  // One row per CTA, four 8-element vectors per thread, just enough warps for the row.
  if (h <= kFwdRegsMaxVec8) {
    return rows_plan<kWholeBlock, 4, 8, 256>(p, round_up(static_cast<int>(ceil_div(h, 32)), 32));
  }
  // Wider rows: sixteen vectors per thread, parked in shared memory.
  return staged_plan<16, 8, 512>(p, round_up(static_cast<int>(ceil_div(h, 128)), 32));
}

LaunchPlan plan_fwd_rows_vec1(const AddNormFwdParams& p) {
  const int h = p.hidden;
  if (h <= 64) return rows_plan<32, 2, 1, 128>(p, 128);
  if (h <= 256) return rows_plan<32, 8, 1, 128>(p, 128);
  return rows_plan<kWholeBlock, 4, 1, 1024>(p, round_up(static_cast<int>(ceil_div(h, 4)), 32));
}

}  // namespace residual_fused
