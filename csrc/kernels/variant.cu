// Variants (variant.h): their text form, the tuning override and the measured table.
// Host code only.
#include "variant.h"

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <tuple>
#include <utility>
#include <vector>

#include <cuda_runtime.h>

#include "add_norm.h"
#include "tuned_table.h"

namespace residual_fused {
namespace {

const char* const kFamilyNames[] = {"rule", "rows", "staged", "cluster", "streamed"};
const char* const kReduceNames[] = {"auto", "columns", "sliced"};

// A decimal in [lo, hi] (lo >= 1), written without leading zeros: one text per variant.
bool parse_int(const std::string& text, int lo, int hi, int* out) {
  if (text.empty() || text.size() > 7 || text.rfind("0", 0) == 0 ||
      text.find_first_not_of("0123456789") != std::string::npos) {
    return false;
  }
  const int v = std::atoi(text.c_str());
  if (v < lo || v > hi) return false;
  *out = v;
  return true;
}

// One "key=value" choice into v; false with *error set when it is not a valid choice.
bool parse_choice(const std::string& item, Variant* v, std::string* error) {
  const size_t eq = item.find('=');
  const std::string key = item.substr(0, eq), value = eq == std::string::npos ? "" : item.substr(eq + 1);
  bool ok = false;
  if (key == "pt") {
    ok = parse_int(value, 16, 32, &v->per_thread) && (v->per_thread == 16 || v->per_thread == 32);
    if (!ok) *error = "pt (elements per thread) must be 16 or 32, got '" + value + "'";
  } else if (key == "tb") {
    ok = parse_int(value, 32, 1024, &v->target_block) && v->target_block % 32 == 0;
    if (!ok) *error = "tb (target threads per CTA) must be a multiple of 32 in [32, 1024], got '" + value + "'";
  } else if (key == "cps") {
    ok = parse_int(value, 1, 32, &v->ctas_per_sm);
    if (!ok) *error = "cps (CTAs per SM) must be in [1, 32], got '" + value + "'";
  } else if (key == "cs") {
    ok = parse_int(value, 1, 16, &v->cluster);
    if (!ok) *error = "cs (CTAs per cluster) must be in [1, 16], got '" + value + "'";
  } else if (key == "red") {
    for (int r = 1; r < 3; ++r) {
      if (value == kReduceNames[r]) {
        v->reduce = static_cast<Reduce>(r);
        ok = true;
      }
    }
    if (!ok) *error = "red (weight-gradient reduction) must be columns or sliced, got '" + value + "'";
  } else if (key == "st") {
    ok = parse_int(value, 1, 2, &v->stages);
    if (!ok) *error = "st (ring stages) must be 1 or 2, got '" + value + "'";
  } else {
    *error = "unknown choice '" + key + "' (pt, tb, cps, cs, red or st)";
  }
  return ok;
}

}  // namespace

bool parse_variant(const std::string& text, Variant* out, std::string* error) {
  Variant v;
  const size_t colon = text.find(':');
  const std::string family = text.substr(0, colon);
  int f = 0;
  while (f < 5 && family != kFamilyNames[f]) ++f;
  if (f == 5) {
    *error = "unknown variant family '" + family + "' (rule, rows, staged, cluster or streamed)";
    return false;
  }
  v.family = static_cast<Family>(f);
  if (colon != std::string::npos) {
    if (v.family == Family::kRule) {
      *error = "the variant 'rule' takes no choices";
      return false;
    }
    std::string seen = ",";  // the keys given so far: each once
    size_t start = colon + 1;
    while (true) {
      const size_t comma = text.find(',', start);
      const std::string item = text.substr(start, comma - start);
      const std::string key = item.substr(0, item.find('='));
      if (seen.find("," + key + ",") != std::string::npos) {
        *error = "the choice '" + key + "' is given twice";
        return false;
      }
      seen += key + ",";
      if (!parse_choice(item, &v, error)) return false;
      if (comma == std::string::npos) break;
      start = comma + 1;
    }
  }
  *out = v;
  return true;
}

std::string variant_name(const Variant& v) {
  std::string name = kFamilyNames[static_cast<int>(v.family)];
  std::string choices;
  const auto add = [&](const char* key, const std::string& value) {
    choices += (choices.empty() ? ":" : ",") + std::string(key) + "=" + value;
  };
  if (v.per_thread != 0) add("pt", std::to_string(v.per_thread));
  if (v.target_block != 0) add("tb", std::to_string(v.target_block));
  if (v.ctas_per_sm != 0) add("cps", std::to_string(v.ctas_per_sm));
  if (v.cluster != 0) add("cs", std::to_string(v.cluster));
  if (v.reduce != Reduce::kAuto) add("red", kReduceNames[static_cast<int>(v.reduce)]);
  if (v.stages != 0) add("st", std::to_string(v.stages));
  return name + choices;
}

namespace {

// The override and the last launch of each direction. `set` is read on every call
// without the lock (one relaxed load when no override is set).
struct VariantState {
  std::mutex mutex;
  std::atomic<bool> set[2] = {{false}, {false}};
  Variant forced[2];
  // The last launch's variant of each direction, packed (pack_variant; 0: none yet):
  // written on every launch without a lock.
  std::atomic<uint64_t> last[2] = {{0}, {0}};
  std::atomic<bool> env_failed{false};  // RESIDUAL_FUSED_VARIANT was refused; env_error says why
  std::string env_error;

