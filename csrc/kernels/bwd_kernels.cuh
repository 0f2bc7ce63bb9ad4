// Backward kernels. Per row (g = dy * weight, n = hidden):
//   LayerNorm: ds = rstd * (g - mean(g) - xhat * mean(g * xhat))
//   RMSNorm:   ds = rstd * (g - xhat * mean(g * xhat))
//   pre-norm:  ds += d(residual_out)
// dx = ds (dy's dtype), dresidual = ds (its own dtype, only when it differs), and the
// column sums of dy * xhat and dy go to a per-CTA fp32 partial row, reduced later in a
// fixed order (reduce_partials_kernel below): bitwise-reproducible weight gradients,
// no atomics.
//
// xhat is rebuilt from `saved`: s * rstd (LayerNorm: (s - mean(s)) * rstd), or in
// memory-efficient mode (y - bias) / weight. LayerNorm's xhat is re-centred on the
// row mean of the rebuilt values: `saved` is rounded to its dtype while rstd came
// from the unrounded sum, and without re-centring that rounding would enter as a mean
// shift times rstd (catastrophic for near-constant rows, e.g. hidden = 1).
#pragma once

#include "ring.cuh"
#include "rows.cuh"

namespace residual_fused {

// The CTA's column sums of dy * xhat and dy over the rows it handles: in registers
// when a thread holds at most 16 elements, otherwise in dynamic shared memory. There
// slot k of thread t is float4 number k * blockDim.x + t of its array: consecutive
// threads touch consecutive 16 bytes (conflict-free), no padding is needed, the size
// follows the block, and each thread only touches its own slots (no barrier).
template <int CHUNKS, int VEC, bool IN_SMEM>
struct Partials;

template <int CHUNKS, int VEC>
struct Partials<CHUNKS, VEC, false> {
  float dw[CHUNKS][VEC], db[CHUNKS][VEC];
  static constexpr int kSmemFloats = 0;  // per thread

  __device__ __forceinline__ explicit Partials(float*) {
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c)
#pragma unroll
      for (int i = 0; i < VEC; ++i) dw[c][i] = db[c][i] = 0.f;
  }
  __device__ __forceinline__ void add(int c, const float (&g)[VEC], const float (&v)[VEC]) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      dw[c][i] += g[i] * v[i];
      db[c][i] += g[i];
    }
  }
  __device__ __forceinline__ void get(int c, float (&w)[VEC], float (&b)[VEC]) const {
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      w[i] = dw[c][i];
      b[i] = db[c][i];
    }
  }
};

template <int CHUNKS, int VEC>
struct Partials<CHUNKS, VEC, true> {
  static_assert(VEC % 4 == 0, "shared-memory partials move as float4");
  static constexpr int kSlots = CHUNKS * VEC / 4;  // float4 per thread and array
  static constexpr int kSmemFloats = 2 * kSlots * 4;  // per thread
  float4* dw;  // this thread's slot 0; slot k is dw[k * stride]
  float4* db;
  int stride;  // blockDim.x

  __device__ __forceinline__ explicit Partials(float* smem)
      : dw(reinterpret_cast<float4*>(smem) + threadIdx.x),
        db(reinterpret_cast<float4*>(smem) + kSlots * blockDim.x + threadIdx.x),
        stride(static_cast<int>(blockDim.x)) {
#pragma unroll
    for (int k = 0; k < kSlots; ++k) dw[k * stride] = db[k * stride] = make_float4(0.f, 0.f, 0.f, 0.f);
  }
  __device__ __forceinline__ void add(int c, const float (&g)[VEC], const float (&v)[VEC]) {
#pragma unroll
    for (int q = 0; q < VEC / 4; ++q) {
      const int k = (c * VEC / 4 + q) * stride;
      float4 w = dw[k], b = db[k];
      w.x += g[4 * q] * v[4 * q];
      w.y += g[4 * q + 1] * v[4 * q + 1];
      w.z += g[4 * q + 2] * v[4 * q + 2];
      w.w += g[4 * q + 3] * v[4 * q + 3];
      b.x += g[4 * q];
      b.y += g[4 * q + 1];
      b.z += g[4 * q + 2];
      b.w += g[4 * q + 3];
      dw[k] = w;
      db[k] = b;
    }
  }
  __device__ __forceinline__ void get(int c, float (&w)[VEC], float (&b)[VEC]) const {
#pragma unroll
    for (int q = 0; q < VEC / 4; ++q) {
      const int k = (c * VEC / 4 + q) * stride;
      const float4 a = dw[k], d = db[k];
      w[4 * q] = a.x; w[4 * q + 1] = a.y; w[4 * q + 2] = a.z; w[4 * q + 3] = a.w;
      b[4 * q] = d.x; b[4 * q + 1] = d.y; b[4 * q + 2] = d.z; b[4 * q + 3] = d.w;
    }
  }
};

