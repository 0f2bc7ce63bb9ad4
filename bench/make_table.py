"""Turn tuning runs into csrc/kernels/tuned_table.h, the table dispatch uses.

    python bench/make_table.py bench/results/nvidia_h200/results.csv [more runs...]
    python bench/make_table.py RUN.csv --check     # exit 1 if the table is not up to date

Each run is a results CSV of ``make gpu-tune`` (or bench_add_norm) with its env.json
beside it (the GPU's name keys the table). For every (GPU, direction, norm, form,
dtype mix, hidden size) measured, the fastest of the library's rows wins: the rule
(``residual_fused[rule]``, timed under the override; the entry is then "rule", so
dispatch keeps deciding by rule there) or a timed variant (``residual_fused[<variant>]``;
the entry is the variant as asked for). A variant must beat the rule's time by more
than MARGIN to win, so noise does not bake a variant in; where the rule's row is
missing, the fastest wins. Rows that failed, were refused, or belong to a variant
the run found wrong (stages.json beside the CSV, ``correctness.wrong``) never win.
Only sweep rows of the compiled fast mixes count, not memory-efficient ones
(dispatch does not key on that). Several runs of one GPU are pooled: give runs of
the same sizes (rows x hidden), as make gpu-tune's are.

Buckets: each measured hidden size owns the sizes up to the geometric midpoint to
the next measured one; the first starts at 1 and the last ends at 262144, so every
size of a listed (GPU, direction, norm, form, mix) has an entry; neighbours with the
same variant merge. Where the table's variant cannot run a call (a size its shape
does not hold, a misaligned tensor), dispatch uses the rule.
"""

import argparse
import json
import math
import os
import sys
from typing import Dict, List, Optional, Tuple

if __name__ == "__main__":  # run as a script: bench and tools are packages of the repository root
    sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import report, variants  # noqa: E402

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
TABLE = os.path.join(ROOT, "csrc", "kernels", "tuned_table.h")
MAX_HIDDEN = 262144  # kMaxHidden of csrc/kernels/add_norm.h
MODES = ("fwd", "bwd")
MARGIN = 0.03  # a variant wins only when faster than the rule by more than this fraction
#: (dtype, residual) columns of a CSV row -> the table's mix (bench/variants.TABLE_MIXES)
MIX_OF_ROW = {("bfloat16", "bfloat16"): "bf16", ("float16", "float16"): "fp16", ("float32", "float32"): "fp32",
              ("bfloat16+fp32res", "float32"): "bf16-fp32res", ("float16+fp32res", "float32"): "fp16-fp32res"}

Key = Tuple[str, str, str, str, str]  # device, mode, norm, form, mix


def run_of(csv_path: str) -> Tuple[dict, List[dict], set]:
    """(env, rows, variants found wrong) of one run."""
    folder = os.path.dirname(os.path.abspath(csv_path))
    with open(os.path.join(folder, "env.json")) as f:
        env = json.load(f)
    wrong = set()
    stages = os.path.join(folder, "stages.json")
    if os.path.exists(stages):
        with open(stages) as f:
            for r in json.load(f).get("correctness", {}).get("wrong", []):
                wrong.add((r.get("direction", ""), r.get("variant", "")))
    return env, report.read_csv(csv_path), wrong


def candidates(runs) -> Dict[Key, Dict[int, List[Tuple[float, str]]]]:
    """{key: {hidden: [(ms, variant), ...]}} of the rows that may win. A variant is
    entered as it was asked for (its automatic choices stay automatic: they resolve per
    call, e.g. the reduction by the row count). The rule's time is its row under the
    override (``residual_fused[rule]``); a run without one (before variants existed)
    gives the library's own row, which then ran the rule."""
    out: Dict[Key, Dict[int, List[Tuple[float, str]]]] = {}
    for env, rows, wrong in runs:
        device = env.get("gpu")
        if not device:
            continue  # a CPU run
        forced_rule = {_where(r) for r in rows if r["provider"] == variants.provider_name("rule")}
        for r in rows:
            mix = MIX_OF_ROW.get((r["dtype"], r["residual"]))
            if r["provider"] == "residual_fused":
                asked = None if _where(r) in forced_rule else "rule"
            else:
                asked = variants.variant_of_provider(r["provider"])
            if (r["table"] != "sweep" or r["mode"] not in MODES or r["memory_efficient"] or mix is None
                    or asked is None or r["ms"] is None or (r["mode"], asked) in wrong):
                continue
            key = (device, r["mode"], r["norm"], r["form"], mix)
            out.setdefault(key, {}).setdefault(r["hidden"], []).append((r["ms"], asked))
    return out


def _where(r: dict) -> tuple:
    return tuple(r[k] for k in ("table", "norm", "form", "mode", "dtype", "residual", "memory_efficient", "rows",
                                "hidden"))


