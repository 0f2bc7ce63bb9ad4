// Internal interface of the emulator's runtime (not seen by the kernels).
//   device.cpp    GPU profiles, the kernels' resource table, the CUDA runtime calls,
//                 launch rules, occupancy, fault injection
//   scheduler.cpp fibers, schedules, barriers, shuffles, per-CTA shared memory
//   memory.cpp    guarded allocations and the fault handler
//   api.cpp       the C API that tools/cuda_emulator.py calls
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace emu {

// ---- errors ---------------------------------------------------------------------
// The first problem of the current call, in words; cleared by api.cpp per call.
void report(const std::string& message);
const std::string& last_message();
void clear_message();
std::string mangled_name(const void* func);  // the kernel's symbol, as in SASS
std::string kernel_name(const void* func);   // demangled and short, for messages
std::string site_text(const char* file, int line);

// ---- device.cpp -------------------------------------------------------------------
struct Profile {
  std::string name;
  std::string arch;            // "80" or "90": which compile's registers to use
  int sm_count;
  int smem_per_sm;             // bytes
  int smem_per_block_optin;    // bytes, the most one block may opt in to
  int reserved_smem_per_block; // bytes the driver keeps per CTA
  int max_threads_per_sm;
  int max_ctas_per_sm;
  int regs_per_sm;
};

struct Resources {
  bool known = false;
  int registers = 0;
  int static_smem = 0;
  int max_threads = 1024;  // __launch_bounds__
};

const Profile& profile();
int profile_count();
const char* profile_name(int i);
// sm_count 0: the profile's; clusters false: an sm_90 part that refuses cluster launches
// (cudaDevAttrClusterLaunch 0), as under MIG or a driver without them.
void configure(int device, int profile_index, int sm_count, bool clusters = true, int code_arch = 0);
void set_dry_run(bool on);
// The name the next device queries report (cudaGetDeviceProperties), until the next
// configure: another GPU of the same profile (e.g. an H200 for h100).
void set_device_name(const std::string& name);  // launches are checked, not executed
struct LaunchRecord {
  const void* func;
  int64_t grid;
  int block;
  size_t smem;
  int cluster;  // CTAs per cluster (1: none)
};
std::vector<LaunchRecord>& recorded_launches();  // by dry runs, in order
void set_resources(const std::string& name, const std::string& arch, int registers,
                   int static_smem, int max_threads);
// The call of `kind` (0 cudaFuncSetAttribute, 1 occupancy query, 2 cudaFuncGetAttributes,
// 3 cudaLaunchKernel, 4 cudaGetDeviceProperties) after `after` more successful ones fails
// with `error`.
void inject(int kind, int after, int error);
int peek_last_error();  // the runtime's last error, not cleared
Resources resources(const void* func);
int ctas_per_sm(const void* func, int block, size_t dynamic_smem);
bool dry_run();
// Most fibers (threads of the interleaved CTAs of a wave) alive at once: the size of
// the stack pool; a launch runs at most kMaxFibers / block CTAs interleaved.
constexpr int kMaxFibers = 8192;

// ---- scheduler.cpp ----------------------------------------------------------------
enum class Schedule { kRoundRobin = 0, kReverse = 1, kRandom = 2, kWarpGreedy = 3, kCtaGreedy = 4 };
void set_schedule(Schedule schedule, uint64_t seed);
// Runs the grid, `wave` CTAs interleaved at a time (whole clusters of `cluster` CTAs,
// started together). Returns cudaSuccess, or an error with report() called.
cudaError_t execute(const void* func, dim3 grid, dim3 block, size_t dynamic_smem, int wave,
                    const std::function<void()>& body, int cluster);
// The static __shared__ arrays of each kernel (registered by the test harness from
// the library's symbol table): every CTA gets its own copy of these.
void register_static_shared(const std::string& kernel, void* address, size_t bytes);
void* current_dynamic_smem();
std::string current_thread_text();  // "kernel, block b, thread t" of the running fiber

// ---- memory.cpp -------------------------------------------------------------------
// What a guarded allocation holds; the access checks (checker.cpp) differ by kind.
// kInPlace: an input the call overwrites with its output (the in-place forms): read
// before written, every byte written.
enum class MemoryKind : int { kInput = 0, kOutput = 1, kWorkspace = 2, kShared = 3, kInPlace = 4 };
const char* kind_text(MemoryKind kind);

// One guarded allocation: `bytes` bytes at `user`, inside accessible pages [begin, end)
// with an inaccessible page on each side.
struct Region {
  char* map = nullptr;  // first (guard) page
  size_t map_pages = 0;
  char* begin = nullptr;
  char* end = nullptr;
  char* user = nullptr;
  size_t bytes = 0;
  std::string name;
  MemoryKind kind = MemoryKind::kInput;
  int slot = -1;  // kShared: the scheduler slot (resident CTA) it belongs to
  // Outputs, workspace and in-place tensors: which bytes a kernel wrote (since allocation), and per 4-byte
  // 2 bytes the last writer as (launch << 32) | (block + 1), 0 if none.
  std::vector<uint8_t> written;
  std::vector<uint64_t> writer;
};

// Memory with inaccessible pages on both sides; the caller's bytes sit flush against
// one of them (the end by default), at an address congruent to align_mod (mod 16).
void* guarded_alloc(const char* name, size_t bytes, size_t align_mod, bool flush_start,
                    MemoryKind kind = MemoryKind::kInput, int slot = -1);
bool guarded_intact(void* user);  // the slack between the bytes and the guard page
void guarded_free(void* user);
Region* region_at(const void* address);  // the region whose pages hold address, or null
Region* region_of_user(void* user);      // the region guarded_alloc returned `user` for
uintptr_t arena_base();                  // all guarded memory lies in [base, base + bytes)
size_t arena_bytes();
// Runs fn with the fault handler armed: a fault (guard page, misaligned access that
// traps, UBSan trap) inside it is reported with where it happened and returns false.
bool run_guarded(const std::function<void()>& fn);
// Where in which allocation an address lies, for messages ("" if none).
std::string describe_address(const void* address);
// The faulting instruction of the last fault, as an offset into the emulator library.
uintptr_t last_fault_offset();

// ---- checker.cpp: every load and store of the kernels --------------------------------
// The kernel sources are compiled with the AddressSanitizer's instrumentation in
// call mode and without its runtime: each access calls __asan_load*/__asan_store*,
// which checker.cpp implements. Global memory: bounds of the allocation, no write to
// an input, no read of output or workspace bytes nothing wrote, no byte written or
// read by one CTA after another CTA of the same launch wrote it. Shared memory
// (scheduler.cpp, check_shared): see there.
void set_static_range(uintptr_t lo, uintptr_t hi);  // where the __shared__ arrays lie
bool all_written(void* user);  // every byte of an output region was written by a kernel

// ---- scheduler.cpp, for the checks ---------------------------------------------------
bool in_kernel();            // the caller runs on a kernel thread
int64_t current_block();     // its block index
uint64_t launch_sequence();  // the running launch's number (distinct per launch)
[[noreturn]] void kernel_error(const std::string& message);  // stops the launch, reported
// An access of n bytes at a by the running thread to dynamic shared memory (region r)
// or to a static __shared__ array (anywhere else: ignored when a is not in one).
void check_shared(Region& r, uintptr_t a, size_t n, bool write);
void check_static_shared(uintptr_t a, size_t n, bool write);

}  // namespace emu