// Adds one row's dy * xhat and dy to a thread's partials, over its chunks inside the
// row (`hidden` columns).
template <int CHUNKS, int VEC, bool IN_SMEM>
__device__ __forceinline__ void add_partials(const RowLayout<CHUNKS, VEC>& rl, int hidden,
                                             const float (&dy)[CHUNKS][VEC], const float (&xhat)[CHUNKS][VEC],
                                             Partials<CHUNKS, VEC, IN_SMEM>& part) {
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    if (rl.col0 + c * rl.stride < hidden) part.add(c, dy[c], xhat[c]);
  }
}

template <int CHUNKS, int VEC>
constexpr bool kSmemPartials = CHUNKS * VEC > 16;

// One row group's inputs in a ring stage of the backward rows kernel: saved, dy and
// d(residual_out) (when given), one after the other.
__host__ __device__ inline int bwd_ring_row_bytes(const AddNormBwdParams& p) {
  return ring_row_bytes(p.saved, p.saved_dtype, p.hidden) + ring_row_bytes(p.dy, p.dy_dtype, p.hidden) +
         ring_row_bytes(p.dresidual_out, p.dresidual_out_dtype, p.hidden);
}

// Dynamic shared memory of the backward rows kernel, in bytes: the staged weight (and
// bias when xhat is rebuilt from y), the shared-memory partials, with several rows per
// CTA 2 * hidden floats where the row groups' partials are added in order, and with
// STAGES == 2 the ring: two stages of every row group's inputs.
template <int CHUNKS, int VEC, int STAGES = 1>
__host__ __device__ inline int bwd_rows_smem(const AddNormBwdParams& p, int block) {
  const int rows_per_cta = block / row_threads_for(p.hidden, CHUNKS * VEC);
  const int params = param_bytes(p.weight, p.weight_dtype, p.hidden) +
                     (p.memory_efficient ? param_bytes(p.bias, p.bias_dtype, p.hidden) : 0);
  const int partials = static_cast<int>(sizeof(float)) * block *
                       Partials<CHUNKS, VEC, kSmemPartials<CHUNKS, VEC>>::kSmemFloats;
  const int combine = rows_per_cta > 1 ? static_cast<int>(sizeof(float)) * 2 * p.hidden : 0;
  const int ring = STAGES == 2 ? 2 * rows_per_cta * bwd_ring_row_bytes(p) : 0;
  return params + partials + combine + ring;
}

