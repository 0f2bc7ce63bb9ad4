// The machinery of the rows kernels (fwd_kernels.cuh, bwd_kernels.cuh): a row held
// in registers by a group of threads, element types fixed at compile time for the
// common dtype mixes, and the parameters staged once per CTA in shared memory.
//
// One idea: every global load a row needs is issued before any of them is used, so a
// row costs one memory round trip. With the element type known at compile time the
// loads land as raw 16-byte vectors (Fetched) and are converted afterwards; with a
// run-time dtype (AnyType, the generic fallback) each tensor's switch converts as it
// loads, which serialises the tensors but keeps every dtype mix supported.
#pragma once

#include "common.cuh"

namespace residual_fused {

// Element type read from the params at run time (the generic kernels).
struct AnyType {};

template <typename T>
struct DTypeOf;
template <>
struct DTypeOf<float> { static constexpr DType value = DType::kFloat32; };
template <>
struct DTypeOf<__half> { static constexpr DType value = DType::kFloat16; };
template <>
struct DTypeOf<__nv_bfloat16> { static constexpr DType value = DType::kBFloat16; };

// Whether a tensor of dtype `t` (absent when `present` is false) may be read as T.
template <typename T>
__host__ __device__ inline bool type_matches(bool present, DType t) {
  if constexpr (std::is_same<T, AnyType>::value) {
    return true;
  } else {
    return !present || t == DTypeOf<T>::value;
  }
}

// The element types of one kernel instantiation:
//   ACT: x and y (forward), dy and dx (backward)
//   RES: residual and residual_out (forward), d(residual_out) and dresidual (backward)
//   PARAM: weight and bias
//   SAVED: the tensor the backward rebuilds xhat from
template <typename ACT, typename RES, typename PARAM, typename SAVED = RES>
struct Mix {
  using act_t = ACT;
  using res_t = RES;
  using param_t = PARAM;
  using saved_t = SAVED;
};
using AnyMix = Mix<AnyType, AnyType, AnyType, AnyType>;

// Row `row` of a [rows, hidden] tensor whose elements are T (AnyType: of dtype t).
// The element size is a constant for a known T, so no branch on a dtype separates a
// row's loads. `base` may be null for an absent tensor (its loads are then switched
// off): it stays null rather than being offset. Pointer arithmetic on the kernel's
// own pointer arguments keeps them known as global memory (LDG, not generic loads).
template <typename T>
__device__ __forceinline__ int elem_size(DType t) {
  if constexpr (std::is_same<T, AnyType>::value) {
    return dtype_size(t);
  } else {
    return static_cast<int>(sizeof(T));
  }
}

template <typename T, typename P>
__device__ __forceinline__ P* row_of(P* base, int64_t row, int64_t row_stride, DType t) {
  using Byte = typename std::conditional<std::is_const<P>::value, const char, char>::type;
  const int64_t offset = base == nullptr ? 0 : row * row_stride * elem_size<T>(t);
  return reinterpret_cast<P*>(reinterpret_cast<Byte*>(base) + offset);
}

// ---- one tensor's vectors, between load and conversion --------------------------
// CHUNKS vectors of VEC elements; chunk c starts at column col0 + c * stride. Chunks
// past the row end (and every chunk of an idle row group) read as zero.

template <typename T, int CHUNKS, int VEC>
struct Fetched {
  using V = VecTraits<T, VEC>;
  typename V::Piece raw[CHUNKS][V::kPieces];

  __device__ __forceinline__ void load(const void* row, DType, int col0, int stride, int hidden,
                                       bool active) {
    const T* src = static_cast<const T*>(row);
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
      const int col = col0 + c * stride;
#pragma unroll
      for (int q = 0; q < V::kPieces; ++q) {
        raw[c][q] = active && col < hidden
                        ? *reinterpret_cast<const typename V::Piece*>(src + col + q * V::kPerPiece)
                        : typename V::Piece{};
      }
    }
  }

  template <typename acc_t>
  __device__ __forceinline__ void to(acc_t (&out)[CHUNKS][VEC]) const {
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c)
#pragma unroll
      for (int q = 0; q < V::kPieces; ++q) {
        union { typename V::Piece piece; T v[V::kPerPiece]; } u;
        u.piece = raw[c][q];
#pragma unroll
        for (int i = 0; i < V::kPerPiece; ++i) out[c][q * V::kPerPiece + i] = to_acc<acc_t>(u.v[i]);
      }
  }
};

template <int CHUNKS, int VEC>
struct Fetched<AnyType, CHUNKS, VEC> {
  float v[CHUNKS][VEC];

