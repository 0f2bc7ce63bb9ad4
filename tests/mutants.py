"""Mutants derived mechanically from csrc/kernels, and the run that must kill them.

    python tests/mutants.py --list                 # every generated mutant
    python tests/mutants.py --all --jobs 2         # run them all (make mutants)
    python tests/mutants.py --sample 8 --seed 3    # a random sample (CI runs one)
    python tests/mutants.py --key '<key>'          # one mutant, its suite output shown

Operators, applied to the code of every kernel and dispatch source (comments, strings
and preprocessor lines excluded), one change per mutant:
  rel     a relational operator to its off-by-one or negated sibling (< <=, > >=, == !=)
  arith   + -, * /, % / and the compound assignments likewise
  logic   && ||, and a unary ! dropped
  const   an integer literal +1 and -1 (0: +1 only); 0.f / 1.f literals swapped
  swap    the two indices of a[i][j]
  cond    an if's condition replaced by true, and by false
  sync    a __syncthreads(), cluster_sync() or async_commit() removed; a
          cp.async wait allowed one more group in flight
  mask    a full-warp shuffle mask narrowed to half a warp
  call    a whole one-line call statement removed
Not mutated: code the emulator does not compile (device-only blocks), and the
arguments of __launch_bounds__, static_assert and template parameter lists (nvcc-only
or compile-time: the emulator cannot observe them; tests/test_cuda_build.py checks
what nvcc makes of them).

Each mutant is built from the cached emulator objects plus the translation units that
include the mutated file, and run (in a subprocess, with a time limit) through the
mutant suite: tests/emulated_cases.py --quick, the fuzzer's regression cases, and a
fixed fuzz batch; it stops at the first failure. Outcomes: killed (the suite failed),
survived, stillborn (does not compile: not counted), equivalent (listed with the reason
in tests/mutants_equivalent.txt: not counted). The kill rate is killed / (killed +
survived).
"""

import argparse
import concurrent.futures
import dataclasses
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import cuda_emulator  # noqa: E402
import kernel_coverage  # noqa: E402

KERNELS = cuda_emulator.KERNELS
EQUIVALENT = os.path.join(HERE, "mutants_equivalent.txt")
FUZZ_SEED, FUZZ_CASES = 0, 12  # the fixed fuzz batch of the mutant suite
TIME_LIMIT = 600  # seconds per mutant run: a hang (a deadlock not reported) is killed


# ---- the code of a source file --------------------------------------------------------------

def code_mask(text: str) -> List[bool]:
    """For each character: True where it is code (not a comment, a string or character
    literal, or a preprocessor line)."""
    mask = [True] * len(text)
    i, n = 0, len(text)
    line_start = True
    while i < n:
        c = text[i]
        if line_start and text[i:].lstrip(" \t").startswith("#"):
            j = text.find("\n", i)
            j = n if j < 0 else j
            while j > 0 and text[j - 1] == "\\" and j < n:  # continued directive
                k = text.find("\n", j + 1)
                j = n if k < 0 else k
            for k in range(i, j):
                mask[k] = False
            i = j
            continue
        line_start = c == "\n"
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            for k in range(i, j):
                mask[k] = False
            i = j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            for k in range(i, j):
                mask[k] = False
            i = j
        elif c in "\"'":
            j = i + 1
            while j < n and text[j] != c:
                j += 2 if text[j] == "\\" else 1
            for k in range(i, min(j + 1, n)):
                mask[k] = False
            i = j + 1
        else:
            i += 1
    return mask


def _matching(text: str, open_at: int) -> int:
    """Index of the parenthesis/bracket closing the one at open_at."""
    pairs = {"(": ")", "[": "]", "<": ">"}
    o, c = text[open_at], pairs[text[open_at]]
    depth = 0
    for k in range(open_at, len(text)):
        if text[k] == o:
            depth += 1
        elif text[k] == c:
            depth -= 1
            if depth == 0:
                return k
    return -1


def excluded_spans(text: str) -> List[Tuple[int, int]]:
    """Spans never mutated: device-only blocks, __launch_bounds__(...), static_assert(...),
    template <...> parameter lists."""
    offsets = [0]
    for line in text.split("\n"):
        offsets.append(offsets[-1] + len(line) + 1)
    spans = [(offsets[first - 1], offsets[last]) for first, last in kernel_coverage.device_only_lines(text)]
    for m in re.finditer(r"\b(__launch_bounds__|static_assert)\s*\(|\btemplate\s*<", text):
        spans.append((m.start(), _matching(text, m.end() - 1) + 1))
    return spans


