// Fibers for CUDA threads, run one at a time on the calling OS thread in an order
// chosen per launch, with the CTAs of a wave interleaved:
//   round robin  every ready thread in turn, CTA by CTA (the old fixed order)
//   reverse      the same, last thread first
//   random       a seeded random ready thread each time
//   warp greedy  one warp runs until all its threads block, then the next warp
//   CTA greedy   one CTA runs until all its threads block or exit, then the next CTA
//                (a CTA races ahead of its cluster peers: a missing cluster barrier
//                shows)
// A correct kernel gives bitwise the same outputs under every order; a missing
// barrier shows as a difference or as poison (NaN) read back.
//
// Checked on every barrier and shuffle, reported with the kernel, block, thread and
// call site instead of hanging: all threads of a block reach the same __syncthreads;
// all lanes named in a shuffle's mask reach the same shuffle with the same mask and
// width, and read only lanes inside the mask; all threads of a cluster reach the same
// cluster barrier; a CTA maps only its own dynamic shared memory to a peer's, and
// never that of a peer that has exited; no thread exits while others wait for it; no
// deadlock.
//
// The CTAs of a cluster occupy consecutive slots and start together; a new cluster
// starts there once all of them have exited. An exited CTA's dynamic shared memory is
// poisoned at once, and a peer that touches it afterwards is reported.
//
// Shared memory (dynamic, and every static __shared__ array; checker.cpp routes each
// access of the kernels here) is checked on every access, as compute-sanitizer's
// memcheck, initcheck and racecheck would check it on a GPU:
//   - no read of a byte nothing has written since the CTA started;
//   - no access to the destination of a cp.async copy before the wait that retires it
//     (a read before its data is there, or a write that reuses the slot);
//   - no race: two threads touching the same bytes, at least one writing, with no
//     __syncthreads (or cluster barrier) between them; accesses of another CTA of the
//     cluster (distributed shared memory) are ordered by cluster barriers only;
//   - a peer's shared memory only while the peer runs.
// cp.async copies are checked when issued (source inside its allocation, destination
// inside the CTA's dynamic shared memory and not the target of a copy still pending),
// performed when a wait retires them, and a thread that exits with copies it never
// waited for is reported.
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <random>
#include <sstream>

#include "cuda_emulation.h"
#include "emulator.h"

// ---- context switching ---------------------------------------------------------------
// On x86-64 a fiber switch saves the callee-saved registers, the SSE and x87 control
// words and the stack pointer, and loads the other fiber's: no system call, unlike
// swapcontext (which also saves the signal mask), so the emulator runs several times
// faster. Elsewhere, ucontext.
#if defined(__x86_64__)
extern "C" void emu_switch_context(void** save_sp, void* load_sp);
asm(R"(
    .text
    .globl emu_switch_context
    .type emu_switch_context, @function
emu_switch_context:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_switch_context, .-emu_switch_context
)");

namespace {
struct Context {
  void* sp = nullptr;
};

// A context that, when switched to, calls entry() on `stack` (which must not return).
void make_context(Context& c, char* stack, size_t bytes, void (*entry)()) {
  uint64_t* top = reinterpret_cast<uint64_t*>(stack + bytes);  // 16-byte aligned
  *--top = 0;                                   // entry() sees rsp = 8 mod 16, as after a call
  *--top = reinterpret_cast<uint64_t>(entry);   // emu_switch_context returns here
  for (int r = 0; r < 6; ++r) *--top = 0;       // rbp rbx r12 r13 r14 r15
  uint32_t mxcsr = 0;
  uint16_t fpcw = 0;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpcw));
  *--top = static_cast<uint64_t>(mxcsr) | (static_cast<uint64_t>(fpcw) << 32);
  c.sp = top;
}

void switch_context(Context& from, Context& to) { emu_switch_context(&from.sp, to.sp); }
}  // namespace
#else
namespace {
struct Context {
  ucontext_t uc;
};

void make_context(Context& c, char* stack, size_t bytes, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}

void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
}  // namespace
#endif

