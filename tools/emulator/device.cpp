// The emulated GPU: a device profile, the kernels' real resources (registers, static
// shared memory, launch bounds, from nvcc's report of csrc/kernels), the CUDA runtime
// calls dispatch.cu makes, and the rules a GPU applies at launch:
//   - at most 1024 threads, and no more than the kernel's __launch_bounds__;
//   - registers x threads within the register file;
//   - dynamic shared memory within the kernel's limit: 48 KB minus its static shared
//     memory unless cudaFuncSetAttribute raised it, which may not exceed the
//     device's opt-in maximum less the static part;
//   - occupancy from registers, shared memory (plus the driver's per-CTA reserve),
//     threads and CTAs per SM, as the occupancy API computes it;
//   - thread-block clusters only on sm_90 profiles: at most 8 CTAs, or 16 once the
//     kernel allows the non-portable size; the grid a multiple of the cluster; a
//     cluster lives in one processing cluster (GPC) of kSmsPerGpc SMs.
// Any runtime call can be made to fail on request (fault injection); a failed call
// sets the runtime's last error, which cudaGetLastError returns and clears.
#include <algorithm>
#include <climits>
#include <cstdio>
#include <map>
#include <sstream>
#include <string>

#include "cuda_emulation.h"
#include "emulator.h"

