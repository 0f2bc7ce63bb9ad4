// The CPU kernels of both ops, compiled once per CPU capability (see kernels.h): the
// including file defines CPU_CAPABILITY (and CPU_CAPABILITY_AVX2) before any ATen
// header, so at::vec::Vectorized is the AVX2 one in kernel_avx2.cpp and the
// portable one in kernel_default.cpp.
//
// One idea: one pass over memory. Each row of each input is read once into a buffer
// of the calling thread in the compute type (float, or double for fp64 x), which
// stays in L1/L2 at transformer widths; the statistics and every output come from
// that buffer, and each output row is written once. The passes that touch memory
// also do the arithmetic (the sum while loading, the affine map while storing), so
// the loads and stores stream while the core computes. Rows are split over threads
// with at::parallel_for; small calls stay on the calling thread.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <utility>

#include "cpu/kernels.h"
#include "cpu/rows.h"
#include "kernels/args.h"

namespace residual_fused::cpu::CPU_CAPABILITY {
namespace {

template <typename T, typename acc>
C10_ALWAYS_INLINE acc scalar(const T* p, int64_t i) {
  if constexpr (std::is_same_v<T, None>) {
    return acc(0);
  } else {
    return static_cast<acc>(p[i]);
  }
}

// Whether a call that moves `bytes` writes its outputs with non-temporal stores: when
// its data outgrows a typical last-level cache (32 MiB), the outputs would leave the
// cache before anything reads them, and skipping their read-for-ownership saves a
// third of their traffic. Smaller calls keep their outputs in cache for the next op.
inline bool streams(int64_t bytes) {
  constexpr int64_t kStreamMinBytes = int64_t(32) << 20;
  return bytes >= kStreamMinBytes;
}

// Bytes per element column of every [rows, hidden] tensor p holds (params.h's lists).
template <class P>
int64_t column_bytes(const P& p) {
  int64_t bytes = 0;
  for (int i = 0; i < ArgsOf<P>::count; ++i) {
    const TensorArg& a = ArgsOf<P>::table[i];
    if (a.is_rows() && arg_ptr(p, a) != nullptr) bytes += elem_size(arg_dtype(p, a));
  }
  return bytes;
}

// The next row's inputs, fetched into cache while the current row's last pass runs.
// Rows are short streams (a few KB per tensor), too short for the hardware
// prefetchers to ramp up, so without this each row starts with a wait on memory.
struct NextRow {
  const char* ptr[3] = {nullptr, nullptr, nullptr};
  int64_t elem[3] = {0, 0, 0};