// One row per row group per iteration, persistent CTAs. All of a row's global loads
// (saved, dy, d(residual_out), rstd) are issued before any is used (d(residual_out)
// after the reductions when a thread holds 32 elements); weight and bias come from
// shared memory. The CTA writes one partial row per weight gradient at the
// end, its row groups added in a fixed order.
//
// STAGES == 2 (16 elements per thread, vectorised rows): the next iteration's rows
// are copied into a shared-memory ring (ring.cuh) while this one is computed, so a
// row's loads no longer wait in turn with its reductions and stores. The first rows'
// copies start before the parameters are staged. That leaves a row's reductions on
// its serial path, so with the forward's row mean (p.mean) LayerNorm takes its three
// row sums in one reduction, shifted by that mean; RMSNorm has one sum either way.
template <class MIX, int CHUNKS, int VEC, int MAX_BLOCK, int STAGES = 1>
__global__ void __launch_bounds__(MAX_BLOCK, 1)
add_norm_bwd_rows_kernel(const AddNormBwdParams p) {
  using X = typename MIX::act_t;
  using R = typename MIX::res_t;
  using W = typename MIX::param_t;
  using S = typename MIX::saved_t;
  constexpr bool kSmem = kSmemPartials<CHUNKS, VEC>;
  constexpr bool kRing = STAGES == 2;
  static_assert(STAGES == 1 || (kRing && !kSmem && VEC == 8), "the ring: 16 elements per thread, 16-byte vectors");
  // With 32 elements per thread, holding d(residual_out) through the reductions would
  // spill; it is loaded after them instead (a second round trip per row).
  constexpr bool kEarlyDresOut = !kSmem;
  const int hidden = p.hidden;
  const RowLayout<CHUNKS, VEC> rl(hidden);
  const bool want_partials = p.dweight_partial != nullptr || p.dbias_partial != nullptr;
  const bool has_dres_out = p.dresidual_out != nullptr;
  // LayerNorm rebuilding xhat from the sum, with the forward's mean: the ring's shift.
  const bool has_mean = kRing && !p.is_rms_norm && !p.memory_efficient && p.mean != nullptr;
  __shared__ float red[(kRing ? 3 : 2) * (MAX_BLOCK / 32)];

  // The ring sits after the parameters, the partials and the group-combine buffer.
  const int64_t step = static_cast<int64_t>(gridDim.x) * rl.rows_per_cta;
  const int saved_bytes = ring_row_bytes(p.saved, p.saved_dtype, hidden);
  const int dy_bytes = ring_row_bytes(p.dy, p.dy_dtype, hidden);
  const int group_bytes = bwd_ring_row_bytes(p);
  const int stage_bytes = rl.rows_per_cta * group_bytes;
  unsigned char* const ring =
      reinterpret_cast<unsigned char*>(dynamic_smem()) + (kRing ? bwd_rows_smem<CHUNKS, VEC>(p, blockDim.x) : 0);
  float rstd_next = 0.f, mean_next = 0.f;
  // Starts copying this thread's part of the rows from `first` on into `stage`, and
  // loads their rstd and mean: one committed group per iteration (empty past the last row).
  const auto fetch = [&](int64_t first, int stage) {
    const int64_t row = first + rl.group;
    if (row < p.rows) {
      unsigned char* const b = ring + stage * stage_bytes + rl.group * group_bytes;
      fetch_chunks(b, row_of<S>(p.saved, row, p.saved_row_stride, p.saved_dtype), elem_size<S>(p.saved_dtype), rl,
                   hidden);
      fetch_chunks(b + saved_bytes, row_of<X>(p.dy, row, p.dy_row_stride, p.dy_dtype), elem_size<X>(p.dy_dtype), rl,
                   hidden);
      if (has_dres_out) {
        fetch_chunks(b + saved_bytes + dy_bytes,
                     row_of<R>(p.dresidual_out, row, p.dresidual_out_row_stride, p.dresidual_out_dtype),
                     elem_size<R>(p.dresidual_out_dtype), rl, hidden);
      }
      rstd_next = static_cast<const float*>(p.rstd)[row];
      if (has_mean) mean_next = static_cast<const float*>(p.mean)[row];
    }
    async_commit();
  };
  if constexpr (kRing) fetch(static_cast<int64_t>(blockIdx.x) * rl.rows_per_cta, 0);

  StagedParam weight, bias;
  stage_params<VEC>(p.weight, p.weight_dtype, float(p.weight_offset), p.memory_efficient ? p.bias : nullptr,
                    p.bias_dtype,
               hidden, weight, bias);
  const int params_bytes = param_bytes(weight.ptr, p.weight_dtype, hidden) +
                           param_bytes(bias.ptr, p.bias_dtype, hidden);
  float* const after_params = dynamic_smem() + params_bytes / 4;
  Partials<CHUNKS, VEC, kSmem> part(after_params);
  __syncthreads();

  int stage = 0;
  for (int64_t first = static_cast<int64_t>(blockIdx.x) * rl.rows_per_cta; first < p.rows;
       first += step, stage ^= 1) {
    const int64_t row = first + rl.group;
    const bool active = row < p.rows;  // idle row groups still join the reductions

    // Every global load of the row in flight before any is used (or, with the ring,
    // the next rows' copies started and this row's awaited).
    const void* saved_src = row_of<S>(p.saved, row, p.saved_row_stride, p.saved_dtype);
    const void* dy_src = row_of<X>(p.dy, row, p.dy_row_stride, p.dy_dtype);
    const void* dres_out_src = row_of<R>(p.dresidual_out, row, p.dresidual_out_row_stride, p.dresidual_out_dtype);
    float rstd, shift = 0.f;
    if constexpr (kRing) {
      rstd = active ? rstd_next : 0.f;
      if (active) shift = mean_next;
      fetch(first + step, stage ^ 1);
      async_wait<1>();
      const unsigned char* const b = ring + stage * stage_bytes + rl.group * group_bytes;
      saved_src = b;
      dy_src = b + saved_bytes;
      dres_out_src = b + saved_bytes + dy_bytes;
    } else {
      rstd = active ? static_cast<const float*>(p.rstd)[row] : 0.f;
    }
    Fetched<S, CHUNKS, VEC> fs;
    Fetched<X, CHUNKS, VEC> fdy;
    Fetched<R, CHUNKS, VEC> fdo;
    fs.load(saved_src, p.saved_dtype, rl.col0, rl.stride, hidden, active);
    fdy.load(dy_src, p.dy_dtype, rl.col0, rl.stride, hidden, active);
    if (kEarlyDresOut) {
      fdo.load(dres_out_src, p.dresidual_out_dtype, rl.col0, rl.stride, hidden, active && has_dres_out);
    }

    float v[CHUNKS][VEC], g[CHUNKS][VEC];  // g holds dy until it is scaled by weight
    fs.to(v);
    fdy.to(g);

    // v -> xhat (zero past the end of the row), g = dy * weight, and the row sums.
    if (p.memory_efficient) undo_affine<W>(weight, bias, rl.col0, rl.stride, hidden, v);
    const float scale = p.memory_efficient ? 1.f : rstd;
    float mean_g = 0.f, mean_gx;
    if (p.is_rms_norm) {
      scale_chunks(rl, hidden, 0.f, scale, v);
      // Weight-gradient partials use dy, before it is scaled into g.
      if (active && want_partials) add_partials(rl, hidden, g, v, part);
      if (weight.ptr != nullptr) apply_param<Affine::kMul, W>(weight, rl.col0, rl.stride, hidden, g);
      float sums[1] = {0.f};  // sum(g * xhat)
#pragma unroll
      for (int c = 0; c < CHUNKS; ++c)
#pragma unroll
        for (int i = 0; i < VEC; ++i) sums[0] += g[c][i] * v[c][i];
      row_sum<MAX_BLOCK>(rl, sums, red);
      mean_gx = sums[0] / hidden;
    } else if (has_mean) {
      // LayerNorm, with the ring: one reduction of the row's sums of u = v - shift and
      // g, the shift the forward's mean: sum(g xhat) is scale (sum(g u) - mean(u)
      // sum(g)), which cancels nothing with the shift that near the row mean. The ring
      // takes the loads off a row's serial path, which leaves its reductions there.
      scale_chunks(rl, hidden, shift, 1.f, v);
      float sums[3] = {0.f, chunk_sum(v), 0.f};  // sum(g u), sum(u), sum(g)
#pragma unroll
      for (int c = 0; c < CHUNKS; ++c) {
        // g keeps dy until the partials have it (holding both through the reduction
        // would spill): the sums weigh a copy, a chunk at a time.
        float wdy[1][VEC];
#pragma unroll
        for (int i = 0; i < VEC; ++i) wdy[0][i] = g[c][i];
        if (weight.ptr != nullptr) {
          apply_param<Affine::kMul, W>(weight, rl.col0 + c * rl.stride, rl.stride, hidden, wdy);
        }
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          sums[0] += wdy[0][i] * v[c][i];
          sums[2] += wdy[0][i];
        }
      }
      row_sum<MAX_BLOCK>(rl, sums, red);
      const float mean_u = sums[1] / hidden;
      mean_g = sums[2] / hidden;
      mean_gx = scale * ((sums[0] - mean_u * sums[2]) / hidden);
      scale_chunks(rl, hidden, mean_u, scale, v);
      if (active && want_partials) add_partials(rl, hidden, g, v, part);
      if (weight.ptr != nullptr) apply_param<Affine::kMul, W>(weight, rl.col0, rl.stride, hidden, g);
    } else {
      // LayerNorm: the row mean of v (xhat is centred over the saved row), then the
      // sums of g and g xhat.
      float sum[1] = {chunk_sum(v)};
      row_sum<MAX_BLOCK>(rl, sum, red);
      scale_chunks(rl, hidden, sum[0] / hidden, scale, v);
      if (active && want_partials) add_partials(rl, hidden, g, v, part);
      if (weight.ptr != nullptr) apply_param<Affine::kMul, W>(weight, rl.col0, rl.stride, hidden, g);
      float sums[2] = {0.f, 0.f};  // sum(g), sum(g * xhat)
#pragma unroll
      for (int c = 0; c < CHUNKS; ++c)
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          sums[0] += g[c][i];
          sums[1] += g[c][i] * v[c][i];
        }
      row_sum<MAX_BLOCK>(rl, sums, red);
      mean_g = sums[0] / hidden;
      mean_gx = sums[1] / hidden;
    }

    if (active) {
#pragma unroll
      for (int c = 0; c < CHUNKS; ++c)
#pragma unroll
        for (int i = 0; i < VEC; ++i) g[c][i] = rstd * (g[c][i] - mean_g - v[c][i] * mean_gx);
      if (has_dres_out) {
        if (!kEarlyDresOut) fdo.load(dres_out_src, p.dresidual_out_dtype, rl.col0, rl.stride, hidden, true);
        float d[CHUNKS][VEC];
        fdo.to(d);
        add_chunks(g, d);
      }
      store_row<X>(row_of<X>(p.dx, row, hidden, p.dy_dtype), p.dy_dtype, rl.col0, rl.stride, hidden, g);
      if (p.dresidual != nullptr) {
        store_row<R>(row_of<R>(p.dresidual, row, hidden, p.dresidual_dtype), p.dresidual_dtype,
                     rl.col0, rl.stride, hidden, g);
      }
    }
  }

  if (!want_partials) return;  // uniform over the grid
  const int64_t out_row = static_cast<int64_t>(blockIdx.x) * hidden;
  float* const dw_out = p.dweight_partial == nullptr ? nullptr : static_cast<float*>(p.dweight_partial) + out_row;
  float* const db_out = p.dbias_partial == nullptr ? nullptr : static_cast<float*>(p.dbias_partial) + out_row;
  if (rl.rows_per_cta == 1) {
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
      const int col = rl.col0 + c * rl.stride;
      if (col < hidden) {
        float w[VEC], b[VEC];
        part.get(c, w, b);
        if (dw_out != nullptr) store_vec<float, VEC>(dw_out + col, w);
        if (db_out != nullptr) store_vec<float, VEC>(db_out + col, b);
      }
    }
    return;
  }
  // Several rows per CTA: add the row groups' sums in group order, then write them.
  float* const buf = after_params + blockDim.x * Partials<CHUNKS, VEC, kSmem>::kSmemFloats;
  for (int k = 0; k < rl.rows_per_cta; ++k) {
    if (rl.group == k) {
#pragma unroll
      for (int c = 0; c < CHUNKS; ++c) {
        const int col = rl.col0 + c * rl.stride;
        if (col < hidden) {
          float w[VEC], b[VEC];
          part.get(c, w, b);
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            buf[col + i] = k == 0 ? w[i] : buf[col + i] + w[i];
            buf[hidden + col + i] = k == 0 ? b[i] : buf[hidden + col + i] + b[i];
          }
        }
      }
    }
    __syncthreads();
  }
  for (int col = threadIdx.x * VEC; col < hidden; col += blockDim.x * VEC) {
    float w[VEC], b[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      w[i] = buf[col + i];
      b[i] = buf[hidden + col + i];
    }
    if (dw_out != nullptr) store_vec<float, VEC>(dw_out + col, w);
    if (db_out != nullptr) store_vec<float, VEC>(db_out + col, b);
  }
}