namespace emu {
namespace {

const std::vector<Profile>& profiles() {
  // name, arch, SMs, smem/SM, opt-in smem/block, reserved/CTA, threads/SM, CTAs/SM, regs/SM
  static const std::vector<Profile> list = {
      {"h100", "90", 132, 228 * 1024, 227 * 1024, 1024, 2048, 32, 65536},
      {"a100", "80", 108, 164 * 1024, 163 * 1024, 1024, 2048, 32, 65536},
      // sm_86 / sm_89 (RTX 30xx/40xx, A40, L40): 99 KB per block; registers from the
      // sm_80 compile, the nearest one built.
      {"sm86", "80", 84, 100 * 1024, 99 * 1024, 1024, 1536, 16, 65536},
  };
  return list;
}

std::vector<LaunchRecord> g_recorded;  // launches of the dry runs, for plan queries

int g_profile = 0;
int g_sm_override = 0;
int g_device = 0;
bool g_dry_run = false;
cudaError_t g_last_error = cudaSuccess;

// Resources per (kernel symbol, arch); `table_loaded` makes a kernel missing from it
// an error, so a new kernel cannot launch unchecked.
std::map<std::pair<std::string, std::string>, Resources> g_resources;
bool g_table_loaded = false;

// cudaFuncAttributeMaxDynamicSharedMemorySize per (device, kernel).
std::map<std::pair<int, const void*>, int> g_max_dynamic;
// cudaFuncAttributeNonPortableClusterSizeAllowed per (device, kernel).
std::map<std::pair<int, const void*>, int> g_non_portable;

// SMs per GPC the cluster occupancy assumes (H100 SXM: 132 SMs in GPCs of up to 18;
// counting 16 is the conservative whole-GPC figure).
constexpr int kSmsPerGpc = 16;

bool g_clusters = true;  // clusters allowed on a profile that has them (sm_90)

bool has_clusters() { return profile().arch == "90" && g_clusters; }
// The PTX target the kernels' code was built for (0: the profile's own). Kernels built
// for an older target run through the JIT; code below compute_90 has no cluster
// bodies (RESIDUAL_FUSED_HAS_CLUSTERS), so launching it in clusters is wrong.
int g_code_arch = 0;
int code_arch() { return g_code_arch != 0 ? g_code_arch : std::stoi(profile().arch); }

int max_cluster(const void* func) {
  const auto it = g_non_portable.find({g_device, func});
  return it != g_non_portable.end() && it->second != 0 ? 16 : 8;
}

int sm_total() { return g_sm_override > 0 ? g_sm_override : profile().sm_count; }

// Clusters of `cluster` CTAs resident at once: each GPC holds whole clusters.
int64_t resident_clusters(int ctas_per_sm_fit, int cluster) {
  const int sms = sm_total();
  const int full_gpcs = sms / kSmsPerGpc;
  const int rest = sms % kSmsPerGpc;
  return static_cast<int64_t>(full_gpcs) * (ctas_per_sm_fit * kSmsPerGpc / cluster) +
         ctas_per_sm_fit * rest / cluster;
}

// Fault injection: kind -> calls to let through before failing one, and the error.
struct Injection {
  int after = -1;
  cudaError_t error = cudaSuccess;
};
Injection g_inject[5];  // InjectKind

bool injected(int kind) {
  Injection& in = g_inject[kind];
  if (in.after < 0) return false;
  if (in.after-- > 0) return false;
  g_last_error = in.error;
  return true;
}

cudaError_t set_error(cudaError_t err) {
  g_last_error = err;
  return err;
}

int round_up(int a, int b) { return (a + b - 1) / b * b; }

int max_dynamic(const void* func) {
  const auto it = g_max_dynamic.find({g_device, func});
  if (it != g_max_dynamic.end()) return it->second;
  return std::max(0, 48 * 1024 - resources(func).static_smem);
}

}  // namespace

enum InjectKind { kSetAttribute = 0, kOccupancy = 1, kFuncAttributes = 2, kLaunch = 3, kDeviceProperties = 4 };

const Profile& profile() { return profiles()[g_profile]; }
bool dry_run() { return g_dry_run; }

Resources resources(const void* func) {
  const auto it = g_resources.find({mangled_name(func), profile().arch});
  return it == g_resources.end() ? Resources{} : it->second;
}

int ctas_per_sm(const void* func, int block, size_t dynamic_smem) {
  const Profile& dev = profile();
  const Resources r = resources(func);
  const int warps = (block + 31) / 32;
  int ctas = std::min(dev.max_ctas_per_sm, dev.max_threads_per_sm / (warps * 32));
  if (r.registers > 0) {
    // Registers are allocated per warp in units of 256 (8 per thread).
    const int per_warp = round_up(r.registers * 32, 256);
    ctas = std::min(ctas, (dev.regs_per_sm / per_warp) / warps);
  }
  const int64_t smem = static_cast<int64_t>(dynamic_smem) + r.static_smem + dev.reserved_smem_per_block;
  ctas = std::min<int64_t>(ctas, dev.smem_per_sm / smem);
  return std::max(ctas, 0);
}

cudaError_t get_device(int* device) {
  *device = g_device;
  return cudaSuccess;
}

// The GPU's name as the real runtime reports it (the measured table is keyed by it);
// a configuration may take another GPU's name (an H200 is an H100 profile by name).
std::string g_device_name;

const char* full_name(const std::string& profile_name) {
  if (profile_name == "h100") return "NVIDIA H100 80GB HBM3";
  if (profile_name == "a100") return "NVIDIA A100-SXM4-80GB";
  return "NVIDIA RTX A6000";
}

cudaError_t device_properties(cudaDeviceProp* prop, int) {
  if (injected(kDeviceProperties)) return g_last_error;
  const Profile& dev = profile();
  *prop = cudaDeviceProp{};
  std::snprintf(prop->name, sizeof(prop->name), "%s",
                g_device_name.empty() ? full_name(dev.name) : g_device_name.c_str());
  prop->major = dev.arch[0] - '0';
  prop->minor = 0;
  prop->multiProcessorCount = g_sm_override > 0 ? g_sm_override : dev.sm_count;
  return cudaSuccess;
}

cudaError_t device_attribute(int* value, cudaDeviceAttr attr, int) {
  const Profile& dev = profile();
  switch (attr) {
    case cudaDevAttrMultiProcessorCount:
      *value = g_sm_override > 0 ? g_sm_override : dev.sm_count;
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = dev.smem_per_block_optin;
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor:
      *value = dev.smem_per_sm;
      return cudaSuccess;
    case cudaDevAttrReservedSharedMemoryPerBlock:
      *value = dev.reserved_smem_per_block;
      return cudaSuccess;
    case cudaDevAttrClusterLaunch:
      *value = has_clusters() ? 1 : 0;
      return cudaSuccess;
    default:
      report("device attribute " + std::to_string(static_cast<int>(attr)) + " is not emulated");
      return set_error(cudaErrorInvalidValue);
  }
}

cudaError_t func_set_attribute(const void* func, cudaFuncAttribute attr, int value) {
  if (injected(kSetAttribute)) return g_last_error;
  if (attr == cudaFuncAttributeNonPortableClusterSizeAllowed) {
    if (!has_clusters() || (value != 0 && value != 1)) return set_error(cudaErrorInvalidValue);
    g_non_portable[{g_device, func}] = value;
    return cudaSuccess;
  }
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) {
    report("function attribute " + std::to_string(static_cast<int>(attr)) + " is not emulated");
    return set_error(cudaErrorInvalidValue);
  }
  if (value < 0 || value + resources(func).static_smem > profile().smem_per_block_optin) {
    return set_error(cudaErrorInvalidValue);
  }
  g_max_dynamic[{g_device, func}] = value;
  return cudaSuccess;
}

