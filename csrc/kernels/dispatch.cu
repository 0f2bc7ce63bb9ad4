// Entry points of add_norm.h: choose a kernel family per call and launch it.
//
// A call runs the tuning override's variant if one is set (refused if that variant
// cannot run it), else the variant the measured table (tuned_table.h) lists for this
// GPU and call where it can run it, else the rule below (variant.h).
//
// The rule. Vectorised (8-element, 16-byte) kernels need hidden % 8 == 0 and every row start
// 16-byte aligned; anything else (odd hidden sizes, odd offsets or strides) takes the
// element-wise kernels of the same design. On sm_90, vectorised rows wider than
// kClusterMinHidden are split across a thread-block cluster; elsewhere, rows too wide
// to keep on chip are staged in shared memory or streamed.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <utility>

#include "common.cuh"
#include "launch.h"
#include "mixes.h"

namespace residual_fused {
namespace {

constexpr int kMaxDevices = 64;

int current_device() {
  int device = 0;
  cudaGetDevice(&device);
  return device;
}

// A device attribute, cached per device (benign race: every writer stores the same value).
int cached_attribute(std::atomic<int> (&cache)[kMaxDevices], cudaDeviceAttr attr) {
  const int device = current_device();
  if (device < 0 || device >= kMaxDevices) {
    int value = 0;
    cudaDeviceGetAttribute(&value, attr, device);
    return value;
  }
  int value = cache[device].load(std::memory_order_relaxed);
  if (value == 0) {
    cudaDeviceGetAttribute(&value, attr, device);
    cache[device].store(value, std::memory_order_relaxed);
  }
  return value;
}

int max_smem_per_block() {
  static std::atomic<int> cache[kMaxDevices];
  return cached_attribute(cache, cudaDevAttrMaxSharedMemoryPerBlockOptin);
}

// Whether the device can launch thread-block clusters (compute capability 9.0+).
bool device_has_clusters() {
  static std::atomic<int> cache[kMaxDevices];
  return cached_attribute(cache, cudaDevAttrClusterLaunch) == 1;
}

// A [rows, hidden] tensor (or a [hidden] vector, row_stride 0) can use 16-byte vectors.
bool aligned16(const void* ptr, int64_t row_stride, DType t) {
  return ptr == nullptr ||
         (reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && (row_stride * dtype_size(t)) % 16 == 0);
}

// Per kernel and device: its static shared memory, and whether it may use all the
// dynamic shared memory the device allows. The attribute is set once, to that
// maximum, rather than per call: it is one value per kernel, shared by every host
// thread and every captured graph, so lowering it could fail another's launch.
struct KernelInfo {
  bool valid = false;  // the attribute query succeeded; a failed one is not cached
  int static_smem = 0;
  int ptx_version = 0;  // the PTX target its code came from (90: sm_90, with clusters)
  bool opted_in = false;
  bool non_portable_cluster = false;  // clusters of more than 8 CTAs allowed
};

std::mutex& kernel_info_mutex() {
  static std::mutex mutex;
  return mutex;
}

// The entry of (kernel, current device); the caller holds kernel_info_mutex(). A failed
// query is retried by the next caller rather than cached: caching a wrong static size
// would make every later opt-in request exceed the device limit.
KernelInfo& kernel_info_locked(const void* kernel) {
  static std::map<std::pair<const void*, int>, KernelInfo> cache;
  KernelInfo& info = cache[{kernel, current_device()}];
  if (!info.valid) {
    cudaFuncAttributes attr{};
    if (cudaFuncGetAttributes(&attr, kernel) == cudaSuccess) {
      info.valid = true;
      info.static_smem = static_cast<int>(attr.sharedSizeBytes);
      info.ptx_version = attr.ptxVersion;
    } else {
      cudaGetLastError();  // consumed here; the caller treats the kernel as unusable for now
    }
  }
  return info;
}

// Without the opt-in a block may use 48 KB of shared memory, static and dynamic
// together.
constexpr int64_t kDefaultSmemPerBlock = 48 * 1024;

}  // namespace

// A kernel whose attributes cannot be read now does not fit: the caller falls back to
// the streamed kernels, which need no opt-in.
bool fits_on_device(const LaunchPlan& plan) {
  std::lock_guard<std::mutex> lock(kernel_info_mutex());
  const KernelInfo& info = kernel_info_locked(plan.kernel);
  return info.valid && static_cast<int64_t>(plan.smem) + info.static_smem <= max_smem_per_block();
}

namespace {

cudaError_t allow_smem(const LaunchPlan& plan) {
  std::lock_guard<std::mutex> lock(kernel_info_mutex());
  KernelInfo& info = kernel_info_locked(plan.kernel);
  if (!info.valid) return plan.smem == 0 ? cudaSuccess : cudaErrorInvalidDeviceFunction;
  if (static_cast<int64_t>(plan.smem) + info.static_smem <= kDefaultSmemPerBlock || info.opted_in) {
    return cudaSuccess;
  }
  const cudaError_t err = cudaFuncSetAttribute(plan.kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               max_smem_per_block() - info.static_smem);
  info.opted_in = err == cudaSuccess;
  if (err != cudaSuccess) cudaGetLastError();  // returned to the caller, not left pending
  return err;
}

// Clusters of more than 8 CTAs need the non-portable size allowed, once per kernel.
cudaError_t allow_cluster(const LaunchPlan& plan) {
  if (plan.cluster <= 8) return cudaSuccess;
  std::lock_guard<std::mutex> lock(kernel_info_mutex());
  KernelInfo& info = kernel_info_locked(plan.kernel);
  if (info.non_portable_cluster) return cudaSuccess;
  const cudaError_t err = cudaFuncSetAttribute(plan.kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
  info.non_portable_cluster = err == cudaSuccess;
  if (err != cudaSuccess) cudaGetLastError();
  return err;
}

// The launch configuration of a cluster plan (attr: storage for its one attribute).
cudaLaunchConfig_t cluster_config(const LaunchPlan& plan, int64_t grid, cudaStream_t stream,
                                  cudaLaunchAttribute& attr) {
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(grid));
  config.blockDim = dim3(plan.block);
  config.dynamicSmemBytes = plan.smem;
  config.stream = stream;
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = static_cast<unsigned>(plan.cluster);
  attr.val.clusterDim.y = 1;
  attr.val.clusterDim.z = 1;
  config.attrs = &attr;
  config.numAttrs = 1;
  return config;
}

template <typename Params>
cudaError_t launch(const LaunchPlan& plan, const Params& params, cudaStream_t stream) {
  cudaError_t err = allow_smem(plan);
  if (err == cudaSuccess) err = allow_cluster(plan);
  if (err != cudaSuccess) return err;
  void* args[] = {const_cast<Params*>(&params)};
  cudaError_t launched;
  if (plan.cluster > 1) {
    cudaLaunchAttribute attr;
    const cudaLaunchConfig_t config = cluster_config(plan, plan.grid, stream, attr);
    launched = cudaLaunchKernelExC(&config, plan.kernel, args);
  } else {
    launched = cudaLaunchKernel(plan.kernel, dim3(static_cast<unsigned>(plan.grid)), dim3(plan.block), args,
                                plan.smem, stream);
  }
  // A refused launch also sets the runtime's last error; clear it so that it is
  // reported once, by our caller, and not again by an unrelated later call.
  if (launched != cudaSuccess) cudaGetLastError();
  return launched;
}

// Whether the kernels may use 16-byte vectors on every tensor of p they read or write
// in the tensor types (params.h: TensorArg::is_vectorised).
template <class Params>
bool vectorisable(const Params& p) {
  if (p.hidden % 8 != 0) return false;
  for (int i = 0; i < ArgsOf<Params>::count; ++i) {
    const TensorArg& a = ArgsOf<Params>::table[i];
    if (a.is_vectorised() && !aligned16(arg_ptr(p, a), arg_row_stride(p, a), arg_dtype(p, a))) return false;
  }
  return true;
}

// The documented rule (top of this file).
LaunchPlan fwd_rule_plan(const AddNormFwdParams& p, bool vec8) {
  const Variant none;
  if (p.x_dtype == DType::kFloat64) return plan_fwd_streamed(p, 1, none);
  const int h = p.hidden;
  if (vec8 && h > kClusterMinHidden) {
    const LaunchPlan plan = plan_fwd_cluster(p, none);
    if (plan.kernel != nullptr) return plan;  // else: no clusters here
  }
  if (h <= (vec8 ? kFwdRowsMaxVec8 : kFwdRowsMaxVec1)) {
    const LaunchPlan plan =
        !vec8 ? plan_fwd_rows_vec1(p, none) : h <= kFwdRegsMaxVec8 ? plan_fwd_rows_vec8(p, none) : plan_fwd_staged(p);
    // Staged rows need hidden fp32 values of shared memory per CTA.
    if (plan.kernel != nullptr && fits_on_device(plan)) return plan;
  }
  return plan_fwd_streamed(p, vec8 ? 8 : 1, none);
}

LaunchPlan bwd_rule_plan(const AddNormBwdParams& p, bool vec8) {
  const Variant none;
  if (p.dy_dtype == DType::kFloat64) return plan_bwd_streamed(p, 1, none);
  const int h = p.hidden;
  if (vec8 && h > kClusterMinHidden) {
    const LaunchPlan plan = plan_bwd_cluster(p, none);
    if (plan.kernel != nullptr) return plan;  // else: no clusters here
  }
  if (h <= (vec8 ? kBwdRowsMaxVec8 : kBwdRowsMaxVec1)) {
    const LaunchPlan plan = vec8 ? plan_bwd_rows_vec8(p, none) : plan_bwd_rows_vec1(p, none);
    // Whole-block rows keep about 2 * hidden fp32 partials in shared memory; GPUs with
    // less shared memory per block (e.g. 99 KB on sm_86/sm_89) stream the widest rows.
    if (plan.kernel != nullptr && fits_on_device(plan)) return plan;
  }
  return plan_bwd_streamed(p, vec8 ? 8 : 1, none);
}

// Why variant v's choices do not apply to its family or to direction d, or nullptr.
const char* choices_refusal(const Variant& v, Direction d) {
  const bool fwd = d == Direction::kFwd;
  if (v.family == Family::kRows && v.cluster != 0) return "rows: cs applies to the cluster family";
  if (v.family == Family::kStaged) {
    if (!fwd) return "staged: the backward has no staged kernel";
    if (v.per_thread != 0 || v.target_block != 0 || v.ctas_per_sm != 0 || v.cluster != 0) {
      return "staged: takes no pt, tb, cps or cs (one CTA per row, 128 columns per thread)";
    }
  }
  if (v.family == Family::kCluster && (v.target_block != 0 || v.ctas_per_sm != 0)) {
    return "cluster: takes no tb or cps (one cluster per row)";
  }
  if (v.family == Family::kStreamed && (v.per_thread != 0 || v.target_block != 0 || v.cluster != 0)) {
    return "streamed: takes no pt, tb or cs (512 threads per row)";
  }
  if (fwd && v.reduce != Reduce::kAuto) return "red applies to the backward";
  if (v.stages != 0 && v.family != Family::kRows) return "st (ring stages) applies to the rows kernels";
  return nullptr;
}

// The plan of variant v (not the rule) for p, or a refused plan saying why v cannot
// run it.
LaunchPlan fwd_variant_plan(const AddNormFwdParams& p, const Variant& v, bool vec8) {
  if (const char* why = choices_refusal(v, Direction::kFwd)) return refused(why);
  if (p.x_dtype == DType::kFloat64 && v.family != Family::kStreamed) {
    return refused("float64 runs only the streamed kernel");
  }
  if (!vec8 && v.family != Family::kRows && v.family != Family::kStreamed) {
    return refused("staged and cluster kernels need vectorised rows (hidden % 8 == 0, 16-byte aligned)");
  }
  LaunchPlan plan;
  switch (v.family) {
    case Family::kRows:
      plan = vec8 ? plan_fwd_rows_vec8(p, v) : plan_fwd_rows_vec1(p, v);
      break;
    case Family::kStaged:
      plan = plan_fwd_staged(p);
      break;
    case Family::kCluster:
      plan = plan_fwd_cluster(p, v);
      break;
    default:
      plan = plan_fwd_streamed(p, vec8 ? 8 : 1, v);
      break;
  }
  if (plan.kernel != nullptr && !fits_on_device(plan)) return refused("its shared memory does not fit on this device");
  return plan;
}

LaunchPlan bwd_variant_plan(const AddNormBwdParams& p, const Variant& v, bool vec8) {
  if (const char* why = choices_refusal(v, Direction::kBwd)) return refused(why);
  if (p.dy_dtype == DType::kFloat64 && v.family != Family::kStreamed) {
    return refused("float64 runs only the streamed kernel");
  }
  if (!vec8 && v.family == Family::kCluster) {
    return refused("cluster kernels need vectorised rows (hidden % 8 == 0, 16-byte aligned)");
  }
  LaunchPlan plan;
  switch (v.family) {
    case Family::kRows:
      plan = vec8 ? plan_bwd_rows_vec8(p, v) : plan_bwd_rows_vec1(p, v);
      break;
    case Family::kCluster:
      plan = plan_bwd_cluster(p, v);
      break;
    default:
      plan = plan_bwd_streamed(p, vec8 ? 8 : 1, v);
      break;
  }
  if (plan.kernel != nullptr && !fits_on_device(plan)) return refused("its shared memory does not fit on this device");
  return plan;
}

// Index of p's dtype mix in FastMixes (the table's mix), or -1.
template <class Params, class... MIXES>
int8_t fast_mix_index(const Params& p, MixList<MIXES...>) {
  int8_t index = -1, i = 0;
  ((index < 0 && mix_matches<MIXES>(p) ? index = i : 0, ++i), ...);
  return index;
}

// Why this thread's last call was refused before any launch ("" if it was not).
thread_local std::string t_last_refusal;

// A call's plan: the tuning override, else the measured table's variant where it can
// run the call, else the rule (variant.h). A refused override says why in
// t_last_refusal, naming the variant and where it was set.
template <class Params, class RulePlan, class VariantPlan>
LaunchPlan choose_plan(const Params& p, Direction d, bool prenorm, RulePlan&& rule, VariantPlan&& variant_plan) {
  if (variant_env_error(&t_last_refusal)) return refused("RESIDUAL_FUSED_VARIANT does not parse");
  Variant v;
  if (variant_override(d, &v)) {
    if (v.family == Family::kRule) return rule();
    const LaunchPlan plan = variant_plan(v);
    if (plan.kernel == nullptr) {
      t_last_refusal = "the tuning variant '" + variant_name(v) + "' (set by RESIDUAL_FUSED_VARIANT or " +
                       "residual_fused_set_variant) cannot run this call (hidden " + std::to_string(p.hidden) +
                       "): " + plan.why;
    }
    return plan;
  }
  const TunedKey key{d, p.is_rms_norm, prenorm, fast_mix_index(p, FastMixes{}), p.hidden};
  if (const Variant* tuned = tuned_variant(key)) {
    const LaunchPlan plan = variant_plan(*tuned);
    if (plan.kernel != nullptr) return plan;  // else: the rule (e.g. the call is misaligned)
  }
  return rule();
}

LaunchPlan fwd_plan(const AddNormFwdParams& p) {
  const bool vec8 = vectorisable(p);
  return choose_plan(
      p, Direction::kFwd, p.residual_out != nullptr, [&] { return fwd_rule_plan(p, vec8); },
      [&](const Variant& v) { return fwd_variant_plan(p, v, vec8); });
}

LaunchPlan bwd_plan(const AddNormBwdParams& p) {
  const bool vec8 = vectorisable(p);
  return choose_plan(
      p, Direction::kBwd, p.dresidual_out != nullptr, [&] { return bwd_rule_plan(p, vec8); },
      [&](const Variant& v) { return bwd_variant_plan(p, v, vec8); });
}

// The status of a refused plan (t_last_refusal says why).
cudaError_t refuse(const LaunchPlan& plan) {
  if (t_last_refusal.empty()) t_last_refusal = plan.why != nullptr ? plan.why : "no kernel can run this call";
  return cudaErrorInvalidValue;
}

}  // namespace

int sm_count() {
  static std::atomic<int> cache[kMaxDevices];
  return cached_attribute(cache, cudaDevAttrMultiProcessorCount);
}

int max_ctas_per_sm(const LaunchPlan& plan) {
  // A plan that does not fit is discarded by the caller; query nothing for it, so no
  // failed call leaves an error behind for a later, unrelated launch to report.
  if (!fits_on_device(plan) || allow_smem(plan) != cudaSuccess) return 1;
  // Answers are cached per (kernel, device, block, shared memory): the query costs
  // microseconds of host time, and a plan's inputs take few distinct values.
  using Key = std::tuple<const void*, int, int, size_t>;
  static std::map<Key, int> cache;
  const Key key{plan.kernel, current_device(), plan.block, plan.smem};
  {
    std::lock_guard<std::mutex> lock(kernel_info_mutex());
    const auto hit = cache.find(key);
    if (hit != cache.end()) return hit->second;
  }
  int ctas = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&ctas, plan.kernel, plan.block, plan.smem) !=
      cudaSuccess) {
    cudaGetLastError();
    return 1;  // not cached: the next call asks again
  }
  ctas = std::max(ctas, 1);
  std::lock_guard<std::mutex> lock(kernel_info_mutex());
  cache[key] = ctas;
  return ctas;
}