# ---- mutants -----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Mutant:
    file: str
    line: int
    start: int         # offset in the file
    end: int
    original: str
    replacement: str
    operator: str
    key: str           # stable across edits elsewhere: file, line text, column, change

    def apply(self, text: str) -> str:
        assert text[self.start:self.end] == self.original, self
        return text[:self.start] + self.replacement + text[self.end:]

    def __str__(self):
        return f"{self.file}:{self.line} {self.operator} {self.original.strip()!r} -> {self.replacement.strip()!r}"


REL = {" < ": [" <= "], " <= ": [" < "], " > ": [" >= "], " >= ": [" > "], " == ": [" != "], " != ": [" == "]}
ARITH = {" + ": [" - "], " - ": [" + "], " * ": [" / "], " / ": [" * "], " % ": [" / "],
         " += ": [" -= "], " -= ": [" += "], " *= ": [" /= "], " /= ": [" *= "]}
LOGIC = {" && ": [" || "], " || ": [" && "]}
KEYWORDS = {"return", "if", "for", "while", "switch", "case", "else", "do", "break", "continue", "using",
            "typedef", "constexpr", "const", "static", "template", "struct", "class", "namespace"}


def _candidates(text: str, mask: List[bool]) -> List[Tuple[int, int, str, str]]:
    """(start, end, replacement, operator) for every mutation of `text`."""
    out = []

    def code(a, b):
        return all(mask[a:b])

    for table, op in ((REL, "rel"), (ARITH, "arith"), (LOGIC, "logic")):
        for token, repls in table.items():
            for m in re.finditer(re.escape(token), text):
                if not code(m.start(), m.end()):
                    continue
                # a - or * starting a unary expression (x = -y, *p) is not binary
                before = text[:m.start()].rstrip()
                if not before or before[-1] in "(=,?:;{[&|!<>+-*/%" and token in (" - ", " * ", " + "):
                    continue
                for r in repls:
                    out.append((m.start(), m.end(), r, op))
    for m in re.finditer(r"!(?=[A-Za-z_(])", text):
        if code(m.start(), m.end()):
            out.append((m.start(), m.end(), "", "logic"))
    for m in re.finditer(r"(?<![\w.])(\d+)([uUlL]*)(?![\w.])", text):
        if not code(m.start(), m.end()) or text[m.start() - 2: m.start()] == "0x":
            continue
        value, suffix = int(m.group(1)), m.group(2)
        for v in ([value + 1, value - 1] if value > 0 else [1]):
            out.append((m.start(), m.end(), f"{v}{suffix}", "const"))
    for m in re.finditer(r"(?<![\w.])([01])\.f(?![\w])", text):
        if code(m.start(), m.end()):
            out.append((m.start(), m.end(), "1.f" if m.group(1) == "0" else "0.f", "const"))
    for m in re.finditer(r"\[(\w+)\]\[(\w+)\]", text):
        if code(m.start(), m.end()) and m.group(1) != m.group(2):
            out.append((m.start(), m.end(), f"[{m.group(2)}][{m.group(1)}]", "swap"))
    for m in re.finditer(r"\bif \(", text):
        close = _matching(text, m.end() - 1)
        if close > 0 and code(m.start(), close + 1):
            for v in ("true", "false"):
                out.append((m.end(), close, v, "cond"))
    for pattern in (r"__syncthreads\(\);", r"cluster_sync\(\);", r"async_commit\(\);"):
        for m in re.finditer(pattern, text):
            if code(m.start(), m.end()):
                out.append((m.start(), m.end(), "", "sync"))
    for m in re.finditer(r"async_wait<(\d+)>\(\);", text):
        if code(m.start(), m.end()):
            out.append((m.start(), m.end(), f"async_wait<{int(m.group(1)) + 1}>();", "sync"))
    for m in re.finditer(r"0xffffffffu", text):
        if code(m.start(), m.end()):
            out.append((m.start(), m.end(), "0x0000ffffu", "mask"))
    for m in re.finditer(r"(?m)^([ \t]*)([A-Za-z_][\w:]*(?:<[^;=]*>)?)\((.*)\);[ \t]*$", text):
        word = m.group(2).split("<")[0].split("::")[-1]
        if word in KEYWORDS or not code(m.start(2), m.end()) or "=" in re.sub(r"\(.*\)", "", m.group(3)):
            continue
        out.append((m.start(2), m.end(), "", "call"))
    return out


