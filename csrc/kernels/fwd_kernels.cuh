// Forward kernels: y = norm(x + residual) * weight + bias, residual_out = x + residual.
//
// Three kernels:
//  * rows: the whole row in registers; every input read once, every output written
//    once, all of a row's loads in flight together (rows.cuh). A row belongs to a
//    group of threads (several rows per warp for small hidden sizes, several warps
//    per row for large ones); element types fixed per dtype mix, or read at run time.
//  * staged: one row per CTA with the fp32 sum parked in shared memory, for rows too
//    wide for registers; still one trip through HBM.
//  * streamed: any hidden size: one CTA per row, statistics in a first pass over the
//    row, outputs in a second (which mostly hits L2).
#pragma once

#include "ring.cuh"
#include "rows.cuh"

namespace residual_fused {

// One row group's inputs in a ring stage of the forward rows kernel: x, then the
// residual (when given).
__host__ __device__ inline int fwd_ring_row_bytes(const AddNormFwdParams& p) {
  return ring_row_bytes(p.x, p.x_dtype, p.hidden) + ring_row_bytes(p.residual, p.residual_dtype, p.hidden);
}

// Dynamic shared memory of the forward rows kernel, in bytes: the staged weight and
// bias (param_bytes each), and with STAGES == 2 the ring: two stages of every row
// group's inputs.
template <int CHUNKS, int VEC, int STAGES = 1>
__host__ __device__ inline int fwd_rows_smem(const AddNormFwdParams& p, int block) {
  const int rows_per_cta = block / row_threads_for(p.hidden, CHUNKS * VEC);
  const int params = param_bytes(p.weight, p.weight_dtype, p.hidden) + param_bytes(p.bias, p.bias_dtype, p.hidden);
  return params + (STAGES == 2 ? 2 * rows_per_cta * fwd_ring_row_bytes(p) : 0);
}

// Dynamic shared memory: fwd_rows_smem. Persistent: a CTA loops over rows with its
// parameters staged once.
//
// STAGES == 2 (16-byte vectors): the next iteration's rows are copied into a
// shared-memory ring (ring.cuh) while this one is computed, and the first rows' copies
// start before the parameters are staged.
template <class MIX, int CHUNKS, int VEC, int MAX_BLOCK, int STAGES = 1>
__global__ void __launch_bounds__(MAX_BLOCK, rows_min_ctas(CHUNKS * VEC, MAX_BLOCK))
add_norm_fwd_rows_kernel(const AddNormFwdParams p) {
  using X = typename MIX::act_t;
  using R = typename MIX::res_t;
  using W = typename MIX::param_t;
  constexpr bool kRing = STAGES == 2;
  static_assert(STAGES == 1 || (kRing && VEC == 8), "the ring: 16-byte vectors");
  const int hidden = p.hidden;
  const RowLayout<CHUNKS, VEC> rl(hidden);
  const bool has_residual = p.residual != nullptr;
  __shared__ float red[MAX_BLOCK / 32];

  // The ring sits after the parameters.
  const int64_t step = static_cast<int64_t>(gridDim.x) * rl.rows_per_cta;
  const int x_bytes = ring_row_bytes(p.x, p.x_dtype, hidden);
  const int group_bytes = fwd_ring_row_bytes(p);
  const int stage_bytes = rl.rows_per_cta * group_bytes;
  unsigned char* const ring =
      reinterpret_cast<unsigned char*>(dynamic_smem()) + (kRing ? fwd_rows_smem<CHUNKS, VEC>(p, blockDim.x) : 0);
  // Starts copying this thread's part of the rows from `first` on into `stage`: one
  // committed group per iteration (empty past the last row).
  const auto fetch = [&](int64_t first, int stage) {
    const int64_t row = first + rl.group;
    if (row < p.rows) {
      unsigned char* const b = ring + stage * stage_bytes + rl.group * group_bytes;
      fetch_chunks(b, row_of<X>(p.x, row, p.x_row_stride, p.x_dtype), elem_size<X>(p.x_dtype), rl, hidden);
      if (has_residual) {
        fetch_chunks(b + x_bytes, row_of<R>(p.residual, row, p.residual_row_stride, p.residual_dtype),
                     elem_size<R>(p.residual_dtype), rl, hidden);
      }
    }
    async_commit();
  };
  if constexpr (kRing) fetch(static_cast<int64_t>(blockIdx.x) * rl.rows_per_cta, 0);

  StagedParam weight, bias;
  stage_params<VEC>(p.weight, p.weight_dtype, float(p.weight_offset), p.bias, p.bias_dtype, hidden, weight,
                    bias);
  __syncthreads();

  // Trip count is uniform across the CTA, so the reductions' barriers are safe.
  int stage = 0;
  for (int64_t first = static_cast<int64_t>(blockIdx.x) * rl.rows_per_cta; first < p.rows;
       first += step, stage ^= 1) {
    const int64_t row = first + rl.group;
    const bool active = row < p.rows;  // idle row groups still join the reductions

    // x's and the residual's loads are all in flight before either is converted (or,
    // with the ring, the next rows' copies started and this row's awaited).
    const void* x_src = row_of<X>(p.x, row, p.x_row_stride, p.x_dtype);
    const void* r_src = row_of<R>(p.residual, row, p.residual_row_stride, p.residual_dtype);
    if constexpr (kRing) {
      fetch(first + step, stage ^ 1);
      async_wait<1>();
      const unsigned char* const b = ring + stage * stage_bytes + rl.group * group_bytes;
      x_src = b;
      r_src = b + x_bytes;
    }
    Fetched<X, CHUNKS, VEC> fx;
    Fetched<R, CHUNKS, VEC> fr;
    fx.load(x_src, p.x_dtype, rl.col0, rl.stride, hidden, active);
    fr.load(r_src, p.residual_dtype, rl.col0, rl.stride, hidden, active && has_residual);
    float s[CHUNKS][VEC];
    fx.to(s);
    if (has_residual) {
      float r[CHUNKS][VEC];
      fr.to(r);
      add_chunks(s, r);
    }

    // Two-pass statistics on the unrounded fp32 sum held in registers.
    float mean = 0.f;
    if (!p.is_rms_norm) {
      float sum[1] = {chunk_sum(s)};  // chunks past hidden are zero
      row_sum<MAX_BLOCK>(rl, sum, red);
      mean = sum[0] / hidden;
    }
    float sq[1] = {0.f};
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
      if (rl.col0 + c * rl.stride < hidden) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          const float d = s[c][i] - mean;
          sq[0] += d * d;
        }
      }
    }
    row_sum<MAX_BLOCK>(rl, sq, red);
    const float rstd = inv_sqrt(sq[0] / hidden + static_cast<float>(p.eps));

    if (active) {
      if (rl.col0 == 0) store_row_stats(p, row, mean, rstd);
      if (p.residual_out != nullptr) {
        store_row<R>(row_of<R>(p.residual_out, row, hidden, p.residual_out_dtype),
                     p.residual_out_dtype, rl.col0, rl.stride, hidden, s);
      }
#pragma unroll
      for (int c = 0; c < CHUNKS; ++c)
#pragma unroll
        for (int i = 0; i < VEC; ++i) s[c][i] = (s[c][i] - mean) * rstd;
      if (weight.ptr != nullptr) apply_param<Affine::kMul, W>(weight, rl.col0, rl.stride, hidden, s);
      if (bias.ptr != nullptr) apply_param<Affine::kAdd, W>(bias, rl.col0, rl.stride, hidden, s);
      store_row<X>(row_of<X>(p.y, row, hidden, p.x_dtype), p.x_dtype, rl.col0, rl.stride, hidden, s);
    }
  }
}

