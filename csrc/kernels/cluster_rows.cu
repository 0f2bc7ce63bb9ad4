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

ClusterShape cluster_shape(int hidden, int per_thread) {
  const int cluster = static_cast<int>(ceil_div(hidden, kClusterBlock * per_thread));
  const int slice = cluster_slice(hidden, cluster);
  return {per_thread, cluster, slice, row_threads_for(slice, per_thread)};
}

// Persistent clusters: one per row up to as many as are resident at once. Grid 0 when
// none can run here (no clusters on this device or build, or too little shared memory).
void finish_plan(LaunchPlan& plan, int64_t rows) {
  const int clusters = fits_on_device(plan) ? max_active_clusters(plan) : 0;
  plan.grid = clusters <= 0 ? 0 : std::min<int64_t>(rows, clusters) * plan.cluster;
}

template <class MIX, int CHUNKS>
LaunchPlan fwd_plan_of(const AddNormFwdParams& p, const ClusterShape& shape) {
  LaunchPlan plan;
  plan.kernel = reinterpret_cast<const void*>(&add_norm_fwd_cluster_kernel<MIX, CHUNKS, 8, kClusterBlock>);
  plan.block = shape.block;
  plan.cluster = shape.cluster;
  plan.smem = fwd_cluster_smem<CHUNKS, 8>(p, shape.slice);
  finish_plan(plan, p.rows);
  return plan;
}

template <class MIX, int CHUNKS>
LaunchPlan bwd_plan_of(const AddNormBwdParams& p, const ClusterShape& shape) {
  LaunchPlan plan;
  plan.kernel = reinterpret_cast<const void*>(&add_norm_bwd_cluster_kernel<MIX, CHUNKS, 8, kClusterBlock>);
  plan.block = shape.block;
  plan.cluster = shape.cluster;
  plan.smem = bwd_cluster_smem<CHUNKS, 8>(p, shape.slice, shape.block);
  finish_plan(plan, p.rows);
  return plan;
}

}  // namespace

LaunchPlan plan_fwd_cluster(const AddNormFwdParams& p) {
  const ClusterShape narrow = cluster_shape(p.hidden, 16), wide = cluster_shape(p.hidden, 32);
  return plan_for_mix(p, FastMixes{}, [&](auto mix) {
    using MIX = decltype(mix);
    if (narrow.cluster <= kPortableCluster) {
      const LaunchPlan plan = fwd_plan_of<MIX, 2>(p, narrow);
      if (plan.grid > 0) return plan;
    }
    return fwd_plan_of<MIX, 4>(p, wide);
  });
}

LaunchPlan plan_bwd_cluster(const AddNormBwdParams& p) {
  const ClusterShape narrow = cluster_shape(p.hidden, 16), wide = cluster_shape(p.hidden, 32);
  return plan_for_mix(p, FastMixes{}, [&](auto mix) {
    using MIX = decltype(mix);
    if (narrow.cluster <= kPortableCluster) {
      const LaunchPlan plan = bwd_plan_of<MIX, 2>(p, narrow);
      if (plan.grid > 0) return plan;
    }
    if constexpr (std::is_same<MIX, AnyMix>::value) {
      // The run-time-dtype kernel would spill at 32 elements per thread: such mixes
      // stream what 16 elements per thread cannot hold.
      return LaunchPlan{};
    } else {
      return bwd_plan_of<MIX, 4>(p, wide);
    }
  });
}

}  // namespace residual_fused