  VariantState() { apply_environment(std::getenv("RESIDUAL_FUSED_VARIANT")); }

  // RESIDUAL_FUSED_VARIANT's value (null or empty: none): one variant for both
  // directions, or "fwd=<v>;bwd=<v>" (either part may be left out). A value that
  // does not parse is kept as env_error, which every call then reports: a setting the
  // user made is never ignored.
  void apply_environment(const char* value) {
    set[0] = set[1] = false;
    env_failed = false;
    env_error.clear();
    if (value == nullptr || *value == '\0') return;
    std::string error;
    if (!apply_setting(value, &error)) {
      set[0] = set[1] = false;
      env_error = std::string("RESIDUAL_FUSED_VARIANT='").append(value).append("': ").append(error);
      env_failed = true;
    }
  }

  bool apply_setting(const std::string& text, std::string* error) {
    if (text.rfind("fwd=", 0) != 0 && text.rfind("bwd=", 0) != 0) {
      Variant v;
      if (!parse_variant(text, &v, error)) return false;
      forced[0] = forced[1] = v;
      set[0] = set[1] = true;
      return true;
    }
    size_t start = 0;
    while (true) {
      const size_t semi = text.find(';', start);
      const std::string item = text.substr(start, semi - start);
      const int d = item.rfind("fwd=", 0) == 0 ? 0 : item.rfind("bwd=", 0) == 0 ? 1 : -1;
      if (d < 0) {
        *error = "expected '<variant>' or 'fwd=<variant>;bwd=<variant>', got '" + item + "'";
        return false;
      }
      if (set[d]) {
        *error = std::string(d == 0 ? "fwd" : "bwd") + " is given twice";
        return false;
      }
      if (!parse_variant(item.substr(4), &forced[d], error)) return false;
      set[d] = true;
      if (semi == std::string::npos) return true;
      start = semi + 1;
    }
  }
};

VariantState& state() {
  static VariantState s;
  return s;
}

}  // namespace

bool set_variant_override(Direction d, const std::string& text, std::string* error) {
  VariantState& s = state();
  const int i = static_cast<int>(d);
  Variant v;
  if (!text.empty() && !parse_variant(text, &v, error)) return false;
  std::lock_guard<std::mutex> lock(s.mutex);
  s.forced[i] = v;
  s.set[i].store(!text.empty(), std::memory_order_relaxed);
  return true;
}

bool variant_override(Direction d, Variant* out) {
  VariantState& s = state();
  const int i = static_cast<int>(d);
  if (!s.set[i].load(std::memory_order_relaxed)) return false;
  std::lock_guard<std::mutex> lock(s.mutex);
  *out = s.forced[i];
  return s.set[i].load(std::memory_order_relaxed);
}

bool variant_env_error(std::string* why) {
  VariantState& s = state();
  if (!s.env_failed.load(std::memory_order_relaxed)) return false;
  std::lock_guard<std::mutex> lock(s.mutex);
  *why = s.env_error;
  return true;
}

namespace {

// A variant in 64 bits, for the lock-free record of the last launch (bit 56: present;
// stages in bits 57-59).
uint64_t pack_variant(const Variant& v) {
  return static_cast<uint64_t>(v.family) | static_cast<uint64_t>(v.per_thread) << 8 |
         static_cast<uint64_t>(v.target_block) << 16 | static_cast<uint64_t>(v.ctas_per_sm) << 32 |
         static_cast<uint64_t>(v.cluster) << 40 | static_cast<uint64_t>(v.reduce) << 48 | uint64_t{1} << 56 |
         static_cast<uint64_t>(v.stages) << 57;
}

Variant unpack_variant(uint64_t bits) {
  Variant v;
  v.family = static_cast<Family>(bits & 0xff);
  v.per_thread = static_cast<int>(bits >> 8 & 0xff);
  v.target_block = static_cast<int>(bits >> 16 & 0xffff);
  v.ctas_per_sm = static_cast<int>(bits >> 32 & 0xff);
  v.cluster = static_cast<int>(bits >> 40 & 0xff);
  v.reduce = static_cast<Reduce>(bits >> 48 & 0xff);
  v.stages = static_cast<int>(bits >> 57 & 0x7);
  return v;
}

}  // namespace

void record_variant(Direction d, const Variant& v) {
  state().last[static_cast<int>(d)].store(pack_variant(v), std::memory_order_relaxed);
}

std::string last_variant(Direction d) {
  const uint64_t bits = state().last[static_cast<int>(d)].load(std::memory_order_relaxed);
  return bits == 0 ? std::string() : variant_name(unpack_variant(bits));
}

namespace {

constexpr int kTunedTableSize = static_cast<int>(sizeof(kTunedTable) / sizeof(kTunedTable[0]));
constexpr int kMaxTunedDevices = 64;

// The entries of `name`: the table is sorted by device first, so they are contiguous.
std::pair<int, int> device_range(const char* name) {
  int begin = 0;
  while (begin < kTunedTableSize && std::strcmp(kTunedTable[begin].device, name) != 0) ++begin;
  int end = begin;
  while (end < kTunedTableSize && std::strcmp(kTunedTable[end].device, name) == 0) ++end;
  return {begin, end};
}

// The table's entries for the current device, found by its name once per device
// (benign race: every writer stores the same value).
std::pair<int, int> current_device_range() {
  // (begin + 1) << 32 | end in one atomic, so a reader sees both or neither.
  static std::atomic<int64_t> cache[kMaxTunedDevices];
  int device = 0;
  cudaGetDevice(&device);  // as dispatch.cu: every call after a failure here fails anyway
  const bool cached = device >= 0 && device < kMaxTunedDevices;
  const int64_t hit = cached ? cache[device].load(std::memory_order_relaxed) : 0;
  if (hit != 0) return {static_cast<int>(hit >> 32) - 1, static_cast<int>(hit & 0xffffffff)};
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, device) != cudaSuccess) {
    cudaGetLastError();
    return {0, 0};  // not cached: the next call asks again
  }
  const std::pair<int, int> range = device_range(prop.name);
  if (cached) cache[device].store(int64_t{range.first + 1} << 32 | range.second, std::memory_order_relaxed);
  return range;
}