// ---- staged: wide rows in shared memory ---------------------------------------------

template <int CHUNKS, int VEC, typename acc_t>
__device__ __forceinline__ void load_sum_chunks(const AddNormFwdParams& p, const void* x,
                                                const void* r, int col0, int stride,
                                                acc_t (&s)[CHUNKS][VEC]) {
  load_chunks<CHUNKS, VEC>(x, p.x_dtype, col0, stride, p.hidden, s);
  if (r != nullptr) {
    acc_t q[CHUNKS][VEC];
    load_chunks<CHUNKS, VEC>(r, p.residual_dtype, col0, stride, p.hidden, q);
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c)
#pragma unroll
      for (int i = 0; i < VEC; ++i) s[c][i] += q[c][i];
  }
}

// Dynamic shared memory: blockDim * (CHUNKS * VEC + 1) floats. A thread parks its
// CHUNKS * VEC elements at a pitch of one extra word: scalar accesses are
// conflict-free, offsets are compile-time immediates, and since a thread reads back
// only what it wrote, no barrier is needed besides the reductions'.
template <int CHUNKS, int VEC, int MAX_BLOCK>
__global__ void __launch_bounds__(MAX_BLOCK, 1) add_norm_fwd_staged_kernel(const AddNormFwdParams p) {
  using acc_t = float;
  constexpr int kGroup = 4;  // chunks loaded together: bytes in flight vs registers
  static_assert(CHUNKS % kGroup == 0, "chunks come in groups");
  float* const dyn_smem = dynamic_smem();
  __shared__ acc_t red[MAX_BLOCK / 32];
  acc_t* const srow = dyn_smem + threadIdx.x * (CHUNKS * VEC + 1);
  const int hidden = p.hidden;
  const int stride = blockDim.x * VEC;
  const int col0 = threadIdx.x * VEC;
  const auto valid = [&](int c) { return col0 + c * stride < hidden; };

  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const void* x = row_ptr(p.x, row, p.x_row_stride, p.x_dtype);
    const void* r = p.residual == nullptr
                        ? nullptr
                        : row_ptr(p.residual, row, p.residual_row_stride, p.residual_dtype);
    acc_t sum[1] = {0.f};
#pragma unroll
    for (int g = 0; g < CHUNKS; g += kGroup) {
      acc_t s[kGroup][VEC];
      load_sum_chunks<kGroup, VEC>(p, x, r, col0 + g * stride, stride, s);
#pragma unroll
      for (int c = 0; c < kGroup; ++c) {
        if (valid(g + c)) {
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            srow[(g + c) * VEC + i] = s[c][i];
            sum[0] += s[c][i];
          }
        }
      }
    }
    acc_t mean = 0.f;
    if (!p.is_rms_norm) {
      block_sum<MAX_BLOCK>(sum, red);
      mean = sum[0] / hidden;
    }
    acc_t sq[1] = {0.f};
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
      if (valid(c)) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          const acc_t d = srow[c * VEC + i] - mean;
          sq[0] += d * d;
        }
      }
    }
    block_sum<MAX_BLOCK>(sq, red);
    const acc_t rstd = inv_sqrt(sq[0] / hidden + static_cast<acc_t>(p.eps));
    if (threadIdx.x == 0) store_row_stats(p, row, mean, rstd);

    void* y = row_ptr(p.y, row, hidden, p.x_dtype);
    void* res_out = p.residual_out == nullptr
                        ? nullptr
                        : row_ptr(p.residual_out, row, hidden, p.residual_out_dtype);
    // The weight offset's presence is fixed for the whole epilogue (one uniform branch),
    // so the weight and bias loads of a group are issued together on either side.
    const acc_t offset = static_cast<acc_t>(p.weight_offset);
    auto epilogue = [&](auto with_offset) {
      constexpr bool kOffset = decltype(with_offset)::value;
#pragma unroll
      for (int g = 0; g < CHUNKS; g += kGroup) {
        const int gcol = col0 + g * stride;
        acc_t s[kGroup][VEC];
#pragma unroll
        for (int c = 0; c < kGroup; ++c)
#pragma unroll
          for (int i = 0; i < VEC; ++i) s[c][i] = valid(g + c) ? srow[(g + c) * VEC + i] : 0.f;
        if (res_out != nullptr) store_chunks<kGroup, VEC>(res_out, p.residual_out_dtype, gcol, stride, hidden, s);
#pragma unroll
        for (int c = 0; c < kGroup; ++c)
#pragma unroll
          for (int i = 0; i < VEC; ++i) s[c][i] = (s[c][i] - mean) * rstd;
        if (p.weight != nullptr) {
          apply_affine_fixed<Affine::kMul, kOffset>(p.weight, p.weight_dtype, gcol, stride, hidden, s, offset);
        }
        if (p.bias != nullptr) apply_affine<Affine::kAdd>(p.bias, p.bias_dtype, gcol, stride, hidden, s);
        store_chunks<kGroup, VEC>(y, p.x_dtype, gcol, stride, hidden, s);
      }
    };
    if (offset != acc_t(0)) {
      epilogue(std::true_type{});
    } else {
      epilogue(std::false_type{});
    }
  }
}