namespace emu {

dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace {

constexpr size_t kStackBytes = 256 * 1024;

enum class State : uint8_t { kReady, kBarrier, kShuffle, kCluster, kDone };

// A cp.async copy not yet performed.
struct PendingCopy {
  void* dst;
  const void* src;
};

// Per byte of shared memory.
constexpr uint8_t kWritten = 1;  // written since the CTA started
constexpr uint8_t kPending = 2;  // the destination of a cp.async copy not yet waited for

// The last write and the last read(s) of 2 bytes of shared memory (no element is
// narrower, so threads writing neighbouring elements never share one): the thread
// (fiber index, -1 none) and the barrier counts of its CTA and cluster at the time.
struct SharedAccess {
  int32_t writer = -1;
  int32_t reader = -1;
  uint32_t w_sync = 0, w_cluster = 0;
  uint32_t r_sync = 0, r_cluster = 0;
  bool readers = false;  // more than one thread read it since the last write, unordered
};

struct SharedShadow {
  std::vector<uint8_t> state;      // per byte: kWritten | kPending
  std::vector<int32_t> issuer;     // per 16 bytes: the thread whose copy is pending there
  std::vector<SharedAccess> words;   // per 2 bytes

  void reset(size_t bytes) {
    state.assign(bytes, 0);
    issuer.assign(bytes / 16 + 1, -1);
    words.assign((bytes + 1) / 2, SharedAccess{});
  }
};

struct Fiber {
  Context context;
  State state = State::kDone;
  int slot = 0;
  int tid = 0;
  double shuffled = 0;  // this lane's result of the shuffle it waits in
  std::vector<std::vector<PendingCopy>> async_groups;  // committed, oldest first
  std::vector<PendingCopy> async_open;                 // issued, not yet committed
};

// A warp's shuffle in progress: the lanes that arrived and what they brought.
struct Warp {
  unsigned arrived = 0;
  Site site{nullptr, 0};
  unsigned mask = 0;
  int width = 0;
  double values[32];
  int lane_masks[32];
};

// A CTA resident in the wave.
struct Slot {
  bool active = false;
  int64_t block = -1;
  int live = 0;     // threads not yet exited
  int arrived = 0;  // threads waiting at the current __syncthreads
  Site barrier{nullptr, 0};
  std::vector<Warp> warps;
  std::vector<unsigned char> statics;  // this CTA's copy of the kernel's __shared__ arrays
  void* dynamic = nullptr;             // guarded dynamic shared memory
  uint32_t sync_epoch = 0;             // barriers (CTA or cluster) this CTA has passed
  SharedShadow dynamic_shadow, static_shadow;
};

// A cluster's barrier in progress (one per group of `cluster` slots).
struct ClusterBarrier {
  int arrived = 0;
  Site site{nullptr, 0};
  uint32_t epoch = 0;  // cluster barriers passed
};

struct StaticArray {
  unsigned char* address;
  size_t bytes;
};

// A static __shared__ array of the running kernel and where its bytes sit in a slot's
// static_shadow.
struct StaticRef {
  uintptr_t address;
  size_t bytes;
  size_t offset;
};

std::map<std::string, std::vector<StaticArray>>& static_table() {
  static std::map<std::string, std::vector<StaticArray>> table;
  return table;
}

Schedule g_schedule = Schedule::kRoundRobin;
uint64_t g_seed = 1;
uint64_t g_launches = 0;
uintptr_t g_static_lo = UINTPTR_MAX, g_static_hi = 0;

struct Launch {
  const void* func = nullptr;
  std::string name;
  int threads = 0;
  int64_t blocks = 0;
  size_t dynamic_bytes = 0;
  const std::function<void()>* body = nullptr;
  const std::vector<StaticArray>* statics = nullptr;
  std::vector<StaticRef> static_index;  // by address
  size_t statics_bytes = 0;
  uint64_t sequence = 0;
  int cluster = 1;            // CTAs per cluster; slots come in groups of this many
  std::vector<Slot> slots;
  std::vector<ClusterBarrier> clusters;  // per group of slots
  std::vector<Fiber> fibers;  // slot-major: fibers[slot * threads + tid]
  int owner = -1;             // slot whose __shared__ arrays are in place
  int64_t next_block = 0;
  int current = -1;
  Context scheduler;
  bool aborted = false;
  // Ready threads: a count per warp, and a list for random picks.
  std::vector<int> warp_ready;
  std::vector<int> ready_list, ready_pos;
  int cursor = 0;
  int warp_cursor = 0;
  int cta_cursor = 0;
  std::mt19937_64 rng;
};
Launch* g = nullptr;

char* fiber_stack(int i) {
  static std::vector<char*> stacks(kMaxFibers, nullptr);
  if (stacks[i] == nullptr) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    void* map = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (map == MAP_FAILED) return nullptr;
    mprotect(map, page, PROT_NONE);  // a fiber that overflows its stack faults here
    stacks[i] = static_cast<char*>(map) + page;
  }
  return stacks[i];
}

void set_ready(Launch& L, int i) {
  Fiber& f = L.fibers[i];
  if (f.state == State::kReady) return;
  f.state = State::kReady;
  ++L.warp_ready[i / 32];
  L.ready_pos[i] = static_cast<int>(L.ready_list.size());
  L.ready_list.push_back(i);
}

void set_waiting(Launch& L, int i, State state) {
  Fiber& f = L.fibers[i];
  if (f.state == State::kReady) {
    --L.warp_ready[i / 32];
    const int pos = L.ready_pos[i];
    const int last = L.ready_list.back();
    L.ready_list[pos] = last;
    L.ready_pos[last] = pos;
    L.ready_list.pop_back();
  }
  f.state = state;
}

std::string where(const Launch& L, int i) {
  const Fiber& f = L.fibers[i];
  std::ostringstream out;
  out << L.name << ", block " << L.slots[f.slot].block << ", thread " << f.tid;
  return out.str();
}

std::string hex(unsigned v) {
  std::ostringstream out;
  out << "0x" << std::hex << v;
  return out.str();
}

bool same_site(Site a, Site b) { return a.line == b.line && std::strcmp(a.file, b.file) == 0; }

// Stops the launch from inside a fiber: the scheduler sees `aborted` and returns.
[[noreturn]] void fail(const std::string& message) {
  Launch& L = *g;
  report(where(L, L.current) + ": " + message);
  L.aborted = true;
  switch_context(L.fibers[L.current].context, L.scheduler);
  std::abort();  // never resumed
}

void block_until_released(State state) {
  Launch& L = *g;
  set_waiting(L, L.current, state);
  switch_context(L.fibers[L.current].context, L.scheduler);
}

void swap_statics(Launch& L, int to) {
  if (L.owner == to || L.statics_bytes == 0) {
    L.owner = to;
    return;
  }
  if (L.owner >= 0) {
    unsigned char* save = L.slots[L.owner].statics.data();
    for (const StaticArray& a : *L.statics) {
      std::memcpy(save, a.address, a.bytes);
      save += a.bytes;
    }
  }
  const unsigned char* load = L.slots[to].statics.data();
  for (const StaticArray& a : *L.statics) {
    std::memcpy(a.address, load, a.bytes);
    load += a.bytes;
  }
  L.owner = to;
}

void on_exit();

void fiber_entry() {
  (*g->body)();
  on_exit();
  Launch& L = *g;
  switch_context(L.fibers[L.current].context, L.scheduler);  // done: never resumed
  std::abort();
}

// The next block of the grid starts in `slot`, its shared memory poisoned.
bool start_block(Launch& L, int slot) {
  Slot& s = L.slots[slot];
  if (L.next_block >= L.blocks) {
    s.active = false;
    return true;
  }
  s.active = true;
  s.block = L.next_block++;
  s.live = L.threads;
  s.arrived = 0;
  for (Warp& w : s.warps) w.arrived = 0;
  // 0xFF bytes are NaN as float and double: a read of what was never written shows.
  std::fill(s.statics.begin(), s.statics.end(), 0xFF);
  if (L.owner == slot) L.owner = -1;  // reload the poisoned copy before it runs
  if (s.dynamic != nullptr) std::memset(s.dynamic, 0xFF, L.dynamic_bytes);
  s.dynamic_shadow.reset(L.dynamic_bytes);
  s.static_shadow.reset(L.statics_bytes);
  for (int t = 0; t < L.threads; ++t) {
    const int i = slot * L.threads + t;
    Fiber& f = L.fibers[i];
    f.slot = slot;
    f.tid = t;
    f.state = State::kDone;
    f.async_groups.clear();
    f.async_open.clear();
    char* stack = fiber_stack(i);
    if (stack == nullptr) {
      report(L.name + ": out of memory for fiber stacks");
      return false;
    }
    make_context(f.context, stack, kStackBytes, fiber_entry);
    set_ready(L, i);
  }
  return true;
}

// The copies a thread issued and no wait has retired, oldest first.
std::vector<const PendingCopy*> copies_in_flight(const Fiber& f) {
  std::vector<const PendingCopy*> out;
  for (const auto& group : f.async_groups) {
    for (const PendingCopy& c : group) out.push_back(&c);
  }
  for (const PendingCopy& c : f.async_open) out.push_back(&c);
  return out;
}

void on_exit() {
  Launch& L = *g;
  const int i = L.current;
  Fiber& f = L.fibers[i];
  Slot& s = L.slots[f.slot];
  const std::vector<const PendingCopy*> pending = copies_in_flight(f);
  if (!pending.empty()) {
    fail("exits with " + std::to_string(pending.size()) + " cp.async cop" + (pending.size() == 1 ? "y" : "ies") +
         " it never waited for (the first into byte " +
         std::to_string(static_cast<unsigned char*>(pending.front()->dst) - static_cast<unsigned char*>(s.dynamic)) +
         " of its dynamic shared memory, from " + describe_address(pending.front()->src) + ")");
  }
  set_waiting(L, i, State::kDone);
  --s.live;
  if (s.arrived > 0) {
    fail("exits while " + std::to_string(s.arrived) + " thread(s) of its block wait at __syncthreads (" +
         site_text(s.barrier.file, s.barrier.line) + ")");
  }
  const Warp& w = s.warps[f.tid / 32];
  if (w.arrived != 0 && (w.mask >> (f.tid % 32) & 1u)) {
    fail("exits while lanes of its warp wait for it at __shfl_xor_sync (" +
         site_text(w.site.file, w.site.line) + ")");
  }
  const ClusterBarrier& cb = L.clusters[f.slot / L.cluster];
  if (cb.arrived > 0) {
    fail("exits while " + std::to_string(cb.arrived) + " thread(s) of its cluster wait at cluster_sync (" +
         site_text(cb.site.file, cb.site.line) + ")");
  }
}

int pick(Launch& L) {
  if (L.ready_list.empty()) return -1;
  const int n = static_cast<int>(L.fibers.size());
  switch (g_schedule) {
    case Schedule::kRandom:
      return L.ready_list[std::uniform_int_distribution<size_t>(0, L.ready_list.size() - 1)(L.rng)];
    case Schedule::kReverse:
      for (int k = 0; k < n; ++k) {
        const int i = (L.cursor - k + n) % n;
        if (L.fibers[i].state == State::kReady) {
          L.cursor = (i - 1 + n) % n;
          return i;
        }
      }
      return -1;
    case Schedule::kWarpGreedy: {
      const int warps = n / 32;
      for (int k = 0; k < warps; ++k) {
        const int w = (L.warp_cursor + k) % warps;
        if (L.warp_ready[w] == 0) continue;
        L.warp_cursor = w;  // stay on this warp until none of its threads is ready
        for (int lane = 0; lane < 32; ++lane) {
          if (L.fibers[w * 32 + lane].state == State::kReady) return w * 32 + lane;
        }
      }
      return -1;
    }
    case Schedule::kCtaGreedy: {
      const int slots = static_cast<int>(L.slots.size());
      for (int k = 0; k < slots; ++k) {
        const int slot = (L.cta_cursor + k) % slots;
        for (int t = 0; t < L.threads; ++t) {
          if (L.fibers[slot * L.threads + t].state == State::kReady) {
            L.cta_cursor = slot;  // stay on this CTA until none of its threads is ready
            return slot * L.threads + t;
          }
        }
      }
      return -1;
    }
    case Schedule::kRoundRobin:
    default:
      for (int k = 0; k < n; ++k) {
        const int i = (L.cursor + k) % n;
        if (L.fibers[i].state == State::kReady) {
          L.cursor = (i + 1) % n;
          return i;
        }
      }
      return -1;
  }
}

std::string deadlock_text(const Launch& L) {
  std::ostringstream out;
  out << L.name << ": deadlock, no thread can run:";
  for (const Slot& s : L.slots) {
    if (!s.active) continue;
    out << " block " << s.block << ": " << (L.threads - s.live) << " exited";
    if (s.arrived > 0) {
      out << ", " << s.arrived << " at __syncthreads (" << site_text(s.barrier.file, s.barrier.line) << ")";
    }
    for (size_t w = 0; w < s.warps.size(); ++w) {
      if (s.warps[w].arrived != 0) {
        out << ", warp " << w << " lanes " << hex(s.warps[w].arrived)
            << " at __shfl_xor_sync (" << site_text(s.warps[w].site.file, s.warps[w].site.line)
            << ") waiting for mask " << hex(s.warps[w].mask);
      }
    }
    out << ";";
  }
  for (size_t c = 0; c < L.clusters.size(); ++c) {
    if (L.clusters[c].arrived > 0) {
      out << " cluster " << c << ": " << L.clusters[c].arrived << " at cluster_sync ("
          << site_text(L.clusters[c].site.file, L.clusters[c].site.line) << ");";
    }
  }
  return out.str();
}

void run(Launch& L) {
  for (;;) {
    const int i = pick(L);
    if (i < 0) {
      for (const Slot& s : L.slots) {
        if (s.active) {
          report(deadlock_text(L));
          L.aborted = true;
          return;
        }
      }
      return;  // every block has finished
    }
    Fiber& f = L.fibers[i];
    swap_statics(L, f.slot);
    threadIdx = dim3(f.tid, 0, 0);
    blockIdx = dim3(static_cast<unsigned>(L.slots[f.slot].block), 0, 0);
    L.current = i;
    switch_context(L.scheduler, f.context);
    L.current = -1;
    if (L.aborted) return;
    Slot& s = L.slots[f.slot];
    if (f.state == State::kDone && s.live == 0) {
      if (s.dynamic != nullptr && !guarded_intact(s.dynamic)) {
        report(L.name + ", block " + std::to_string(s.block) + ": wrote past its dynamic shared memory");
        L.aborted = true;
        return;
      }
      if (L.cluster == 1) {
        if (!start_block(L, f.slot)) {
          L.aborted = true;
          return;
        }
        continue;
      }
      // Peers may still run: what they read of this CTA from now on is poison.
      if (s.dynamic != nullptr) std::memset(s.dynamic, 0xFF, L.dynamic_bytes);
      s.active = false;
      const int first = f.slot / L.cluster * L.cluster;
      bool all_done = true;
      for (int k = first; k < first + L.cluster; ++k) all_done = all_done && L.slots[k].live == 0;
      for (int k = first; all_done && k < first + L.cluster; ++k) {
        if (!start_block(L, k)) {
          L.aborted = true;
          return;
        }
      }
    }
  }
}

}  // namespace

