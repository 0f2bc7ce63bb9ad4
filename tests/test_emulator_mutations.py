"""Keep the emulator honest: plant one bug at a time in a copy of csrc/kernels and
require that the emulated suite (tests/emulated_cases.py, quick mode) fails on it,
through a check that reports (not a crash or a hang).

The catalogue is generated from the sources, so new kernels join it where the
mutation is mechanical:
  sync    every __syncthreads() removed in turn
  mask    every full-warp shuffle mask narrowed to half a warp
  bound   every `< hidden` row bound made `<= hidden` (off by one), except the
          kernel-level bounds listed in EQUIVALENT_BOUNDS: there the row accessors
          of common.cuh check the bound again, so the mutant computes the same thing
  idle    idle row groups skipping their row reduction (rows kernels)
  cluster every cluster barrier removed in turn
and a fixed list: the shared-memory opt-in dropped, the fit check without the
kernel's static shared memory, the alignment check dropped (a misaligned 16-byte
access), the dtype-mix check dropped (a fast path reading the wrong element type);
the argument lists of params.h (args.h): the alignment check skipping the weight and bias,
the dtype-mix check skipping the outputs, a tensor added that the emulator's
driver does not give;
a variant chosen for a shape it cannot handle (each refusal of the variant plans
dropped in turn), the tuning override ignored; for the cluster kernels, the exchange
slots not double-buffered, a CTA's slice not
offset by its rank, a wait that leaves the current row's copies in flight, the next
row fetched into the buffer being read, and the non-portable cluster size not
allowed (the widest rows silently leave the cluster path); for the backward rows
kernel's ring (st=2), a wait that leaves the current rows in flight, the next rows
fetched into the stage being read, the next rows' rstd or mean taken, the forward's mean ignored or not used as the
shift, the shifted sums not re-centred or their mean term dropped, the forward's mean
not written or wrong, no group committed
past the last row, stages that overlap or overflow shared memory, one tensor copied
over another, and each of its refusals dropped; most of the same in the forward's. Each mutant is built from
the cached emulator objects plus the translation units that include the mutated file
(tests/mutants.py, which also generates mutants mechanically and measures their kill
rate) and run in a subprocess with a time limit; mutants run two at a time. CI runs a
random share of the catalogue each time; make mutants runs all of it.
"""

import concurrent.futures
import dataclasses
import os
import random
import re
import shutil
import subprocess
import sys
from typing import List

import pytest

import mutants
import repo_root
from tools import cuda_emulator

pytestmark = pytest.mark.slow

HERE = os.path.dirname(os.path.abspath(__file__))
KERNEL_FILES = sorted(f for f in os.listdir(cuda_emulator.KERNELS) if f.endswith((".cu", ".cuh", ".h")))


@dataclasses.dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    pattern: str      # regex
    replacement: str
    occurrence: int   # which match to replace

    def apply(self, text: str) -> str:
        matches = list(re.finditer(self.pattern, text))
        m = matches[self.occurrence]
        return text[:m.start()] + m.expand(self.replacement) + text[m.end():]

    def __str__(self):
        return self.name