// ---- streamed: any hidden size --------------------------------------------------
// One CTA per row, three passes over the row (they mostly hit L2): the mean of the
// rebuilt values (LayerNorm), then sum(g) and sum(g * xhat), then the outputs. The
// partial sums are read-modify-written in this CTA's own row of the workspace, a
// vector at a time (one round trip per VEC columns, not one per column).

template <int VEC, typename acc_t>
struct StreamedRow {
  const AddNormBwdParams& p;
  const void* saved;
  const void* dy;
  acc_t rstd;

  // xhat before re-centring (times rstd for the sum), for one vector at `col`.
  __device__ __forceinline__ void rebuilt(int col, acc_t (&v)[1][VEC]) const {
    load_chunks<1, VEC>(saved, p.saved_dtype, col, 0, p.hidden, v);
    if (p.memory_efficient) {
      if (p.bias != nullptr) apply_affine<Affine::kSub>(p.bias, p.bias_dtype, col, 0, p.hidden, v);
      if (p.weight != nullptr) {
        apply_affine<Affine::kDiv>(p.weight, p.weight_dtype, col, 0, p.hidden, v, p.weight_offset);
      }
    }
  }

  __device__ __forceinline__ void xhat_and_dy(int col, acc_t mean_v, acc_t (&v)[1][VEC],
                                              acc_t (&d)[1][VEC]) const {
    rebuilt(col, v);
    const acc_t scale = p.memory_efficient ? acc_t(1) : rstd;
#pragma unroll
    for (int i = 0; i < VEC; ++i) v[0][i] = (v[0][i] - mean_v) * scale;
    load_chunks<1, VEC>(dy, p.dy_dtype, col, 0, p.hidden, d);
  }
};

