// The arguments of the two ops as plain structs: raw pointers, row strides and
// dtypes, filled by the torch glue (csrc/glue_impl.h) and read by every kernel, CUDA
// (csrc/kernels) and CPU (csrc/cpu). No torch or CUDA headers.
#pragma once

#include <cstdint>

namespace residual_fused {

// Element types of the tensors. Every tensor carries its own, so any mix works
// with one kernel instantiation; the compute type is float, or double when x is
// float64.
enum class DType : int8_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

struct AddNormFwdParams {
  int64_t rows = 0;
  int hidden = 0;
  bool is_rms_norm = false;
  double eps = 0.0;

  const void* x = nullptr;             // [rows, hidden], row stride x_row_stride (elements)
  int64_t x_row_stride = 0;
  DType x_dtype = DType::kFloat32;     // also y's dtype; kFloat64 selects double compute
  const void* residual = nullptr;      // [rows, hidden] or null
  int64_t residual_row_stride = 0;
  DType residual_dtype = DType::kFloat32;
  const void* weight = nullptr;        // [hidden] or null
  DType weight_dtype = DType::kFloat32;
  double weight_offset = 0.0;          // the weight used is weight + weight_offset, added in
                                       // the compute type (Gemma's 1 + w); 0 without a weight
  const void* bias = nullptr;          // [hidden] or null (always null for RMSNorm)
  DType bias_dtype = DType::kFloat32;

  void* y = nullptr;                   // [rows, hidden], contiguous, x_dtype
  void* residual_out = nullptr;        // [rows, hidden], contiguous, or null: x + residual
  DType residual_out_dtype = DType::kFloat32;
  void* rstd = nullptr;                // [rows], float (double when x is float64); the CPU
                                       // kernels take null (the inference forms keep none)
  void* mean = nullptr;                // [rows] or null, rstd's type: LayerNorm's row mean of
                                       // x + residual, which the backward subtracts first
};

struct AddNormBwdParams {
  int64_t rows = 0;
  int hidden = 0;
  bool is_rms_norm = false;
  bool memory_efficient = false;       // saved is y: xhat = (y - bias) / weight

  const void* dy = nullptr;            // [rows, hidden], row stride dy_row_stride
  int64_t dy_row_stride = 0;
  DType dy_dtype = DType::kFloat32;    // also dx's dtype; kFloat64 selects double compute
  const void* dresidual_out = nullptr; // [rows, hidden] or null (pre-norm: added to ds)
  int64_t dresidual_out_row_stride = 0;
  DType dresidual_out_dtype = DType::kFloat32;
  const void* saved = nullptr;         // [rows, hidden]: residual_out / x, or y if memory_efficient
  int64_t saved_row_stride = 0;
  DType saved_dtype = DType::kFloat32;
  const void* rstd = nullptr;          // [rows], compute type
  const void* mean = nullptr;          // [rows], compute type, or null: the forward's row mean
                                       // (LayerNorm, not memory_efficient). Only a shift: xhat
                                       // is re-centred over the saved row whatever it is. The
                                       // rows kernels' ring takes LayerNorm's row sums in one
                                       // reduction shifted by it; the other kernels, and the
                                       // ring without it, reduce the row for its mean first
  const void* weight = nullptr;        // [hidden] or null
  DType weight_dtype = DType::kFloat32;
  double weight_offset = 0.0;          // as the forward's: dx uses weight + weight_offset,
                                       // dweight is the gradient of weight itself
  const void* bias = nullptr;          // [hidden] or null
  DType bias_dtype = DType::kFloat32;

  void* dx = nullptr;                  // [rows, hidden], contiguous, dy_dtype
  void* dresidual = nullptr;           // [rows, hidden], contiguous, or null (then dx serves)
  DType dresidual_dtype = DType::kFloat32;
  void* dweight = nullptr;             // [hidden], weight_dtype, or null
  void* dbias = nullptr;               // [hidden], bias_dtype, or null

  // Workspace of the backward's plan: column sums of dy * xhat and dy over one share
  // of the rows each (a CTA's on CUDA, AddNormBwdPlan::partial_rows; a task's on
  // CPU, cpu::bwd_partial_rows), [partial_rows, hidden] in the compute type, then
  // reduced in a fixed order so the weight gradients are bitwise reproducible (no
  // atomics).
  void* dweight_partial = nullptr;
  void* dbias_partial = nullptr;
  int64_t partial_rows = 0;            // rows of the workspace the caller allocated
};

}  // namespace residual_fused