int max_active_clusters(const LaunchPlan& plan) {
  if (!device_has_clusters()) return 0;
  {
    std::lock_guard<std::mutex> lock(kernel_info_mutex());
    const KernelInfo& info = kernel_info_locked(plan.kernel);
    if (!info.valid || info.ptx_version < 90) return 0;  // e.g. a build without sm_90
  }
  if (allow_smem(plan) != cudaSuccess || allow_cluster(plan) != cudaSuccess) return 0;
  using Key = std::tuple<const void*, int, int, size_t, int>;
  static std::map<Key, int> cache;
  const Key key{plan.kernel, current_device(), plan.block, plan.smem, plan.cluster};
  {
    std::lock_guard<std::mutex> lock(kernel_info_mutex());
    const auto hit = cache.find(key);
    if (hit != cache.end()) return hit->second;
  }
  cudaLaunchAttribute attr;
  const cudaLaunchConfig_t config = cluster_config(plan, plan.cluster, nullptr, attr);
  int clusters = 0;
  if (cudaOccupancyMaxActiveClusters(&clusters, plan.kernel, &config) != cudaSuccess) {
    cudaGetLastError();
    return 0;  // not cached: the next call asks again
  }
  std::lock_guard<std::mutex> lock(kernel_info_mutex());
  cache[key] = clusters;
  return clusters;
}