cudaError_t occupancy(int* ctas, const void* func, int block, size_t smem) {
  if (injected(kOccupancy)) return g_last_error;
  *ctas = static_cast<int64_t>(smem) > max_dynamic(func) ? 0 : ctas_per_sm(func, block, smem);
  return cudaSuccess;
}

cudaError_t func_attributes(cudaFuncAttributes* attr, const void* func) {
  if (injected(kFuncAttributes)) return g_last_error;
  const Resources r = resources(func);
  *attr = cudaFuncAttributes{};
  attr->sharedSizeBytes = r.static_smem;
  attr->numRegs = r.registers;
  attr->maxThreadsPerBlock = r.max_threads;
  attr->maxDynamicSharedSizeBytes = max_dynamic(func);
  // Code for the profile's own target (nvcc -gencode arch=compute_XX,code=sm_XX), or
  // PTX of an older one compiled for this GPU by the JIT.
  attr->ptxVersion = code_arch();
  attr->binaryVersion = std::stoi(profile().arch);
  return cudaSuccess;
}

cudaError_t occupancy_clusters(int* clusters, const void* func, const cudaLaunchConfig_t* config) {
  if (injected(kOccupancy)) return g_last_error;
  int cluster = 1;
  for (unsigned i = 0; i < config->numAttrs; ++i) {
    if (config->attrs[i].id == cudaLaunchAttributeClusterDimension) cluster = config->attrs[i].val.clusterDim.x;
  }
  if (!has_clusters() || cluster < 1 || cluster > max_cluster(func)) {
    return set_error(cluster > max_cluster(func) ? cudaErrorInvalidClusterSize : cudaErrorInvalidValue);
  }
  const int threads = static_cast<int>(config->blockDim.x);
  const size_t smem = config->dynamicSmemBytes;
  const int fit = static_cast<int64_t>(smem) > max_dynamic(func) ? 0 : ctas_per_sm(func, threads, smem);
  *clusters = static_cast<int>(resident_clusters(fit, cluster));
  return cudaSuccess;
}

cudaError_t get_last_error() {
  const cudaError_t err = g_last_error;
  g_last_error = cudaSuccess;
  return err;
}

