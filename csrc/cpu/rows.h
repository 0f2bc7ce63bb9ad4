// Row primitives of the CPU kernels: moving rows between the storage dtypes and the
// compute type, and vectorised reductions and maps over compute-type buffers.
// Compiled once per CPU capability, like add_norm_kernel.h, which includes it.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>

#include "kernels/params.h"

namespace residual_fused::cpu::CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;
using c10::BFloat16;
using c10::Half;

template <typename acc>
constexpr int64_t kLanes = Vectorized<acc>::size();

// On the row loops: inline everything they call, ATen's conversions included (left
// to itself the compiler calls them per vector, with the vectors spilled to memory).
// The AVX2 build only: in the portable one it multiplies the compile time.
#if defined(__GNUC__) && defined(CPU_CAPABILITY_AVX2)
#define RESIDUAL_FUSED_FLATTEN __attribute__((flatten))
#else
#define RESIDUAL_FUSED_FLATTEN
#endif

// ---------------------------------------------------------------------------------
// Rows between storage dtypes and the compute type. Two compute vectors per step:
// that is one Vectorized<BFloat16> (or Half), which ATen converts as a unit.

template <typename acc, typename T>
constexpr bool kAtenConverts =
    std::is_same_v<acc, float> && (std::is_same_v<T, BFloat16> || std::is_same_v<T, Half>);

template <typename acc, typename T>
C10_ALWAYS_INLINE void load2(const T* src, Vectorized<acc>& lo, Vectorized<acc>& hi) {
  constexpr int64_t n = kLanes<acc>;
  if constexpr (std::is_same_v<T, acc>) {
    lo = Vectorized<acc>::loadu(src);
    hi = Vectorized<acc>::loadu(src + n);
  } else if constexpr (kAtenConverts<acc, T>) {
    at::vec::load_to_float<T>(src, lo, hi);
  } else {  // fp32 <-> fp64 and fp16/bf16 -> fp64: rare mixes, converted one by one
    acc tmp[2 * n];
    for (int64_t i = 0; i < 2 * n; ++i) tmp[i] = static_cast<acc>(src[i]);
    lo = Vectorized<acc>::loadu(tmp);
    hi = Vectorized<acc>::loadu(tmp + n);
  }
}

// Non-temporal stores (AVX2 variant only): a large call's output rows go straight to
// memory instead of first reading each cache line for ownership, a third of an
// output's traffic, and they leave the caches to the inputs. `dst` must be 32-byte
// aligned; returns false (nothing stored) where this type pair has none.
template <typename acc, typename T>
C10_ALWAYS_INLINE bool stream2(T* dst, const Vectorized<acc>& lo, const Vectorized<acc>& hi) {
#ifdef CPU_CAPABILITY_AVX2
  if constexpr (std::is_same_v<T, float> && std::is_same_v<acc, float>) {
    _mm256_stream_ps(dst, lo);
    _mm256_stream_ps(dst + kLanes<acc>, hi);
    return true;
  } else if constexpr (std::is_same_v<T, double> && std::is_same_v<acc, double>) {
    _mm256_stream_pd(dst, lo);
    _mm256_stream_pd(dst + kLanes<acc>, hi);
    return true;
  } else if constexpr (kAtenConverts<acc, T>) {
    const __m256i packed = at::vec::convert_from_float<T>(lo, hi);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst), packed);
    return true;
  }
#endif
  (void)dst, (void)lo, (void)hi;
  return false;
}

// Orders a thread's non-temporal stores before whatever reads the outputs next.
inline void stream_fence() {
#ifdef CPU_CAPABILITY_AVX2
  _mm_sfence();
#endif
}

inline bool aligned32(const void* p) { return reinterpret_cast<uintptr_t>(p) % 32 == 0; }