  void add(const void* p, DType t) {
    for (int k = 0; k < 3; ++k) {
      if (ptr[k] == nullptr) {
        ptr[k] = static_cast<const char*>(p);
        elem[k] = elem_size(t);
        return;
      }
    }
  }
  // The cache line holding element i of each tensor. Called once per step of
  // 2 * kLanes elements, at most one line of every tensor (fp64 read by the fp32
  // kernels, a rare mix, gets every other line).
  C10_ALWAYS_INLINE void fetch(int64_t i) const {
#if defined(__GNUC__)
    for (int k = 0; k < 3; ++k) {
      if (ptr[k]) __builtin_prefetch(ptr[k] + i * elem[k], 0, 3);
    }
#endif
  }
};

// ---------------------------------------------------------------------------------
// Forward

// s = x + r (r may be None); returns the sums of s and of s * s (one template for
// both norms keeps the instantiations, and the build, half as many).
template <typename acc, typename TX, typename TR>
RESIDUAL_FUSED_FLATTEN std::pair<acc, acc> load_sum(const TX* __restrict__ x,
                                                    const TR* __restrict__ r,
                                                    acc* __restrict__ s, int64_t n) {
  using V = Vectorized<acc>;
  constexpr int64_t L = kLanes<acc>;
  V sum_lo(acc(0)), sum_hi(acc(0)), sq_lo(acc(0)), sq_hi(acc(0));
  int64_t i = 0;
  for (; i + 2 * L <= n; i += 2 * L) {
    V lo, hi;
    load2<acc>(x + i, lo, hi);
    if constexpr (!std::is_same_v<TR, None>) {
      V r_lo, r_hi;
      load2<acc>(r + i, r_lo, r_hi);
      lo = lo + r_lo;
      hi = hi + r_hi;
    }
    lo.store(s + i);
    hi.store(s + i + L);
    sum_lo = sum_lo + lo;
    sum_hi = sum_hi + hi;
    sq_lo = sq_lo + lo * lo;
    sq_hi = sq_hi + hi * hi;
  }
  acc lanes[L], sq_lanes[L];
  (sum_lo + sum_hi).store(lanes);
  (sq_lo + sq_hi).store(sq_lanes);
  acc sum = 0, sq = 0;
  for (int64_t l = 0; l < L; ++l) {
    sum += lanes[l];
    sq += sq_lanes[l];
  }
  for (; i < n; ++i) {
    const acc v = scalar<TX, acc>(x, i) + scalar<TR, acc>(r, i);
    s[i] = v;
    sum += v;
    sq += v * v;
  }
  return {sum, sq};
}

// y = (s - mean) * rstd [* w] [+ b], rounded to y's dtype.
template <typename acc, typename TY>
RESIDUAL_FUSED_FLATTEN void affine_store(const acc* __restrict__ s, acc mean, acc rstd, const acc* __restrict__ w,
                  const acc* __restrict__ b, TY* __restrict__ y, int64_t n, bool stream,
                  const NextRow& next) {
  using V = Vectorized<acc>;
  constexpr int64_t L = kLanes<acc>;
  const V m(mean), rs(rstd);
  stream = stream && aligned32(y);
  int64_t i = 0;
  // The weight and bias tests are loop-invariant; the compiler unswitches them.
  for (; i + 2 * L <= n; i += 2 * L) {
    next.fetch(i);
    V lo = (V::loadu(s + i) - m) * rs;
    V hi = (V::loadu(s + i + L) - m) * rs;
    if (w) {
      lo = lo * V::loadu(w + i);
      hi = hi * V::loadu(w + i + L);
    }
    if (b) {
      lo = lo + V::loadu(b + i);
      hi = hi + V::loadu(b + i + L);
    }
    store2<acc>(y + i, lo, hi, stream);
  }
  for (; i < n; ++i) {
    acc v = (s[i] - mean) * rstd;
    if (w) v = v * w[i];
    if (b) v = v + b[i];
    y[i] = narrow<TY>(v);
  }
}

template <typename acc>
void fwd_rows(const AddNormFwdParams& p, const acc* w, const acc* b, bool stream,
              int64_t begin, int64_t end) {
  using V = Vectorized<acc>;
  const int64_t n = p.hidden;
  std::unique_ptr<acc[]> buffer(new acc[n]);
  acc* s = buffer.get();
  acc* rstd_out = static_cast<acc*>(p.rstd);  // null for the inference forms
  acc* mean_out = static_cast<acc*>(p.mean);  // null for RMSNorm
  const acc eps = static_cast<acc>(p.eps);
  for (int64_t r = begin; r < end; ++r) {
    const void* x_row = row_of(p.x, p.x_dtype, p.x_row_stride, r);
    const void* res_row =
        p.residual ? row_of(p.residual, p.residual_dtype, p.residual_row_stride, r) : nullptr;
    std::pair<acc, acc> sums;
    visit(p.x_dtype, [&](auto tx) {
      using TX = decltype(tx);
      visit_optional(res_row, p.residual_dtype, [&](auto tr) {
        using TR = decltype(tr);
        sums = load_sum(static_cast<const TX*>(x_row), static_cast<const TR*>(res_row), s, n);
      });
    });
    if (p.residual_out) {
      store_row(p.residual_out_dtype, s, row_of(p.residual_out, p.residual_out_dtype, n, r), n,
                stream);
    }
    // Two-pass statistics from the unrounded sum in the buffer: the centred variance
    // reads the buffer again (L1/L2), never memory.
    acc mean = 0;
    acc var = sums.second / n;
    if (!p.is_rms_norm) {
      mean = sums.first / n;
      const V m(mean);
      var = reduce_row(s, n, [&](V v, int64_t) { return (v - m) * (v - m); }) / n;
    }
    const acc rstd = acc(1) / std::sqrt(var + eps);
    NextRow next;
    if (r + 1 < end) {
      next.add(row_of(p.x, p.x_dtype, p.x_row_stride, r + 1), p.x_dtype);
      if (p.residual) {
        next.add(row_of(p.residual, p.residual_dtype, p.residual_row_stride, r + 1),
                 p.residual_dtype);
      }
    }
    visit(p.x_dtype, [&](auto ty) {
      using TY = decltype(ty);
      affine_store(s, mean, rstd, w, b, static_cast<TY*>(row_of(p.y, p.x_dtype, n, r)), n,
                   stream, next);
    });
    if (rstd_out) rstd_out[r] = rstd;
    if (mean_out) mean_out[r] = mean;
  }
  if (stream) stream_fence();
}

template <typename acc>
void fwd(const AddNormFwdParams& p) {
  const int64_t n = p.hidden;
  const Param<acc> w(p.weight, p.weight_dtype, n, p.weight_offset), b(p.bias, p.bias_dtype, n);
  const bool stream = streams(p.rows * n * column_bytes(p));
  at::parallel_for(0, p.rows, grain_rows(n), [&](int64_t begin, int64_t end) {
    fwd_rows<acc>(p, w.ptr, b.ptr, stream, begin, end);
  });
}

// ---------------------------------------------------------------------------------
// Backward

// xhat = (buffer - mean) * scale, the last step of its rebuild, done by the pass
// that first reads it (saves a pass over the buffer).
template <typename acc>
struct Xhat {
  acc mean;
  acc scale;
};

// From dy: g = dy [* w] (into g), xhat finished in place, the partial column sums
// dw += dy * xhat and db += dy, and the row sums of g and of g * xhat.
template <typename acc, typename TDY>
RESIDUAL_FUSED_FLATTEN void grad_pass(const TDY* __restrict__ dy, acc* __restrict__ xhat,
                                      Xhat<acc> map, const acc* __restrict__ w,
                                      acc* __restrict__ dw, acc* __restrict__ db,
                                      acc* __restrict__ g, int64_t n, acc& sum_g,
                                      acc& sum_gx) {
  using V = Vectorized<acc>;
  constexpr int64_t L = kLanes<acc>;
  const V m(map.mean), sc(map.scale);
  V sg(acc(0)), sgx(acc(0));
  int64_t i = 0;
  for (; i + 2 * L <= n; i += 2 * L) {
    V d[2];
    load2<acc>(dy + i, d[0], d[1]);
    for (int h = 0; h < 2; ++h) {
      const int64_t j = i + h * L;
      const V xh = (V::loadu(xhat + j) - m) * sc;
      xh.store(xhat + j);
      if (dw) (V::loadu(dw + j) + d[h] * xh).store(dw + j);
      if (db) (V::loadu(db + j) + d[h]).store(db + j);
      const V gv = w ? d[h] * V::loadu(w + j) : d[h];
      gv.store(g + j);
      sg = sg + gv;
      sgx = sgx + gv * xh;
    }
  }
  acc lanes_g[L], lanes_gx[L];
  sg.store(lanes_g);
  sgx.store(lanes_gx);
  sum_g = 0;
  sum_gx = 0;
  for (int64_t l = 0; l < L; ++l) {
    sum_g += lanes_g[l];
    sum_gx += lanes_gx[l];
  }
  for (; i < n; ++i) {
    const acc d = static_cast<acc>(dy[i]);
    xhat[i] = (xhat[i] - map.mean) * map.scale;
    if (dw) dw[i] += d * xhat[i];
    if (db) db[i] += d;
    const acc gv = w ? d * w[i] : d;
    g[i] = gv;
    sum_g += gv;
    sum_gx += gv * xhat[i];
  }
}

// ds = (g - mean_g - xhat * mean_gx) * rstd [+ dresidual_out], stored as dx in dy's
// dtype, and kept in g when `keep` (for a dresidual of another dtype).
template <typename acc, typename TDRO, typename TDX>
RESIDUAL_FUSED_FLATTEN void ds_store(acc* __restrict__ g, const acc* __restrict__ xhat, acc mean_g, acc mean_gx,
              acc rstd, const TDRO* __restrict__ dro, TDX* __restrict__ dx, int64_t n,
              bool stream, bool keep, const NextRow& next) {
  using V = Vectorized<acc>;
  constexpr int64_t L = kLanes<acc>;
  const V mg(mean_g), mgx(mean_gx), rs(rstd);
  stream = stream && aligned32(dx);
  int64_t i = 0;
  for (; i + 2 * L <= n; i += 2 * L) {
    next.fetch(i);
    V lo = (V::loadu(g + i) - mg - V::loadu(xhat + i) * mgx) * rs;
    V hi = (V::loadu(g + i + L) - mg - V::loadu(xhat + i + L) * mgx) * rs;
    if constexpr (!std::is_same_v<TDRO, None>) {
      V d_lo, d_hi;
      load2<acc>(dro + i, d_lo, d_hi);
      lo = lo + d_lo;
      hi = hi + d_hi;
    }
    if (keep) {
      lo.store(g + i);
      hi.store(g + i + L);
    }
    store2<acc>(dx + i, lo, hi, stream);
  }
  for (; i < n; ++i) {
    const acc v = (g[i] - mean_g - xhat[i] * mean_gx) * rstd + scalar<TDRO, acc>(dro, i);
    g[i] = v;
    dx[i] = narrow<TDX>(v);
  }
}

// xhat of one row from what was saved, up to its last map (applied by grad_pass).
// LayerNorm re-centres it over the row: the saved tensor was rounded after rstd came
// from the unrounded sum (see reference.py).
template <typename acc>
Xhat<acc> rebuild_xhat(const AddNormBwdParams& p, const void* saved_row, acc rstd,
                       const acc* w, const acc* b, acc* xhat) {
  using V = Vectorized<acc>;
  const int64_t n = p.hidden;
  acc sum = 0;
  visit(p.saved_dtype, [&](auto ts) {
    sum = load_sum(static_cast<const decltype(ts)*>(saved_row), static_cast<const None*>(nullptr),
                   xhat, n).first;
  });
  if (!p.memory_efficient) return {p.is_rms_norm ? acc(0) : sum / n, rstd};
  if (b) map_row(xhat, n, [&](V v, int64_t i) { return v - lanes_at(b, i, n); });
  if (w) map_row(xhat, n, [&](V v, int64_t i) { return v / lanes_at(w, i, n); });
  if (p.is_rms_norm) return {acc(0), acc(1)};
  return {reduce_row(xhat, n, [](V v, int64_t) { return v; }) / n, acc(1)};
}

// Rows [begin, end) into dx (and dresidual), their column sums into partial row `part`.
template <typename acc>
void bwd_rows(const AddNormBwdParams& p, const acc* w, const acc* b, bool stream, int64_t part,
              int64_t begin, int64_t end) {
  const int64_t n = p.hidden;
  std::unique_ptr<acc[]> buffers(new acc[2 * n]);
  acc* xhat = buffers.get();
  acc* g = xhat + n;
  acc* dw = p.dweight_partial ? static_cast<acc*>(p.dweight_partial) + part * n : nullptr;
  acc* db = p.dbias_partial ? static_cast<acc*>(p.dbias_partial) + part * n : nullptr;
  if (dw) std::fill(dw, dw + n, acc(0));
  if (db) std::fill(db, db + n, acc(0));
  const acc* rstd_in = static_cast<const acc*>(p.rstd);
  for (int64_t r = begin; r < end; ++r) {
    const acc rstd = rstd_in[r];
    const Xhat<acc> map =
        rebuild_xhat(p, row_of(p.saved, p.saved_dtype, p.saved_row_stride, r), rstd, w, b, xhat);
    acc sum_g = 0, sum_gx = 0;
    visit(p.dy_dtype, [&](auto tdy) {
      grad_pass(static_cast<const decltype(tdy)*>(row_of(p.dy, p.dy_dtype, p.dy_row_stride, r)),
                xhat, map, w, dw, db, g, n, sum_g, sum_gx);
    });
    const acc mean_g = p.is_rms_norm ? acc(0) : sum_g / n;
    const void* dro_row =
        p.dresidual_out
            ? row_of(p.dresidual_out, p.dresidual_out_dtype, p.dresidual_out_row_stride, r)
            : nullptr;
    NextRow next;
    if (r + 1 < end) {
      next.add(row_of(p.saved, p.saved_dtype, p.saved_row_stride, r + 1), p.saved_dtype);
      next.add(row_of(p.dy, p.dy_dtype, p.dy_row_stride, r + 1), p.dy_dtype);
      if (p.dresidual_out) {
        next.add(row_of(p.dresidual_out, p.dresidual_out_dtype, p.dresidual_out_row_stride, r + 1),
                 p.dresidual_out_dtype);
      }
    }
    visit_optional(dro_row, p.dresidual_out_dtype, [&](auto tdro) {
      using TDRO = decltype(tdro);
      visit(p.dy_dtype, [&](auto tdx) {
        using TDX = decltype(tdx);
        ds_store(g, xhat, mean_g, sum_gx / n, rstd, static_cast<const TDRO*>(dro_row),
                 static_cast<TDX*>(row_of(p.dx, p.dy_dtype, n, r)), n, stream,
                 p.dresidual != nullptr, next);
      });
    });
    if (p.dresidual) {
      store_row(p.dresidual_dtype, g, row_of(p.dresidual, p.dresidual_dtype, n, r), n, stream);
    }
  }
  if (stream) stream_fence();
}

// Column sums of the partial rows, in partial-row order, into `out` (weight's dtype).
template <typename acc>
void reduce_partials(acc* partial, int64_t parts, int64_t n, DType out_dtype, void* out) {
  using V = Vectorized<acc>;
  for (int64_t k = 1; k < parts; ++k) {
    const acc* row = partial + k * n;
    map_row(partial, n, [&](V v, int64_t i) { return v + lanes_at(row, i, n); });
  }
  store_row(out_dtype, partial, out, n);
}

template <typename acc>
void bwd(const AddNormBwdParams& p) {
  const int64_t n = p.hidden;
  const int64_t parts = p.partial_rows;
  if (p.rows == 0 || parts == 0) return;
  const Param<acc> w(p.weight, p.weight_dtype, n, p.weight_offset), b(p.bias, p.bias_dtype, n);
  const int64_t per_part = (p.rows + parts - 1) / parts;
  const bool stream = streams(p.rows * n * column_bytes(p));
  at::parallel_for(0, parts, 1, [&](int64_t first, int64_t last) {
    for (int64_t k = first; k < last; ++k) {
      const int64_t begin = std::min(p.rows, k * per_part);
      const int64_t end = std::min(p.rows, begin + per_part);
      bwd_rows<acc>(p, w.ptr, b.ptr, stream, k, begin, end);
    }
  });
  if (p.dweight) reduce_partials(static_cast<acc*>(p.dweight_partial), parts, n, p.weight_dtype, p.dweight);
  if (p.dbias) reduce_partials(static_cast<acc*>(p.dbias_partial), parts, n, p.bias_dtype, p.dbias);
}

}  // namespace

void add_norm_fwd_kernel(const AddNormFwdParams& p) {
  if (p.x_dtype == DType::kFloat64) {
    fwd<double>(p);
  } else {
    fwd<float>(p);
  }
}

void add_norm_bwd_kernel(const AddNormBwdParams& p) {
  if (p.dy_dtype == DType::kFloat64) {
    bwd<double>(p);
  } else {
    bwd<float>(p);
  }
}

}  // namespace residual_fused::cpu::CPU_CAPABILITY