def winner(timed: List[Tuple[float, str]]) -> str:
    """The fastest of (ms, variant) rows; "rule" unless a variant beats it by MARGIN."""
    ms, variant = min(timed)
    rule = [t for t, v in timed if v == "rule"]
    if rule and ms > min(rule) * (1 - MARGIN):
        return "rule"
    return variant


def buckets(measured: Dict[int, List[Tuple[float, str]]]) -> List[Tuple[int, int, str]]:
    """[(hidden_lo, hidden_hi, variant)] covering 1..MAX_HIDDEN: the winner of each
    measured size, up to the geometric midpoint to the next; equal neighbours merged."""
    sizes = sorted(measured)
    best = [winner(measured[h]) for h in sizes]
    out: List[Tuple[int, int, str]] = []
    for i, h in enumerate(sizes):
        lo = 1 if i == 0 else out[-1][1] + 1
        hi = MAX_HIDDEN if i == len(sizes) - 1 else max(lo, int(math.sqrt(h * sizes[i + 1])))
        if out and out[-1][2] == best[i]:
            out[-1] = (out[-1][0], hi, best[i])
        else:
            out.append((lo, hi, best[i]))
    return out


def entries(runs) -> List[tuple]:
    """Every table entry, sorted as dispatch searches them (device, direction, norm,
    form, mix, hidden_lo)."""
    rows = []
    for (device, mode, norm, form, mix), measured in candidates(runs).items():
        for lo, hi, variant in buckets(measured):
            rows.append((device, MODES.index(mode), norm == "rms", form == "pre",
                         variants.TABLE_MIXES.index(mix), lo, hi, variant))
    return sorted(rows)


def render(rows: List[tuple], sources: List[str]) -> str:
    source = "; ".join(sources)
    lines = ["// Generated by bench/make_table.py from the tuning runs below; do not edit.",
             "// (device, direction, norm, form, dtype mix, hidden sizes) -> the fastest",
             "// correct variant measured there (csrc/kernels/variant.h). Runs:"]
    lines += [f"//   {s}" for s in sources] or ["//   (none)"]
    lines += ["#pragma once", "", '#include "variant.h"', "", "namespace residual_fused {", "",
              f"constexpr const char* kTunedTableSource = {json.dumps(source)};",
              "constexpr TunedEntry kTunedTable[] = {"]
    mixes = variants.TABLE_MIXES
    for device, d, rms, pre, mix, lo, hi, variant in rows:
        lines.append(f"    {{{json.dumps(device)}, Direction::{'kFwd' if d == 0 else 'kBwd'}, "
                     f"{'true' if rms else 'false'}, {'true' if pre else 'false'}, {mix}, {lo}, {hi}, "
                     f"{json.dumps(variant)}}},  // {mixes[mix]}")
    if not rows:  # an array needs an element: one that matches no device
        lines.append('    {"", Direction::kFwd, false, false, -1, 0, 0, "rule"},')
    lines += ["};", "", "}  // namespace residual_fused", ""]
    return "\n".join(lines)


def source_of(csv_path: str, env: dict) -> str:
    rel = os.path.relpath(os.path.abspath(csv_path), ROOT)
    return f"{rel} ({env.get('gpu')}, {env.get('date', 'undated')}, torch {env.get('torch', '?')})"


def build(csv_paths: List[str]) -> str:
    runs = [run_of(p) for p in csv_paths]
    sources = [source_of(p, env) for p, (env, _, _) in zip(csv_paths, runs) if env.get("gpu")]
    return render(entries(runs), sources)


def parse_table(text: str) -> List[dict]:
    """The entries of a generated table (for tests and the results page)."""
    import re

    out = []
    for m in re.finditer(r'\{("[^"]*"), Direction::k(Fwd|Bwd), (true|false), (true|false), (-?\d+), (\d+), (\d+), '
                         r'("[^"]*")\}', text):
        out.append(dict(device=json.loads(m.group(1)), direction=m.group(2).lower(), rms=m.group(3) == "true",
                        prenorm=m.group(4) == "true", mix=int(m.group(5)), lo=int(m.group(6)),
                        hi=int(m.group(7)), variant=json.loads(m.group(8))))
    return out


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csv", nargs="+", help="results.csv of tuning runs (env.json beside each)")
    p.add_argument("--out", default=TABLE)
    p.add_argument("--check", action="store_true", help="exit 1 if --out differs from what the runs give")
    args = p.parse_args(argv)
    text = build(args.csv)
    if args.check:
        with open(args.out) as f:
            same = f.read() == text
        print(f"{args.out} is {'up to date' if same else 'stale: rerun bench/make_table.py'}")
        return 0 if same else 1
    with open(args.out, "w") as f:
        f.write(text)
    print(f"wrote {args.out}: {len(parse_table(text))} entries")
    return 0


if __name__ == "__main__":
    sys.exit(main())
