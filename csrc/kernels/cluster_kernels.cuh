// Wide rows split across a thread-block cluster (sm_90).
//
// One idea: a row too wide for one CTA's registers is cut into `cluster` slices, one
// per CTA of a cluster, each held in registers exactly as the rows kernels hold a
// whole row (rows.cuh: every load of the slice in flight before any is used). The
// row's statistics need one exchange through distributed shared memory per row: each
// CTA publishes its slice's partial statistics, one cluster barrier, and every CTA
// reads all of them and combines them in rank order (so every CTA gets bitwise the
// same result). Each input byte is read from HBM once and each output written once.
// At 16 elements per thread each thread also fetches its part of the next row into
// shared memory (cp.async) while the current row is computed.
//
// Exchange slots are double-buffered by row parity: a CTA overwrites slot[parity]
// two rows later, after the barrier of the row between, which every peer reaches
// only once it has read that slot. A final barrier keeps every CTA's shared memory
// alive until its peers are done with it.
//
// The statistics combine per-slice values in a stable way:
//   forward LayerNorm: (mean_r, M2_r) around each slice's own mean, merged as
//     M2 = sum_r M2_r + n_r (mean_r - mean)^2 (no E[x^2] - E[x]^2 cancellation);
//   backward: (mean_r, sum g, sum g (v - mean_r)) with the row mean folded in as
//     sum g (v - mean) = sum_r [S_gv,r + (mean_r - mean) S_g,r].
#pragma once

#include "bwd_kernels.cuh"
#include "cluster.cuh"
#include "ring.cuh"

namespace residual_fused {

// Most CTAs per cluster: 16 on sm_90 with the non-portable size allowed (8 without).
constexpr int kMaxCluster = 16;

// Columns per CTA when a row of `hidden` is split `cluster` ways: equal slices of a
// multiple of 8 columns (16-byte vectors), the last one shorter. Every slice is
// non-empty for the shapes the plans use (cluster_rows.cu: whole warps per CTA).
__host__ __device__ inline int cluster_slice(int hidden, int cluster) {
  return ((hidden + cluster - 1) / cluster + 7) / 8 * 8;
}

// Element `col` of row `row` of a [rows, hidden] tensor of T (AnyType: dtype t); null
// stays null.
template <typename T, typename P>
__device__ __forceinline__ P* slice_of(P* base, int64_t row, int64_t row_stride, int col, DType t) {
  using Byte = typename std::conditional<std::is_const<P>::value, const char, char>::type;
  P* const r = row_of<T>(base, row, row_stride, t);
  return r == nullptr ? r : reinterpret_cast<P*>(reinterpret_cast<Byte*>(r) + int64_t{col} * elem_size<T>(t));
}

// ---- the next row's slice, fetched while this one is computed ---------------------
// With 16 elements per thread, a CTA double-buffers its inputs in shared memory: the
// copies of row r + 1 (cp.async) are in flight through row r's reductions, cluster
// barrier and stores, so the barrier's wait no longer idles the memory system
// (ring.cuh: each thread copies and waits for its own vectors, no barrier).

template <int CHUNKS, int VEC>
constexpr bool kClusterPipelined = CHUNKS * VEC <= 16;

#if RESIDUAL_FUSED_HAS_CLUSTERS
// Where this CTA sits in its cluster and which columns it owns.
struct ClusterSlice {
  int hidden;   // columns of the whole row
  int cluster;  // CTAs per cluster
  int rank;     // this CTA's rank
  int slice;    // columns per slice (the layout is sized by it: the same in every CTA)
  int begin;    // first column of this CTA's slice
  int len;      // columns of this CTA's slice

  __device__ __forceinline__ explicit ClusterSlice(int hidden_size)
      : hidden(hidden_size),
        cluster(cluster_size()),
        rank(cluster_rank()),
        slice(cluster_slice(hidden_size, cluster)),
        begin(rank * slice),
        len(len_of(rank)) {}

