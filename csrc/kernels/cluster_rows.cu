// Launch plans of the cluster kernels (cluster_kernels.cuh): rows wider than one CTA
// holds in registers, split across a thread-block cluster on sm_90.
//
// The shape rule: a CTA holds 16 elements per thread and up to 512 threads (8192
// columns, the rows kernels' most efficient layout) and double-buffers its inputs in
// shared memory, on clusters of up to 8 CTAs, the portable cluster size: hidden <=
// 65536. Wider rows, or rows whose buffers do not fit in shared memory (fp32 tensors),
// hold 32 elements per thread without buffers, on up to 16 CTAs (hidden <= 262144),
// the non-portable size sm_90 allows. The cluster is the fewest CTAs whose slices
// hold the row, so the exchange stays small and clusters pack into the GPU's
// processing clusters.
#include <algorithm>
#include <type_traits>

#include "cluster_kernels.cuh"
#include "launch.h"
#include "mixes.h"

namespace residual_fused {
namespace {

constexpr int kClusterBlock = 512;
constexpr int kPortableCluster = 8;

struct ClusterShape {
  int per_thread;  // elements per thread: 16 or 32
  int cluster;     // CTAs per cluster
  int slice;       // columns per CTA
  int block;       // threads per CTA
};

// The fewest CTAs whose slices hold the row, or `cluster` when given.
ClusterShape cluster_shape(int hidden, int per_thread, int cluster = 0) {
  if (cluster == 0) cluster = static_cast<int>(ceil_div(hidden, kClusterBlock * per_thread));
  const int slice = cluster_slice(hidden, cluster);
  return {per_thread, cluster, slice, row_threads_for(slice, per_thread)};
}

// Why `shape` cannot split a row, or nullptr.
const char* shape_refusal(const ClusterShape& shape) {
  if (shape.cluster < 2) return "cluster: a row split across fewer than 2 CTAs is the rows family";
  if (shape.block > kClusterBlock) return "cluster: a slice needs more than 512 threads (cs or pt too small)";
  // Whole warps per CTA: slices of at least 32 x per_thread columns, so with at most
  // 16 CTAs (and slices rounded up by at most 8) the last slice is never empty.
  if (shape.block < 32) return "cluster: a slice must give each CTA whole warps, 32 x pt columns (cs too large)";
  return nullptr;
}

// Persistent clusters: one per row up to as many as are resident at once. Refused when
// none can run here (no clusters on this device or build, or too little shared memory).
void finish_plan(LaunchPlan& plan, int64_t rows, const ClusterShape& shape, Reduce reduce) {
  const int clusters = fits_on_device(plan) ? max_active_clusters(plan) : 0;
  if (clusters <= 0) {
    plan = refused("cluster: no cluster of this shape can run on this device or build");
    return;
  }
  plan.grid = std::min<int64_t>(rows, clusters) * plan.cluster;
  plan.variant = {Family::kCluster, shape.per_thread, 0, 0, shape.cluster, reduce};
}

template <class MIX, int CHUNKS>
LaunchPlan fwd_plan_of(const AddNormFwdParams& p, const ClusterShape& shape) {
  LaunchPlan plan;
  plan.kernel = reinterpret_cast<const void*>(&add_norm_fwd_cluster_kernel<MIX, CHUNKS, 8, kClusterBlock>);
  plan.block = shape.block;
  plan.cluster = shape.cluster;
  plan.smem = fwd_cluster_smem<CHUNKS, 8>(p, shape.slice);
  finish_plan(plan, p.rows, shape, Reduce::kAuto);
  return plan;
}

template <class MIX, int CHUNKS>
LaunchPlan bwd_plan_of(const AddNormBwdParams& p, const ClusterShape& shape, Reduce reduce) {
  if constexpr (CHUNKS == 4 && std::is_same<MIX, AnyMix>::value) {
    // The run-time-dtype kernel would spill at 32 elements per thread: such mixes
    // stream what 16 elements per thread cannot hold.
    return refused("cluster: pt=32 has no backward kernel for this dtype mix (it would spill)");
  } else {
    LaunchPlan plan;
    plan.kernel = reinterpret_cast<const void*>(&add_norm_bwd_cluster_kernel<MIX, CHUNKS, 8, kClusterBlock>);
    plan.block = shape.block;
    plan.cluster = shape.cluster;
    plan.smem = bwd_cluster_smem<CHUNKS, 8>(p, shape.slice, shape.block);
    finish_plan(plan, p.rows, shape, reduce);
    return plan;
  }
}

// The shape rule (top of this file) or the variant's choices: `plan_of(mix, chunks,
// shape)` builds one shape's plan.
template <class Params, class PlanOf>
LaunchPlan cluster_plan(const Params& p, const Variant& v, PlanOf&& plan_of) {
  const int hidden = p.hidden;
  return plan_for_mix(p, FastMixes{}, [&](auto mix) {
    if (v.per_thread != 0 || v.cluster != 0) {
      const ClusterShape shape = cluster_shape(hidden, v.per_thread != 0 ? v.per_thread : 16, v.cluster);
      if (const char* why = shape_refusal(shape)) return refused(why);
      return shape.per_thread == 16 ? plan_of(mix, std::integral_constant<int, 2>{}, shape)
                                    : plan_of(mix, std::integral_constant<int, 4>{}, shape);
    }
    // The rule's shapes are checked too: a bare "cluster" variant may ask for a row
    // too narrow to split (the rule itself only splits rows wider than 16384).
    const ClusterShape narrow = cluster_shape(hidden, 16), wide = cluster_shape(hidden, 32);
    if (narrow.cluster <= kPortableCluster && shape_refusal(narrow) == nullptr) {
      const LaunchPlan plan = plan_of(mix, std::integral_constant<int, 2>{}, narrow);
      if (plan.kernel != nullptr) return plan;
    }
    if (const char* why = shape_refusal(wide)) return refused(why);
    return plan_of(mix, std::integral_constant<int, 4>{}, wide);
  });
}

}  // namespace

LaunchPlan plan_fwd_cluster(const AddNormFwdParams& p, const Variant& v) {
  return cluster_plan(p, v, [&](auto mix, auto chunks, const ClusterShape& shape) {
    return fwd_plan_of<decltype(mix), decltype(chunks)::value>(p, shape);
  });
}

LaunchPlan plan_bwd_cluster(const AddNormBwdParams& p, const Variant& v) {
  return cluster_plan(p, v, [&](auto mix, auto chunks, const ClusterShape& shape) {
    return bwd_plan_of<decltype(mix), decltype(chunks)::value>(p, shape, v.reduce);
  });
}

}  // namespace residual_fused
