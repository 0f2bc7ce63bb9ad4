// What walks the kernel arguments, built from params.h's lists: one TensorArg per
// tensor (where its pointer, row stride and dtype sit in the struct), for the glue
// (csrc/glue_impl.h) to bind tensors through and the launch code to check dtype mixes
// (mixes.h) and alignment (dispatch.cu) over; and every field's name, type and offset,
// which the emulator exports (tools/emulator/api.cpp). No torch or CUDA headers.
#pragma once

#include <cstddef>
#include <cstdint>

#include "params.h"

namespace residual_fused {

// ---- the tensors of each struct -------------------------------------------------------
enum class ArgKind : int8_t { kRowsIn, kRowsOut, kRowsOutAs, kVecIn, kVecOutAs, kStatsIn, kStatsOut, kWorkspace };
enum class MixRole : int8_t { kNone, kAct, kRes, kParam, kSaved };

// One tensor argument: byte offsets of its fields in the params struct, -1 for those
// it does not have.
struct TensorArg {
  const char* name;
  ArgKind kind;
  MixRole role;        // kNone unless it has a dtype field of its own
  int16_t ptr;         // its data pointer (const void* for inputs, void* for outputs)
  int16_t row_stride;  // ROWS_IN only: elements between rows
  int16_t dtype;       // its own dtype field, or for the *_AS kinds DTYPE_OF's; -1 for the
                       // compute type (stats, workspace)
  constexpr bool is_output() const {
    return kind == ArgKind::kRowsOut || kind == ArgKind::kRowsOutAs || kind == ArgKind::kVecOutAs ||
           kind == ArgKind::kStatsOut || kind == ArgKind::kWorkspace;
  }
  constexpr bool has_own_dtype() const {
    return kind == ArgKind::kRowsIn || kind == ArgKind::kRowsOut || kind == ArgKind::kVecIn;
  }
  // [rows, hidden].
  constexpr bool is_rows() const {
    return kind == ArgKind::kRowsIn || kind == ArgKind::kRowsOut || kind == ArgKind::kRowsOutAs;
  }
  // [rows, hidden] or an input [hidden], in a dtype of the tensor types: the kernels'
  // 16-byte vectors read or write it.
  constexpr bool is_vectorised() const { return is_rows() || kind == ArgKind::kVecIn; }
};

#define RESIDUAL_FUSED_OFFSET(P, field) static_cast<int16_t>(offsetof(P, field))
#define RESIDUAL_FUSED_ROLE_ACT MixRole::kAct
#define RESIDUAL_FUSED_ROLE_RES MixRole::kRes
#define RESIDUAL_FUSED_ROLE_PARAM MixRole::kParam
#define RESIDUAL_FUSED_ROLE_SAVED MixRole::kSaved
#define RESIDUAL_FUSED_ROLE__ MixRole::kNone
#define RESIDUAL_FUSED_ARG(P, name, kind, role, stride, dtype) \
  TensorArg{#name, ArgKind::kind, RESIDUAL_FUSED_ROLE_##role, RESIDUAL_FUSED_OFFSET(P, name), stride, dtype},

#define RESIDUAL_FUSED_ARG_SCALAR(P, name, of, role)
#define RESIDUAL_FUSED_ARG_ROWS_IN(P, name, of, role)                                   \
  RESIDUAL_FUSED_ARG(P, name, kRowsIn, role, RESIDUAL_FUSED_OFFSET(P, name##_row_stride), \
                     RESIDUAL_FUSED_OFFSET(P, name##_dtype))
#define RESIDUAL_FUSED_ARG_ROWS_OUT(P, name, of, role) \
  RESIDUAL_FUSED_ARG(P, name, kRowsOut, role, -1, RESIDUAL_FUSED_OFFSET(P, name##_dtype))
#define RESIDUAL_FUSED_ARG_ROWS_OUT_AS(P, name, of, role) \
  RESIDUAL_FUSED_ARG(P, name, kRowsOutAs, role, -1, RESIDUAL_FUSED_OFFSET(P, of##_dtype))
#define RESIDUAL_FUSED_ARG_VEC_IN(P, name, of, role) \
  RESIDUAL_FUSED_ARG(P, name, kVecIn, role, -1, RESIDUAL_FUSED_OFFSET(P, name##_dtype))
#define RESIDUAL_FUSED_ARG_VEC_OUT_AS(P, name, of, role) \
  RESIDUAL_FUSED_ARG(P, name, kVecOutAs, role, -1, RESIDUAL_FUSED_OFFSET(P, of##_dtype))
#define RESIDUAL_FUSED_ARG_STATS_IN(P, name, of, role) RESIDUAL_FUSED_ARG(P, name, kStatsIn, role, -1, -1)
#define RESIDUAL_FUSED_ARG_STATS_OUT(P, name, of, role) RESIDUAL_FUSED_ARG(P, name, kStatsOut, role, -1, -1)
#define RESIDUAL_FUSED_ARG_WORKSPACE(P, name, of, role) RESIDUAL_FUSED_ARG(P, name, kWorkspace, role, -1, -1)
#define RESIDUAL_FUSED_FWD_ARG(kind, name, of, role) RESIDUAL_FUSED_ARG_##kind(AddNormFwdParams, name, of, role)
#define RESIDUAL_FUSED_BWD_ARG(kind, name, of, role) RESIDUAL_FUSED_ARG_##kind(AddNormBwdParams, name, of, role)

inline constexpr TensorArg kFwdArgs[] = {RESIDUAL_FUSED_FWD_ARGS(RESIDUAL_FUSED_FWD_ARG)};
inline constexpr TensorArg kBwdArgs[] = {RESIDUAL_FUSED_BWD_ARGS(RESIDUAL_FUSED_BWD_ARG)};

// FwdArg::x, ...: a tensor's index in its table, for the glue to name it at compile time.
#define RESIDUAL_FUSED_ENUM_SCALAR(name)
#define RESIDUAL_FUSED_ENUM_ROWS_IN(name) name,
#define RESIDUAL_FUSED_ENUM_ROWS_OUT(name) name,
#define RESIDUAL_FUSED_ENUM_ROWS_OUT_AS(name) name,
#define RESIDUAL_FUSED_ENUM_VEC_IN(name) name,
#define RESIDUAL_FUSED_ENUM_VEC_OUT_AS(name) name,
#define RESIDUAL_FUSED_ENUM_STATS_IN(name) name,
#define RESIDUAL_FUSED_ENUM_STATS_OUT(name) name,
#define RESIDUAL_FUSED_ENUM_WORKSPACE(name) name,
#define RESIDUAL_FUSED_ENUM(kind, name, of, role) RESIDUAL_FUSED_ENUM_##kind(name)
enum class FwdArg : int { RESIDUAL_FUSED_FWD_ARGS(RESIDUAL_FUSED_ENUM) kCount };
enum class BwdArg : int { RESIDUAL_FUSED_BWD_ARGS(RESIDUAL_FUSED_ENUM) kCount };
static_assert(static_cast<int>(FwdArg::kCount) == sizeof(kFwdArgs) / sizeof(TensorArg));
static_assert(static_cast<int>(BwdArg::kCount) == sizeof(kBwdArgs) / sizeof(TensorArg));

// Each struct's table and index type.
template <class P>
struct ArgsOf;
template <>
struct ArgsOf<AddNormFwdParams> {
  using Arg = FwdArg;
  static constexpr const TensorArg* table = kFwdArgs;
  static constexpr int count = static_cast<int>(FwdArg::kCount);
};
template <>
struct ArgsOf<AddNormBwdParams> {
  using Arg = BwdArg;
  static constexpr const TensorArg* table = kBwdArgs;
  static constexpr int count = static_cast<int>(BwdArg::kCount);
};

constexpr const TensorArg& arg_info(FwdArg a) { return kFwdArgs[static_cast<int>(a)]; }
constexpr const TensorArg& arg_info(BwdArg a) { return kBwdArgs[static_cast<int>(a)]; }

// Reads and writes of a tensor's fields through its TensorArg. const void* and void*
// are similar types, so either names the pointer field.
template <class T, class P>
T& field_at(P& p, int16_t offset) {
  return *reinterpret_cast<T*>(reinterpret_cast<char*>(&p) + offset);
}
template <class T, class P>
const T& field_at(const P& p, int16_t offset) {
  return *reinterpret_cast<const T*>(reinterpret_cast<const char*>(&p) + offset);
}

template <class P>
const void* arg_ptr(const P& p, const TensorArg& a) { return field_at<const void*>(p, a.ptr); }

// The tensor's dtype (a.dtype >= 0: not for stats or workspace, in the compute type).
template <class P>
DType arg_dtype(const P& p, const TensorArg& a) { return field_at<DType>(p, a.dtype); }

// Elements between rows: the row stride field of an input, `hidden` for an output
// (written densely), 0 for a [hidden] vector or [rows] stats.
template <class P>
int64_t arg_row_stride(const P& p, const TensorArg& a) {
  if (a.row_stride >= 0) return field_at<int64_t>(p, a.row_stride);
  return a.is_rows() ? p.hidden : 0;
}

// Points tensor `a` of p at ptr; sets its row stride and its own dtype where it has them.
template <class P>
void bind_arg(P& p, const TensorArg& a, const void* ptr, int64_t row_stride, DType dtype) {
  field_at<const void*>(p, a.ptr) = ptr;
  if (a.row_stride >= 0) field_at<int64_t>(p, a.row_stride) = row_stride;
  if (a.has_own_dtype()) field_at<DType>(p, a.dtype) = dtype;
}

// ---- every field, for the emulator's ctypes structure ----------------------------------
enum class FieldType : int8_t { kInt64, kInt32, kBool, kDouble, kPointer, kDType };

template <class T>
constexpr FieldType field_type();
template <>
constexpr FieldType field_type<int64_t>() { return FieldType::kInt64; }
template <>
constexpr FieldType field_type<int>() { return FieldType::kInt32; }
template <>
constexpr FieldType field_type<bool>() { return FieldType::kBool; }
template <>
constexpr FieldType field_type<double>() { return FieldType::kDouble; }

struct FieldInfo {
  const char* name;
  FieldType type;
  int16_t offset;
};

#define RESIDUAL_FUSED_FIELD(P, name, type) FieldInfo{#name, FieldType::type, RESIDUAL_FUSED_OFFSET(P, name)},
#define RESIDUAL_FUSED_INFO_SCALAR(P, name, of) FieldInfo{#name, field_type<of>(), RESIDUAL_FUSED_OFFSET(P, name)},
#define RESIDUAL_FUSED_INFO_ROWS_IN(P, name, of)                                            \
  RESIDUAL_FUSED_FIELD(P, name, kPointer) RESIDUAL_FUSED_FIELD(P, name##_row_stride, kInt64) \
  RESIDUAL_FUSED_FIELD(P, name##_dtype, kDType)
#define RESIDUAL_FUSED_INFO_ROWS_OUT(P, name, of) \
  RESIDUAL_FUSED_FIELD(P, name, kPointer) RESIDUAL_FUSED_FIELD(P, name##_dtype, kDType)
#define RESIDUAL_FUSED_INFO_ROWS_OUT_AS(P, name, of) RESIDUAL_FUSED_FIELD(P, name, kPointer)
#define RESIDUAL_FUSED_INFO_VEC_IN(P, name, of) RESIDUAL_FUSED_INFO_ROWS_OUT(P, name, of)
#define RESIDUAL_FUSED_INFO_VEC_OUT_AS(P, name, of) RESIDUAL_FUSED_FIELD(P, name, kPointer)
#define RESIDUAL_FUSED_INFO_STATS_IN(P, name, of) RESIDUAL_FUSED_FIELD(P, name, kPointer)
#define RESIDUAL_FUSED_INFO_STATS_OUT(P, name, of) RESIDUAL_FUSED_FIELD(P, name, kPointer)
#define RESIDUAL_FUSED_INFO_WORKSPACE(P, name, of) RESIDUAL_FUSED_FIELD(P, name, kPointer)
#define RESIDUAL_FUSED_FWD_INFO(kind, name, of, role) RESIDUAL_FUSED_INFO_##kind(AddNormFwdParams, name, of)
#define RESIDUAL_FUSED_BWD_INFO(kind, name, of, role) RESIDUAL_FUSED_INFO_##kind(AddNormBwdParams, name, of)

inline constexpr FieldInfo kFwdFields[] = {RESIDUAL_FUSED_FWD_ARGS(RESIDUAL_FUSED_FWD_INFO)};
inline constexpr FieldInfo kBwdFields[] = {RESIDUAL_FUSED_BWD_ARGS(RESIDUAL_FUSED_BWD_INFO)};

}  // namespace residual_fused