  // Columns of the slice of rank r.
  __device__ __forceinline__ int len_of(int r) const { return hidden - r * slice < slice ? hidden - r * slice : slice; }
};

// Publishes this CTA's N values for the row of `parity` and gathers every rank's into
// `all` (rank order). Every thread of the cluster calls it; `mine` is the same in
// every thread of a CTA (row_sum's result).
template <int N>
__device__ __forceinline__ void cluster_gather(float* slots, int parity, const float (&mine)[N],
                                               float (*all)[N]) {
  float* const slot = slots + parity * N;
  if (threadIdx.x == 0) {
#pragma unroll
    for (int i = 0; i < N; ++i) slot[i] = mine[i];
  }
  cluster_sync();
  if (static_cast<int>(threadIdx.x) < cluster_size()) {
    const float* const peer = cluster_map(slot, static_cast<int>(threadIdx.x));
#pragma unroll
    for (int i = 0; i < N; ++i) all[threadIdx.x][i] = peer[i];
  }
  __syncthreads();
}
#endif  // RESIDUAL_FUSED_HAS_CLUSTERS

// Bytes of exchange slots after the staged parameters: 2 parities x 4 floats.
constexpr int kClusterSlotBytes = 2 * 4 * static_cast<int>(sizeof(float));

// Dynamic shared memory of the forward cluster kernel: the CTA's slices of weight and
// bias, the exchange slots, and (pipelined) two buffers of the x and residual slices.
template <int CHUNKS, int VEC>
__host__ __device__ inline int fwd_cluster_smem(const AddNormFwdParams& p, int slice) {
  const int buffers = kClusterPipelined<CHUNKS, VEC>
                          ? 2 * (ring_row_bytes(p.x, p.x_dtype, slice) +
                                 ring_row_bytes(p.residual, p.residual_dtype, slice))
                          : 0;
  return param_bytes(p.weight, p.weight_dtype, slice) + param_bytes(p.bias, p.bias_dtype, slice) +
         kClusterSlotBytes + buffers;
}

// ---- forward -----------------------------------------------------------------------
// Dynamic shared memory: fwd_cluster_smem. Two CTAs per SM (64 registers) only where two CTAs' buffers and parameters fit in
// shared memory: 16-bit residual stream and parameters (about 96 KB per CTA at 8192
// columns). fp32 ones need about 160 KB: one CTA, and registers to match.
template <class MIX, int CHUNKS, int VEC, int MAX_BLOCK>
constexpr int fwd_cluster_min_ctas() {
  return sizeof(typename MIX::res_t) <= 2 && sizeof(typename MIX::param_t) <= 2
             ? rows_min_ctas(CHUNKS * VEC, MAX_BLOCK)
             : 1;
}

template <class MIX, int CHUNKS, int VEC, int MAX_BLOCK>
__global__ void __launch_bounds__(MAX_BLOCK, (fwd_cluster_min_ctas<MIX, CHUNKS, VEC, MAX_BLOCK>()))
add_norm_fwd_cluster_kernel(const AddNormFwdParams p) {
#if RESIDUAL_FUSED_HAS_CLUSTERS
  using X = typename MIX::act_t;
  using R = typename MIX::res_t;
  using W = typename MIX::param_t;
  const int hidden = p.hidden;
  const ClusterSlice cs(hidden);
  const RowLayout<CHUNKS, VEC> rl(cs.slice);  // one row group: blockDim == its threads
  const int len = cs.len;
  __shared__ float red[MAX_BLOCK / 32];
  __shared__ float all[kMaxCluster][2];

  constexpr bool kPipelined = kClusterPipelined<CHUNKS, VEC>;
  StagedParam weight, bias;
  stage_params<VEC>(slice_of<W>(p.weight, 0, 0, cs.begin, p.weight_dtype), p.weight_dtype,
                    float(p.weight_offset), slice_of<W>(p.bias, 0, 0, cs.begin, p.bias_dtype), p.bias_dtype, len, weight, bias);
  float* const slots = dynamic_smem() + (param_bytes(p.weight, p.weight_dtype, cs.slice) +
                                         param_bytes(p.bias, p.bias_dtype, cs.slice)) / 4;
  unsigned char* const buffers = reinterpret_cast<unsigned char*>(slots) + kClusterSlotBytes;
  const bool has_residual = p.residual != nullptr;
  const int x_bytes = ring_row_bytes(p.x, p.x_dtype, cs.slice);
  const int stage_bytes = x_bytes + ring_row_bytes(p.residual, p.residual_dtype, cs.slice);
  const auto fetch = [&](int64_t row, int buf) {  // one committed group per row
    unsigned char* const b = buffers + buf * stage_bytes;
    fetch_chunks(b, slice_of<X>(p.x, row, p.x_row_stride, cs.begin, p.x_dtype), elem_size<X>(p.x_dtype), rl, len);
    if (has_residual) {
      fetch_chunks(b + x_bytes, slice_of<R>(p.residual, row, p.residual_row_stride, cs.begin, p.residual_dtype),
                  elem_size<R>(p.residual_dtype), rl, len);
    }
    async_commit();
  };
  // No barrier after staging: the parameters are first read after the row's cluster
  // barrier, which every thread of the CTA passes.

  const int64_t clusters = gridDim.x / cs.cluster;
  const int64_t first = blockIdx.x / cs.cluster;
  if (kPipelined && first < p.rows) fetch(first, 0);
  int parity = 0;
  // Every CTA of a cluster runs the same rows: the barriers inside are uniform.
  for (int64_t row = first; row < p.rows; row += clusters, parity ^= 1) {
    const void* x_src = slice_of<X>(p.x, row, p.x_row_stride, cs.begin, p.x_dtype);
    const void* r_src = slice_of<R>(p.residual, row, p.residual_row_stride, cs.begin, p.residual_dtype);
    if (kPipelined) {
      if (row + clusters < p.rows) {
        fetch(row + clusters, parity ^ 1);
      } else {
        async_commit();  // an empty group keeps "all but the newest" meaning this row
      }
      async_wait<1>();
      x_src = buffers + parity * stage_bytes;
      r_src = buffers + parity * stage_bytes + x_bytes;
    }
    Fetched<X, CHUNKS, VEC> fx;
    Fetched<R, CHUNKS, VEC> fr;
    fx.load(x_src, p.x_dtype, rl.col0, rl.stride, len, true);
    fr.load(r_src, p.residual_dtype, rl.col0, rl.stride, len, has_residual);
    float s[CHUNKS][VEC];
    fx.to(s);
    if (has_residual) {
      float r[CHUNKS][VEC];
      fr.to(r);
      add_chunks(s, r);
    }

    // The slice's statistics, around its own mean (LayerNorm).
    float local_mean = 0.f;
    if (!p.is_rms_norm) {
      float sum[1] = {chunk_sum(s)};  // zero past the slice
      row_sum<MAX_BLOCK>(rl, sum, red);
      local_mean = sum[0] / len;
    }
    float sq[1] = {0.f};
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
      if (rl.col0 + c * rl.stride < len) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          const float d = s[c][i] - local_mean;
          sq[0] += d * d;
        }
      }
    }
    row_sum<MAX_BLOCK>(rl, sq, red);
    const float mine[2] = {local_mean, sq[0]};
    cluster_gather<2>(slots, parity, mine, all);

    float mean = 0.f;
    if (!p.is_rms_norm) {
      for (int r = 0; r < cs.cluster; ++r) mean += static_cast<float>(cs.len_of(r)) * all[r][0];
      mean /= hidden;
    }
    float m2 = 0.f;
    for (int r = 0; r < cs.cluster; ++r) {
      const float d = all[r][0] - mean;
      m2 += all[r][1] + static_cast<float>(cs.len_of(r)) * d * d;
    }
    const float rstd = inv_sqrt(m2 / hidden + static_cast<float>(p.eps));

    if (cs.rank == 0 && threadIdx.x == 0) store_row_stats(p, row, mean, rstd);
    if (p.residual_out != nullptr) {
      store_row<R>(slice_of<R>(p.residual_out, row, hidden, cs.begin, p.residual_out_dtype),
                   p.residual_out_dtype, rl.col0, rl.stride, len, s);
    }
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c)
#pragma unroll
      for (int i = 0; i < VEC; ++i) s[c][i] = (s[c][i] - mean) * rstd;
    if (weight.ptr != nullptr) apply_param<Affine::kMul, W>(weight, rl.col0, rl.stride, len, s);
    if (bias.ptr != nullptr) apply_param<Affine::kAdd, W>(bias, rl.col0, rl.stride, len, s);
    store_row<X>(slice_of<X>(p.y, row, hidden, cs.begin, p.x_dtype), p.x_dtype, rl.col0, rl.stride,
                 len, s);
  }
  cluster_sync();  // peers may still read this CTA's last slot