  __device__ __forceinline__ void load(const void* row, DType t, int col0, int stride, int hidden,
                                       bool active) {
    if (active) {
      load_chunks<CHUNKS, VEC>(row, t, col0, stride, hidden, v);
    } else {
#pragma unroll
      for (int c = 0; c < CHUNKS; ++c)
#pragma unroll
        for (int i = 0; i < VEC; ++i) v[c][i] = 0.f;
    }
  }

  __device__ __forceinline__ void to(float (&out)[CHUNKS][VEC]) const {
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c)
#pragma unroll
      for (int i = 0; i < VEC; ++i) out[c][i] = v[c][i];
  }
};

template <typename T, int CHUNKS, int VEC>
__device__ __forceinline__ void store_row(void* row, DType t, int col0, int stride, int hidden,
                                          const float (&in)[CHUNKS][VEC]) {
  if constexpr (std::is_same<T, AnyType>::value) {
    store_chunks<CHUNKS, VEC>(row, t, col0, stride, hidden, in);
  } else {
    store_chunks_of<T>(static_cast<T*>(row), col0, stride, hidden, in);
  }
}

// ---- parameters, staged once per CTA -----------------------------------------------
// weight and bias are copied byte for byte into dynamic shared memory when the CTA
// starts (each region padded to 16 bytes), so the row loop reads them from shared
// memory instead of issuing global loads per row.

__host__ __device__ inline int param_bytes(const void* ptr, DType t, int hidden) {
  return ptr == nullptr ? 0 : (hidden * dtype_size(t) + 15) / 16 * 16;
}

// Copies `bytes` bytes from global `src` to shared `dst` (16-byte aligned). ALIGNED16:
// the host guarantees a 16-byte aligned source and size (the vectorised kernels);
// otherwise the widest access both allow.
template <bool ALIGNED16>
__device__ __forceinline__ void copy_to_smem(unsigned char* dst, const void* src, int bytes) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(src);
  if (ALIGNED16 || (a % 16 == 0 && bytes % 16 == 0)) {
    for (int k = threadIdx.x; k < bytes / 16; k += blockDim.x) {
      reinterpret_cast<uint4*>(dst)[k] = reinterpret_cast<const uint4*>(src)[k];
    }
  } else if (a % 4 == 0 && bytes % 4 == 0) {
    for (int k = threadIdx.x; k < bytes / 4; k += blockDim.x) {
      reinterpret_cast<uint32_t*>(dst)[k] = reinterpret_cast<const uint32_t*>(src)[k];
    }
  } else {  // every dtype is at least 2 bytes wide and aligned to its size
    for (int k = threadIdx.x; k < bytes / 2; k += blockDim.x) {
      reinterpret_cast<uint16_t*>(dst)[k] = reinterpret_cast<const uint16_t*>(src)[k];
    }
  }
}

// A [hidden] parameter in shared memory: null when the op has none. offset is added
// to each element where it is used (the weight's weight_offset; 0 for the bias).
struct StagedParam {
  const void* ptr;
  DType dtype;
  float offset;
};

// Stages `a` then `b` at the start of dynamic shared memory; the caller synchronises.
// VEC 8: the vectorised kernels, whose parameters are 16-byte aligned with
// hidden % 8 == 0 (every dtype's row is a multiple of 16 bytes).
template <int VEC>
__device__ __forceinline__ void stage_params(const void* a, DType ta, float a_offset, const void* b,
                                             DType tb, int hidden, StagedParam& sa, StagedParam& sb) {
  unsigned char* const base = reinterpret_cast<unsigned char*>(dynamic_smem());
  const int a_bytes = param_bytes(a, ta, hidden);
  if (a != nullptr) copy_to_smem<VEC % 8 == 0>(base, a, hidden * dtype_size(ta));
  if (b != nullptr) copy_to_smem<VEC % 8 == 0>(base + a_bytes, b, hidden * dtype_size(tb));
  sa = {a == nullptr ? nullptr : base, ta, a_offset};
  sb = {b == nullptr ? nullptr : base + a_bytes, tb, 0.f};
}

// v = v (op) param, elementwise over the thread's chunks, reading the staged copy.
template <Affine OP, typename T, int CHUNKS, int VEC>
__device__ __forceinline__ void apply_param(const StagedParam& param, int col0, int stride,
                                            int hidden, float (&v)[CHUNKS][VEC]) {
  if constexpr (std::is_same<T, AnyType>::value) {
    apply_affine<OP>(param.ptr, param.dtype, col0, stride, hidden, v, param.offset);
  } else {
    apply_affine_of<OP>(static_cast<const T*>(param.ptr), col0, stride, hidden, v, param.offset);
  }
}

// ---- elementwise steps shared by the rows and cluster kernels ------------------------