std::tuple<int, int, int, int, int> sort_key(const TunedEntry& e) {
  return {static_cast<int>(e.direction), e.is_rms_norm, e.prenorm, e.mix, e.hidden_lo};
}

}  // namespace

const Variant* tuned_variant(const TunedKey& key) {
  if (key.mix < 0) return nullptr;
  const std::pair<int, int> range = current_device_range();
  const TunedEntry* first = kTunedTable + range.first;
  const TunedEntry* last = kTunedTable + range.second;
  const std::tuple<int, int, int, int, int> want{static_cast<int>(key.direction), key.is_rms_norm, key.prenorm,
                                                 key.mix, key.hidden};
  // The last entry whose (…, hidden_lo) is at most the key's: the bucket holding hidden.
  const TunedEntry* it = std::upper_bound(first, last, want, [](const std::tuple<int, int, int, int, int>& k,
                                                                const TunedEntry& e) { return k < sort_key(e); });
  if (it == first) return nullptr;
  --it;
  if (it->direction != key.direction || it->is_rms_norm != key.is_rms_norm || it->prenorm != key.prenorm ||
      it->mix != key.mix || key.hidden > it->hidden_hi) {
    return nullptr;
  }
  // The entries' variants, parsed once (tests/test_tuned_table.py checks that all parse).
  static const std::vector<std::pair<bool, Variant>> parsed = [] {
    std::vector<std::pair<bool, Variant>> all(kTunedTableSize);
    std::string error;
    for (int i = 0; i < kTunedTableSize; ++i) all[i].first = parse_variant(kTunedTable[i].variant, &all[i].second, &error);
    return all;
  }();
  const std::pair<bool, Variant>& entry = parsed[it - kTunedTable];
  // A "rule" entry is the rule itself: no variant to impose.
  return entry.first && entry.second.family != Family::kRule ? &entry.second : nullptr;
}

