// Device helpers shared by the forward and backward kernels: element conversion,
// vector loads/stores whose element type is chosen at run time, and reductions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "add_norm.h"

namespace residual_fused {

__host__ __device__ inline int dtype_size(DType t) {
  switch (t) {
    case DType::kFloat16:
    case DType::kBFloat16:
      return 2;
    case DType::kFloat64:
      return 8;
    default:
      return 4;
  }
}

// Address of row `row` of a [rows, hidden] tensor with the given row stride.
template <typename P>
__device__ __forceinline__ P* row_ptr(P* base, int64_t row, int64_t row_stride, DType t) {
  using Byte = typename std::conditional<std::is_const<P>::value, const char, char>::type;
  return reinterpret_cast<P*>(reinterpret_cast<Byte*>(base) + row * row_stride * dtype_size(t));
}

// Dynamic shared memory of the running kernel, as floats.
#ifdef RESIDUAL_FUSED_HOST_EMULATION
float* dynamic_smem();  // tools/emulator: one host buffer, blocks run one at a time
#else
__device__ __forceinline__ float* dynamic_smem() {
  extern __shared__ float4 dyn_smem[];  // float4: the base is 16-byte aligned
  return reinterpret_cast<float*>(dyn_smem);
}
#endif

// ---- conversions -------------------------------------------------------------------

template <typename acc_t, typename T>
__device__ __forceinline__ acc_t to_acc(T v) { return static_cast<acc_t>(v); }
template <typename acc_t>
__device__ __forceinline__ acc_t to_acc(__half v) { return static_cast<acc_t>(__half2float(v)); }
template <typename acc_t>
__device__ __forceinline__ acc_t to_acc(__nv_bfloat16 v) {
  return static_cast<acc_t>(__bfloat162float(v));
}

template <typename T>
struct FromAcc {
  template <typename acc_t>
  __device__ __forceinline__ static T cast(acc_t v) { return static_cast<T>(v); }
};
template <>
struct FromAcc<__half> {
  __device__ __forceinline__ static __half cast(float v) { return __float2half_rn(v); }
  __device__ __forceinline__ static __half cast(double v) { return __double2half(v); }
};
template <>
struct FromAcc<__nv_bfloat16> {
  __device__ __forceinline__ static __nv_bfloat16 cast(float v) { return __float2bfloat16_rn(v); }
  __device__ __forceinline__ static __nv_bfloat16 cast(double v) { return __double2bfloat16(v); }
};

// ---- vectors of N elements ---------------------------------------------------------
// N elements of T move as 16-byte pieces (smaller when N * sizeof(T) < 16), so the
// address of element 0 must be aligned to min(16, N * sizeof(T)) bytes; the host
// picks N = 8 only when every row start is 16-byte aligned and hidden % 8 == 0.

template <int kBytes>
struct Raw;
template <>
struct Raw<16> { using type = uint4; };
template <>
struct Raw<8> { using type = uint2; };
template <>
struct Raw<4> { using type = uint32_t; };
template <>
struct Raw<2> { using type = uint16_t; };

template <typename T, int N>
struct VecTraits {
  static constexpr int kBytes = N * static_cast<int>(sizeof(T));
  static constexpr int kPiece = kBytes < 16 ? kBytes : 16;
  static constexpr int kPieces = kBytes / kPiece;
  static constexpr int kPerPiece = kPiece / static_cast<int>(sizeof(T));
  using Piece = typename Raw<kPiece>::type;
};

template <typename T, int N, typename acc_t>
__device__ __forceinline__ void load_vec(const T* __restrict__ src, acc_t (&out)[N]) {
  using V = VecTraits<T, N>;
#pragma unroll
  for (int p = 0; p < V::kPieces; ++p) {
    union { typename V::Piece raw; T v[V::kPerPiece]; } u;
    u.raw = *reinterpret_cast<const typename V::Piece*>(src + p * V::kPerPiece);
#pragma unroll
    for (int i = 0; i < V::kPerPiece; ++i) out[p * V::kPerPiece + i] = to_acc<acc_t>(u.v[i]);
  }
}

template <typename T, int N, typename acc_t>
__device__ __forceinline__ void store_vec(T* __restrict__ dst, const acc_t (&in)[N]) {
  using V = VecTraits<T, N>;
#pragma unroll
  for (int p = 0; p < V::kPieces; ++p) {
    union { typename V::Piece raw; T v[V::kPerPiece]; } u;
#pragma unroll
    for (int i = 0; i < V::kPerPiece; ++i) u.v[i] = FromAcc<T>::cast(in[p * V::kPerPiece + i]);
    *reinterpret_cast<typename V::Piece*>(dst + p * V::kPerPiece) = u.raw;
  }
}

// Calls f(T{}) with T the C++ type of `t`. The branch is uniform across the grid.
template <typename F>
__device__ __forceinline__ void dispatch_dtype(DType t, F&& f) {
  switch (t) {
    case DType::kFloat16:
      f(__half{});
      break;
    case DType::kBFloat16:
      f(__nv_bfloat16{});
      break;
    case DType::kFloat64:
      f(double{});
      break;
    default:
      f(float{});
      break;
  }
}

// ---- a row held by one thread as CHUNKS vectors of VEC elements -------------------
// Chunk c of a thread covers columns [col0 + c * stride, + VEC); `stride` is the row
// group's width in elements, so consecutive threads touch consecutive vectors
// (coalesced). VEC divides hidden, so a chunk is wholly inside the row or wholly
// past its end; chunks past the end read as zero and are never stored.

template <int CHUNKS, int VEC, typename acc_t>
__device__ __forceinline__ void load_chunks(const void* row, DType t, int col0, int stride,
                                            int hidden, acc_t (&out)[CHUNKS][VEC]) {
  dispatch_dtype(t, [&](auto tag) {
    using T = decltype(tag);
    const T* src = static_cast<const T*>(row);
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
      const int col = col0 + c * stride;
      if (col < hidden) {
        load_vec<T, VEC>(src + col, out[c]);
      } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) out[c][i] = acc_t(0);
      }
    }
  });
}

