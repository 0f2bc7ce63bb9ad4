"""Line and branch coverage of csrc/kernels under the emulated suite (gcov).

The emulator compiles the kernel sources as host code, so gcov can count what the
emulated suite executes of them:

    python tests/kernel_coverage.py            # build, run the suite, report (make coverage)
    python tests/kernel_coverage.py --quick    # the quick suite only, as CI runs it
    python tests/kernel_coverage.py --report   # report the counts already collected

The suite is tests/emulated_cases.py (every launch path under every schedule, the
fallbacks, the failure paths), the fuzzer's fixed regression cases and a fixed batch of
100 fuzz cases, run on the coverage build of the emulator (build/emulator/coverage-*,
unoptimised so that every count lands on its own line). CI runs the quick suite (the
one every mutant must survive) and the regression cases. Every line gcov counts must
be executed, or be listed in tests/coverage_unreachable.txt with the reason it cannot
be (each entry must still match an unexecuted line, so the list cannot go stale).
Lines under ``#ifndef RESIDUAL_FUSED_HOST_EMULATION`` (the device-only intrinsics of
cluster.cuh, ring.cuh and common.cuh) are not compiled by the emulator: the report lists them
as run only on a GPU.

Branch coverage is reported two ways: per source line (a branch counts as taken if any
template instantiation took it, among instantiations with the same branches on that
line), and per instantiation (every compiled copy separately; templates make many of
those unreachable by construction, so this figure is information, not a target).
"""

import argparse
import collections
import dataclasses
import glob
import json
import os
import re
import subprocess
import sys
from typing import Dict, List, Tuple

import repo_root

repo_root.rerun_with_root(__name__)

from tools import cuda_emulator  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
KERNELS = os.path.normpath(cuda_emulator.KERNELS)
UNREACHABLE = os.path.join(HERE, "coverage_unreachable.txt")


@dataclasses.dataclass
class Coverage:
    lines: Dict[Tuple[str, int], int]                  # (file, line) -> executions
    branches: Dict[Tuple[str, int, int], Dict[int, int]]  # (file, line, branches on line) -> {index: taken}
    instance_branches: Tuple[int, int]                # (taken, total) over every instantiation
    device_only: List[Tuple[str, int, int]]            # (file, first, last) not compiled here

    def line_totals(self) -> Tuple[int, int]:
        return sum(1 for c in self.lines.values() if c > 0), len(self.lines)

    def branch_totals(self) -> Tuple[int, int]:
        taken = sum(sum(1 for v in b.values() if v > 0) for b in self.branches.values())
        total = sum(key[2] for key in self.branches)
        return taken, total

    def uncovered(self) -> List[Tuple[str, int]]:
        return sorted(k for k, c in self.lines.items() if c == 0)


def collect(build_dir: str) -> Coverage:
    """Merge gcov's counts of every kernel source compiled into the library."""
    lines: Dict[Tuple[str, int], int] = collections.defaultdict(int)
    branches: Dict[Tuple[str, int, int], Dict[int, int]] = collections.defaultdict(lambda: collections.defaultdict(int))
    inst_taken = inst_total = 0
    for source in cuda_emulator.KERNEL_SOURCES:
        obj = os.path.join(build_dir, source + ".o")
        out = subprocess.run(["gcov", "--json-format", "--stdout", "--branch-probabilities", "--object-directory",
                              obj, os.path.join(KERNELS, source)], capture_output=True, text=True, timeout=600,
                             cwd=build_dir)
        if out.returncode != 0:
            raise RuntimeError(f"gcov failed on {source}: {out.stderr[-2000:]}")
        for doc in _json_documents(out.stdout):
            for f in doc["files"]:
                path = os.path.normpath(f["file"])
                if os.path.dirname(path) != KERNELS:
                    continue
                name = os.path.basename(path)
                for entry in f["lines"]:
                    key = (name, entry["line_number"])
                    lines[key] += entry["count"]
                    n = len(entry["branches"])
                    inst_total += n
                    inst_taken += sum(1 for b in entry["branches"] if b["count"] > 0)
                    if n:
                        per_line = branches[(name, entry["line_number"], n)]
                        for k, b in enumerate(entry["branches"]):
                            per_line[k] += b["count"]
    return Coverage(dict(lines), {k: dict(v) for k, v in branches.items()}, (inst_taken, inst_total),
                    device_only_blocks())


def _json_documents(text: str):
    decoder = json.JSONDecoder()
    i = 0
    while i < len(text):
        while i < len(text) and text[i].isspace():
            i += 1
        if i >= len(text):
            break
        doc, i = decoder.raw_decode(text, i)
        yield doc


def device_only_lines(text: str) -> List[Tuple[int, int]]:
    """(first line, last line) of each block of `text` the emulator does not compile:
    #ifndef RESIDUAL_FUSED_HOST_EMULATION ... #endif, and the #else part of an #ifdef."""
    out = []
    depth, start = 0, None
    for n, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if start is None:
            if re.match(r"#\s*(ifndef\s+RESIDUAL_FUSED_HOST_EMULATION|if\b.*!\s*defined\(RESIDUAL_FUSED_HOST_EMULATION\))",
                        s):
                start, depth = n, 1
            elif re.match(r"#\s*ifdef\s+RESIDUAL_FUSED_HOST_EMULATION", s):
                start, depth = -n, 1  # the #else part is device-only
            continue
        if re.match(r"#\s*if", s):
            depth += 1
        elif re.match(r"#\s*else", s) and depth == 1 and start < 0:
            start = n
        elif re.match(r"#\s*endif", s):
            depth -= 1
            if depth == 0:
                if start > 0:
                    out.append((start, n))
                start = None
    return out


