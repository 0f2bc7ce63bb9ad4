// The dtype mixes with compiled fast paths (rows.cuh: Mix), and the choice between
// them and the generic kernel. A mix is picked only when every tensor present has
// exactly its types; any other mix runs the generic (run-time dtype) kernel, so the
// set of supported mixes does not depend on this list.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "add_norm.h"
#include "args.h"
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

// Whether a tensor of `role` (not kNone: mix_matches skips those) with dtype t,
// present or not, fits MIX.
template <class MIX>
bool role_matches(MixRole role, bool present, DType t) {
  if (role == MixRole::kAct) return type_matches<typename MIX::act_t>(present, t);
  if (role == MixRole::kRes) return type_matches<typename MIX::res_t>(present, t);
  if (role == MixRole::kParam) return type_matches<typename MIX::param_t>(present, t);
  return type_matches<typename MIX::saved_t>(present, t);  // kSaved
}

// Whether every tensor of p with a dtype of its own (params.h: its ROLE) has MIX's type.
// The activation's counts even when absent: it is also y's (dx's) dtype.
template <class MIX, class Params>
bool mix_matches(const Params& p) {
  for (int i = 0; i < ArgsOf<Params>::count; ++i) {
    const TensorArg& a = ArgsOf<Params>::table[i];
    if (a.role == MixRole::kNone) continue;
    const bool present = a.role == MixRole::kAct || arg_ptr(p, a) != nullptr;
    if (!role_matches<MIX>(a.role, present, arg_dtype(p, a))) return false;
  }
  return true;
}

// make(MIX{}) for the first mix of the list that matches every tensor of p, else
// make(AnyMix{}): the plan of the dtype-specialised kernel, or of the generic one.
template <class Params, class Make, class... MIXES>
LaunchPlan plan_for_mix(const Params& p, MixList<MIXES...>, Make&& make) {
  LaunchPlan plan;
  const bool fast = ((mix_matches<MIXES>(p) && (plan = make(MIXES{}), true)) || ...);
  return fast ? plan : make(AnyMix{});
}

}  // namespace residual_fused
