// Every load and store the kernels make, checked where the GPU tools would check it.
//
// The kernel sources are compiled with GCC's AddressSanitizer instrumentation in call
// mode (--param asan-instrumentation-with-call-threshold=0) and without its runtime:
// each access becomes a call of __asan_load<N>/__asan_store<N>, defined here. Stack
// and global instrumentation are off, so nothing else of the runtime is needed.
// Accesses outside guarded memory and the __shared__ arrays (locals, the emulator's
// own variables) return after two comparisons.
//
// Global memory (inputs, outputs, workspace):
//   - the access lies wholly inside its allocation (the guard pages only catch what
//     reaches them; this also catches the slack between the bytes and the page);
//   - no write to an input: a kernel never modifies what the caller passed;
//   - an input updated in place (the in-place forms) is read only where no kernel has
//     written it yet: a read after the write would take the output for the input;
//   - no read of output or workspace bytes that no kernel has written yet (initcheck);
//   - no byte written or read by one CTA after another CTA of the same launch wrote
//     it: nothing orders CTAs within a launch (a race between CTAs).
// Shared memory: scheduler.cpp's check_shared (bounds, reads of bytes never written,
// cp.async destinations touched before their wait, races between threads without a
// barrier between them, a peer's memory used after it exited).
#include <cstdint>
#include <sstream>

#include "emulator.h"

namespace emu {
namespace {

const uintptr_t g_arena_lo = arena_base();
const uintptr_t g_arena_size = arena_bytes();
uintptr_t g_static_lo = 0;
uintptr_t g_static_span = 0;

std::string access_text(bool write, size_t n) {
  std::ostringstream out;
  out << (write ? "writes " : "reads ") << n << " byte" << (n == 1 ? "" : "s");
  return out.str();
}

// Outputs and workspace: initialised bytes and writers, per 2-byte granule (no element
// is narrower, so neighbouring elements written by different CTAs never share one).
void check_global(Region& r, size_t offset, size_t n, bool write) {
  const uint64_t launch = launch_sequence();
  const uint64_t me = (launch << 32) | static_cast<uint64_t>(current_block() + 1);
  for (size_t k = offset / 2; k <= (offset + n - 1) / 2; ++k) {
    const uint64_t last = r.writer[k];
    if (last != 0 && (last >> 32) == launch && last != me) {
      std::ostringstream out;
      out << access_text(write, n) << " at byte " << offset << " of " << r.name << ", which block "
          << static_cast<int64_t>(last & 0xffffffffu) - 1
          << " wrote in this launch: nothing orders the CTAs of a launch (a race between CTAs)";
      kernel_error(out.str());
    }
  }
  if (write) {
    for (size_t b = offset; b < offset + n; ++b) r.written[b] = 1;
    for (size_t k = offset / 2; k <= (offset + n - 1) / 2; ++k) r.writer[k] = me;
    return;
  }
  for (size_t b = offset; b < offset + n; ++b) {
    if (!r.written[b]) {
      std::ostringstream out;
      out << access_text(write, n) << " at byte " << offset << " of " << r.name << " (" << kind_text(r.kind)
          << "), whose byte " << b << " no kernel has written yet";
      kernel_error(out.str());
    }
  }
}

void check_arena(uintptr_t a, size_t n, bool write) {
  if (!in_kernel()) return;
  Region* r = region_at(reinterpret_cast<const void*>(a));
  if (r == nullptr) return;  // freed pages are inaccessible: the fault handler reports it
  const char* p = reinterpret_cast<const char*>(a);
  if (p < r->user || p + n > r->user + r->bytes) {
    const char* edge = p < r->user ? p : p + n - 1;  // the first byte outside
    kernel_error(access_text(write, n) + " at " + describe_address(p) + ": byte " +
                 describe_address(edge) + " is outside " + r->name);
  }
  switch (r->kind) {
    case MemoryKind::kShared:
      check_shared(*r, a, n, write);
      return;
    case MemoryKind::kInPlace:
      if (!write) {
        const size_t offset = static_cast<size_t>(p - r->user);
        for (size_t b = offset; b < offset + n; ++b) {
          if (r->written[b]) {
            std::ostringstream out;
            out << access_text(write, n) << " at byte " << offset << " of " << r->name
                << " (updated in place), whose byte " << b
                << " a kernel already overwrote: it would read the output in place of the input";
            kernel_error(out.str());
          }
        }
        return;
      }
      check_global(*r, static_cast<size_t>(p - r->user), n, write);
      return;
    case MemoryKind::kInput:
      if (write) {
        kernel_error(access_text(write, n) + " to the input " + r->name + " (" + describe_address(p) +
                     "): a kernel must never modify what the caller passed");
      }
      return;
    default:
      check_global(*r, static_cast<size_t>(p - r->user), n, write);
  }
}

inline void check(uintptr_t a, size_t n, bool write) {
  if (a - g_arena_lo < g_arena_size) {
    check_arena(a, n, write);
  } else if (a - g_static_lo < g_static_span) {
    if (in_kernel()) check_static_shared(a, n, write);
  }
}

}  // namespace

void set_static_range(uintptr_t lo, uintptr_t hi) {
  g_static_lo = lo;
  g_static_span = hi - lo;
}

bool all_written(void* user) {
  const Region* r = region_of_user(user);
  if (r == nullptr || r->written.size() != r->bytes) return true;  // not an output region
  for (uint8_t w : r->written) {
    if (!w) return false;
  }
  return true;
}

}  // namespace emu

// The instrumentation's entry points (the _noabort forms: -fsanitize-recover=address).
#define EMU_ACCESS_HOOKS(N)                                                                        \
  extern "C" __attribute__((visibility("default"))) void __asan_load##N##_noabort(uintptr_t a) {  \
    ::emu::check(a, N, false);                                                                     \
  }                                                                                                \
  extern "C" __attribute__((visibility("default"))) void __asan_store##N##_noabort(uintptr_t a) { \
    ::emu::check(a, N, true);                                                                      \
  }
EMU_ACCESS_HOOKS(1)
EMU_ACCESS_HOOKS(2)
EMU_ACCESS_HOOKS(4)
EMU_ACCESS_HOOKS(8)
EMU_ACCESS_HOOKS(16)
#undef EMU_ACCESS_HOOKS

extern "C" {
__attribute__((visibility("default"))) void __asan_loadN_noabort(uintptr_t a, size_t n) {
  if (n > 0) ::emu::check(a, n, false);
}
__attribute__((visibility("default"))) void __asan_storeN_noabort(uintptr_t a, size_t n) {
  if (n > 0) ::emu::check(a, n, true);
}
// Called by the instrumented objects' constructors; the checks need no set-up.
__attribute__((visibility("default"))) void __asan_init() {}
__attribute__((visibility("default"))) void __asan_version_mismatch_check_v8() {}
__attribute__((visibility("default"))) void __asan_handle_no_return() {}
}