def generate(files: Optional[List[str]] = None) -> List[Mutant]:
    """Every mutant of the kernel sources (or of `files`), in file order."""
    names = files or sorted(f for f in os.listdir(KERNELS) if f.endswith((".cu", ".cuh", ".h")))
    mutants = []
    for name in names:
        with open(os.path.join(KERNELS, name)) as f:
            text = f.read()
        mask = code_mask(text)
        spans = excluded_spans(text)
        lines = text.split("\n")
        seen_lines: Dict[str, int] = {}
        line_occurrence = []
        for line in lines:
            key = line.strip()
            line_occurrence.append(seen_lines.get(key, 0))
            seen_lines[key] = seen_lines.get(key, 0) + 1
        for start, end, repl, op in sorted(set(_candidates(text, mask))):
            if any(a <= start < b for a, b in spans):
                continue
            line = text.count("\n", 0, start) + 1
            line_start = text.rfind("\n", 0, start) + 1
            stripped = lines[line - 1].strip()
            indent = len(lines[line - 1]) - len(lines[line - 1].lstrip())
            change = " ".join(text[start:end].split()) + "->" + " ".join(repl.split())
            key = f"{name}|{stripped}|{line_occurrence[line - 1]}|{start - line_start - indent}|{change}"
            mutants.append(Mutant(name, line, start, end, text[start:end], repl, op, key))
    return mutants


# ---- running one --------------------------------------------------------------------------------

@dataclasses.dataclass
class Outcome:
    status: str   # killed, survived, stillborn, timeout
    detail: str
    seconds: float


def suite(lib: str) -> List[List[str]]:
    """The mutant suite's commands, run in order until one fails."""
    py = sys.executable
    return [[py, os.path.join(HERE, "emulated_cases.py"), "--lib", lib, "--quick"],
            [py, os.path.join(HERE, "fuzz_emulated.py"), "--lib", lib, "--regressions"],
            [py, os.path.join(HERE, "fuzz_emulated.py"), "--lib", lib, "--seed", str(FUZZ_SEED), "--cases",
             str(FUZZ_CASES)]]


def baseline_objects() -> Dict[str, str]:
    """The checked emulator's objects for today's sources (built once, cached)."""
    lib = cuda_emulator.build_cached()
    d = os.path.dirname(lib)
    return {s: os.path.join(d, s + ".o") for s in cuda_emulator.KERNEL_SOURCES + cuda_emulator.RUNTIME_SOURCES}


def build_mutant(file: str, new_text: str, baseline: Dict[str, str], work: str) -> str:
    """The emulator library with `file` of csrc/kernels replaced by `new_text`: the
    translation units that include it recompiled, the rest taken from `baseline`.
    Raises RuntimeError if it does not compile."""
    kernels = os.path.join(work, "kernels")
    shutil.copytree(KERNELS, kernels)
    path = os.path.join(kernels, file)
    with open(path, "w") as f:
        f.write(new_text)
    affected = [s for s in cuda_emulator.KERNEL_SOURCES
                if path in cuda_emulator.includes(os.path.join(kernels, s), [kernels])]
    objects = dict(baseline)
    objects.update(cuda_emulator.compile_objects(os.path.join(work, "obj"), kernels, only=affected, jobs=1,
                                                 debug=False))
    # plan-boundaries.json is a property of the plans, which a mutant may change: the
    # mutant's fuzz batch computes its own
    return cuda_emulator.link(objects, os.path.join(work, "mutant.so"))


def run_suite(lib: str, time_limit: float = TIME_LIMIT) -> Tuple[str, str]:
    """('killed', the failure) at the first failing command, ('timeout', ...) if the
    time runs out, else ('survived', '')."""
    deadline = time.monotonic() + time_limit
    for cmd in suite(lib):
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True,
                                  timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return "timeout", f"{os.path.basename(cmd[1])} ran past {time_limit:.0f} s"
        if proc.returncode != 0:
            text = (proc.stdout + proc.stderr).strip().splitlines()
            failed = [line for line in text if "FAILED" in line]
            return "killed", f"{os.path.basename(cmd[1])}: " + (failed[-1] if failed else "\n".join(text[-5:]))[:400]
    return "survived", ""