// store_chunks and apply_affine for a known element type T; the run-time versions
// below dispatch to them.
template <typename T, int CHUNKS, int VEC, typename acc_t>
__device__ __forceinline__ void store_chunks_of(T* dst, int col0, int stride, int hidden,
                                                const acc_t (&in)[CHUNKS][VEC]) {
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const int col = col0 + c * stride;
    if (col < hidden) store_vec<T, VEC>(dst + col, in[c]);
  }
}

// Combines the row with a [hidden] parameter vector, elementwise: v = v (op) (param +
// offset). The offset (the weight's weight_offset, 0 for a bias) is added only when
// nonzero, so a -0.0 weight element keeps its sign without one.
enum class Affine { kMul, kAdd, kSub, kDiv };

template <Affine OP, bool OFFSET, typename T, int CHUNKS, int VEC, typename acc_t>
__device__ __forceinline__ void apply_affine_chunks(const T* src, int col0, int stride, int hidden,
                                                    acc_t (&v)[CHUNKS][VEC], acc_t off) {
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const int col = col0 + c * stride;
    if (col < hidden) {
      acc_t q[VEC];
      load_vec<T, VEC>(src + col, q);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        if constexpr (OFFSET) q[i] += off;
        if constexpr (OP == Affine::kMul) v[c][i] *= q[i];
        if constexpr (OP == Affine::kAdd) v[c][i] += q[i];
        if constexpr (OP == Affine::kSub) v[c][i] -= q[i];
        if constexpr (OP == Affine::kDiv) v[c][i] /= q[i];
      }
    }
  }
}

// One uniform branch around the whole loop: without an offset the code is exactly
// the offset-free one (same loads in flight, same registers).
template <Affine OP, typename T, int CHUNKS, int VEC, typename acc_t, typename off_t = acc_t>
__device__ __forceinline__ void apply_affine_of(const T* src, int col0, int stride, int hidden,
                                                acc_t (&v)[CHUNKS][VEC], off_t offset = off_t(0)) {
  const acc_t off = acc_t(offset);
  if (off != acc_t(0)) {
    apply_affine_chunks<OP, true>(src, col0, stride, hidden, v, off);
  } else {
    apply_affine_chunks<OP, false>(src, col0, stride, hidden, v, off);
  }
}

