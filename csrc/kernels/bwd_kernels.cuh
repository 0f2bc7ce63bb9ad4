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

#include "common.cuh"

namespace residual_fused {

template <int CHUNKS, int VEC, typename acc_t>
__device__ __forceinline__ void zero(acc_t (&v)[CHUNKS][VEC]) {
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c)
#pragma unroll
    for (int i = 0; i < VEC; ++i) v[c][i] = acc_t(0);
}

// Row group (ROW_THREADS <= 32) kernels keep the dweight/dbias sums in registers;
// whole-block kernels keep them in dynamic shared memory so the registers hold the
// row. There each thread only touches its own CHUNKS * VEC elements, at a pitch of
// one extra word (scalar accesses are conflict-free, offsets are compile-time
// immediates, and no barrier is needed). Either way the CTA writes one partial row
// per weight gradient at the end. Dynamic shared memory, in floats:
// whole-block 2 * blockDim * (CHUNKS * VEC + 1); row groups 2 * blockDim * CHUNKS * VEC.
template <int ROW_THREADS, int CHUNKS, int VEC, int MAX_BLOCK>
__global__ void __launch_bounds__(MAX_BLOCK, 1)
add_norm_bwd_rows_kernel(const AddNormBwdParams p) {
  using acc_t = float;
  constexpr bool kWhole = ROW_THREADS == kWholeBlock;
  const RowGroup<ROW_THREADS, VEC, MAX_BLOCK> rg;
  const int hidden = p.hidden;
  const bool want_partials = p.dweight_partial != nullptr || p.dbias_partial != nullptr;
  float* const dyn_smem = dynamic_smem();
  __shared__ acc_t red[kWhole ? 2 * (MAX_BLOCK / 32) : 1];

  // Partial sums: registers for row groups, shared memory for a whole-block row.
  constexpr int kPitch = CHUNKS * VEC + 1;
  acc_t dw_reg[kWhole ? 1 : CHUNKS][VEC], db_reg[kWhole ? 1 : CHUNKS][VEC];
  acc_t* const dw_smem = dyn_smem + threadIdx.x * kPitch;
  acc_t* const db_smem = dyn_smem + (blockDim.x + threadIdx.x) * kPitch;
  if constexpr (kWhole) {
#pragma unroll
    for (int k = 0; k < CHUNKS * VEC; ++k) dw_smem[k] = db_smem[k] = 0.f;
  } else {
    zero(dw_reg);
    zero(db_reg);
  }

  for (int64_t first = static_cast<int64_t>(blockIdx.x) * rg.rows_per_cta; first < p.rows;
       first += static_cast<int64_t>(gridDim.x) * rg.rows_per_cta) {
    const int64_t row = first + threadIdx.x / rg.row_threads;
    const bool active = row < p.rows;  // idle row groups still join the shuffles

    acc_t v[CHUNKS][VEC], g[CHUNKS][VEC];  // g holds dy until it is scaled by weight
    acc_t rstd = 0.f;
    if (active) {
      load_chunks<CHUNKS, VEC>(row_ptr(p.saved, row, p.saved_row_stride, p.saved_dtype),
                               p.saved_dtype, rg.col0, rg.stride, hidden, v);
      load_chunks<CHUNKS, VEC>(row_ptr(p.dy, row, p.dy_row_stride, p.dy_dtype), p.dy_dtype, rg.col0,
                               rg.stride, hidden, g);
      rstd = static_cast<const acc_t*>(p.rstd)[row];
    } else {
      zero(v);
      zero(g);
    }

    // v -> xhat (zero past the end of the row).
    if (p.memory_efficient) {
      if (p.bias != nullptr) apply_affine<Affine::kSub>(p.bias, p.bias_dtype, rg.col0, rg.stride, hidden, v);
      if (p.weight != nullptr) apply_affine<Affine::kDiv>(p.weight, p.weight_dtype, rg.col0, rg.stride, hidden, v);
    }
    const acc_t scale = p.memory_efficient ? acc_t(1) : rstd;
    acc_t mean_v = 0.f;
    if (!p.is_rms_norm) {
      acc_t sum[1] = {0.f};
#pragma unroll
      for (int c = 0; c < CHUNKS; ++c)
#pragma unroll
        for (int i = 0; i < VEC; ++i) sum[0] += v[c][i];
      if constexpr (kWhole) block_sum<MAX_BLOCK>(sum, red); else group_sum<ROW_THREADS>(sum);
      mean_v = sum[0] / hidden;
    }
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
      if (rg.col0 + c * rg.stride < hidden) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) v[c][i] = (v[c][i] - mean_v) * scale;
      }
    }

    // Weight-gradient partials use dy, before it is scaled into g.
    if (active && want_partials) {
#pragma unroll
      for (int c = 0; c < CHUNKS; ++c) {
        const int col = rg.col0 + c * rg.stride;
        if (col < hidden) {
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            if constexpr (kWhole) {
              dw_smem[c * VEC + i] += g[c][i] * v[c][i];
              db_smem[c * VEC + i] += g[c][i];
            } else {
              dw_reg[c][i] += g[c][i] * v[c][i];
              db_reg[c][i] += g[c][i];
            }
          }
        }
      }
    }

    if (p.weight != nullptr) apply_affine<Affine::kMul>(p.weight, p.weight_dtype, rg.col0, rg.stride, hidden, g);
    acc_t sums[2] = {0.f, 0.f};  // sum(g), sum(g * xhat)
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c)
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        sums[0] += g[c][i];
        sums[1] += g[c][i] * v[c][i];
      }
    if constexpr (kWhole) block_sum<MAX_BLOCK>(sums, red); else group_sum<ROW_THREADS>(sums);
    const acc_t mean_g = p.is_rms_norm ? acc_t(0) : sums[0] / hidden;
    const acc_t mean_gx = sums[1] / hidden;

    if (active) {
#pragma unroll
      for (int c = 0; c < CHUNKS; ++c)
#pragma unroll
        for (int i = 0; i < VEC; ++i) g[c][i] = rstd * (g[c][i] - mean_g - v[c][i] * mean_gx);
      if (p.dresidual_out != nullptr) {
        acc_t d[CHUNKS][VEC];
        load_chunks<CHUNKS, VEC>(
            row_ptr(p.dresidual_out, row, p.dresidual_out_row_stride, p.dresidual_out_dtype),
            p.dresidual_out_dtype, rg.col0, rg.stride, hidden, d);
#pragma unroll
        for (int c = 0; c < CHUNKS; ++c)
#pragma unroll
          for (int i = 0; i < VEC; ++i) g[c][i] += d[c][i];
      }
      store_chunks<CHUNKS, VEC>(row_ptr(p.dx, row, hidden, p.dy_dtype), p.dy_dtype, rg.col0, rg.stride,
                                hidden, g);
      if (p.dresidual != nullptr) {
        store_chunks<CHUNKS, VEC>(row_ptr(p.dresidual, row, hidden, p.dresidual_dtype),
                                  p.dresidual_dtype, rg.col0, rg.stride, hidden, g);
      }
    }
  }

  if (!want_partials) return;
  acc_t* const dw_out = static_cast<acc_t*>(p.dweight_partial);
  acc_t* const db_out = static_cast<acc_t*>(p.dbias_partial);
  const int64_t out_row = static_cast<int64_t>(blockIdx.x) * hidden;
  if constexpr (kWhole) {
    for (int c = 0; c < CHUNKS; ++c) {
      const int col = rg.col0 + c * rg.stride;
      if (col < hidden) {
        for (int i = 0; i < VEC; ++i) {
          if (dw_out != nullptr) dw_out[out_row + col + i] = dw_smem[c * VEC + i];
          if (db_out != nullptr) db_out[out_row + col + i] = db_smem[c * VEC + i];
        }
      }
    }
  } else {
    // Sum the CTA's row groups in a fixed order through shared memory.
    const int width = rg.stride * CHUNKS;  // columns a row group covers (>= hidden)
    const int group = threadIdx.x / rg.row_threads;
    acc_t* const dw_buf = dyn_smem;
    acc_t* const db_buf = dyn_smem + rg.rows_per_cta * width;
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c)
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        dw_buf[group * width + rg.col0 + c * rg.stride + i] = dw_reg[c][i];
        db_buf[group * width + rg.col0 + c * rg.stride + i] = db_reg[c][i];
      }
    __syncthreads();
    for (int col = threadIdx.x; col < hidden; col += blockDim.x) {
      acc_t dw = dw_buf[col], db = db_buf[col];
      for (int k = 1; k < rg.rows_per_cta; ++k) {
        dw += dw_buf[k * width + col];
        db += db_buf[k * width + col];
      }
      if (dw_out != nullptr) dw_out[out_row + col] = dw;
      if (db_out != nullptr) db_out[out_row + col] = db;
    }
  }
}

