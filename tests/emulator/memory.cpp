// Guarded memory and the fault handler.
//
// Every tensor a kernel sees (inputs, outputs, workspace, dynamic shared memory) lives
// in its own mapping with an inaccessible page on each side, its bytes flush against
// one of them, so a read or write past the end (or before the start) faults at the
// first byte. The handler turns a fault, or a trap from the UndefinedBehaviorSanitizer
// (misaligned vector access, index out of bounds), into a report naming the kernel,
// block, thread, the allocation and how far outside it the access was, then unwinds
// to the launch, which fails instead of taking the test process down.
#include <dlfcn.h>
#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <csetjmp>
#include <cstring>
#include <map>
#include <sstream>

#include "emulator.h"

namespace emu {
namespace {

constexpr unsigned char kCanary = 0xA5;

struct Allocation {
  char* map;
  size_t map_bytes;
  char* begin;  // first accessible byte
  char* end;    // one past the last accessible byte
  char* user;
  size_t bytes;
  std::string name;
};

std::map<char*, Allocation>& allocations() {
  static std::map<char*, Allocation> table;
  return table;
}

size_t page_size() { return static_cast<size_t>(sysconf(_SC_PAGESIZE)); }

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

void* guarded_alloc(const char* name, size_t bytes, size_t align_mod, bool flush_start) {
  const size_t page = page_size();
  const size_t data = ((bytes + 32 + page - 1) / page) * page;
  const size_t total = data + 2 * page;
  void* m = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (m == MAP_FAILED) return nullptr;
  char* map = static_cast<char*>(m);
  mprotect(map, page, PROT_NONE);
  mprotect(map + page + data, page, PROT_NONE);
  Allocation a{map, total, map + page, map + page + data, nullptr, bytes, name};
  align_mod %= 16;
  if (flush_start) {
    a.user = a.begin + align_mod;
  } else {
    a.user = a.end - bytes;
    a.user -= (reinterpret_cast<uintptr_t>(a.user) - align_mod) & 15u;
  }
  std::memset(a.begin, kCanary, static_cast<size_t>(a.end - a.begin));
  allocations()[a.user] = a;
  return a.user;
}

bool guarded_intact(void* user) {
  const auto it = allocations().find(static_cast<char*>(user));
  if (it == allocations().end()) return false;
  const Allocation& a = it->second;
  for (const char* p = a.begin; p < a.user; ++p) {
    if (static_cast<unsigned char>(*p) != kCanary) return false;
  }
  for (const char* p = a.user + a.bytes; p < a.end; ++p) {
    if (static_cast<unsigned char>(*p) != kCanary) return false;
  }
  return true;
}

void guarded_free(void* user) {
  const auto it = allocations().find(static_cast<char*>(user));
  if (it == allocations().end()) return;
  munmap(it->second.map, it->second.map_bytes);
  allocations().erase(it);
}

std::string describe_address(const void* address) {
  const char* p = static_cast<const char*>(address);
  for (const auto& [user, a] : allocations()) {
    if (p < a.map || p >= a.map + a.map_bytes) continue;
    std::ostringstream out;
    if (p < a.begin || p < a.user) {
      out << (a.user - p) << " bytes before the start of " << a.name;
    } else if (p >= a.user + a.bytes) {
      out << (p - (a.user + a.bytes)) << " bytes past the end of " << a.name << " ("
          << a.bytes << " bytes)";
    } else {
      out << "byte " << (p - a.user) << " of " << a.name;
    }
    return out.str();
  }
  return "";
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
