// The ATen backend of the shared op preparation (csrc/glue_impl.h), used by the CPU
// ops (csrc/add_norm_cpu.cpp) and by the CUDA ops built against torch's full C++ API
// (csrc/cuda/add_norm_cuda.cpp). Device-specific parts (the hidden-size range, the
// device guard, the launch) stay in those files.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <vector>

#include "glue_impl.h"

namespace residual_fused {

struct AtenBackend {
  using Tensor = at::Tensor;
  using OptTensor = std::optional<at::Tensor>;
  using ScalarType = at::ScalarType;
  static DType dtype(ScalarType t, const char* name);
  static ScalarType stats_type(ScalarType t) {
    return t == at::kDouble ? at::kDouble : at::kFloat;
  }
  static bool same_device(const Tensor& a, const Tensor& b) { return a.device() == b.device(); }
  static std::string device_name(const Tensor& t) { return t.device().str(); }
  static Tensor contiguous(const Tensor& t) { return t.contiguous(); }
  static Tensor empty(const std::vector<int64_t>& sizes, ScalarType dtype, const Tensor& like);
  static void zero(Tensor& t) { t.zero_(); }
  [[noreturn]] static void fail(const std::string& message);
};

using OptTensor = AtenBackend::OptTensor;
using AtenGlue = Glue<AtenBackend>;
using FwdCall = AtenGlue::FwdCall;
using BwdCall = AtenGlue::BwdCall;

}  // namespace residual_fused