// ---- streamed: any hidden size --------------------------------------------------
// One CTA per row, three passes over the row (they mostly hit L2): the mean of the
// rebuilt values (LayerNorm), then sum(g) and sum(g * xhat), then the outputs. The
// partial sums are read-modify-written in this CTA's own row of the workspace.

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
      if (p.weight != nullptr) apply_affine<Affine::kDiv>(p.weight, p.weight_dtype, col, 0, p.hidden, v);
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
  acc_t* const dw_out = static_cast<acc_t*>(p.dweight_partial);
  acc_t* const db_out = static_cast<acc_t*>(p.dbias_partial);
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
      if (p.weight != nullptr) apply_affine<Affine::kMul>(p.weight, p.weight_dtype, col, 0, hidden, g);
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
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        if (dw_out != nullptr) {
          const acc_t prev = first ? acc_t(0) : dw_out[out_row + col + i];
          dw_out[out_row + col + i] = prev + g[0][i] * v[0][i];
        }
        if (db_out != nullptr) {
          const acc_t prev = first ? acc_t(0) : db_out[out_row + col + i];
          db_out[out_row + col + i] = prev + g[0][i];
        }
      }
      if (p.weight != nullptr) apply_affine<Affine::kMul>(p.weight, p.weight_dtype, col, 0, hidden, g);
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

}  // namespace residual_fused