def _line(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


# `< hidden` matches (0-based, in file order) whose mutation cannot change a result,
# and how many matches each file has (a change there means revisiting this list).
EQUIVALENT_BOUNDS = {
    # partial sums of chunks past the row end (dy is zero there); the streamed passes'
    # first two column loops (every access is re-checked); the reduction's final store
    # (store_chunks re-checks). (The re-centring's bound, in rows.cuh's scale_chunks, is
    # not equivalent since the ring's shifted sums use it.)
    "bwd_kernels.cuh": ({0, 4, 5, 8}, 9),
    # the streamed forward's output pass (loads, affine and stores all re-check).
    "fwd_kernels.cuh": ({3}, 4),
}


def catalogue() -> List[Mutation]:
    # (family, pattern, replacement, files: None for every kernel file)
    families = [
        ("sync", r"__syncthreads\(\);", "", None),
        ("mask", r"__shfl_xor_sync\(0xffffffffu", "__shfl_xor_sync(0x0000ffffu", None),
        ("bound", r"(?<![<=])< hidden\b", "<= hidden", None),
        ("idle", r"row_sum<MAX_BLOCK>\(rl, ", "if (active) row_sum<MAX_BLOCK>(rl, ",
         ("fwd_kernels.cuh", "bwd_kernels.cuh")),
        ("cluster", r"cluster_sync\(\);", "", ("cluster_kernels.cuh",)),
    ]
    fixed = [
        ("opt-in dropped", "dispatch.cu", r"cudaFuncSetAttribute\([^;]*\)", "cudaSuccess"),
        ("fit check ignores static smem", "dispatch.cu",
         r"static_cast<int64_t>\(plan\.smem\) \+ info\.static_smem <= max_smem_per_block\(\)",
         "static_cast<int64_t>(plan.smem) <= max_smem_per_block()"),
        ("alignment check dropped", "dispatch.cu", r"return ptr == nullptr \|\|", "return true ||"),
        ("backward planned again at launch", "dispatch.cu", r"launch\(plan\.main, p, stream\)",
         "launch(bwd_plan(p), p, stream)"),
        ("refused launch left pending", "dispatch.cu", r"if \(launched != cudaSuccess\) cudaGetLastError\(\);", ""),
        ("dtype mix check dropped", "rows.cuh", r"return !present \|\| t == DTypeOf<T>::value;", "return true;"),
        # the argument lists of params.h and what is built from them
        ("alignment check skips the [hidden] inputs", "args.h",
         r"return is_rows\(\) \|\| kind == ArgKind::kVecIn;", "return is_rows();"),
        ("dtype mix check skips the outputs", "mixes.h", r"if \(a\.role == MixRole::kNone\) continue;",
         "if (a.role == MixRole::kNone || a.is_output()) continue;"),
        ("a forward argument the driver does not give", "params.h", r"X\(ROWS_IN, residual, _, RES\)",
         "X(ROWS_IN, residual, _, RES) X(ROWS_IN, extra, _, RES)"),
        ("host and kernel disagree on threads per row", "bwd_rows.cu",
         r"row_threads_for\(p\.hidden, CHUNKS \* VEC\)", "row_threads_for(p.hidden, 2 * CHUNKS * VEC)"),
        ("exchange slots not double-buffered", "cluster_kernels.cuh",
         r"float\* const slot = slots \+ parity \* N;", "float* const slot = slots;"),
        ("slice not offset by the CTA's rank", "cluster_kernels.cuh", r"begin\(rank \* slice\)", "begin(0)"),
        ("forward waits for the next row only", "cluster_kernels.cuh", r"async_wait<1>\(\);", "async_wait<2>();"),
        ("backward waits for the next row only", "cluster_kernels.cuh", r"async_wait<1>\(\);", "async_wait<2>();", 1),
        ("next row fetched into the buffer being read", "cluster_kernels.cuh",
         r"fetch\(row \+ clusters, parity \^ 1\);", "fetch(row + clusters, parity);"),
        ("backward fetches into the buffer being read", "cluster_kernels.cuh",
         r"fetch\(row \+ clusters, parity \^ 1\);", "fetch(row + clusters, parity);", 1),
        # the backward rows kernel's ring (st=2, ring.cuh)
        ("ring takes the next rows' rstd", "bwd_kernels.cuh",
         r"rstd = active \? rstd_next : 0\.f;\n(      if \(active\) shift = mean_next;\n)      fetch\(first \+ step, stage \^ 1\);",
         "\\1      fetch(first + step, stage ^ 1);\n      rstd = active ? rstd_next : 0.f;"),
        ("ring commits no group past the last row", "bwd_kernels.cuh",
         r"(mean_next = static_cast<const float\*>\(p\.mean\)\[row\];\n)    \}\n    async_commit\(\);",
         r"\1      async_commit();\n    }"),
        # LayerNorm's one reduction with the forward's mean (the ring; check_shift)
        ("ring takes the next rows' mean", "bwd_kernels.cuh",
         r"(      if \(active\) shift = mean_next;\n)(      fetch\(first \+ step, stage \^ 1\);\n)", r"\2\1"),
        ("ring's one reduction not shifted", "bwd_kernels.cuh",
         r"scale_chunks\(rl, hidden, shift, 1\.f, v\);\n(      float sums\[3\])",
         r"scale_chunks(rl, hidden, 0.f, 1.f, v);\n\1"),
        ("ring ignores the forward's mean", "bwd_kernels.cuh", r"const bool has_mean = kRing &&",
         "const bool has_mean = false &&"),
        ("ring's shifted sums not re-centred", "bwd_kernels.cuh",
         r"scale_chunks\(rl, hidden, mean_u, scale, v\);", "scale_chunks(rl, hidden, 0.f, scale, v);"),
        ("ring's sum(g xhat) without its mean term", "bwd_kernels.cuh",
         r"mean_gx = scale \* \(\(sums\[0\] - mean_u \* sums\[2\]\) / hidden\);",
         "mean_gx = scale * (sums[0] / hidden);"),
        ("forward writes no mean", "common.cuh",
         r"if \(p\.mean != nullptr\) static_cast<acc_t\*>\(p\.mean\)\[row\] = mean;", ""),
        ("forward writes rstd as the mean", "common.cuh",
         r"static_cast<acc_t\*>\(p\.mean\)\[row\] = mean;", "static_cast<acc_t*>(p.mean)[row] = rstd;"),
        ("ring given one stage of shared memory", "bwd_kernels.cuh", r"const int ring = STAGES == 2 \? 2 \*",
         "const int ring = STAGES == 2 ? 1 *"),
        ("ring copies d(residual_out) over dy", "bwd_kernels.cuh", r"fetch_chunks\(b \+ saved_bytes \+ dy_bytes,",
         "fetch_chunks(b + saved_bytes,"),
        ("ring (forward) commits no group past the last row", "fwd_kernels.cuh",
         r"(elem_size<R>\(p\.residual_dtype\), rl, hidden\);\n      \}\n)    \}\n    async_commit\(\);",
         r"\1      async_commit();\n    }"),
        ("ring (forward) copies the residual over x", "fwd_kernels.cuh", r"fetch_chunks\(b \+ x_bytes,",
         "fetch_chunks(b,"),
        ("ring (forward) given one stage of shared memory", "fwd_kernels.cuh",
         r"\(STAGES == 2 \? 2 \* rows_per_cta", "(STAGES == 2 ? 1 * rows_per_cta"),
        ("ring on 32 elements per thread", "bwd_rows.cu", r"if \(per_thread != 16\) return refused\(kRowsRingNeedsPt16\);",
         ""),
        ("ring stages not checked against the family", "dispatch.cu",
         r"if \(v\.stages != 0 && v\.family != Family::kRows\)", "if (false)"),
        # variant selection: a variant chosen for a shape it cannot handle
        ("rows variant too narrow for the row", "fwd_rows.cu",
         r"if \(row_threads > MAX_BLOCK\) return refused", "if (false) return refused"),
        ("backward rows variant too narrow for the row", "bwd_rows.cu",
         r"if \(row_threads > MAX_BLOCK\) return refused", "if (false) return refused"),
        ("cluster variant of partial warps", "cluster_rows.cu", r"if \(shape\.block < 32\)", "if (false)"),
        ("cluster variant slice wider than a CTA", "cluster_rows.cu", r"if \(shape\.block > kClusterBlock\)",
         "if (false)"),
        ("bare cluster variant on a row too narrow to split", "cluster_rows.cu",
         r"if \(const char\* why = shape_refusal\(wide\)\) return refused\(why\);", ""),
        ("variant choices not checked against the family", "dispatch.cu",
         r"if \(const char\* why = choices_refusal\(v, Direction::kFwd\)\) return refused\(why\);", ""),
        ("staged variant without vectorised rows", "dispatch.cu", r"if \(!vec8 && v\.family != Family::kRows && ",
         "if (false && "),
        ("tuning override ignored", "dispatch.cu", r"if \(variant_override\(d, &v\)\)", "if (false)"),
        # in place (check_inplace): a result written before the last read of its input
        ("streamed forward writes residual_out in its first pass", "fwd_kernels.cuh",
         r"(      load_sum_chunks<1, VEC>\(p, x, r, col, 0, s\);\n)(      if \(p\.is_rms_norm\) \{)",
         r"\1      if (p.residual_out != nullptr) store_chunks<1, VEC>(row_ptr(p.residual_out, row, hidden, "
         r"p.residual_out_dtype), p.residual_out_dtype, col, 0, hidden, s);\n\2"),
        ("non-portable cluster size not allowed", "dispatch.cu",
         r"cudaFuncAttributeNonPortableClusterSizeAllowed, 1\)", "cudaFuncAttributeNonPortableClusterSizeAllowed, 0)"),
    ]
    # the same bugs in both rows kernels' ring
    for name, pattern, repl in [
            ("waits for the next rows too", r"async_wait<1>\(\);", "async_wait<2>();"),
            ("fetches into the stage being read", r"fetch\(first \+ step, stage \^ 1\);", "fetch(first + step, stage);"),
            ("stage sized for one row group", r"const int stage_bytes = rl\.rows_per_cta \* group_bytes;",
             "const int stage_bytes = group_bytes;")]:
        fixed += [(f"ring {name}", "bwd_kernels.cuh", pattern, repl),
                  (f"ring (forward) {name}", "fwd_kernels.cuh", pattern, repl)]
    misaligned = r"if \(v\.stages == 2\) return refused\(kRowsRingNeedsVec8\);"
    fixed += [("ring on misaligned rows", "bwd_rows.cu", misaligned, ""),
              ("ring (forward) on misaligned rows", "fwd_rows.cu", misaligned, "")]
    out = []
    for f in KERNEL_FILES:
        with open(os.path.join(cuda_emulator.KERNELS, f)) as fh:
            text = fh.read()
        for family, pattern, repl, files in families:
            if files is not None and f not in files:
                continue
            for k, m in enumerate(re.finditer(pattern, text)):
                if family == "bound" and k in EQUIVALENT_BOUNDS.get(f, (set(), 0))[0]:
                    continue
                out.append(Mutation(f"{family} {f}:{_line(text, m.start())}", f, pattern, repl, k))
    for name, f, pattern, repl, *occurrence in fixed:  # occurrence: the first match by default
        out.append(Mutation(name, f, pattern, repl, occurrence[0] if occurrence else 0))
    return out


MUTATIONS = catalogue()
# CI runs a fresh random share of the catalogue each time (RESIDUAL_FUSED_HAND_MUTANTS
# mutants, default 9; "all" runs every one, as make mutants does).
_share = os.environ.get("RESIDUAL_FUSED_HAND_MUTANTS", "9")
SELECTED = (MUTATIONS if _share == "all" else
            random.Random(int.from_bytes(os.urandom(4), "little")).sample(MUTATIONS, min(int(_share),
                                                                                         len(MUTATIONS))))


def run_mutant(mutation: Mutation, baseline, work: str) -> str:
    """'' if the suite caught the mutant through a report, else why not."""
    with open(os.path.join(cuda_emulator.KERNELS, mutation.file)) as f:
        text = f.read()
    lib = mutants.build_mutant(mutation.file, mutation.apply(text), baseline, work)
    try:
        proc = subprocess.run([sys.executable, os.path.join(HERE, "emulated_cases.py"), "--lib", lib,
                               "--quick"], capture_output=True, text=True, timeout=600, env=repo_root.env())
    except subprocess.TimeoutExpired:
        return "the emulated suite hung (deadlocks must be reported)"
    finally:
        shutil.rmtree(work, ignore_errors=True)
    output = (proc.stdout + proc.stderr)[-2000:]
    if proc.returncode == 0:
        return f"the emulated suite passes:\n{output}"
    if proc.returncode != 1 or "FAILED:" not in proc.stdout:
        return f"the suite crashed (exit {proc.returncode}) instead of reporting:\n{output}"
    print(f"caught {mutation}: {proc.stdout.strip().splitlines()[-1][:240]}")
    return ""


@pytest.fixture(scope="module")
def results(tmp_path_factory, kernel_build):
    """Every mutant built and run, two at a time (the machines have few cores)."""
    del kernel_build  # built (and cached) before the subprocesses need it
    try:
        baseline = mutants.baseline_objects()
    except FileNotFoundError as why:
        pytest.skip(str(why))
    work = tmp_path_factory.mktemp("mutants")
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        futures = {m.name: pool.submit(run_mutant, m, baseline, str(work / f"m{k}"))
                   for k, m in enumerate(SELECTED)}
        return {name: f.result() for name, f in futures.items()}


def test_catalogue_covers_every_family():
    names = " ".join(m.name for m in MUTATIONS)
    for family in ("sync ", "mask ", "bound ", "idle ", "opt-in dropped", "fit check", "alignment",
                   "planned again", "left pending", "dtype mix", "threads per row", "cluster ",
                   "exchange slots", "rank", "waits for the next row", "buffer being read",
                   "non-portable", "variant", "tuning override", "ring "):
        assert family in names, f"no mutation of family {family!r}: did a pattern stop matching?"
    for m in MUTATIONS:  # every fixed mutation still applies to today's sources
        with open(os.path.join(cuda_emulator.KERNELS, m.file)) as fh:
            assert len(re.findall(m.pattern, fh.read())) > m.occurrence, m.name
    for f, (_, count) in EQUIVALENT_BOUNDS.items():
        with open(os.path.join(cuda_emulator.KERNELS, f)) as fh:
            found = len(re.findall(r"(?<![<=])< hidden\b", fh.read()))
        assert found == count, f"{f} now has {found} row bounds, not {count}: revisit EQUIVALENT_BOUNDS"


@pytest.mark.parametrize("mutation", SELECTED, ids=str)
def test_planted_bug_is_caught(mutation, results):
    assert results[mutation.name] == "", f"with '{mutation}' planted, {results[mutation.name]}"