// ---- streamed: any hidden size --------------------------------------------------

// Running (count, mean, M2) merged with Chan et al.'s pairwise update: stable, and
// unlike E[s^2] - E[s]^2 free of cancellation.
template <typename acc_t>
struct MeanM2 {
  acc_t n, mean, m2;

  __device__ __forceinline__ void merge(acc_t nb, acc_t mean_b, acc_t m2_b) {
    const acc_t total = n + nb;
    if (nb == acc_t(0)) return;
    const acc_t delta = mean_b - mean;
    const acc_t wb = nb / total;
    mean += delta * wb;
    m2 += m2_b + delta * delta * n * wb;
    n = total;
  }
};

template <int VEC, typename acc_t, int BLOCK>
__global__ void __launch_bounds__(BLOCK, 1) add_norm_fwd_streamed_kernel(const AddNormFwdParams p) {
  constexpr int kWarps = BLOCK / 32;
  __shared__ acc_t smem[3 * kWarps];
  const int hidden = p.hidden;
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const void* x = row_ptr(p.x, row, p.x_row_stride, p.x_dtype);
    const void* r = p.residual == nullptr
                        ? nullptr
                        : row_ptr(p.residual, row, p.residual_row_stride, p.residual_dtype);

    // Pass 1: per-thread statistics, then a fixed-order merge over the block.
    MeanM2<acc_t> st{acc_t(0), acc_t(0), acc_t(0)};
    for (int col = threadIdx.x * VEC; col < hidden; col += BLOCK * VEC) {
      acc_t s[1][VEC];
      load_sum_chunks<1, VEC>(p, x, r, col, 0, s);
      if (p.is_rms_norm) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) st.m2 += s[0][i] * s[0][i];
      } else {
        acc_t cmean = 0, cm2 = 0;
#pragma unroll
        for (int i = 0; i < VEC; ++i) cmean += s[0][i];
        cmean /= VEC;
#pragma unroll
        for (int i = 0; i < VEC; ++i) cm2 += (s[0][i] - cmean) * (s[0][i] - cmean);
        st.merge(acc_t(VEC), cmean, cm2);
      }
    }
    for (int offset = 16; offset > 0; offset /= 2) {
      const acc_t nb = __shfl_xor_sync(0xffffffffu, st.n, offset);
      const acc_t mb = __shfl_xor_sync(0xffffffffu, st.mean, offset);
      const acc_t m2b = __shfl_xor_sync(0xffffffffu, st.m2, offset);
      if (p.is_rms_norm) st.m2 += m2b; else st.merge(nb, mb, m2b);
    }
    const int warp = threadIdx.x / 32;
    if (threadIdx.x % 32 == 0) {
      smem[warp] = st.n;
      smem[kWarps + warp] = st.mean;
      smem[2 * kWarps + warp] = st.m2;
    }
    __syncthreads();
    MeanM2<acc_t> total{smem[0], smem[kWarps], smem[2 * kWarps]};
    for (int w = 1; w < kWarps; ++w) {
      if (p.is_rms_norm) total.m2 += smem[2 * kWarps + w];
      else total.merge(smem[w], smem[kWarps + w], smem[2 * kWarps + w]);
    }
    __syncthreads();  // smem is rewritten by the next row
    const acc_t mean = p.is_rms_norm ? acc_t(0) : total.mean;
    const acc_t rstd = inv_sqrt(total.m2 / hidden + static_cast<acc_t>(p.eps));
    if (threadIdx.x == 0) store_row_stats(p, row, mean, rstd);

    // Pass 2: recompute the sum (bitwise the same) and write the outputs.
    void* y = row_ptr(p.y, row, hidden, p.x_dtype);
    void* res_out = p.residual_out == nullptr
                        ? nullptr
                        : row_ptr(p.residual_out, row, hidden, p.residual_out_dtype);
    for (int col = threadIdx.x * VEC; col < hidden; col += BLOCK * VEC) {
      acc_t s[1][VEC];
      load_sum_chunks<1, VEC>(p, x, r, col, 0, s);
      if (res_out != nullptr) store_chunks<1, VEC>(res_out, p.residual_out_dtype, col, 0, hidden, s);
#pragma unroll
      for (int i = 0; i < VEC; ++i) s[0][i] = (s[0][i] - mean) * rstd;
      if (p.weight != nullptr) {
        apply_affine<Affine::kMul>(p.weight, p.weight_dtype, col, 0, hidden, s, p.weight_offset);
      }
      if (p.bias != nullptr) apply_affine<Affine::kAdd>(p.bias, p.bias_dtype, col, 0, hidden, s);
      store_chunks<1, VEC>(y, p.x_dtype, col, 0, hidden, s);
    }
  }
}

}  // namespace residual_fused