// A compute-type value rounded to the storage type T, correctly (to nearest even).
// fp64 to fp16/bf16 goes through fp32 rounded to odd: rounding to nearest twice can
// land on the wrong side of a 16-bit tie, while an odd last fp32 bit keeps the fp64
// value's side of it (fp32 has more than two bits to spare over either 16-bit type).
template <typename T, typename acc>
C10_ALWAYS_INLINE T narrow(acc v) {
  if constexpr (std::is_same_v<acc, double> && (std::is_same_v<T, BFloat16> || std::is_same_v<T, Half>)) {
    float f = static_cast<float>(v);
    if (static_cast<double>(f) != v && std::isfinite(f)) {
      if (std::fabs(static_cast<double>(f)) > std::fabs(v)) f = std::nextafter(f, 0.0f);  // toward zero
      uint32_t bits;
      std::memcpy(&bits, &f, sizeof(bits));
      bits |= 1u;  // inexact: odd
      std::memcpy(&f, &bits, sizeof(bits));
    }
    return static_cast<T>(f);
  } else {
    return static_cast<T>(v);
  }
}

template <typename acc, typename T>
C10_ALWAYS_INLINE void store2(T* dst, const Vectorized<acc>& lo, const Vectorized<acc>& hi,
                   bool stream = false) {
  constexpr int64_t n = kLanes<acc>;
  if (stream && stream2<acc>(dst, lo, hi)) return;
  if constexpr (std::is_same_v<T, acc>) {
    lo.store(dst);
    hi.store(dst + n);
  } else if constexpr (kAtenConverts<acc, T>) {
    at::vec::convert_from_float<T>(lo, hi).store(dst);  // round to nearest even
  } else {
    acc tmp[2 * n];
    lo.store(tmp);
    hi.store(tmp + n);
    for (int64_t i = 0; i < 2 * n; ++i) dst[i] = narrow<T>(tmp[i]);
  }
}

// dst = src (kAdd: dst += src), n elements.
template <bool kAdd, typename acc, typename T>
RESIDUAL_FUSED_FLATTEN void load_row_t(const T* __restrict__ src, acc* __restrict__ dst, int64_t n) {
  constexpr int64_t step = 2 * kLanes<acc>;
  int64_t i = 0;
  for (; i + step <= n; i += step) {
    Vectorized<acc> lo, hi;
    load2<acc>(src + i, lo, hi);
    if constexpr (kAdd) {
      lo = lo + Vectorized<acc>::loadu(dst + i);
      hi = hi + Vectorized<acc>::loadu(dst + i + kLanes<acc>);
    }
    lo.store(dst + i);
    hi.store(dst + i + kLanes<acc>);
  }
  for (; i < n; ++i) {
    const acc v = static_cast<acc>(src[i]);
    dst[i] = kAdd ? dst[i] + v : v;
  }
}

// Steps of 2 * kLanes elements keep a 32-byte aligned row aligned for stream2.
template <typename acc, typename T>
RESIDUAL_FUSED_FLATTEN void store_row_t(const acc* __restrict__ src, T* __restrict__ dst, int64_t n, bool stream) {
  constexpr int64_t step = 2 * kLanes<acc>;
  stream = stream && aligned32(dst);
  int64_t i = 0;
  for (; i + step <= n; i += step) {
    store2<acc>(dst + i, Vectorized<acc>::loadu(src + i),
                Vectorized<acc>::loadu(src + i + kLanes<acc>), stream);
  }
  for (; i < n; ++i) dst[i] = narrow<T>(src[i]);
}

// Calls f with a value of the storage type `t` names. One switch per row and tensor,
// never per element.
template <typename F>
inline void visit(DType t, F&& f) {
  switch (t) {
    case DType::kFloat32:
      return f(float{});
    case DType::kFloat16:
      return f(Half{});
    case DType::kBFloat16:
      return f(BFloat16{});
    case DType::kFloat64:
      return f(double{});
  }
}

// The tag of an absent tensor (no residual, no residual_out gradient).
struct None {};

// visit() for an optional tensor: f(None{}) when `ptr` is null.
template <typename F>
inline void visit_optional(const void* ptr, DType t, F&& f) {
  if (ptr == nullptr) return f(None{});
  visit(t, f);
}

inline int64_t elem_size(DType t) {
  return t == DType::kFloat64 ? 8 : t == DType::kFloat32 ? 4 : 2;
}

// Row r of a [rows, hidden] tensor with a row stride in elements.
inline const void* row_of(const void* base, DType t, int64_t stride, int64_t r) {
  return static_cast<const char*>(base) + r * stride * elem_size(t);
}
inline void* row_of(void* base, DType t, int64_t stride, int64_t r) {
  return static_cast<char*>(base) + r * stride * elem_size(t);
}