template <int VEC, typename acc_t, int BLOCK>
__global__ void __launch_bounds__(BLOCK, 1) add_norm_bwd_streamed_kernel(const AddNormBwdParams p) {
  __shared__ acc_t red[2 * (BLOCK / 32)];
  const int hidden = p.hidden;
  // Each CTA owns its partial row: no other pointer aliases it, so the compiler may
  // move a vector's loads ahead of the stores before it.
  acc_t* __restrict__ const dw_out = static_cast<acc_t*>(p.dweight_partial);
  acc_t* __restrict__ const db_out = static_cast<acc_t*>(p.dbias_partial);
  const int64_t out_row = static_cast<int64_t>(blockIdx.x) * hidden;
  bool first = true;
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x, first = false) {
    const StreamedRow<VEC, acc_t> r{p, row_ptr(p.saved, row, p.saved_row_stride, p.saved_dtype),
                                    row_ptr(p.dy, row, p.dy_row_stride, p.dy_dtype),
                                    static_cast<const acc_t*>(p.rstd)[row]};
    acc_t mean_v = 0;
    if (!p.is_rms_norm) {
      acc_t sum[1] = {0};
      for (int col = threadIdx.x * VEC; col < hidden; col += BLOCK * VEC) {
        acc_t v[1][VEC];
        r.rebuilt(col, v);
#pragma unroll
        for (int i = 0; i < VEC; ++i) sum[0] += v[0][i];
      }
      block_sum<BLOCK>(sum, red);
      mean_v = sum[0] / hidden;
    }

    acc_t sums[2] = {0, 0};  // sum(g), sum(g * xhat)
    for (int col = threadIdx.x * VEC; col < hidden; col += BLOCK * VEC) {
      acc_t v[1][VEC], g[1][VEC];
      r.xhat_and_dy(col, mean_v, v, g);
      if (p.weight != nullptr) {
        apply_affine<Affine::kMul>(p.weight, p.weight_dtype, col, 0, hidden, g, p.weight_offset);
      }
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        sums[0] += g[0][i];
        sums[1] += g[0][i] * v[0][i];
      }
    }
    block_sum<BLOCK>(sums, red);
    const acc_t mean_g = p.is_rms_norm ? acc_t(0) : sums[0] / hidden;
    const acc_t mean_gx = sums[1] / hidden;

    void* dx = row_ptr(p.dx, row, hidden, p.dy_dtype);
    void* dres = p.dresidual == nullptr ? nullptr : row_ptr(p.dresidual, row, hidden, p.dresidual_dtype);
    const void* dres_out = p.dresidual_out == nullptr
        ? nullptr
        : row_ptr(p.dresidual_out, row, p.dresidual_out_row_stride, p.dresidual_out_dtype);
    for (int col = threadIdx.x * VEC; col < hidden; col += BLOCK * VEC) {
      acc_t v[1][VEC], g[1][VEC];
      r.xhat_and_dy(col, mean_v, v, g);
      if (dw_out != nullptr) {
        acc_t w[VEC];
        if (first) {
#pragma unroll
          for (int i = 0; i < VEC; ++i) w[i] = acc_t(0);
        } else {
          load_vec<acc_t, VEC>(dw_out + out_row + col, w);
        }
#pragma unroll
        for (int i = 0; i < VEC; ++i) w[i] += g[0][i] * v[0][i];
        store_vec<acc_t, VEC>(dw_out + out_row + col, w);
      }
      if (db_out != nullptr) {
        acc_t b[VEC];
        if (first) {
#pragma unroll
          for (int i = 0; i < VEC; ++i) b[i] = acc_t(0);
        } else {
          load_vec<acc_t, VEC>(db_out + out_row + col, b);
        }
#pragma unroll
        for (int i = 0; i < VEC; ++i) b[i] += g[0][i];
        store_vec<acc_t, VEC>(db_out + out_row + col, b);
      }
      if (p.weight != nullptr) {
        apply_affine<Affine::kMul>(p.weight, p.weight_dtype, col, 0, hidden, g, p.weight_offset);
      }
#pragma unroll
      for (int i = 0; i < VEC; ++i) g[0][i] = r.rstd * (g[0][i] - mean_g - v[0][i] * mean_gx);
      if (dres_out != nullptr) {
        acc_t d[1][VEC];
        load_chunks<1, VEC>(dres_out, p.dresidual_out_dtype, col, 0, hidden, d);
#pragma unroll
        for (int i = 0; i < VEC; ++i) g[0][i] += d[0][i];
      }
      store_chunks<1, VEC>(dx, p.dy_dtype, col, 0, hidden, g);
      if (dres != nullptr) store_chunks<1, VEC>(dres, p.dresidual_dtype, col, 0, hidden, g);
    }
  }
}

