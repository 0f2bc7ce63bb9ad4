"""The mutants tests/mutants.py derives from csrc/kernels. A campaign (``make mutants``)
runs them through the mutant suite and records each outcome in
tests/mutants_record.txt; every survivor it records is explained in
tests/mutants_equivalent.txt. CI reruns a random sample of the recorded kills: a change
to the kernels, the emulator or the tests that lets one of them survive fails it.

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


def test_every_mutant_a_schema_holds_is_rendered():
    """A rewrite the schema renderer drops would run the original code under its
    mutant's number: a survivor by construction (build_schema also checks each build)."""
    files: dict = {}
    for m in MUTANTS:
        files.setdefault(m.file, []).append(m)
    for file, group in files.items():
        with open(os.path.join(mutants.KERNELS, file)) as f:
            text = f.read()
        ids = {m.key: k + 1 for k, m in enumerate(group)}
        edits, _ = mutants._edits(text, group, ids)
        _, clashes = mutants._nest(edits)
        edits = [e for e in edits if e not in clashes]
        _, lost = mutants._rendered(mutants.render_schema(text, edits), edits, ids)
        assert not lost, f"{file}: rewrites the schema does not render: {[m for e in lost for m in e.mutants][:5]}"


def test_every_recorded_survivor_is_explained():
    listed = mutants.equivalents()
    recorded = mutants.record()
    unexplained = [k for k, status in recorded.items() if status == "survived" and k not in listed]
    assert not unexplained, (f"{mutants.RECORD} records survivors that {mutants.EQUIVALENT} does not "
                             f"explain (kill them with a test, or note why they are equivalent):\n  " +
                             "\n  ".join(unexplained))
    stale = [k for k, status in recorded.items() if status != "survived" and k in listed]
    assert not stale, f"listed as equivalent, but the record has them killed: {stale}"


def test_a_random_sample_of_the_recorded_kills_is_killed(kernel_build):
    del kernel_build  # built (and cached) before the subprocesses need it
    n = int(os.environ.get("RESIDUAL_FUSED_MUTANT_SAMPLE", "8"))
    seed = int(os.environ.get("RESIDUAL_FUSED_MUTANT_SEED", int.from_bytes(os.urandom(4), "little")))
    recorded = mutants.record()
    killed = [m for m in MUTANTS if recorded.get(m.key) in ("killed", "timeout")]
    assert len(killed) >= n, f"{mutants.RECORD} records {len(killed)} killed mutants: run a campaign"
    sample = random.Random(seed).sample(killed, n)
    try:
        results = mutants.run_all(sample, jobs=2, full_sanity=False)
    except FileNotFoundError as why:
        pytest.skip(str(why))
    text, unexplained = mutants.summary(sample, results)
    text += (f"; {len(recorded)} of the {len(MUTANTS)} generated mutants have a recorded outcome, "
             f"{len(killed)} of them killed")
    SUMMARIES.append(f"generated mutants, a sample of {n} recorded kills (seed {seed}): {text}")
    assert not unexplained, "recorded as killed, now surviving:\n" + "\n".join(
        f"  {m}\n    key: {m.key}\n    reproduce: python tests/mutants.py --key '{m.key}'" for m in unexplained)