template <bool kAdd, typename acc>
void load_row(DType t, const void* src, acc* dst, int64_t n) {
  visit(t, [&](auto tag) {
    load_row_t<kAdd>(static_cast<const decltype(tag)*>(src), dst, n);
  });
}

template <typename acc>
void store_row(DType t, const acc* src, void* dst, int64_t n, bool stream = false) {
  visit(t, [&](auto tag) { store_row_t(src, static_cast<decltype(tag)*>(dst), n, stream); });
}

// A [hidden] parameter in the compute type: the caller's memory when it already has
// that type, else a converted copy owned here.
template <typename acc>
struct Param {
  const acc* ptr = nullptr;
  std::unique_ptr<acc[]> copy;

  // offset (the weight's weight_offset) is added to each element in the compute type,
  // only when nonzero (a -0.0 element keeps its sign without one).
  Param(const void* p, DType t, int64_t n, double offset = 0.0) {
    if (p == nullptr) return;
    const acc off = static_cast<acc>(offset);
    if (off == acc(0) && ((std::is_same_v<acc, float> && t == DType::kFloat32) ||
                          (std::is_same_v<acc, double> && t == DType::kFloat64))) {
      ptr = static_cast<const acc*>(p);
      return;
    }
    copy.reset(new acc[n]);
    load_row<false>(t, p, copy.get(), n);
    if (off != acc(0)) {
      for (int64_t i = 0; i < n; ++i) copy[i] += off;
    }
    ptr = copy.get();
  }
};

// ---------------------------------------------------------------------------------
// Row math on compute-type buffers. Sums use four vector accumulators (a fixed
// order, so results are reproducible) to hide the add latency.

template <typename acc, typename F>
acc reduce_row(const acc* a, int64_t n, F term) {
  using V = Vectorized<acc>;
  constexpr int64_t L = kLanes<acc>;
  V s0(acc(0)), s1(acc(0)), s2(acc(0)), s3(acc(0));
  int64_t i = 0;
  for (; i + 4 * L <= n; i += 4 * L) {
    s0 = s0 + term(V::loadu(a + i), i);
    s1 = s1 + term(V::loadu(a + i + L), i + L);
    s2 = s2 + term(V::loadu(a + i + 2 * L), i + 2 * L);
    s3 = s3 + term(V::loadu(a + i + 3 * L), i + 3 * L);
  }
  for (; i + L <= n; i += L) s0 = s0 + term(V::loadu(a + i), i);
  acc lanes[L];
  ((s0 + s1) + (s2 + s3)).store(lanes);
  acc total = 0;
  for (int64_t l = 0; l < L; ++l) total += lanes[l];
  if (i < n) {  // the tail, through the same vector code on a zero-padded copy
    acc pad_a[L] = {};
    std::memcpy(pad_a, a + i, (n - i) * sizeof(acc));
    const V t = term(V::loadu(pad_a), i);
    t.store(lanes);
    for (int64_t l = 0; l < n - i; ++l) total += lanes[l];
  }
  return total;
}

// Applies v = f(v, i) to every element of a, vectorised, with a scalar tail.
template <typename acc, typename F>
void map_row(acc* a, int64_t n, F f) {
  using V = Vectorized<acc>;
  constexpr int64_t L = kLanes<acc>;
  int64_t i = 0;
  for (; i + L <= n; i += L) f(V::loadu(a + i), i).store(a + i);
  if (i < n) {
    acc pad[L] = {};
    std::memcpy(pad, a + i, (n - i) * sizeof(acc));
    f(V::loadu(pad), i).store(pad);
    std::memcpy(a + i, pad, (n - i) * sizeof(acc));
  }
}

// Loads a parameter's lanes at column i; past the end (the tail) reads a padded copy.
template <typename acc>
C10_ALWAYS_INLINE Vectorized<acc> lanes_at(const acc* p, int64_t i, int64_t n) {
  constexpr int64_t L = kLanes<acc>;
  if (i + L <= n) return Vectorized<acc>::loadu(p + i);
  acc pad[L] = {};
  std::memcpy(pad, p + i, (n - i) * sizeof(acc));
  return Vectorized<acc>::loadu(pad);
}

}  // namespace
}  // namespace residual_fused::cpu::CPU_CAPABILITY