def run_mutant(mutant: Mutant, baseline: Dict[str, str], work: str) -> Outcome:
    start = time.monotonic()
    with open(os.path.join(KERNELS, mutant.file)) as f:
        text = f.read()
    try:
        lib = build_mutant(mutant.file, mutant.apply(text), baseline, work)
    except RuntimeError as err:
        return Outcome("stillborn", str(err).splitlines()[-1][:200] if str(err) else "", time.monotonic() - start)
    status, detail = run_suite(lib)
    shutil.rmtree(work, ignore_errors=True)
    return Outcome(status, detail, time.monotonic() - start)


def equivalents() -> Dict[str, str]:
    """tests/mutants_equivalent.txt: key -> why (entries are `key  -- why`)."""
    out = {}
    if os.path.exists(EQUIVALENT):
        with open(EQUIVALENT) as f:
            for line in f:
                if line.strip() and not line.startswith("#"):
                    key, _, why = line.rstrip("\n").partition("  -- ")
                    out[key.strip()] = why.strip()
    return out


def run_all(mutants: List[Mutant], jobs: int = 2, out=sys.stdout) -> Dict[str, Outcome]:
    baseline = baseline_objects()
    work = tempfile.mkdtemp(prefix="mutants-")
    results: Dict[str, Outcome] = {}
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = {pool.submit(run_mutant, m, baseline, os.path.join(work, f"m{k}")): m
                       for k, m in enumerate(mutants)}
            for future in concurrent.futures.as_completed(futures):
                m = futures[future]
                r = future.result()
                results[m.key] = r
                print(f"{r.status:9s} {r.seconds:5.0f}s  {m}   [{m.key}]" +
                      (f"\n          {r.detail}" if r.status in ("survived", "timeout") else ""), file=out, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results


def summary(mutants: List[Mutant], results: Dict[str, Outcome]) -> Tuple[str, List[Mutant]]:
    """The kill rate, and the survivors not listed as equivalent."""
    eq = equivalents()
    counts = {"killed": 0, "survived": 0, "stillborn": 0, "timeout": 0, "equivalent": 0}
    unexplained = []
    for m in mutants:
        r = results.get(m.key)
        if r is None:
            continue
        if r.status == "survived" and m.key in eq:
            counts["equivalent"] += 1
        else:
            counts[r.status] += 1
            if r.status == "survived":
                unexplained.append(m)
    killed = counts["killed"] + counts["timeout"]
    live = killed + counts["survived"]
    rate = 100.0 * killed / live if live else 100.0
    text = (f"{len(results)} mutants: {counts['killed']} killed, {counts['timeout']} timed out (killed), "
            f"{counts['survived']} survived, {counts['equivalent']} equivalent, {counts['stillborn']} stillborn; "
            f"kill rate {rate:.1f}% of the non-equivalent")
    return text, unexplained


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--list", action="store_true")
    p.add_argument("--all", action="store_true")
    p.add_argument("--sample", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--key", help="run one mutant, by key")
    p.add_argument("--files", nargs="*", help="only these kernel sources")
    p.add_argument("--jobs", type=int, default=2)
    args = p.parse_args(argv)
    mutants = generate(args.files)
    if args.list:
        for m in mutants:
            print(f"{m}   [{m.key}]")
        counts: Dict[str, int] = {}
        for m in mutants:
            counts[m.operator] = counts.get(m.operator, 0) + 1
        print(f"{len(mutants)} mutants: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        return 0
    if args.key:
        chosen = [m for m in mutants if m.key == args.key]
        if not chosen:
            print(f"no mutant has key {args.key!r}")
            return 2
    elif args.sample:
        seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
        print(f"sample of {args.sample} with seed {seed}")
        chosen = random.Random(seed).sample(mutants, min(args.sample, len(mutants)))
    elif args.all:
        chosen = mutants
    else:
        p.error("one of --list, --all, --sample, --key")
    results = run_all(chosen, args.jobs)
    text, unexplained = summary(chosen, results)
    print(text)
    for m in unexplained:
        print(f"SURVIVED (not listed in {os.path.relpath(EQUIVALENT)}): {m}\n  key: {m.key}")
    return 1 if unexplained else 0


if __name__ == "__main__":
    sys.exit(main())