cudaError_t launch(const void* func, dim3 grid, dim3 block, size_t smem,
                   const std::function<void()>& body, int cluster, bool cluster_attribute) {
  if (injected(kLaunch)) return g_last_error;
  const Resources r = resources(func);
  const int threads = static_cast<int>(block.x * block.y * block.z);
  std::ostringstream why;
  cudaError_t err = cudaSuccess;
  if (g_table_loaded && !r.known) {
    why << "has no entry in the resource table for sm_" << profile().arch
        << " (was it compiled by tools/cubin.py?)";
    err = cudaErrorInvalidDeviceFunction;
  } else if (grid.x == 0 || grid.x > static_cast<unsigned>(INT_MAX) || grid.y != 1 || grid.z != 1) {
    why << "grid (" << grid.x << ", " << grid.y << ", " << grid.z << ") is not a 1-D grid of 1..2^31-1 CTAs";
    err = cudaErrorInvalidConfiguration;
  } else if (threads == 0 || threads > 1024 || block.y != 1 || block.z != 1) {
    why << "block of " << threads << " threads is not 1-D with 1..1024 threads";
    err = cudaErrorInvalidConfiguration;
  } else if (threads % 32 != 0) {
    why << "block of " << threads << " threads is not whole warps (the emulator runs whole warps)";
    err = cudaErrorInvalidConfiguration;
  } else if (threads > r.max_threads) {
    why << "block of " << threads << " threads exceeds __launch_bounds__ " << r.max_threads;
    err = cudaErrorLaunchOutOfResources;
  } else if (r.registers * round_up(threads, 32) > profile().regs_per_sm) {
    why << r.registers << " registers x " << threads << " threads exceed the register file";
    err = cudaErrorLaunchOutOfResources;
  } else if (static_cast<int64_t>(smem) > max_dynamic(func)) {
    why << smem << " bytes of dynamic shared memory exceed the kernel's limit of " << max_dynamic(func)
        << " (static " << r.static_smem << "; above 48 KB in all needs cudaFuncSetAttribute, up to "
        << profile().smem_per_block_optin << " on " << profile().name << ")";
    err = cudaErrorInvalidValue;
  }
  if (err == cudaSuccess && cluster_attribute && cluster <= 1 && !has_clusters()) {
    // Whether a GPU without clusters accepts a cluster dimension of 1 is not something
    // the launch code may rely on: it launches plain kernels without the attribute.
    why << "a cluster dimension on " << profile().name << ", which has no clusters";
    err = cudaErrorInvalidValue;
  }
  if (err == cudaSuccess && cluster > 1) {
    const int fit = ctas_per_sm(func, threads, smem);
    if (!has_clusters()) {
      why << "clusters of " << cluster << " CTAs on " << profile().name << ", which has none";
      err = cudaErrorInvalidValue;
    } else if (code_arch() < 90) {
      // A GPU would run it, with the cluster code compiled out: wrong results, no error.
      why << "clusters of " << cluster << " CTAs for code built for compute_" << code_arch()
          << ", which has no cluster code";
      err = cudaErrorInvalidValue;
    } else if (cluster > max_cluster(func)) {
      why << "cluster of " << cluster << " CTAs exceeds " << max_cluster(func)
          << (max_cluster(func) == 8 ? " (more needs cudaFuncAttributeNonPortableClusterSizeAllowed)" : "");
      err = cudaErrorInvalidClusterSize;
    } else if (grid.x % cluster != 0) {
      why << "grid of " << grid.x << " CTAs is not a multiple of the cluster size " << cluster;
      err = cudaErrorInvalidValue;
    } else if (resident_clusters(fit, cluster) < 1) {
      why << "a cluster of " << cluster << " CTAs (" << fit << " per SM) does not fit in a GPC";
      err = cudaErrorInvalidClusterSize;
    } else if (cluster * threads > kMaxFibers) {
      why << "a cluster of " << cluster * threads << " threads exceeds the emulator's " << kMaxFibers;
      err = cudaErrorInvalidValue;
    }
  }
  if (err != cudaSuccess) {
    report("launch of " + kernel_name(func) + " refused: " + why.str());
    return set_error(err);
  }
  if (g_dry_run) {
    g_recorded.push_back({func, grid.x, threads, smem, cluster});
    return cudaSuccess;
  }
  const int fit = std::max(1, ctas_per_sm(func, threads, smem));
  int64_t resident = static_cast<int64_t>(fit) * sm_total();
  if (cluster > 1) resident = resident_clusters(fit, cluster) * cluster;
  int64_t wave = std::min<int64_t>({resident, grid.x, kMaxFibers / threads});
  wave = std::max<int64_t>(cluster, wave / cluster * cluster);  // whole clusters
  const cudaError_t ran = execute(func, grid, block, smem, static_cast<int>(wave), body, cluster);
  if (ran != cudaSuccess) set_error(ran);
  return ran;
}

// ---- configuration, from api.cpp --------------------------------------------------

int profile_count() { return static_cast<int>(profiles().size()); }
const char* profile_name(int i) { return profiles()[i].name.c_str(); }

void configure(int device, int profile_index, int sm_count, bool clusters, int code_arch) {
  g_code_arch = code_arch;
  g_device = device;
  g_profile = profile_index;
  g_sm_override = sm_count;
  g_clusters = clusters;
  g_device_name.clear();
}

void set_device_name(const std::string& name) { g_device_name = name; }

void set_dry_run(bool on) { g_dry_run = on; }

std::vector<LaunchRecord>& recorded_launches() { return g_recorded; }

void set_resources(const std::string& name, const std::string& arch, int registers, int static_smem,
                   int max_threads) {
  g_resources[{name, arch}] = Resources{true, registers, static_smem, max_threads};
  g_table_loaded = true;
}

void inject(int kind, int after, int error) {
  g_inject[kind] = Injection{after, static_cast<cudaError_t>(error)};
}

int peek_last_error() { return static_cast<int>(g_last_error); }

}  // namespace emu