def device_only_blocks() -> List[Tuple[str, int, int]]:
    """(file, first line, last line) of each block of csrc/kernels the emulator does not compile."""
    out = []
    for path in sorted(glob.glob(os.path.join(KERNELS, "*"))):
        with open(path) as f:
            out += [(os.path.basename(path), a, b) for a, b in device_only_lines(f.read())]
    return out


@dataclasses.dataclass
class Exclusion:
    file: str
    text: str
    why: str


def exclusions() -> List[Exclusion]:
    """tests/coverage_unreachable.txt: `file: source line text  -- why` per entry."""
    out = []
    with open(UNREACHABLE) as f:
        for raw in f:
            line = raw.rstrip("\n")
            if not line.strip() or line.startswith("#"):
                continue
            head, _, why = line.partition("  -- ")
            file, _, text = head.partition(": ")
            out.append(Exclusion(file.strip(), text.strip(), why.strip()))
    return out


def source_line(file: str, line: int) -> str:
    with open(os.path.join(KERNELS, file)) as f:
        return f.read().splitlines()[line - 1].strip()


def check(cov: Coverage) -> Tuple[List[Tuple[str, int, str]], List[Exclusion]]:
    """(unexecuted lines not listed as unreachable, listed entries that match nothing)."""
    listed = exclusions()
    used = set()
    missing = []
    for file, line in cov.uncovered():
        text = source_line(file, line)
        hit = [k for k, e in enumerate(listed) if e.file == file and e.text == text]
        if hit:
            used.update(hit)
        else:
            missing.append((file, line, text))
    stale = [e for k, e in enumerate(listed) if k not in used]
    return missing, stale


def report(cov: Coverage) -> str:
    lt, ln = cov.line_totals()
    bt, bn = cov.branch_totals()
    it, inn = cov.instance_branches
    out = [f"csrc/kernels under the emulated suite: lines {lt}/{ln} ({100 * lt / max(ln, 1):.1f}%), "
           f"branches per source line {bt}/{bn} ({100 * bt / max(bn, 1):.1f}%), "
           f"branches per instantiation {it}/{inn} ({100 * it / max(inn, 1):.1f}%)"]
    per_file = collections.defaultdict(lambda: [0, 0])
    for (file, _), c in cov.lines.items():
        per_file[file][1] += 1
        per_file[file][0] += c > 0
    for file, (c, n) in sorted(per_file.items()):
        out.append(f"  {file:22s} lines {c}/{n}")
    listed = {(e.file, e.text): e.why for e in exclusions()}
    uncovered = cov.uncovered()
    if uncovered:
        out.append("unexecuted lines (listed as unreachable, with why):")
        for file, line in uncovered:
            text = source_line(file, line)
            why = listed.get((file, text), "NOT LISTED")
            out.append(f"  {file}:{line}: {text}\n      -> {why}")
    out.append("not compiled by the emulator (device-only code, run only on a GPU):")
    for file, first, last in cov.device_only:
        out.append(f"  {file}:{first}-{last}")
    return "\n".join(out)


def run_suite(lib: str, full: bool = True) -> None:
    """On `lib`: the emulated suite (``full``: every path, flag set and schedule, and a
    fixed fuzz batch; else the mutant suite's quick paths) and the fuzzer's regression
    cases."""
    commands = [["emulated_cases.py", "--lib", lib] + ([] if full else ["--quick"]),
                ["fuzz_emulated.py", "--lib", lib, "--regressions"]]
    if full:
        commands.append(["fuzz_emulated.py", "--lib", lib, "--seed", "0", "--cases", "100"])
    for args in commands:
        proc = subprocess.run([sys.executable, os.path.join(HERE, args[0])] + args[1:], capture_output=True,
                              text=True, timeout=3600, env=repo_root.env())
        if proc.returncode != 0:
            raise RuntimeError(f"{args[0]} failed on the coverage build:\n{(proc.stdout + proc.stderr)[-3000:]}")


def measure(full: bool = True) -> Coverage:
    """Build the coverage variant, clear its counts, run the suite, collect."""
    lib = cuda_emulator.build_cached(coverage=True)
    build_dir = os.path.dirname(lib)
    for gcda in glob.glob(os.path.join(build_dir, "*.gcda")):
        os.remove(gcda)
    run_suite(lib, full)
    return collect(build_dir)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--report", action="store_true", help="report the counts already collected")
    p.add_argument("--quick", action="store_true", help="the quick suite only (as CI runs it)")
    args = p.parse_args(argv)
    if args.report:
        cov = collect(os.path.dirname(cuda_emulator.build_cached(coverage=True)))
    else:
        cov = measure(full=not args.quick)
    print(report(cov))
    missing, stale = check(cov)
    for file, line, text in missing:
        print(f"NOT COVERED and not listed in {os.path.relpath(UNREACHABLE)}: {file}:{line}: {text}")
    for e in stale:
        print(f"STALE entry in {os.path.relpath(UNREACHABLE)} (matches no unexecuted line): {e.file}: {e.text}")
    return 1 if missing or stale else 0


if __name__ == "__main__":
    sys.exit(main())
