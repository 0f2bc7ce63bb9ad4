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
// poisoned at once, so a peer reading it afterwards reads NaN.
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
};

// A cluster's barrier in progress (one per group of `cluster` slots).
struct ClusterBarrier {
  int arrived = 0;
  Site site{nullptr, 0};
};

struct StaticArray {
  unsigned char* address;
  size_t bytes;
};

std::map<std::string, std::vector<StaticArray>>& static_table() {
  static std::map<std::string, std::vector<StaticArray>> table;
  return table;
}

Schedule g_schedule = Schedule::kRoundRobin;
uint64_t g_seed = 1;
uint64_t g_launches = 0;

struct Launch {
  const void* func = nullptr;
  std::string name;
  int threads = 0;
  int64_t blocks = 0;
  size_t dynamic_bytes = 0;
  const std::function<void()>* body = nullptr;
  const std::vector<StaticArray>* statics = nullptr;
  size_t statics_bytes = 0;
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

void on_exit() {
  Launch& L = *g;
  const int i = L.current;
  Fiber& f = L.fibers[i];
  Slot& s = L.slots[f.slot];
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
}

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
  for (const StaticArray& a : *L.statics) L.statics_bytes += a.bytes;
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
      s.dynamic = guarded_alloc("dynamic shared memory", dynamic_smem, 0, false);
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
  Fiber& f = L.fibers[L.current];
  unsigned char* const own = static_cast<unsigned char*>(L.slots[f.slot].dynamic);
  unsigned char* const d = static_cast<unsigned char*>(dst);
  if (own == nullptr || d < own || d + 16 > own + L.dynamic_bytes) {
    fail("cp.async to an address that is not in its dynamic shared memory");
  }
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0 || reinterpret_cast<uintptr_t>(src) % 16 != 0) {
    fail("cp.async of 16 bytes with a source or destination not 16-byte aligned");
  }
  std::memset(dst, 0xFF, 16);  // what a read before the wait would see
  f.async_open.push_back({dst, src});
}

void async_commit() {
  Fiber& f = g->fibers[g->current];
  f.async_groups.push_back(std::move(f.async_open));
  f.async_open.clear();
}

void async_wait(int n) {
  Fiber& f = g->fibers[g->current];
  while (static_cast<int>(f.async_groups.size()) > n) {
    for (const PendingCopy& c : f.async_groups.front()) std::memcpy(c.dst, c.src, 16);
    f.async_groups.erase(f.async_groups.begin());
  }
}

}  // namespace emu