// ---- deterministic reduction of the partial rows --------------------------------
// out[col] = sum over k of partial[k][col], summed in the same order on every run.
// A CTA reduces 32 columns of dweight (even blockIdx.x) or dbias (odd) with
// kReduceSlices groups of 32 threads, each summing every kReduceSlices-th row.

constexpr int kReduceSlices = 16;
constexpr int kReduceBlock = 32 * kReduceSlices;

template <typename acc_t>
__global__ void __launch_bounds__(kReduceBlock, 1) reduce_partials_kernel(const AddNormBwdParams p) {
  const bool bias = blockIdx.x % 2 == 1;
  const acc_t* partial = static_cast<const acc_t*>(bias ? p.dbias_partial : p.dweight_partial);
  void* out = bias ? p.dbias : p.dweight;
  if (partial == nullptr || out == nullptr) return;  // uniform over the CTA
  const int hidden = p.hidden;
  const int lane = threadIdx.x % 32;
  const int slice = threadIdx.x / 32;
  const int col = (blockIdx.x / 2) * 32 + lane;
  acc_t sum = 0;
  if (col < hidden) {
    for (int64_t k = slice; k < p.partial_rows; k += kReduceSlices) sum += partial[k * hidden + col];
  }
  __shared__ acc_t buf[kReduceSlices][33];
  buf[slice][lane] = sum;
  __syncthreads();
  if (slice == 0 && col < hidden) {
    acc_t total = buf[0][lane];
#pragma unroll
    for (int k = 1; k < kReduceSlices; ++k) total += buf[k][lane];
    acc_t v[1][1] = {{total}};
    store_chunks<1, 1>(out, bias ? p.bias_dtype : p.weight_dtype, col, 0, hidden, v);
  }
}