void set_schedule(Schedule schedule, uint64_t seed) {
  g_schedule = schedule;
  g_seed = seed;
}

void register_static_shared(const std::string& kernel, void* address, size_t bytes) {
  static_table()[kernel].push_back({static_cast<unsigned char*>(address), bytes});
  g_static_lo = std::min(g_static_lo, reinterpret_cast<uintptr_t>(address));
  g_static_hi = std::max(g_static_hi, reinterpret_cast<uintptr_t>(address) + bytes);
  set_static_range(g_static_lo, g_static_hi);
}

bool in_kernel() { return g != nullptr && g->current >= 0; }
int64_t current_block() { return g->slots[g->fibers[g->current].slot].block; }
uint64_t launch_sequence() { return g == nullptr ? 0 : g->sequence; }
void kernel_error(const std::string& message) { fail(message); }

void* current_dynamic_smem() {
  if (g == nullptr || g->current < 0) return nullptr;
  return g->slots[g->fibers[g->current].slot].dynamic;
}

std::string current_thread_text() {
  if (g == nullptr || g->current < 0) return "outside any kernel thread";
  return where(*g, g->current);
}

cudaError_t execute(const void* func, dim3 grid, dim3 block, size_t dynamic_smem, int wave,
                    const std::function<void()>& body, int cluster) {
  Launch L;
  L.cluster = cluster;
  L.func = func;
  L.name = kernel_name(func);
  L.threads = static_cast<int>(block.x);
  L.blocks = grid.x;
  L.dynamic_bytes = dynamic_smem;
  L.body = &body;
  L.rng.seed(g_seed * 0x9E3779B97F4A7C15ull + ++g_launches);
  static const std::vector<StaticArray> kNone;
  const auto found = static_table().find(mangled_name(func));
  L.statics = found == static_table().end() ? &kNone : &found->second;
  for (const StaticArray& a : *L.statics) {
    L.static_index.push_back({reinterpret_cast<uintptr_t>(a.address), a.bytes, L.statics_bytes});
    L.statics_bytes += a.bytes;
  }
  std::sort(L.static_index.begin(), L.static_index.end(),
            [](const StaticRef& a, const StaticRef& b) { return a.address < b.address; });
  L.sequence = g_launches;
  const int slots = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(wave, L.blocks)));
  L.slots.resize(slots);
  L.clusters.resize((slots + cluster - 1) / cluster);
  L.fibers.resize(static_cast<size_t>(slots) * L.threads);
  L.warp_ready.assign(L.fibers.size() / 32, 0);
  L.ready_pos.assign(L.fibers.size(), -1);
  L.ready_list.reserve(L.fibers.size());
  blockDim = block;
  gridDim = grid;
  bool ok = true;
  for (int k = 0; k < slots && ok; ++k) {
    Slot& s = L.slots[k];
    s.warps.resize(L.threads / 32);
    s.statics.resize(L.statics_bytes);
    if (dynamic_smem > 0) {
      s.dynamic = guarded_alloc("dynamic shared memory", dynamic_smem, 0, false, MemoryKind::kShared, k);
      ok = s.dynamic != nullptr;
    }
  }
  g = &L;
  if (ok) {
    for (int k = 0; k < slots && ok; ++k) ok = start_block(L, k);
  }
  if (ok) ok = run_guarded([&] { run(L); }) && !L.aborted;
  g = nullptr;
  for (Slot& s : L.slots) {
    if (s.dynamic != nullptr) guarded_free(s.dynamic);
  }
  return ok ? cudaSuccess : cudaErrorLaunchFailure;
}

