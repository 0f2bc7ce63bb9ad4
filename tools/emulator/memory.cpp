// Guarded memory and the fault handler.
//
// Every tensor a kernel sees (inputs, outputs, workspace, dynamic shared memory) lives
// in its own region of one reserved arena: its pages with an inaccessible page on each
// side, its bytes flush against one of them. The arena lets the access checks
// (checker.cpp) tell with one comparison whether an address is in guarded memory, and
// find its region from a page table. A fault (guard page, a misaligned access that
// traps, a trap from the UndefinedBehaviorSanitizer) is turned into a report naming the
// kernel, block, thread, the allocation and how far outside it the access was, then
// unwinds to the launch, which fails instead of taking the test process down.
#include <dlfcn.h>
#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <csetjmp>
#include <cstring>
#include <iterator>
#include <map>
#include <sstream>

#include "emulator.h"

namespace emu {
namespace {

constexpr unsigned char kCanary = 0xA5;
// Address space reserved for guarded memory (never committed until allocated).
constexpr size_t kArenaBytes = size_t{8} << 30;

size_t page_size() {
  static const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return page;
}

struct Arena {
  char* base = nullptr;
  size_t pages = 0;
  std::vector<int32_t> page_region;      // region index + 1, 0 where none
  std::map<size_t, size_t> free_pages;   // first page -> page count
  std::vector<Region> regions;           // by index; `map` null when free
  std::vector<int32_t> free_ids;
  std::map<char*, int32_t> by_user;      // user pointer -> region index
};

Arena& arena() {
  static Arena a = [] {
    Arena r;
    void* m = mmap(nullptr, kArenaBytes, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m != MAP_FAILED) {
      r.base = static_cast<char*>(m);
      r.pages = kArenaBytes / page_size();
      r.page_region.assign(r.pages, 0);
      r.free_pages[0] = r.pages;
    }
    return r;
  }();
  return a;
}

// First fit; returns the first page, or pages (none).
size_t take_pages(Arena& a, size_t n) {
  for (auto it = a.free_pages.begin(); it != a.free_pages.end(); ++it) {
    if (it->second < n) continue;
    const size_t first = it->first, count = it->second;
    a.free_pages.erase(it);
    if (count > n) a.free_pages[first + n] = count - n;
    return first;
  }
  return a.pages;
}

void give_pages(Arena& a, size_t first, size_t n) {
  auto next = a.free_pages.lower_bound(first);
  if (next != a.free_pages.end() && next->first == first + n) {
    n += next->second;
    next = a.free_pages.erase(next);
  }
  if (next != a.free_pages.begin()) {
    auto prev = std::prev(next);
    if (prev->first + prev->second == first) {
      prev->second += n;
      return;
    }
  }
  a.free_pages[first] = n;
}

sigjmp_buf g_jump;
bool g_armed = false;
uintptr_t g_fault_offset = 0;

uintptr_t fault_pc(void* context) {
  const ucontext_t* uc = static_cast<const ucontext_t*>(context);
#if defined(__x86_64__)
  return static_cast<uintptr_t>(uc->uc_mcontext.gregs[REG_RIP]);
#elif defined(__aarch64__)
  return static_cast<uintptr_t>(uc->uc_mcontext.pc);
#else
  (void)uc;
  return 0;
#endif
}

const char* signal_text(int sig, int code) {
  switch (sig) {
    case SIGSEGV:
      return "invalid memory access";
    case SIGBUS:
      return code == BUS_ADRALN ? "misaligned memory access" : "bus error";
    case SIGILL:
      return "trap (the UndefinedBehaviorSanitizer stops on undefined behaviour: misaligned "
             "access, index out of bounds, overflow)";
    case SIGFPE:
      return "arithmetic exception";
    default:
      return "signal";
  }
}

void on_fault(int sig, siginfo_t* info, void* context) {
  if (!g_armed) {  // not ours: let the default action happen
    signal(sig, SIG_DFL);
    raise(sig);
    return;
  }
  g_armed = false;
  const uintptr_t pc = fault_pc(context);
  Dl_info dl{};
  g_fault_offset = 0;
  if (pc != 0 && dladdr(reinterpret_cast<void*>(pc), &dl) != 0 && dl.dli_fbase != nullptr) {
    g_fault_offset = pc - reinterpret_cast<uintptr_t>(dl.dli_fbase);
  }
  std::ostringstream out;
  out << current_thread_text() << ": " << signal_text(sig, info->si_code);
  if (sig == SIGSEGV || sig == SIGBUS) {
    const std::string what = describe_address(info->si_addr);
    out << " at " << info->si_addr << (what.empty() ? "" : " (" + what + ")");
  }
  report(out.str());
  siglongjmp(g_jump, 1);
}

const int kSignals[] = {SIGSEGV, SIGBUS, SIGILL, SIGFPE};

}  // namespace

const char* kind_text(MemoryKind kind) {
  switch (kind) {
    case MemoryKind::kInput:
      return "input";
    case MemoryKind::kOutput:
      return "output";
    case MemoryKind::kWorkspace:
      return "workspace";
    case MemoryKind::kInPlace:
      return "input updated in place";
    default:
      return "shared memory";
  }
}

void* guarded_alloc(const char* name, size_t bytes, size_t align_mod, bool flush_start, MemoryKind kind,
                    int slot) {
  Arena& a = arena();
  if (a.base == nullptr) return nullptr;
  const size_t page = page_size();
  const size_t data_pages = (bytes + 32 + page - 1) / page;
  const size_t first = take_pages(a, data_pages + 2);
  if (first >= a.pages) return nullptr;
  char* const map = a.base + first * page;
  if (mprotect(map + page, data_pages * page, PROT_READ | PROT_WRITE) != 0) {
    give_pages(a, first, data_pages + 2);
    return nullptr;
  }
  Region r;
  r.map = map;
  r.map_pages = data_pages + 2;
  r.begin = map + page;
  r.end = r.begin + data_pages * page;
  r.bytes = bytes;
  r.name = name;
  r.kind = kind;
  r.slot = slot;
  align_mod %= 16;
  if (flush_start) {
    r.user = r.begin + align_mod;
  } else {
    r.user = r.end - bytes;
    r.user -= (reinterpret_cast<uintptr_t>(r.user) - align_mod) & 15u;
  }
  std::memset(r.begin, kCanary, static_cast<size_t>(r.end - r.begin));
  if (kind == MemoryKind::kOutput || kind == MemoryKind::kWorkspace || kind == MemoryKind::kInPlace) {
    r.written.assign(bytes, 0);
    r.writer.assign((bytes + 1) / 2, 0);
  }
  int32_t id;
  if (!a.free_ids.empty()) {
    id = a.free_ids.back();
    a.free_ids.pop_back();
    a.regions[id] = std::move(r);
  } else {
    id = static_cast<int32_t>(a.regions.size());
    a.regions.push_back(std::move(r));
  }
  for (size_t p = first; p < first + data_pages + 2; ++p) a.page_region[p] = id + 1;
  a.by_user[a.regions[id].user] = id;
  return a.regions[id].user;
}

Region* region_at(const void* address) {
  Arena& a = arena();
  const uintptr_t offset = reinterpret_cast<uintptr_t>(address) - reinterpret_cast<uintptr_t>(a.base);
  if (a.base == nullptr || offset >= kArenaBytes) return nullptr;
  const int32_t id = a.page_region[offset / page_size()];
  return id == 0 ? nullptr : &a.regions[id - 1];
}

uintptr_t arena_base() { return reinterpret_cast<uintptr_t>(arena().base); }
size_t arena_bytes() { return arena().base == nullptr ? 0 : kArenaBytes; }

Region* region_of_user(void* user) {
  Arena& a = arena();
  const auto it = a.by_user.find(static_cast<char*>(user));
  return it == a.by_user.end() ? nullptr : &a.regions[it->second];
}

bool guarded_intact(void* user) {
  const Region* r = region_of_user(user);
  if (r == nullptr) return false;
  for (const char* p = r->begin; p < r->user; ++p) {
    if (static_cast<unsigned char>(*p) != kCanary) return false;
  }
  for (const char* p = r->user + r->bytes; p < r->end; ++p) {
    if (static_cast<unsigned char>(*p) != kCanary) return false;
  }
  return true;
}

void guarded_free(void* user) {
  Arena& a = arena();
  const auto it = a.by_user.find(static_cast<char*>(user));
  if (it == a.by_user.end()) return;
  const int32_t id = it->second;
  a.by_user.erase(it);
  Region& r = a.regions[id];
  const size_t page = page_size();
  const size_t first = static_cast<size_t>(r.map - a.base) / page;
  // Give the memory back and make the pages inaccessible again: a later access
  // through a stale pointer faults instead of reading another tensor.
  mprotect(r.map, r.map_pages * page, PROT_NONE);
  madvise(r.map, r.map_pages * page, MADV_DONTNEED);
  for (size_t p = first; p < first + r.map_pages; ++p) a.page_region[p] = 0;
  give_pages(a, first, r.map_pages);
  r = Region{};
  a.free_ids.push_back(id);
}

std::string describe_address(const void* address) {
  const Region* r = region_at(address);
  if (r == nullptr) return "";
  const char* p = static_cast<const char*>(address);
  std::ostringstream out;
  if (p < r->user) {
    out << (r->user - p) << " bytes before the start of " << r->name;
  } else if (p >= r->user + r->bytes) {
    out << (p - (r->user + r->bytes)) << " bytes past the end of " << r->name << " (" << r->bytes
        << " bytes)";
  } else {
    out << "byte " << (p - r->user) << " of " << r->name;
  }
  return out.str();
}

uintptr_t last_fault_offset() { return g_fault_offset; }

bool run_guarded(const std::function<void()>& fn) {
  // The handler runs on its own stack, so a fiber that overflows its stack is reported too.
  static char* alt = nullptr;
  if (alt == nullptr) {
    alt = new char[1 << 16];
    stack_t ss{};
    ss.ss_sp = alt;
    ss.ss_size = 1 << 16;
    sigaltstack(&ss, nullptr);
  }
  struct sigaction ours {}, old[4];
  ours.sa_sigaction = on_fault;
  ours.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigemptyset(&ours.sa_mask);
  for (int k = 0; k < 4; ++k) sigaction(kSignals[k], &ours, &old[k]);
  bool ok = true;
  if (sigsetjmp(g_jump, 1) == 0) {
    g_armed = true;
    fn();
    g_armed = false;
  } else {
    ok = false;
  }
  for (int k = 0; k < 4; ++k) sigaction(kSignals[k], &old[k], nullptr);
  return ok;
}

}  // namespace emu
