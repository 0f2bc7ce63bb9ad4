// Torch-side preparation shared by the CPU and CUDA implementations of the two ops:
// argument checks, row layouts, output allocation, and the params structs the
// kernels read. Device-specific parts (the hidden-size range, the device guard, the
// launch) stay in csrc/add_norm_cpu.cpp and csrc/cuda/add_norm_cuda.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "kernels/params.h"

namespace residual_fused {

using OptTensor = std::optional<at::Tensor>;

// Compute type of the statistics: fp64 for fp64 inputs, else fp32.
at::ScalarType stats_dtype(at::ScalarType t);

// A [..., hidden] tensor seen as [rows, hidden] with one row stride. Copy-free when
// the last dim is contiguous and the leading dims collapse (e.g. t[:, :hidden] of a
// wider tensor); anything else is made contiguous first (t keeps that copy alive).
struct Rows {
  at::Tensor t;
  int64_t row_stride = 0;
  DType dtype = DType::kFloat32;
};

// A [hidden] parameter (weight or bias); undefined when absent.
struct VectorArg {
  at::Tensor t;
  const void* ptr = nullptr;
  DType dtype = DType::kFloat32;
};

// One forward call: its params and the tensors they point into.
struct FwdCall {
  AddNormFwdParams params;
  Rows x, residual;
  VectorArg weight, bias;
  at::Tensor y, residual_out, rstd;
};

// One backward call. The workspace (params.dweight_partial/dbias_partial) is left to
// the device code, which alone knows how many partial rows its plan needs.
struct BwdCall {
  AddNormBwdParams params;
  Rows dy, dresidual_out, saved;
  at::Tensor rstd;
  VectorArg weight, bias;
  at::Tensor dx, dresidual, dweight, dbias;
  at::Tensor dweight_partial, dbias_partial;  // the workspace, once allocated
};

// `hidden` is x.size(-1), already checked against the device's range by the caller.
FwdCall prepare_add_norm_fwd(const at::Tensor& x, const OptTensor& residual,
                             const OptTensor& weight, const OptTensor& bias, double eps,
                             bool is_rms_norm, bool store_residual_out,
                             at::ScalarType residual_out_dtype, int64_t hidden);

// `hidden` is dy.size(-1), already checked against the device's range by the caller.
BwdCall prepare_add_norm_bwd(const at::Tensor& dy, const OptTensor& dresidual_out,
                             const at::Tensor& saved, const at::Tensor& rstd,
                             const OptTensor& weight, const OptTensor& bias, bool is_rms_norm,
                             bool memory_efficient,
                             std::optional<at::ScalarType> dresidual_dtype, int64_t hidden);

// Allocates the [partial_rows, hidden] workspace of a backward call (nothing when
// there is neither weight nor bias) and points the params at it.
void allocate_bwd_workspace(BwdCall& call, int64_t partial_rows);

}  // namespace residual_fused