void syncthreads(Site site) {
  Launch& L = *g;
  const int i = L.current;
  Slot& s = L.slots[L.fibers[i].slot];
  if (s.live < L.threads) {
    fail("reaches __syncthreads (" + site_text(site.file, site.line) + ") after " +
         std::to_string(L.threads - s.live) + " thread(s) of its block exited");
  }
  if (s.arrived == 0) {
    s.barrier = site;
  } else if (!same_site(site, s.barrier)) {
    fail("reaches __syncthreads at " + site_text(site.file, site.line) + " while " +
         std::to_string(s.arrived) + " thread(s) of its block wait at another one, " +
         site_text(s.barrier.file, s.barrier.line));
  }
  if (++s.arrived == L.threads) {  // the last to arrive releases the others
    s.arrived = 0;
    ++s.sync_epoch;
    const int base = L.fibers[i].slot * L.threads;
    for (int t = 0; t < L.threads; ++t) {
      if (L.fibers[base + t].state == State::kBarrier) set_ready(L, base + t);
    }
    return;
  }
  block_until_released(State::kBarrier);
}

double shfl_xor(Site site, unsigned mask, double v, int lane_mask, int width) {
  Launch& L = *g;
  const int i = L.current;
  Fiber& f = L.fibers[i];
  Slot& s = L.slots[f.slot];
  const int lane = f.tid % 32;
  Warp& w = s.warps[f.tid / 32];
  const std::string at = "__shfl_xor_sync (" + site_text(site.file, site.line) + ")";
  if (!(mask >> lane & 1u)) {
    fail("calls " + at + " with mask " + hex(mask) + " that does not include its own lane " +
         std::to_string(lane));
  }
  if (width < 1 || width > 32 || (width & (width - 1)) != 0 || lane_mask < 0 || lane_mask >= width) {
    fail("calls " + at + " with lane mask " + std::to_string(lane_mask) + " and width " +
         std::to_string(width) + " (needs a power-of-two width <= 32 and lane mask < width)");
  }
  if (w.arrived == 0) {
    w.site = site;
    w.mask = mask;
    w.width = width;
  } else if (!same_site(site, w.site) || mask != w.mask || width != w.width) {
    fail("calls " + at + " with mask " + hex(mask) + ", width " + std::to_string(width) +
         " while lanes of its warp wait at __shfl_xor_sync (" + site_text(w.site.file, w.site.line) +
         ") with mask " + hex(w.mask) + ", width " + std::to_string(w.width));
  }
  w.values[lane] = v;
  w.lane_masks[lane] = lane_mask;
  w.arrived |= 1u << lane;
  if (w.arrived != w.mask) {
    block_until_released(State::kShuffle);
    return f.shuffled;
  }
  // Everyone is here: deliver each lane's value, then release the others.
  const int base = i - lane;
  double mine = 0;
  for (int l = 0; l < 32; ++l) {
    if (!(w.mask >> l & 1u)) continue;
    const int src = l ^ w.lane_masks[l];
    if (!(w.mask >> src & 1u)) {
      fail("lane " + std::to_string(l) + " reads lane " + std::to_string(src) + " in " + at +
           ", which is outside the mask");
    }
    const double value = w.values[src];
    if (l == lane) {
      mine = value;
    } else {
      L.fibers[base + l].shuffled = value;
      set_ready(L, base + l);
    }
  }
  w.arrived = 0;
  return mine;
}