int64_t persistent_grid(const LaunchPlan& plan, int64_t work, int ctas_per_sm) {
  const int64_t sms = sm_count();
  if (work <= sms) return work;
  const int fit = max_ctas_per_sm(plan);
  return std::min<int64_t>(work, sms * (ctas_per_sm > 0 ? std::min(fit, ctas_per_sm) : fit));
}

const char* last_refusal() { return t_last_refusal.c_str(); }

cudaError_t launch_add_norm_fwd(const AddNormFwdParams& p, cudaStream_t stream) {
  t_last_refusal.clear();
  if (p.rows == 0) return cudaSuccess;
  const LaunchPlan plan = fwd_plan(p);
  if (plan.kernel == nullptr) return refuse(plan);
  const cudaError_t err = launch(plan, p, stream);
  if (err == cudaSuccess) record_variant(Direction::kFwd, plan.variant);
  return err;
}

AddNormBwdPlan plan_add_norm_bwd(const AddNormBwdParams& p) {
  t_last_refusal.clear();
  AddNormBwdPlan plan;
  if (p.rows == 0) return plan;
  plan.main = bwd_plan(p);
  if (plan.main.kernel == nullptr) {
    refuse(plan.main);  // launch_add_norm_bwd refuses the plan; the reason stays for the caller
    return plan;
  }
  if (p.weight != nullptr || p.bias != nullptr) {
    plan.partial_rows = plan.main.grid / plan.main.cluster;
    Reduce& reduce = plan.main.variant.reduce;  // auto resolved here: the name says what runs
    if (reduce == Reduce::kAuto) reduce = plan.partial_rows <= kReduceColumnsMaxRows ? Reduce::kColumns : Reduce::kSliced;
  }
  return plan;
}

cudaError_t launch_add_norm_bwd(const AddNormBwdParams& p, const AddNormBwdPlan& plan,
                                cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  const bool partials = p.dweight != nullptr || p.dbias != nullptr;
  if (plan.main.kernel == nullptr) return refuse(plan.main);
  // Launch only the plan the workspace was sized for: one partial row per CTA (cluster).
  if (plan.main.cluster < 1 || p.partial_rows != plan.partial_rows ||
      (partials && (plan.partial_rows != plan.main.grid / plan.main.cluster ||
                    (p.dweight != nullptr && p.dweight_partial == nullptr) ||
                    (p.dbias != nullptr && p.dbias_partial == nullptr)))) {
    return cudaErrorInvalidValue;
  }
  cudaError_t err = launch(plan.main, p, stream);
  if (err == cudaSuccess && partials) err = launch(plan_reduce_partials(p, plan.main.variant.reduce), p, stream);
  if (err == cudaSuccess) record_variant(Direction::kBwd, plan.main.variant);
  return err;
}

}  // namespace residual_fused