// Few partial rows (the cluster and streamed backward kernels write one per cluster or
// CTA, often under 32): one thread per column adds them in row order. Every thread is
// busy and every load is coalesced; the sliced kernel above would launch 16 idle
// slices per column. Even blocks reduce dweight, odd blocks dbias.
constexpr int kReduceColumnsBlock = 256;

template <typename acc_t>
__global__ void __launch_bounds__(kReduceColumnsBlock) reduce_partial_columns_kernel(const AddNormBwdParams p) {
  const bool bias = blockIdx.x % 2 == 1;
  const acc_t* __restrict__ partial = static_cast<const acc_t*>(bias ? p.dbias_partial : p.dweight_partial);
  void* out = bias ? p.dbias : p.dweight;
  const int col = static_cast<int>(blockIdx.x / 2) * kReduceColumnsBlock + static_cast<int>(threadIdx.x);
  if (partial == nullptr || out == nullptr || col >= p.hidden) return;  // no barriers follow
  acc_t sum = 0;
#pragma unroll 4
  for (int64_t k = 0; k < p.partial_rows; ++k) sum += partial[k * p.hidden + col];
  acc_t v[1][1] = {{sum}};
  store_chunks<1, 1>(out, bias ? p.bias_dtype : p.weight_dtype, col, 0, p.hidden, v);
}

}  // namespace residual_fused