// ---- clusters ------------------------------------------------------------------------

int cluster_rank() {
  const Launch& L = *g;
  return static_cast<int>(L.slots[L.fibers[L.current].slot].block % L.cluster);
}

int cluster_size() { return g->cluster; }

void(cluster_sync)(Site site) {  // parenthesised: cluster_sync() is a macro
  Launch& L = *g;
  const int i = L.current;
  const int group = L.fibers[i].slot / L.cluster;
  ClusterBarrier& cb = L.clusters[group];
  const std::string at = "cluster_sync (" + site_text(site.file, site.line) + ")";
  for (int k = group * L.cluster; k < (group + 1) * L.cluster; ++k) {
    if (L.slots[k].live < L.threads) {
      fail("reaches " + at + " after " + std::to_string(L.threads - L.slots[k].live) +
           " thread(s) of block " + std::to_string(L.slots[k].block) + " of its cluster exited");
    }
  }
  if (cb.arrived == 0) {
    cb.site = site;
  } else if (!same_site(site, cb.site)) {
    fail("reaches " + at + " while " + std::to_string(cb.arrived) +
         " thread(s) of its cluster wait at another one, " + site_text(cb.site.file, cb.site.line));
  }
  if (++cb.arrived == L.cluster * L.threads) {  // the last to arrive releases the cluster
    cb.arrived = 0;
    ++cb.epoch;  // a cluster barrier also orders each CTA's own threads
    for (int k = group * L.cluster; k < (group + 1) * L.cluster; ++k) ++L.slots[k].sync_epoch;
    const int base = group * L.cluster * L.threads;
    for (int t = 0; t < L.cluster * L.threads; ++t) {
      if (L.fibers[base + t].state == State::kCluster) set_ready(L, base + t);
    }
    return;
  }
  block_until_released(State::kCluster);
}

