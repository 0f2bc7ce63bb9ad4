// The C API of the emulated kernels, for tools/cuda_emulator.py: configure a device,
// a schedule and fault injection; allocate guarded memory; run launch_add_norm_fwd /
// launch_add_norm_bwd of csrc/kernels through the real launch plans; sweep the plans
// over every hidden size without running them.
#include <cxxabi.h>
#include <dlfcn.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <limits>
#include <sstream>
#include <utility>

#include "cuda_emulation.h"
#include "add_norm.h"
#include "args.h"
#include "emulator.h"

namespace emu {
namespace {
std::string g_message;
}  // namespace

int mutant = 0;

void report(const std::string& message) {
  if (g_message.empty()) g_message = message;  // the first problem explains the rest
}
const std::string& last_message() { return g_message; }
void clear_message() { g_message.clear(); }

std::string mangled_name(const void* func) {
  Dl_info dl{};
  if (dladdr(func, &dl) == 0 || dl.dli_sname == nullptr) return "<unknown kernel>";
  return dl.dli_sname;
}

// "add_norm_fwd_rows_kernel<32, 4, 8, 128>" from the symbol.
std::string kernel_name(const void* func) {
  const std::string mangled = mangled_name(func);
  int status = 0;
  char* text = abi::__cxa_demangle(mangled.c_str(), nullptr, nullptr, &status);
  if (status != 0 || text == nullptr) return mangled;
  std::string name(text);
  std::free(text);
  const size_t paren = name.rfind('(');
  if (paren != std::string::npos) name = name.substr(0, paren);
  const size_t space = name.find(' ');  // the return type of a template
  if (space != std::string::npos && space < name.find('<')) name = name.substr(space + 1);
  const std::string ns = "residual_fused::";
  if (name.compare(0, ns.size(), ns) == 0) name = name.substr(ns.size());
  return name;
}

std::string site_text(const char* file, int line) {
  const char* base = std::strrchr(file, '/');
  return std::string(base == nullptr ? file : base + 1) + ":" + std::to_string(line);
}

}  // namespace emu

namespace residual_fused {
// common.cuh's dynamic shared memory under emulation: the running CTA's own buffer.
float* dynamic_smem() { return static_cast<float*>(emu::current_dynamic_smem()); }
}  // namespace residual_fused

using residual_fused::AddNormBwdParams;
using residual_fused::AddNormBwdPlan;
using residual_fused::AddNormFwdParams;
using residual_fused::DType;

namespace {

// What the glue leaves behind must be clean: a pending runtime error would be
// reported by some unrelated later call.
// A call that succeeded must also have written every byte of every output of p (its
// output tensors in params.h's lists; the workspace aside, which emu_bwd checks), or
// of none when `outputs` is false.
template <class P>
int finish(cudaError_t status, const P& p, bool outputs = true) {
  if (status == cudaSuccess && emu::peek_last_error() != cudaSuccess) {
    emu::report("the call succeeded but left cudaError " + std::to_string(emu::peek_last_error()) +
                " pending for a later call to report");
    return -1;
  }
  if (status != cudaSuccess) return static_cast<int>(status);
  for (int i = 0; outputs && i < residual_fused::ArgsOf<P>::count; ++i) {
    const residual_fused::TensorArg& a = residual_fused::ArgsOf<P>::table[i];
    if (!a.is_output() || a.kind == residual_fused::ArgKind::kWorkspace) continue;
    void* ptr = const_cast<void*>(residual_fused::arg_ptr(p, a));
    if (ptr != nullptr && !emu::all_written(ptr)) {
      emu::report(std::string("the call succeeded but left bytes of ") + a.name + " unwritten");
      return -1;
    }
  }
  return 0;
}

// Parameters of a call that is planned and checked but never executed (dry runs): all
// tensors of one dtype, fake device addresses, x misaligned by one element if asked.
char* fake_address() { return reinterpret_cast<char*>(uintptr_t{1} << 40); }

const void* fake_x(int aligned, int dtype) {
  const int elem = dtype == 3 ? 8 : dtype == 0 ? 4 : 2;
  return fake_address() + (aligned ? 0 : elem);
}

AddNormFwdParams fake_fwd(int hidden, int64_t rows, int aligned, int dtype) {
  char* base = fake_address();
  AddNormFwdParams f;
  f.rows = rows;
  f.hidden = hidden;
  f.x = fake_x(aligned, dtype);
  f.x_row_stride = f.residual_row_stride = hidden;
  f.x_dtype = f.residual_dtype = f.weight_dtype = f.bias_dtype = f.residual_out_dtype = static_cast<DType>(dtype);
  f.residual = f.weight = f.bias = base;
  f.y = f.residual_out = f.rstd = base;
  return f;
}

AddNormBwdParams fake_bwd(int hidden, int64_t rows, int aligned, int dtype) {
  char* base = fake_address();
  AddNormBwdParams b;
  b.rows = rows;
  b.hidden = hidden;
  b.dy = fake_x(aligned, dtype);
  b.dy_row_stride = b.dresidual_out_row_stride = b.saved_row_stride = hidden;
  b.dy_dtype = b.dresidual_out_dtype = b.saved_dtype = b.weight_dtype = b.bias_dtype = static_cast<DType>(dtype);
  b.dresidual_out = b.saved = b.rstd = b.weight = b.bias = base;
  b.dx = b.dweight = b.dbias = base;
  return b;
}

// The backward of fake parameters, planned once and launched with a matching workspace.
cudaError_t launch_fake_bwd(AddNormBwdParams& b, AddNormBwdPlan* plan_out = nullptr) {
  const AddNormBwdPlan plan = residual_fused::plan_add_norm_bwd(b);
  if (plan_out != nullptr) *plan_out = plan;
  b.partial_rows = plan.partial_rows;
  b.dweight_partial = b.dbias_partial = fake_address();
  return residual_fused::launch_add_norm_bwd(b, plan, nullptr);
}

}  // namespace