// The tuning entry points, for ctypes (bench/variants.py; tools/cuda_emulator.py):
// plain C symbols of whichever library holds the CUDA kernels. Not a public API.
namespace {

int copy_text(const std::string& text, char* out, int len) {
  if (out != nullptr && len > 0) std::snprintf(out, static_cast<size_t>(len), "%s", text.c_str());
  return static_cast<int>(text.size());
}

}  // namespace
}  // namespace residual_fused

// Exported whatever the build's default visibility: bench/variants.py finds them by name.
#define RESIDUAL_FUSED_EXPORT __attribute__((visibility("default")))

extern "C" {

// Sets (text non-empty) or clears (empty) the override of direction 0 (forward) or 1
// (backward). Returns 0, or -1 with why in `error` (text that does not parse).
RESIDUAL_FUSED_EXPORT int residual_fused_set_variant(int direction, const char* text, char* error, int error_len) {
  using namespace residual_fused;
  std::string why;
  if (direction != 0 && direction != 1) why = "direction must be 0 (forward) or 1 (backward)";
  else if (set_variant_override(static_cast<Direction>(direction), text == nullptr ? "" : text, &why)) return 0;
  copy_text(why, error, error_len);
  return -1;
}

// The text of the variant direction's last launch ran, into out; returns its length.
RESIDUAL_FUSED_EXPORT int residual_fused_last_variant(int direction, char* out, int len) {
  using namespace residual_fused;
  return copy_text(direction == 0 || direction == 1 ? last_variant(static_cast<Direction>(direction)) : "", out,
                   len);
}

// Why this thread's last launch was refused, or "".
RESIDUAL_FUSED_EXPORT const char* residual_fused_last_refusal() { return residual_fused::last_refusal(); }

// Applies `value` as if RESIDUAL_FUSED_VARIANT held it (null: unset), replacing both
// directions' overrides; what the variable gives the first call (tests use it).
RESIDUAL_FUSED_EXPORT void residual_fused_apply_variant_environment(const char* value) {
  residual_fused::VariantState& s = residual_fused::state();
  std::lock_guard<std::mutex> lock(s.mutex);
  s.apply_environment(value);
}

// The run the measured table came from ("" where none was measured).
RESIDUAL_FUSED_EXPORT const char* residual_fused_tuned_table_source() { return residual_fused::kTunedTableSource; }

}  // extern "C"