void* cluster_map(const void* p, int rank) {
  Launch& L = *g;
  const int slot = L.fibers[L.current].slot;
  const unsigned char* const own = static_cast<const unsigned char*>(L.slots[slot].dynamic);
  const unsigned char* const q = static_cast<const unsigned char*>(p);
  if (own == nullptr || q < own || q >= own + L.dynamic_bytes) {
    fail("maps an address that is not in its dynamic shared memory to a peer CTA");
  }
  if (rank < 0 || rank >= L.cluster) {
    fail("maps shared memory of cluster rank " + std::to_string(rank) + " in a cluster of " +
         std::to_string(L.cluster));
  }
  const Slot& peer = L.slots[slot / L.cluster * L.cluster + rank];
  if (peer.live == 0) {
    fail("maps shared memory of cluster rank " + std::to_string(rank) + ", which has exited");
  }
  return static_cast<unsigned char*>(peer.dynamic) + (q - own);
}

// ---- cp.async ------------------------------------------------------------------------

void async_copy16(void* dst, const void* src) {
  Launch& L = *g;
  const int i = L.current;
  Fiber& f = L.fibers[i];
  Slot& s = L.slots[f.slot];
  unsigned char* const own = static_cast<unsigned char*>(s.dynamic);
  unsigned char* const d = static_cast<unsigned char*>(dst);
  if (own == nullptr || d < own || d + 16 > own + L.dynamic_bytes) {
    fail("cp.async to an address that is not in its dynamic shared memory");
  }
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0 || reinterpret_cast<uintptr_t>(src) % 16 != 0) {
    fail("cp.async of 16 bytes with a source or destination not 16-byte aligned");
  }
  // The GPU reads the source some time after the issue: its bounds are checked now.
  const Region* from = region_at(src);
  const char* const p = static_cast<const char*>(src);
  if (from == nullptr || from->kind == MemoryKind::kShared) {
    fail("cp.async from an address that is not in global memory");
  }
  if (p < from->user || p + 16 > from->user + from->bytes) {
    fail("cp.async reads 16 bytes at " + describe_address(p) + ", outside " + from->name +
         " (copies are checked when issued: the GPU reads the source then, waited for or not)");
  }
  const size_t off = static_cast<size_t>(d - own);
  SharedShadow& sh = s.dynamic_shadow;
  for (size_t b = off; b < off + 16; ++b) {
    if (sh.state[b] & kPending) {
      fail("cp.async into byte " + std::to_string(b) + " of its dynamic shared memory, which a copy issued by " +
           where(L, sh.issuer[b / 16]) + " still writes (the slot is reused before that copy's wait)");
    }
  }
  check_shared(*region_at(dst), reinterpret_cast<uintptr_t>(dst), 16, true);  // races, as a write
  for (size_t b = off; b < off + 16; ++b) sh.state[b] |= kPending;
  sh.issuer[off / 16] = i;
  std::memset(dst, 0xFF, 16);  // what a read before the wait would see
  f.async_open.push_back({dst, src});
}