// apply_affine with the offset's presence fixed at compile time, for a caller that
// branches once around a longer stretch of code (the loads of the stretch can then be
// scheduled together on either side).
template <Affine OP, bool OFFSET, int CHUNKS, int VEC, typename acc_t>
__device__ __forceinline__ void apply_affine_fixed(const void* param, DType t, int col0, int stride,
                                                   int hidden, acc_t (&v)[CHUNKS][VEC], acc_t off) {
  dispatch_dtype(t, [&](auto tag) {
    using T = decltype(tag);
    apply_affine_chunks<OP, OFFSET>(static_cast<const T*>(param), col0, stride, hidden, v, off);
  });
}

template <int CHUNKS, int VEC, typename acc_t>
__device__ __forceinline__ void store_chunks(void* row, DType t, int col0, int stride, int hidden,
                                             const acc_t (&in)[CHUNKS][VEC]) {
  dispatch_dtype(t, [&](auto tag) {
    using T = decltype(tag);
    store_chunks_of<T>(static_cast<T*>(row), col0, stride, hidden, in);
  });
}

template <Affine OP, int CHUNKS, int VEC, typename acc_t, typename off_t = acc_t>
__device__ __forceinline__ void apply_affine(const void* param, DType t, int col0, int stride,
                                             int hidden, acc_t (&v)[CHUNKS][VEC],
                                             off_t offset = off_t(0)) {
  dispatch_dtype(t, [&](auto tag) {
    using T = decltype(tag);
    apply_affine_of<OP>(static_cast<const T*>(param), col0, stride, hidden, v, offset);
  });
}

// ---- reductions --------------------------------------------------------------------

// Sums over aligned groups of WIDTH lanes (WIDTH <= 32); every lane gets its group's sum.
// All 32 lanes of the warp must call it.
template <int WIDTH, int N, typename acc_t>
__device__ __forceinline__ void group_sum(acc_t (&v)[N]) {
#pragma unroll
  for (int offset = WIDTH / 2; offset > 0; offset /= 2) {
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] += __shfl_xor_sync(0xffffffffu, v[i], offset, WIDTH);
  }
}

// Sums N values over the whole block (one row per block, blockDim a multiple of 32);
// every thread gets the sums. `smem` holds N * (MAX_BLOCK / 32) values. Warps are
// combined in a fixed order, so the result is identical in every thread and run.
template <int MAX_BLOCK, int N, typename acc_t>
__device__ __forceinline__ void block_sum(acc_t (&v)[N], acc_t* smem) {
  constexpr int kMaxWarps = MAX_BLOCK / 32;
  const int warps = blockDim.x / 32;
  group_sum<32>(v);
  const int warp = threadIdx.x / 32;
  if (threadIdx.x % 32 == 0) {
#pragma unroll
    for (int i = 0; i < N; ++i) smem[i * kMaxWarps + warp] = v[i];
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < N; ++i) {
    acc_t total = smem[i * kMaxWarps];
    for (int w = 1; w < warps; ++w) total += smem[i * kMaxWarps + w];
    v[i] = total;
  }
  __syncthreads();  // smem is reused by the next reduction
}

// The forward's statistics of one row, written by one thread: rstd always, and the
// mean where the caller asked for it (LayerNorm; the backward's shift).
template <typename acc_t>
__device__ __forceinline__ void store_row_stats(const AddNormFwdParams& p, int64_t row, acc_t mean,
                                                acc_t rstd) {
  static_cast<acc_t*>(p.rstd)[row] = rstd;
  if (p.mean != nullptr) static_cast<acc_t*>(p.mean)[row] = mean;
}

__device__ __forceinline__ float inv_sqrt(float v) { return rsqrtf(v); }
__device__ __forceinline__ double inv_sqrt(double v) { return 1.0 / sqrt(v); }

}  // namespace residual_fused
