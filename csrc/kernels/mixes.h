// The dtype mixes with compiled fast paths (rows.cuh: Mix), and the choice between
// them and the generic kernel. A mix is picked only when every tensor present has
// exactly its types; any other mix runs the generic (run-time dtype) kernel, so the
// set of supported mixes does not depend on this list.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "add_norm.h"
#include "rows.cuh"

namespace residual_fused {

using bf16 = __nv_bfloat16;
using fp16 = __half;

// Forward: Mix<x and y, residual and residual_out, weight and bias>.
// Backward: Mix<dy and dx, d(residual_out) and dresidual, weight and bias, saved>.
// All-bf16, all-fp16 and all-fp32 models, and bf16/fp16 activations with an fp32
// residual stream and fp32 parameters (residual_in_fp32, mixed-precision training).
template <class... MIXES>
struct MixList {};
using FastMixes = MixList<Mix<bf16, bf16, bf16, bf16>, Mix<fp16, fp16, fp16, fp16>,
                          Mix<float, float, float, float>, Mix<bf16, float, float, float>,
                          Mix<fp16, float, float, float>>;

template <class MIX>
bool fwd_mix_matches(const AddNormFwdParams& p) {
  using X = typename MIX::act_t;
  using R = typename MIX::res_t;
  using W = typename MIX::param_t;
  return type_matches<X>(true, p.x_dtype) && type_matches<R>(p.residual != nullptr, p.residual_dtype) &&
         type_matches<R>(p.residual_out != nullptr, p.residual_out_dtype) &&
         type_matches<W>(p.weight != nullptr, p.weight_dtype) &&
         type_matches<W>(p.bias != nullptr, p.bias_dtype);
}

template <class MIX>
bool bwd_mix_matches(const AddNormBwdParams& p) {
  using X = typename MIX::act_t;
  using R = typename MIX::res_t;
  using W = typename MIX::param_t;
  using S = typename MIX::saved_t;
  return type_matches<X>(true, p.dy_dtype) && type_matches<S>(true, p.saved_dtype) &&
         type_matches<R>(p.dresidual_out != nullptr, p.dresidual_out_dtype) &&
         type_matches<R>(p.dresidual != nullptr, p.dresidual_dtype) &&
         type_matches<W>(p.weight != nullptr, p.weight_dtype) &&
         type_matches<W>(p.bias != nullptr, p.bias_dtype);
}

template <class MIX>
bool mix_matches(const AddNormFwdParams& p) { return fwd_mix_matches<MIX>(p); }
template <class MIX>
bool mix_matches(const AddNormBwdParams& p) { return bwd_mix_matches<MIX>(p); }

// make(MIX{}) for the first mix of the list that matches every tensor of p, else
// make(AnyMix{}): the plan of the dtype-specialised kernel, or of the generic one.
template <class Params, class Make, class... MIXES>
LaunchPlan plan_for_mix(const Params& p, MixList<MIXES...>, Make&& make) {
  LaunchPlan plan;
  const bool fast = ((mix_matches<MIXES>(p) && (plan = make(MIXES{}), true)) || ...);
  return fast ? plan : make(AnyMix{});
}

}  // namespace residual_fused
