// The arguments of the two ops as plain structs: raw pointers, row strides and
// dtypes, filled by the torch glue (csrc/glue_impl.h) and read by every kernel, CUDA
// (csrc/kernels) and CPU (csrc/cpu). No torch or CUDA headers.
//
// Each struct is written once, as the list of its arguments below. Everything else
// that walks the arguments is built from that list: the struct's fields here, and in
// args.h the tables through which the glue binds tensors, the launch code checks
// dtype mixes (mixes.h) and 16-byte alignment (dispatch.cu), and the emulator exports
// the layout its Python driver builds its ctypes structures from. A tensor added to a
// list is bound, checked and exported with no other edit.
#pragma once

#include <cstdint>

namespace residual_fused {

// Element types of the tensors. Every tensor carries its own, so any mix works
// with one kernel instantiation; the compute type is float, or double when x is
// float64.
enum class DType : int8_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// ---- the lists ---------------------------------------------------------------------
// X(KIND, name, DTYPE_OF, ROLE), in the struct's order. KIND gives the fields:
//   SCALAR       DTYPE_OF name{}                         (DTYPE_OF is the C type)
//   ROWS_IN      const void* name; int64_t name_row_stride; DType name_dtype;
//                [rows, hidden]: the last dim contiguous, rows name_row_stride
//                elements apart
//   ROWS_OUT     void* name; DType name_dtype;           [rows, hidden], contiguous
//   ROWS_OUT_AS  void* name;                             as ROWS_OUT, in DTYPE_OF's dtype
//   VEC_IN       const void* name; DType name_dtype;     [hidden]
//   VEC_OUT_AS   void* name;                             [hidden], in DTYPE_OF's dtype
//   STATS_IN     const void* name;                       [rows], the compute type
//   STATS_OUT    void* name;                             [rows], the compute type
//   WORKSPACE    void* name;                             the compute type
// ROLE is the Mix type (rows.cuh) a tensor's own dtype must have for a dtype-
// specialised kernel to run it: ACT, RES, PARAM, SAVED; `_` for the tensors with no
// dtype of their own, and for scalars. Unused columns are `_`. Every pointer may be
// null where its comment says so; a null tensor is absent.

// Both ops: the shape (rows of `hidden` elements), the norm, and the optional [hidden]
// weight and bias (bias always null for RMSNorm). weight_offset: the weight used is
// weight + weight_offset, added in the compute type (Gemma's 1 + w); 0 without a weight.
// In the backward, dx uses weight + weight_offset and dweight is the gradient of weight.
#define RESIDUAL_FUSED_SHARED_ARGS(X)         \
  X(SCALAR, rows, int64_t, _)                 \
  X(SCALAR, hidden, int, _)                   \
  X(SCALAR, is_rms_norm, bool, _)             \
  X(SCALAR, weight_offset, double, _)         \
  X(VEC_IN, weight, _, PARAM)                 \
  X(VEC_IN, bias, _, PARAM)

// Forward. x: [rows, hidden]; x_dtype is also y's, and kFloat64 selects double compute.
// residual: or null. y: x + residual normalised. residual_out: x + residual, or null.
// rstd: null only for the CPU kernels (the inference forms keep none). mean: or null,
// rstd's type; LayerNorm's row mean of x + residual, which the backward subtracts first.
#define RESIDUAL_FUSED_FWD_ARGS(X)            \
  RESIDUAL_FUSED_SHARED_ARGS(X)               \
  X(SCALAR, eps, double, _)                   \
  X(ROWS_IN, x, _, ACT)                       \
  X(ROWS_IN, residual, _, RES)                \
  X(ROWS_OUT_AS, y, x, _)                     \
  X(ROWS_OUT, residual_out, _, RES)           \
  X(STATS_OUT, rstd, _, _)                    \
  X(STATS_OUT, mean, _, _)

// Backward. memory_efficient: saved is y, and xhat = (y - bias) / weight. dy: its dtype
// is also dx's, and kFloat64 selects double compute. dresidual_out: or null (pre-norm:
// added to ds). saved: residual_out (or x), or y if memory_efficient. rstd: the forward's.
// mean: or null, the forward's row mean (LayerNorm, not memory_efficient); only a shift,
// as xhat is re-centred over the saved row whatever it is: the rows kernels' ring takes
// LayerNorm's row sums in one reduction shifted by it; the other kernels, and the ring
// without it, reduce the row for its mean first. dresidual: or null (then dx serves).
// dweight, dbias: or null.
// dweight_partial, dbias_partial: the workspace of the backward's plan, column sums of
// dy * xhat and dy over one share of the rows each (a CTA's on CUDA,
// AddNormBwdPlan::partial_rows; a task's on CPU, cpu::bwd_partial_rows),
// [partial_rows, hidden], then reduced in a fixed order so the weight gradients are
// bitwise reproducible (no atomics). partial_rows: the rows the caller allocated.
#define RESIDUAL_FUSED_BWD_ARGS(X)            \
  RESIDUAL_FUSED_SHARED_ARGS(X)               \
  X(SCALAR, memory_efficient, bool, _)        \
  X(SCALAR, partial_rows, int64_t, _)         \
  X(ROWS_IN, dy, _, ACT)                      \
  X(ROWS_IN, dresidual_out, _, RES)           \
  X(ROWS_IN, saved, _, SAVED)                 \
  X(STATS_IN, rstd, _, _)                     \
  X(STATS_IN, mean, _, _)                     \
  X(ROWS_OUT_AS, dx, dy, _)                   \
  X(ROWS_OUT, dresidual, _, RES)              \
  X(VEC_OUT_AS, dweight, weight, _)           \
  X(VEC_OUT_AS, dbias, bias, _)               \
  X(WORKSPACE, dweight_partial, _, _)         \
  X(WORKSPACE, dbias_partial, _, _)

// ---- the structs ---------------------------------------------------------------------
#define RESIDUAL_FUSED_FIELDS_SCALAR(name, type) type name{};
#define RESIDUAL_FUSED_FIELDS_ROWS_IN(name, type) \
  const void* name = nullptr;                     \
  int64_t name##_row_stride = 0;                  \
  DType name##_dtype = DType::kFloat32;
#define RESIDUAL_FUSED_FIELDS_ROWS_OUT(name, type) \
  void* name = nullptr;                            \
  DType name##_dtype = DType::kFloat32;
#define RESIDUAL_FUSED_FIELDS_ROWS_OUT_AS(name, type) void* name = nullptr;
#define RESIDUAL_FUSED_FIELDS_VEC_IN(name, type) \
  const void* name = nullptr;                    \
  DType name##_dtype = DType::kFloat32;
#define RESIDUAL_FUSED_FIELDS_VEC_OUT_AS(name, type) void* name = nullptr;
#define RESIDUAL_FUSED_FIELDS_STATS_IN(name, type) const void* name = nullptr;
#define RESIDUAL_FUSED_FIELDS_STATS_OUT(name, type) void* name = nullptr;
#define RESIDUAL_FUSED_FIELDS_WORKSPACE(name, type) void* name = nullptr;
#define RESIDUAL_FUSED_FIELDS(kind, name, type, role) RESIDUAL_FUSED_FIELDS_##kind(name, type)

struct AddNormFwdParams {
  RESIDUAL_FUSED_FWD_ARGS(RESIDUAL_FUSED_FIELDS)
};

struct AddNormBwdParams {
  RESIDUAL_FUSED_BWD_ARGS(RESIDUAL_FUSED_FIELDS)
};

}  // namespace residual_fused