extern "C" {

#ifdef RESIDUAL_FUSED_EMULATOR_COVERAGE
void __gcov_dump();
#endif

// Writes the gcov counts of a coverage build now (they are otherwise written at exit);
// returns 0 for a build without coverage.
int emu_coverage_dump() {
#ifdef RESIDUAL_FUSED_EMULATOR_COVERAGE
  __gcov_dump();
  return 1;
#else
  return 0;
#endif
}

int emu_profile_count() { return emu::profile_count(); }
const char* emu_profile_name(int i) { return emu::profile_name(i); }

// dispatch.cu caches device attributes per device index, so give each configuration
// its own index (as distinct GPUs would have).
void emu_configure(int device, int profile, int sm_count, int clusters, int code_arch) {
  emu::configure(device, profile, sm_count, clusters != 0, code_arch);
}
void emu_set_schedule(int schedule, unsigned long long seed) {
  emu::set_schedule(static_cast<emu::Schedule>(schedule), seed);
}
void emu_set_dry_run(int on) { emu::set_dry_run(on != 0); }
void emu_set_device_name(const char* name) { emu::set_device_name(name); }

void emu_set_mutant(int k) { emu::mutant = k; }
void emu_set_resources(const char* name, const char* arch, int registers, int static_smem,
                       int max_threads) {
  emu::set_resources(name, arch, registers, static_smem, max_threads);
}
void emu_register_static_shared(const char* kernel, void* address, size_t bytes) {
  emu::register_static_shared(kernel, address, bytes);
}
void emu_inject(int kind, int after, int error) { emu::inject(kind, after, error); }
int emu_take_last_error() { return static_cast<int>(cudaGetLastError()); }
const char* emu_message() { return emu::last_message().c_str(); }
unsigned long long emu_fault_offset() { return emu::last_fault_offset(); }

// kind: 0 an input (never written by a kernel), 1 an output (every byte written).
void* emu_alloc(const char* name, size_t bytes, size_t align_mod, int flush_start, int kind) {
  return emu::guarded_alloc(name, bytes, align_mod, flush_start != 0, static_cast<emu::MemoryKind>(kind));
}
int emu_intact(void* p) { return emu::guarded_intact(p) ? 1 : 0; }
void emu_free(void* p) { emu::guarded_free(p); }

// The layout of the params structs (csrc/kernels/params.h: kFwdFields, kBwdFields), from
// which tools/cuda_emulator.py builds its ctypes structures: the struct's size, and
// field i's name, type (residual_fused::FieldType) and byte offset. Returns the number
// of fields of the forward's struct (backward 0) or the backward's.
int emu_params_layout(int backward, int i, const char** name, int* type, int* offset, size_t* size) {
  const residual_fused::FieldInfo* fields = backward ? residual_fused::kBwdFields : residual_fused::kFwdFields;
  const int count = static_cast<int>(backward ? std::size(residual_fused::kBwdFields)
                                              : std::size(residual_fused::kFwdFields));
  *size = backward ? sizeof(AddNormBwdParams) : sizeof(AddNormFwdParams);
  if (i >= 0 && i < count) {
    *name = fields[i].name;
    *type = static_cast<int>(fields[i].type);
    *offset = fields[i].offset;
  }
  return count;
}

// `size` is the caller's idea of sizeof the struct: a driver built from another layout
// is refused rather than read.
bool layout_matches(size_t size, size_t expected) {
  if (size == expected) return true;
  emu::report("the params struct passed has " + std::to_string(size) + " bytes, the kernels' has " +
              std::to_string(expected) + ": rebuild the emulator's driver structures from emu_params_layout");
  return false;
}

int emu_fwd(const AddNormFwdParams* params, size_t size) {
  emu::clear_message();
  if (!layout_matches(size, sizeof(AddNormFwdParams))) return -1;
  const AddNormFwdParams& p = *params;
  return finish(residual_fused::launch_add_norm_fwd(p, nullptr), p);
}

// The backward as the torch glue runs it: plan once, allocate the workspace the plan
// asks for (guarded, poisoned with NaN), launch that plan. `workspace_delta` rows are
// added to the workspace, to test that a mismatch is refused. The caller's workspace
// fields are ignored.
int emu_bwd(const AddNormBwdParams* params, size_t size, int64_t workspace_delta) {
  emu::clear_message();
  if (!layout_matches(size, sizeof(AddNormBwdParams))) return -1;
  AddNormBwdParams p = *params;
  const int64_t rows = p.rows;
  const int hidden = p.hidden;
  const void* weight = p.weight;
  const void* bias = p.bias;
  p.dweight_partial = p.dbias_partial = nullptr;
  const AddNormBwdPlan plan = residual_fused::plan_add_norm_bwd(p);
  // The glue allocates the workspace between planning and launch: an error a failed
  // query left pending here would be reported by whatever CUDA call comes next.
  if (emu::peek_last_error() != cudaSuccess) {
    emu::report("planning the backward left cudaError " + std::to_string(emu::peek_last_error()) +
                " pending for a later call to report");
    return -1;
  }
  p.partial_rows = plan.partial_rows + workspace_delta;
  const size_t word = p.dy_dtype == DType::kFloat64 ? sizeof(double) : sizeof(float);
  const size_t bytes = static_cast<size_t>(std::max<int64_t>(p.partial_rows, 0)) * hidden * word;
  void* dw = nullptr;
  void* db = nullptr;
  if (emu::dry_run()) {  // planned and checked, not run: no workspace needed
    if (weight != nullptr) p.dweight_partial = fake_address();
    if (bias != nullptr) p.dbias_partial = fake_address();
  } else if (weight != nullptr && bytes > 0) {
    dw = emu::guarded_alloc("the dweight workspace", bytes, 0, false, emu::MemoryKind::kWorkspace);
    std::memset(dw, 0xFF, bytes);
    p.dweight_partial = dw;
  }
  if (!emu::dry_run() && bias != nullptr && bytes > 0) {
    db = emu::guarded_alloc("the dbias workspace", bytes, 0, false, emu::MemoryKind::kWorkspace);
    std::memset(db, 0xFF, bytes);
    p.dbias_partial = db;
  }
  const cudaError_t status = residual_fused::launch_add_norm_bwd(p, plan, nullptr);
  int result = finish(status, p, rows != 0);  // with no rows the glue zeroes the weight gradients
  for (void* w : {dw, db}) {
    if (w == nullptr) continue;
    if (result == 0 && !emu::guarded_intact(w)) {
      emu::report("a kernel wrote outside its workspace");
      result = -1;
    }
    emu::guarded_free(w);
  }
  return result;
}

// The launch plan of one call on the configured device, found by a dry run of the
// real launch code: the main kernel's symbol, grid, block, dynamic shared memory, CTAs
// per SM and CTAs per cluster. Returns the launch status.
int emu_plan(int backward, int hidden, int64_t rows, int aligned, int dtype, char* name, int name_len,
             int64_t* grid, int* block, int64_t* smem, int* ctas_per_sm, int* cluster) {
  emu::clear_message();
  emu::recorded_launches().clear();
  emu::set_dry_run(true);
  cudaError_t err;
  if (backward) {
    AddNormBwdParams b = fake_bwd(hidden, rows, aligned, dtype);
    err = launch_fake_bwd(b);
  } else {
    err = residual_fused::launch_add_norm_fwd(fake_fwd(hidden, rows, aligned, dtype), nullptr);
  }
  emu::set_dry_run(false);
  cudaGetLastError();
  if (err == cudaSuccess && !emu::recorded_launches().empty()) {
    const emu::LaunchRecord& r = emu::recorded_launches().front();
    std::snprintf(name, static_cast<size_t>(name_len), "%s", emu::mangled_name(r.func).c_str());
    *grid = r.grid;
    *block = r.block;
    *smem = static_cast<int64_t>(r.smem);
    *ctas_per_sm = emu::ctas_per_sm(r.func, r.block, r.smem);
    *cluster = r.cluster;
  }
  return static_cast<int>(err);
}

// Dry runs of emu_fwd / emu_bwd (emu_set_dry_run(1), any pointers of the alignment to
// plan for): the launches they recorded, in order. Fills launch k's kernel symbol, grid,
// block and CTAs per cluster; returns how many launches were recorded.
int emu_recorded_launch(int k, char* name, int name_len, int64_t* grid, int* block, int* cluster) {
  const auto& launches = emu::recorded_launches();
  if (k >= 0 && k < static_cast<int>(launches.size())) {
    const emu::LaunchRecord& r = launches[static_cast<size_t>(k)];
    std::snprintf(name, static_cast<size_t>(name_len), "%s", emu::mangled_name(r.func).c_str());
    *grid = r.grid;
    *block = r.block;
    *cluster = r.cluster;
  }
  return static_cast<int>(launches.size());
}

void emu_clear_recorded() { emu::recorded_launches().clear(); }

// The hidden sizes in [lo, hi] (every `step`-th, from lo) at which the main kernel's
// plan on the configured device differs from the previous size's: another kernel,
// block, cluster or occupancy. These are the boundaries of the shape rules of
// dispatch.cu and the plans, found from the code itself. Writes up to `max_out` of them
// to `out`; returns how many there are.
int emu_plan_boundaries(int backward, int64_t rows, int lo, int hi, int step, int aligned, int dtype,
                        int* out, int max_out) {
  emu::set_dry_run(true);
  int found = 0;
  std::string last;
  for (int h = lo; h <= hi; h += step) {
    emu::recorded_launches().clear();
    emu::clear_message();
    cudaError_t err;
    if (backward) {
      AddNormBwdParams b = fake_bwd(h, rows, aligned, dtype);
      err = launch_fake_bwd(b);
    } else {
      err = residual_fused::launch_add_norm_fwd(fake_fwd(h, rows, aligned, dtype), nullptr);
    }
    std::string key = "refused";
    if (err == cudaSuccess && !emu::recorded_launches().empty()) {
      const emu::LaunchRecord& r = emu::recorded_launches().front();
      key = emu::mangled_name(r.func) + "/" + std::to_string(r.block) + "/" + std::to_string(r.cluster) + "/" +
            std::to_string(emu::ctas_per_sm(r.func, r.block, r.smem));
    }
    if (h != lo && key != last) {
      if (found < max_out) out[found] = h;
      ++found;
    }
    last = key;
  }
  emu::set_dry_run(false);
  emu::recorded_launches().clear();
  cudaGetLastError();
  return found;
}

// Plans and launch checks (nothing executed) for every hidden size in [lo, hi], on the
// configured device: every plan must be launchable and the backward's workspace must
// match the grid it launches. Returns the number of failing sizes; the first few are
// described in `out`.
int emu_sweep(int lo, int hi, int64_t rows, int aligned, int dtype, char* out, int out_len) {
  emu::set_dry_run(true);
  std::ostringstream text;
  int failures = 0;
  const auto note = [&](const char* dir, int h, const std::string& what) {
    if (++failures <= 5) text << dir << " H=" << h << ": " << what << "\n";
  };
  for (int h = lo; h <= hi; ++h) {
    emu::clear_message();
    cudaError_t err = residual_fused::launch_add_norm_fwd(fake_fwd(h, rows, aligned, dtype), nullptr);
    if (err != cudaSuccess) note("fwd", h, "error " + std::to_string(err) + ": " + emu::last_message());
    emu::clear_message();
    AddNormBwdParams b = fake_bwd(h, rows, aligned, dtype);
    AddNormBwdPlan plan;
    err = launch_fake_bwd(b, &plan);
    if (plan.main.grid < 1 || plan.partial_rows != plan.main.grid / plan.main.cluster) {
      note("bwd", h, "workspace rows " + std::to_string(plan.partial_rows) + " for a grid of " +
                         std::to_string(plan.main.grid));
    } else if (err != cudaSuccess) {
      note("bwd", h, "error " + std::to_string(err) + ": " + emu::last_message());
    }
  }
  emu::set_dry_run(false);
  cudaGetLastError();
  const std::string s = text.str();
  std::snprintf(out, static_cast<size_t>(out_len), "%s", s.c_str());
  return failures;
}

}  // extern "C"