#endif
}

// ---- backward ----------------------------------------------------------------------

// Dynamic shared memory of the backward cluster kernel: the CTA's slices of weight
// (and bias when xhat is rebuilt from y), the exchange slots, then either the partials
// (32 elements per thread) or two buffers of the saved, dy and d(residual_out) slices
// (16 elements per thread: pipelined, partials in registers).
template <int CHUNKS, int VEC>
__host__ __device__ inline int bwd_cluster_smem(const AddNormBwdParams& p, int slice, int block) {
  const int params = param_bytes(p.weight, p.weight_dtype, slice) +
                     (p.memory_efficient ? param_bytes(p.bias, p.bias_dtype, slice) : 0);
  const int buffers = kClusterPipelined<CHUNKS, VEC>
                          ? 2 * (ring_row_bytes(p.saved, p.saved_dtype, slice) +
                                 ring_row_bytes(p.dy, p.dy_dtype, slice) +
                                 ring_row_bytes(p.dresidual_out, p.dresidual_out_dtype, slice))
                          : 0;
  return params + kClusterSlotBytes + buffers +
         static_cast<int>(sizeof(float)) * block * Partials<CHUNKS, VEC, kSmemPartials<CHUNKS, VEC>>::kSmemFloats;
}

// Each CTA keeps the column sums of its slice over all the rows its cluster handles
// and writes them once, to partial row blockIdx.x / cluster (columns of its slice).
template <class MIX, int CHUNKS, int VEC, int MAX_BLOCK>
__global__ void __launch_bounds__(MAX_BLOCK, 1) add_norm_bwd_cluster_kernel(const AddNormBwdParams p) {
#if RESIDUAL_FUSED_HAS_CLUSTERS
  using X = typename MIX::act_t;
  using R = typename MIX::res_t;
  using W = typename MIX::param_t;
  using S = typename MIX::saved_t;
  constexpr bool kSmem = kSmemPartials<CHUNKS, VEC>;
  constexpr bool kEarlyDresOut = !kSmem;  // as in the rows kernel: holding it would spill
  const int hidden = p.hidden;
  const ClusterSlice cs(hidden);
  const RowLayout<CHUNKS, VEC> rl(cs.slice);
  const int len = cs.len;
  const bool want_partials = p.dweight_partial != nullptr || p.dbias_partial != nullptr;
  __shared__ float red[2 * (MAX_BLOCK / 32)];
  __shared__ float all[kMaxCluster][3];

  StagedParam weight, bias;
  stage_params<VEC>(slice_of<W>(p.weight, 0, 0, cs.begin, p.weight_dtype), p.weight_dtype,
                    float(p.weight_offset), p.memory_efficient ? slice_of<W>(p.bias, 0, 0, cs.begin, p.bias_dtype) : nullptr,
                    p.bias_dtype, len, weight, bias);
  float* const slots = dynamic_smem() + (param_bytes(weight.ptr, p.weight_dtype, cs.slice) +
                                         param_bytes(bias.ptr, p.bias_dtype, cs.slice)) / 4;
  Partials<CHUNKS, VEC, kSmem> part(slots + kClusterSlotBytes / 4);
  constexpr bool kPipelined = kClusterPipelined<CHUNKS, VEC>;
  static_assert(!(kPipelined && kSmem), "the buffers take the partials' place");
  unsigned char* const buffers = reinterpret_cast<unsigned char*>(slots) + kClusterSlotBytes;
  const bool has_dres_out = p.dresidual_out != nullptr;
  const int saved_bytes = ring_row_bytes(p.saved, p.saved_dtype, cs.slice);
  const int dy_bytes = ring_row_bytes(p.dy, p.dy_dtype, cs.slice);
  const int stage_bytes =
      saved_bytes + dy_bytes + ring_row_bytes(p.dresidual_out, p.dresidual_out_dtype, cs.slice);
  const float* const rstd_of = static_cast<const float*>(p.rstd);
  float rstd_next = 0.f;
  const auto fetch = [&](int64_t row, int buf) {  // one committed group per row, and its rstd
    unsigned char* const b = buffers + buf * stage_bytes;
    fetch_chunks(b, slice_of<S>(p.saved, row, p.saved_row_stride, cs.begin, p.saved_dtype),
                elem_size<S>(p.saved_dtype), rl, len);
    fetch_chunks(b + saved_bytes, slice_of<X>(p.dy, row, p.dy_row_stride, cs.begin, p.dy_dtype),
                elem_size<X>(p.dy_dtype), rl, len);
    if (has_dres_out) {
      fetch_chunks(b + saved_bytes + dy_bytes,
                  slice_of<R>(p.dresidual_out, row, p.dresidual_out_row_stride, cs.begin, p.dresidual_out_dtype),
                  elem_size<R>(p.dresidual_out_dtype), rl, len);
    }
    async_commit();
    rstd_next = rstd_of[row];
  };
  __syncthreads();

  const int64_t clusters = gridDim.x / cs.cluster;
  const int64_t first = blockIdx.x / cs.cluster;
  if (kPipelined && first < p.rows) fetch(first, 0);
  int parity = 0;
  for (int64_t row = first; row < p.rows; row += clusters, parity ^= 1) {
    const void* const dres_out_row =
        slice_of<R>(p.dresidual_out, row, p.dresidual_out_row_stride, cs.begin, p.dresidual_out_dtype);
    const void* saved_src = slice_of<S>(p.saved, row, p.saved_row_stride, cs.begin, p.saved_dtype);
    const void* dy_src = slice_of<X>(p.dy, row, p.dy_row_stride, cs.begin, p.dy_dtype);
    const void* dres_out_src = dres_out_row;
    float rstd;
    if (kPipelined) {
      rstd = rstd_next;
      if (row + clusters < p.rows) {
        fetch(row + clusters, parity ^ 1);
      } else {
        async_commit();  // an empty group keeps "all but the newest" meaning this row
      }
      async_wait<1>();
      saved_src = buffers + parity * stage_bytes;
      dy_src = buffers + parity * stage_bytes + saved_bytes;
      dres_out_src = buffers + parity * stage_bytes + saved_bytes + dy_bytes;
    } else {
      rstd = rstd_of[row];
    }
    Fetched<S, CHUNKS, VEC> fs;
    Fetched<X, CHUNKS, VEC> fdy;
    Fetched<R, CHUNKS, VEC> fdo;
    fs.load(saved_src, p.saved_dtype, rl.col0, rl.stride, len, true);
    fdy.load(dy_src, p.dy_dtype, rl.col0, rl.stride, len, true);
    if (kEarlyDresOut) fdo.load(dres_out_src, p.dresidual_out_dtype, rl.col0, rl.stride, len, has_dres_out);

    float v[CHUNKS][VEC], dy[CHUNKS][VEC];
    fs.to(v);
    fdy.to(dy);
    if (p.memory_efficient) undo_affine<W>(weight, bias, rl.col0, rl.stride, len, v);
    const float scale = p.memory_efficient ? 1.f : rstd;

    // v centred on the slice's mean (LayerNorm), zero past the slice.
    float local_mean = 0.f;
    if (!p.is_rms_norm) {
      float sum[1] = {chunk_sum(v)};
      row_sum<MAX_BLOCK>(rl, sum, red);
      local_mean = sum[0] / len;
#pragma unroll
      for (int c = 0; c < CHUNKS; ++c) {
        if (rl.col0 + c * rl.stride < len) {
#pragma unroll
          for (int i = 0; i < VEC; ++i) v[c][i] -= local_mean;
        }
      }
    }
    float sums[2] = {0.f, 0.f};  // sum g, sum g * v over the slice (g = dy * weight)
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {  // a chunk at a time: dy stays unscaled, no spills
      float g[1][VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) g[0][i] = dy[c][i];
      if (weight.ptr != nullptr) apply_param<Affine::kMul, W>(weight, rl.col0 + c * rl.stride, rl.stride, len, g);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        sums[0] += g[0][i];
        sums[1] += g[0][i] * v[c][i];
      }
    }
    row_sum<MAX_BLOCK>(rl, sums, red);
    const float mine[3] = {local_mean, sums[0], sums[1]};
    cluster_gather<3>(slots, parity, mine, all);

    float mean = 0.f;
    if (!p.is_rms_norm) {
      for (int r = 0; r < cs.cluster; ++r) mean += static_cast<float>(cs.len_of(r)) * all[r][0];
      mean /= hidden;
    }
    float sum_g = 0.f, sum_gv = 0.f;
    for (int r = 0; r < cs.cluster; ++r) {
      sum_g += all[r][1];
      sum_gv += all[r][2] + (all[r][0] - mean) * all[r][1];
    }
    const float mean_g = p.is_rms_norm ? 0.f : sum_g / hidden;
    const float mean_gx = scale * sum_gv / hidden;
    const float shift = local_mean - mean;
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
      if (rl.col0 + c * rl.stride < len) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) v[c][i] = (v[c][i] + shift) * scale;  // xhat
      }
    }
    if (want_partials) {
#pragma unroll
      for (int c = 0; c < CHUNKS; ++c) {
        if (rl.col0 + c * rl.stride < len) part.add(c, dy[c], v[c]);
      }
    }
    if (weight.ptr != nullptr) apply_param<Affine::kMul, W>(weight, rl.col0, rl.stride, len, dy);
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c)
#pragma unroll
      for (int i = 0; i < VEC; ++i) dy[c][i] = rstd * (dy[c][i] - mean_g - v[c][i] * mean_gx);
    if (has_dres_out) {
      if (!kEarlyDresOut) fdo.load(dres_out_row, p.dresidual_out_dtype, rl.col0, rl.stride, len, true);
      float d[CHUNKS][VEC];
      fdo.to(d);
      add_chunks(dy, d);
    }
    store_row<X>(slice_of<X>(p.dx, row, hidden, cs.begin, p.dy_dtype), p.dy_dtype, rl.col0, rl.stride,
                 len, dy);
    if (p.dresidual != nullptr) {
      store_row<R>(slice_of<R>(p.dresidual, row, hidden, cs.begin, p.dresidual_dtype), p.dresidual_dtype,
                   rl.col0, rl.stride, len, dy);
    }
  }

  if (want_partials) {
    const int64_t out = (static_cast<int64_t>(blockIdx.x) / cs.cluster) * hidden + cs.begin;
    float* const dw_out = p.dweight_partial == nullptr ? nullptr : static_cast<float*>(p.dweight_partial) + out;
    float* const db_out = p.dbias_partial == nullptr ? nullptr : static_cast<float*>(p.dbias_partial) + out;
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
      const int col = rl.col0 + c * rl.stride;
      if (col < len) {
        float w[VEC], b[VEC];
        part.get(c, w, b);
        if (dw_out != nullptr) store_vec<float, VEC>(dw_out + col, w);
        if (db_out != nullptr) store_vec<float, VEC>(db_out + col, b);
      }
    }
  }
  cluster_sync();  // peers may still read this CTA's last slot
#endif
}

}  // namespace residual_fused
