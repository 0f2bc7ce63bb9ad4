"""The fuzzer in CI: its fixed regression cases, then a time-boxed share of fresh random
cases (tests/fuzz_emulated.py; ``make fuzz`` runs it for longer).

RESIDUAL_FUSED_FUZZ_SECONDS sets the share (default 60 s) and RESIDUAL_FUSED_FUZZ_SEED
its seed (default: a fresh one each run). The seed, the case count and the worst
errors are printed at the end of the run; a failure prints its case's reproduction.
"""

import collections
import os
import random

import pytest
import torch

import fuzz_emulated
import fuzz_space
from tools import cuda_emulator

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def emu(request):
    try:
        lib = cuda_emulator.build_cached()
    except FileNotFoundError as why:
        pytest.skip(str(why))
    try:
        kernels = request.getfixturevalue("kernel_build")
    except pytest.skip.Exception:
        kernels = None
    return cuda_emulator.Emulator(lib, kernels)


REGRESSIONS = fuzz_emulated.regressions()


@pytest.mark.parametrize("why,case", REGRESSIONS, ids=[c.summary() for _, c in REGRESSIONS])
def test_regression_case(emu, why, case):
    fuzz_emulated.check(emu, case, f"regression ({why}): ")


def test_regression_cases_on_the_cpu_kernels():
    import residual_fused as rf

    if not rf.cpu_kernels_available():
        pytest.skip("the CPU kernels are not built")
    target = fuzz_emulated.OpsTarget("cpu")
    for why, case in REGRESSIONS:
        fuzz_emulated.check(target, case, f"regression ({why}), CPU kernels: ")


def test_random_share(emu):
    seconds = float(os.environ.get("RESIDUAL_FUSED_FUZZ_SECONDS", "60"))
    seed = int(os.environ.get("RESIDUAL_FUSED_FUZZ_SEED", int.from_bytes(os.urandom(4), "little")))
    stats = fuzz_emulated.run_batch(emu, seed, seconds=seconds)
    fuzz_emulated.SUMMARIES.append(f"fuzzer, seed {seed}, {seconds:.0f} s: {stats.text()}")
    assert stats.cases > 0


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_random_share_on_the_library_ops(emu, device):
    """The same generator through torch.ops on the compiled CPU kernels (and on a GPU's
    CUDA kernels where one is present), RESIDUAL_FUSED_FUZZ_OPS_SECONDS (default 30)."""
    import residual_fused as rf

    if device == "cpu" and not rf.cpu_kernels_available():
        pytest.skip("the CPU kernels are not built")
    if device == "cuda" and not (torch.cuda.is_available() and rf.cuda_kernels_available()):
        pytest.skip("needs a GPU and the CUDA kernels")
    seconds = float(os.environ.get("RESIDUAL_FUSED_FUZZ_OPS_SECONDS", "30"))
    seed = int(os.environ.get("RESIDUAL_FUSED_FUZZ_SEED", int.from_bytes(os.urandom(4), "little")))
    stats = fuzz_emulated.run_batch(emu, seed, seconds=seconds, target=fuzz_emulated.OpsTarget(device))
    fuzz_emulated.SUMMARIES.append(f"fuzzer on the {device} kernels, seed {seed}, {seconds:.0f} s: {stats.text()}")
    assert stats.cases > 0


def test_every_mix_the_api_accepts_is_drawn_from():
    """The space is the API's: fp8 (which the API refuses) never appears, and every
    accepted x dtype, residual dtype and residual_dtype does, with no residual too."""
    mixes = fuzz_space.api_mixes()
    seen = collections.defaultdict(set)
    for m in mixes:
        for name in ("x", "residual", "weight", "bias", "residual_dtype"):
            seen[name].add(getattr(m, name))
    for name in ("residual", "weight", "bias", "residual_dtype"):
        assert seen[name] == {None, torch.float16, torch.bfloat16, torch.float32, torch.float64}, (name, seen[name])
    assert seen["x"] == {torch.float16, torch.bfloat16, torch.float32, torch.float64}
    # the first pre-norm layer: no residual, an fp32 residual stream from 16-bit x
    assert any(m.residual is None and m.residual_dtype == torch.float32 and m.x == torch.bfloat16 and m.prenorm
               for m in mixes)
    fwd, bwd = fuzz_space.op_calls(fuzz_space.ApiMix(False, torch.bfloat16, None, torch.float32, None,
                                                     torch.float32, True, False))
    assert fwd["residual"] is None and fwd["residual_out"] == "f32" and fwd["store"]
    assert bwd["dresidual_out"] == "f32" and bwd["saved"] == "f32" and bwd["dresidual"] is None


def test_the_generator_reaches_every_boundary(emu):
    """Over a few hundred drawn cases (planned, not run), every kind of edge the issue
    names appears: cluster rows with a short last slice, clusters and CTAs that loop
    over several rows, fewer rows than CTAs, each tensor argument off a 16-byte
    boundary by 2, 4 and 8 bytes, padded, broadcast and overlapping rows, every
    profile with and without clusters, every schedule."""
    rng = random.Random(1)
    boundaries = fuzz_space.plan_boundaries(emu.path)
    seen = set()
    for _ in range(300):
        case = fuzz_space.generate(rng, emu, boundaries)
        emu.configure(*case.device)
        try:
            fwd, bwd = fuzz_space.plans(emu, case, case.rows)
        finally:
            emu.configure()
        for launches in (fwd, bwd):
            main = launches[0]
            units = main["grid"] // main["cluster"]
            if main["cluster"] > 1:
                seen.add("clusters")
                slice_ = ((case.hidden + main["cluster"] - 1) // main["cluster"] + 7) // 8 * 8
                if slice_ * main["cluster"] != case.hidden:
                    seen.add("short last slice")
                if case.rows > units:
                    seen.add("clusters loop")
            elif case.rows > units:
                seen.add("CTAs loop")
            if case.rows < units or units == 1:
                seen.add("few rows")
        for name, lay in case.layout.items():
            if lay[0] in (2, 4, 8):
                seen.add(f"{name}@{lay[0]}")
            if len(lay) > 1:
                stride = lay[1]
                seen.add("broadcast" if stride == 0 else "overlap" if stride < case.hidden else
                         "pad" if stride > case.hidden else "contiguous")
        seen.add(f"{case.device[0]}/{'clusters' if case.device[2] else 'none'}")
        seen.update(case.schedules)
    wanted = {"clusters", "short last slice", "clusters loop", "CTAs loop", "few rows", "broadcast", "overlap",
              "pad", "h100/clusters", "h100/none", "a100/clusters", "sm86/clusters"}
    wanted |= set(cuda_emulator.SCHEDULES)
    for name in ("x", "residual", "weight", "bias", "dresidual_out", "dy", "saved"):
        wanted |= {f"{name}@2", f"{name}@4", f"{name}@8"}
    assert wanted <= seen, f"never drawn: {sorted(wanted - seen)}"