void async_commit() {
  Fiber& f = g->fibers[g->current];
  f.async_groups.push_back(std::move(f.async_open));
  f.async_open.clear();
}

void async_wait(int n) {
  Launch& L = *g;
  const int i = L.current;
  Fiber& f = L.fibers[i];
  Slot& s = L.slots[f.slot];
  const uint32_t cluster_epoch = L.clusters[f.slot / L.cluster].epoch;
  while (static_cast<int>(f.async_groups.size()) > n) {
    for (const PendingCopy& c : f.async_groups.front()) {
      std::memcpy(c.dst, c.src, 16);
      const size_t off = static_cast<size_t>(static_cast<unsigned char*>(c.dst) - static_cast<unsigned char*>(s.dynamic));
      for (size_t b = off; b < off + 16; ++b) s.dynamic_shadow.state[b] = kWritten;
      s.dynamic_shadow.issuer[off / 16] = -1;
      for (size_t w = off / 2; w < (off + 16) / 2; ++w) {  // written by this thread, now
        SharedAccess& e = s.dynamic_shadow.words[w];
        e = SharedAccess{};
        e.writer = i;
        e.w_sync = s.sync_epoch;
        e.w_cluster = cluster_epoch;
      }
    }
    f.async_groups.erase(f.async_groups.begin());
  }
}

// ---- shared-memory checks ----------------------------------------------------------------