// The sum of every element a thread holds (chunks past the row end hold zeros).
template <int CHUNKS, int VEC>
__device__ __forceinline__ float chunk_sum(const float (&v)[CHUNKS][VEC]) {
  float sum = 0.f;
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c)
#pragma unroll
    for (int i = 0; i < VEC; ++i) sum += v[c][i];
  return sum;
}

// v += w, elementwise.
template <int CHUNKS, int VEC>
__device__ __forceinline__ void add_chunks(float (&v)[CHUNKS][VEC], const float (&w)[CHUNKS][VEC]) {
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c)
#pragma unroll
    for (int i = 0; i < VEC; ++i) v[c][i] += w[c][i];
}

// Memory-efficient backward: y back to the normalised value, v = (y - bias) / weight.
template <typename W, int CHUNKS, int VEC>
__device__ __forceinline__ void undo_affine(const StagedParam& weight, const StagedParam& bias, int col0,
                                            int stride, int bound, float (&v)[CHUNKS][VEC]) {
  if (bias.ptr != nullptr) apply_param<Affine::kSub, W>(bias, col0, stride, bound, v);
  if (weight.ptr != nullptr) apply_param<Affine::kDiv, W>(weight, col0, stride, bound, v);
}

// Resident CTAs per SM the rows kernels ask nvcc to fit (it caps registers to match):
// two CTAs of up to 512 threads when a thread holds at most 16 elements (at most 64
// registers: 32 warps per SM), else one.
constexpr int rows_min_ctas(int per_thread, int max_block) {
  return per_thread <= 16 && max_block <= 512 ? 2 : 1;
}

// ---- row groups ------------------------------------------------------------------
// A row belongs to row_threads consecutive threads, each holding CHUNKS * VEC of its
// elements: a power of two up to 32 (several rows per warp), or a multiple of 32
// (several warps per row). It depends on hidden alone, so a row is computed the same
// way (bitwise) whatever the number of rows or CTAs: batch invariance.

__host__ __device__ inline int row_threads_for(int hidden, int per_thread) {
  const int t = (hidden + per_thread - 1) / per_thread;
  if (t >= 32) return (t + 31) / 32 * 32;
  int p = 1;
  while (p < t) p *= 2;
  return p;
}

template <int CHUNKS, int VEC>
struct RowLayout {
  int row_threads;   // threads per row
  int rows_per_cta;  // blockDim.x / row_threads
  int group;         // this thread's row within the CTA's rows
  int col0;          // first column of this thread's chunk 0
  int stride;        // columns between its chunks

  __device__ __forceinline__ explicit RowLayout(int hidden)
      : row_threads(row_threads_for(hidden, CHUNKS * VEC)),
        rows_per_cta(static_cast<int>(blockDim.x) / row_threads),
        group(static_cast<int>(threadIdx.x) / row_threads),
        col0(static_cast<int>(threadIdx.x) % row_threads * VEC),
        stride(row_threads * VEC) {}
};

// v = (v - sub) * mul over the chunks that start inside the row (`hidden` columns, a
// slice's in the cluster kernels); the others keep their zeros.
template <int CHUNKS, int VEC>
__device__ __forceinline__ void scale_chunks(const RowLayout<CHUNKS, VEC>& rl, int hidden, float sub,
                                             float mul, float (&v)[CHUNKS][VEC]) {
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    if (rl.col0 + c * rl.stride < hidden) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) v[c][i] = (v[c][i] - sub) * mul;
    }
  }
}

// Sums N values over each row group; every thread gets its group's sums. Every thread
// of the CTA calls it (the branch on row_threads is uniform). `red` holds
// N * MAX_BLOCK / 32 values; warps are added in a fixed order.
template <int MAX_BLOCK, int N, int CHUNKS, int VEC>
__device__ __forceinline__ void row_sum(const RowLayout<CHUNKS, VEC>& rl, float (&v)[N],
                                        float* red) {
  constexpr int kMaxWarps = MAX_BLOCK / 32;
  const int width = rl.row_threads < 32 ? rl.row_threads : 32;
#pragma unroll 1
  for (int offset = width / 2; offset > 0; offset /= 2) {
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] += __shfl_xor_sync(0xffffffffu, v[i], offset, width);
  }
  if (rl.row_threads <= 32) return;
  const int warp = threadIdx.x / 32;
  if (threadIdx.x % 32 == 0) {
#pragma unroll
    for (int i = 0; i < N; ++i) red[i * kMaxWarps + warp] = v[i];
  }
  __syncthreads();
  const int row_warps = rl.row_threads / 32;
  const int first = rl.group * row_warps;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    float total = red[i * kMaxWarps + first];
    for (int w = 1; w < row_warps; ++w) total += red[i * kMaxWarps + first + w];
    v[i] = total;
  }
  __syncthreads();  // red is reused by the next reduction
}

}  // namespace residual_fused
