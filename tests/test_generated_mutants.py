"""A random sample of the mutants tests/mutants.py derives from csrc/kernels must be
killed by the mutant suite (those listed as equivalent, with the reason, in
tests/mutants_equivalent.txt are left out of the sample). ``make mutants`` runs all
of them.

RESIDUAL_FUSED_MUTANT_SAMPLE sets the sample size (default 8), RESIDUAL_FUSED_MUTANT_SEED
its seed (default: a fresh one each run)."""

import os
import random

import pytest

import mutants

pytestmark = pytest.mark.slow

SUMMARIES = []
MUTANTS = mutants.generate()


def test_every_operator_family_generates_mutants():
    ops = {m.operator for m in MUTANTS}
    assert ops == {"rel", "arith", "logic", "const", "swap", "cond", "sync", "mask", "call"}, ops
    files = {m.file for m in MUTANTS}
    for f in ("dispatch.cu", "cluster_kernels.cuh", "bwd_kernels.cuh", "fwd_kernels.cuh", "rows.cuh",
              "common.cuh"):
        assert f in files


def test_every_equivalence_note_names_a_generated_mutant():
    keys = {m.key for m in MUTANTS}
    stale = [k for k in mutants.equivalents() if k not in keys]
    assert not stale, f"{mutants.EQUIVALENT} lists mutants the sources no longer give: {stale}"


def test_a_random_sample_is_killed(kernel_build):
    del kernel_build  # built (and cached) before the subprocesses need it
    n = int(os.environ.get("RESIDUAL_FUSED_MUTANT_SAMPLE", "8"))
    seed = int(os.environ.get("RESIDUAL_FUSED_MUTANT_SEED", int.from_bytes(os.urandom(4), "little")))
    listed = mutants.equivalents()  # known to survive, with the reason: not worth CI's time
    sample = random.Random(seed).sample([m for m in MUTANTS if m.key not in listed], n)
    try:
        results = mutants.run_all(sample, jobs=2, full_sanity=False)
    except FileNotFoundError as why:
        pytest.skip(str(why))
    text, unexplained = mutants.summary(sample, results)
    SUMMARIES.append(f"generated mutants, sample of {n} (seed {seed}): {text}")
    assert not unexplained, "survivors, neither killed nor listed as equivalent:\n" + "\n".join(
        f"  {m}\n    key: {m.key}\n    reproduce: python tests/mutants.py --key '{m.key}'" for m in unexplained)
