// Kernel variants: the launch shapes the library can run, chosen per call without a
// rebuild. A variant is a point of a small space of run-time choices over the kernels
// already compiled (no instantiation is added for it, so the build time does not grow):
//
//   family        rows (one CTA per row group, cluster of 1), staged (forward rows kept
//                 in shared memory), cluster (a row split across a thread-block
//                 cluster, sm_90), streamed (any size, three passes over the row)
//   per_thread    elements per thread of the vectorised rows and cluster kernels: 16
//                 or 32 (2 or 4 vectors of 8); the rows kernels hold a row of at most
//                 512 x per_thread columns, a cluster CTA a slice of that many
//   target_block  rows kernels: the threads per CTA aimed for when a row needs fewer
//                 (rows per CTA = target_block / threads per row; at most 512, or 1024
//                 for element-wise rows)
//   ctas_per_sm   persistent grid: at most this many CTAs per SM (0: as many as fit)
//   cluster       cluster kernels: CTAs per cluster (0: the fewest whose slices hold
//                 the row; more split it finer, each slice at least 4096 columns)
//   reduce        backward: how the per-CTA weight-gradient partials are summed:
//                 columns (a thread per column) or sliced (a warp per 32 columns,
//                 16 row slices); auto picks columns for 32 partial rows or fewer
//   stages        rows kernels: 1, each row's loads go straight to registers; 2, the
//                 next rows are copied into a two-stage shared-memory ring while this
//                 one is computed (ring.cuh; 16-byte vectors, and in the backward 16
//                 elements per thread); 0: the rule's choice (1)
//
// Choices that would need more instantiations (launch bounds, deeper rings, the
// fused weight-gradient reduction) are not in the space: each multiplies the build.
//
// How a call's variant is chosen (dispatch.cu): a tuning override if one is set (a
// call it cannot run is refused, never run another way); else the measured table of
// this GPU (tuned_table.h) if it has an entry that can run the call; else the
// documented rule. Not part of the public API: the override exists for bench/gpu_tune.py.
//
// Text form (the same in C++, Python and the table): "rule", or a family followed by
// the choices that differ from 0/auto, e.g. "rows:pt=32,tb=512,cps=2",
// "cluster:pt=16,cs=4", "streamed", "rows:red=columns", "rows:pt=16,st=2".
#pragma once

#include <cstdint>
#include <string>

namespace residual_fused {

enum class Family : int8_t { kRule = 0, kRows = 1, kStaged = 2, kCluster = 3, kStreamed = 4 };
enum class Reduce : int8_t { kAuto = 0, kColumns = 1, kSliced = 2 };
enum class Direction : int8_t { kFwd = 0, kBwd = 1 };

struct Variant {
  Family family = Family::kRule;  // kRule: the documented rule decides everything
  int per_thread = 0;             // 16 or 32; 0: the rule's choice for the hidden size
  int target_block = 0;           // rows kernels; 0: the family's default
  int ctas_per_sm = 0;            // persistent grid cap per SM; 0: as many as fit
  int cluster = 0;                // cluster kernels; 0: the fewest CTAs that hold the row
  Reduce reduce = Reduce::kAuto;  // backward weight-gradient reduction
  int stages = 0;                 // rows kernels: 1 or 2 ring stages; 0: the rule's choice
};

inline bool operator==(const Variant& a, const Variant& b) {
  return a.family == b.family && a.per_thread == b.per_thread && a.target_block == b.target_block &&
         a.ctas_per_sm == b.ctas_per_sm && a.cluster == b.cluster && a.reduce == b.reduce &&
         a.stages == b.stages;
}

// Parses the text form; on failure returns false and says why in *error.
bool parse_variant(const std::string& text, Variant* out, std::string* error);
// The text form of v (parse_variant(variant_name(v)) == v).
std::string variant_name(const Variant& v);

// The tuning override of one direction: `text` empty clears it. Returns false (and
// changes nothing) when the text does not parse; *error says why.
bool set_variant_override(Direction d, const std::string& text, std::string* error);
// The override of d into *out; false when none is set. The first call reads
// RESIDUAL_FUSED_VARIANT ("<variant>" for both directions, or "fwd=<v>;bwd=<v>").
bool variant_override(Direction d, Variant* out);
// Whether RESIDUAL_FUSED_VARIANT was refused (it does not parse), and why: every
// launch then fails with that reason rather than run something the user did not ask
// for. One relaxed load when it was not.
bool variant_env_error(std::string* why);
// What the last launch of d ran (its plan's variant, every choice filled in; the
// process's last, whichever thread launched it), and its text form ("" before the
// first launch).
void record_variant(Direction d, const Variant& v);
std::string last_variant(Direction d);

// The dtype mixes a table entry is tuned for: the compiled fast mixes, in the order of
// mixes.h's FastMixes (any other mix is never in the table).
constexpr int kTunedMixes = 5;  // bf16, fp16, fp32, bf16-fp32res, fp16-fp32res

// What a variant is tuned for, and one entry of the measured table (tuned_table.h,
// generated by bench/make_table.py): hidden sizes hidden_lo..hidden_hi of one
// (device, direction, norm, form, mix).
struct TunedKey {
  Direction direction;
  bool is_rms_norm;
  bool prenorm;  // forward: residual_out stored; backward: d(residual_out) given
  int8_t mix;    // index in FastMixes, or -1 for a mix the table never lists
  int hidden;
};
struct TunedEntry {
  const char* device;  // the GPU's name, as cudaGetDeviceProperties reports it
  Direction direction;
  bool is_rms_norm;
  bool prenorm;
  int8_t mix;
  int hidden_lo, hidden_hi;
  const char* variant;  // text form, parsed once on first use (one that does not parse is never used)
};

// The measured variant for `key` on the current device (matched by its name), or
// nullptr where the table has none or says "rule" (parsed once, never freed).
const Variant* tuned_variant(const TunedKey& key);

}  // namespace residual_fused