namespace {

// Whether thread j's access, made when its CTA and cluster had passed `sync` and
// `cluster` barriers, is unordered with respect to what thread i does now.
bool unordered(const Launch& L, int j, uint32_t sync, uint32_t cluster, int i) {
  const int slot_j = j / L.threads, slot_i = i / L.threads;
  if (slot_j == slot_i) return sync == L.slots[slot_i].sync_epoch;
  if (slot_j / L.cluster != slot_i / L.cluster) return false;
  return cluster == L.clusters[slot_i / L.cluster].epoch;
}

std::string shared_text(const Launch& L, int owner, const char* what, size_t offset, size_t n, bool write) {
  std::ostringstream out;
  out << (write ? "writes " : "reads ") << n << " byte" << (n == 1 ? "" : "s") << " at byte " << offset << " of "
      << what;
  if (owner != L.fibers[L.current].slot) out << " of block " << L.slots[owner].block;
  return out.str();
}

void check_bytes(Launch& L, SharedShadow& sh, int owner, const char* what, size_t off, size_t n, bool write) {
  const int i = L.current;
  for (size_t b = off; b < off + n; ++b) {
    if (sh.state[b] & kPending) {
      fail(shared_text(L, owner, what, off, n, write) +
           (write ? ", the destination of a cp.async copy that is still pending (issued by "
                  : " before the wait of the cp.async copy into it (issued by ") +
           where(L, sh.issuer[b / 16]) + ")");
    }
    if (!write && !(sh.state[b] & kWritten)) {
      fail(shared_text(L, owner, what, off, n, write) + ": byte " + std::to_string(b) +
           " was never written since the block started");
    }
  }
  const int slot = L.fibers[i].slot;
  const uint32_t sync = L.slots[slot].sync_epoch;
  const uint32_t cluster = L.clusters[slot / L.cluster].epoch;
  for (size_t w = off / 2; w <= (off + n - 1) / 2; ++w) {
    SharedAccess& e = sh.words[w];
    if (e.writer >= 0 && e.writer != i && unordered(L, e.writer, e.w_sync, e.w_cluster, i)) {
      fail(shared_text(L, owner, what, off, n, write) + ", which " + where(L, e.writer) +
           " wrote with no barrier between them (a race)");
    }
    if (write) {
      if (e.reader >= 0 && (e.reader != i || e.readers) && unordered(L, e.reader, e.r_sync, e.r_cluster, i)) {
        fail(shared_text(L, owner, what, off, n, write) + ", which " + where(L, e.reader) +
             (e.readers ? " and others" : "") + " read with no barrier between them (a race)");
      }
      e = SharedAccess{};
      e.writer = i;
      e.w_sync = sync;
      e.w_cluster = cluster;
      continue;
    }
    if (e.reader >= 0 && unordered(L, e.reader, e.r_sync, e.r_cluster, i)) {
      e.readers = e.readers || e.reader != i;
    } else {
      e.readers = false;
    }
    e.reader = i;
    e.r_sync = sync;
    e.r_cluster = cluster;
  }
  if (write) {
    for (size_t b = off; b < off + n; ++b) sh.state[b] |= kWritten;
  }
}

}  // namespace

void check_shared(Region& r, uintptr_t a, size_t n, bool write) {
  Launch& L = *g;
  const int slot = L.fibers[L.current].slot;
  const int owner = r.slot;
  if (owner < 0 || owner >= static_cast<int>(L.slots.size())) {
    fail("accesses dynamic shared memory of another launch");
  }
  Slot& s = L.slots[owner];
  if (owner != slot) {
    if (owner / L.cluster != slot / L.cluster) {
      fail("accesses the dynamic shared memory of block " + std::to_string(s.block) + ", outside its cluster");
    }
    if (!s.active || s.live == 0) {
      fail((write ? "writes" : "reads") + std::string(" the shared memory of cluster rank ") +
           std::to_string(owner % L.cluster) + ", which has exited");
    }
  }
  check_bytes(L, s.dynamic_shadow, owner, "dynamic shared memory",
              static_cast<size_t>(a - reinterpret_cast<uintptr_t>(s.dynamic)), n, write);
}

void check_static_shared(uintptr_t a, size_t n, bool write) {
  Launch& L = *g;
  for (const StaticRef& ref : L.static_index) {
    if (a < ref.address || a >= ref.address + ref.bytes) continue;
    if (a + n > ref.address + ref.bytes) fail("accesses past the end of a __shared__ array");
    const int slot = L.fibers[L.current].slot;
    check_bytes(L, L.slots[slot].static_shadow, slot, "static shared memory", ref.offset + (a - ref.address), n,
                write);
    return;
  }
}

}  // namespace emu
