"""A performance model of the kernels, calibrated on the committed H200 runs.

One idea: a persistent CTA's row iteration is serial. It waits for its loads (a global
latency per dependent round trip, then the transfer of its bytes), for its barriers,
for its cluster peers, and for its own instructions to issue; the other CTAs resident
on its SM overlap with it. An SM therefore moves R x (rows per iteration) x (bytes per
row) per iteration time, and the GPU moves that times the SMs in use, up to a share of
the copy bandwidth. Everything on the kernel's side comes from its compiled code and
its launch (bench/model_facts.py: the SASS of the row loop on the path an all-bf16
call takes, and the plan the dispatch code picks); the constants in `Params` describe
the GPU and were fitted once (`--fit`) to every bf16 row the H200 measured, over three
sets of kernels (bench/results/nvidia_h200/kernel_facts.json). tests/test_perf_model.py
fails if a measured row is predicted further away than recorded.

Time of one call (microseconds), per launch:

    T = launch + waves x iterations per CTA x T_iter  (+ the weight-gradient reduction)
    T_iter = smooth_max(T_cta, T_issue(R x warps), T_bytes)
    T_cta  = trips x latency + barriers x (barrier + barrier_warp x warps per row)
             + cluster waits x (cluster_wait + cluster_peer x CTAs per cluster)
             + issue + load - overlap x min(issue, load)
    issue  = T_issue(warps): warps x instructions / (4 schedulers x clock), slower when a
             scheduler has fewer warps than warp_cpi (a warp's dependent-instruction gap)
    load   = the CTA's loaded bytes / (sm_share x copy / SMs); 0, and one trip fewer,
             where the kernel copies the next row ahead (cp.async)
    T_bytes = SMs in use x R x bytes / (cap x copy); a streamed kernel's later passes
             count again when the rows on chip overflow L2

with R the CTAs resident per SM and smooth_max(a, b, c) = (a^k + b^k + c^k)^(1/k). The
backward's reduction of the weight-gradient partials is a second launch of H / 16 CTAs
of 512 threads (as ncu showed it), costed per wave. Clusters are placed whole inside
GPCs (`GPC_SMS`).

The model ranks designs; it is not a measurement: a figure from it is written
"predicted (model calibrated on H200 runs)". Its largest misses on the runs it was
fitted to are in bench/NOTES.md, "Performance model".
"""

import csv
import dataclasses
import json
import math
import os
import re
import sys
from typing import Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
if __name__ == "__main__":  # run as a script: bench is a package of the repository root (--notes)
    sys.path.append(os.path.dirname(HERE))
RESULTS = os.path.join(HERE, "results", "nvidia_h200")
FACTS = os.path.join(RESULTS, "kernel_facts.json")

# The measured runs and the CSV each wrote (bench/NOTES.md, "Measurements").
RUNS = {"v2": "results-before-clusters.csv",
        "clusters-unbuffered": "results-clusters-unbuffered.csv",
        "final": "results.csv"}

TOLERANCE = 8.0  # points of copy bandwidth, for the sweep rows (rows x H = 2^26)
# The decode rows (1-128 rows) sit at 0.1-22% of copy, where 8 points cannot fail:
# their predicted time must be within this share of the measured time instead.
DECODE_TIME_TOLERANCE = 0.30

# The measured rows the model misses by more than TOLERANCE, with the miss (predicted
# - measured, points) that tests/test_perf_model.py holds them to. What the model lacks:
KNOWN_MISSES = {
    # The first kernels' one-row-per-CTA staged forward (a CTA a row, 16 waves): RMSNorm
    # ran 6 points faster than LayerNorm, the model has them equal (the two share the
    # same round trips; the launch of each wave's CTAs is not modelled).
    ("v2", "sweep", "rms", "post", "fwd", 2048, 32768): -10.2,
    ("v2", "sweep", "rms", "pre", "fwd", 2048, 32768): -10.4,
    # The unbuffered cluster kernels' backward (clusters of 2 to 16): the model is 5-9
    # points under every one of them; RMSNorm pre-norm at clusters of 2 is past 8.
    ("clusters-unbuffered", "sweep", "rms", "pre", "bwd", 5461, 12288): -8.4,
    ("clusters-unbuffered", "sweep", "rms", "pre", "bwd", 4096, 16384): -9.1,
    # The 384-thread rows forward (12 warps, one CTA per SM), LayerNorm: measured 8
    # points below 16384's 512 threads; the model, with its two reductions costed per
    # barrier, puts them within 4.
    ("final", "sweep", "layer", "post", "fwd", 5461, 12288): 8.7,
    ("final", "sweep", "layer", "pre", "fwd", 5461, 12288): 8.9,
}
NOTES_MARKERS = ("<!-- perf-model:begin -->", "<!-- perf-model:end -->")

SMS = 132
# SMs per GPC assumed for the H100/H200 die (132 SMs): the layout that reproduces the
# cluster occupancy ncu reported on the H200 (15 clusters of 8 with one CTA per SM,
# 30 with two, 7 clusters of 16).
GPC_SMS = (18, 18, 18, 18, 18, 16, 16, 10)
L2_BYTES = 50 << 20  # H100 / H200
H200_COPY_GBS = 4195.0  # device-to-device copy measured in the committed H200 runs (4193-4197)


@dataclasses.dataclass(frozen=True)
class Params:
    latency_ns: float = 600.0        # a dependent global round trip under load
    clock_ghz: float = 1.98
    warp_cpi: float = 6.0            # clocks between one warp's instructions (dependencies):
                                     #   a scheduler with fewer warps than this idles
    barrier_ns: float = 40.0         # one CTA barrier, plus barrier_warp_ns per warp of the row
    barrier_warp_ns: float = 6.0     #   (the reduction through shared memory reads every warp's sum)
    cluster_wait_ns: float = 500.0   # one cluster barrier wait (remote arrive), plus
    cluster_peer_ns: float = 20.0    #   this per CTA of the cluster (the peers' sums read over DSMEM)
    cap: float = 0.88                # the share of copy bandwidth a read+write kernel reaches
    sm_share: float = 1.0            # one SM's loads drain at sm_share x copy / SMs
    sharpness: float = 4.0           # k of smooth_max
    overlap: float = 0.5             # share of the shorter of a CTA's load transfer and issue
                                     #   hidden under the longer (warps finish loading apart)
    launch_us: float = 3.0           # a launch as the benchmark times it
    reduce_wave_us: float = 1.25     # one wave of the weight-gradient reduction


# Fitted by `python bench/perf_model.py --fit` (differential evolution, seed 0, 400
# generations) to the 240 bf16 rows of the three committed H200 runs; rounded. The
# data do not pin every constant down: fits that leave one run out reproduce the
# held-out run about as well (bench/NOTES.md) with warp_cpi 1.2-3.9, sm_share 1.1-1.5
# and overlap 0.26-0.70, so read a constant as one fit's value, not a measurement.
CALIBRATED = Params(latency_ns=400.0, warp_cpi=3.64, barrier_ns=60.0, barrier_warp_ns=2.98,
                    cluster_wait_ns=20.0, cluster_peer_ns=56.6, cap=0.967, sm_share=2.70, sharpness=3.54,
                    overlap=0.015, launch_us=6.15, reduce_wave_us=0.2)


def clusters_resident(cluster: int, ctas_per_sm: int) -> int:
    """Clusters of `cluster` CTAs the GPU holds at once: each inside one GPC."""
    return sum(sms * ctas_per_sm // cluster for sms in GPC_SMS)


def row_threads(hidden: int, per_thread: int) -> int:
    """Threads per row of the rows kernels (csrc/kernels/rows.cuh)."""
    t = -(-hidden // per_thread)
    if t >= 32:
        return -(-t // 32) * 32
    p = 1
    while p < t:
        p *= 2
    return p


def template_ints(mangled: str) -> List[int]:
    """The integer template arguments of a mangled kernel name, in order."""
    return [int(a) for a in re.findall(r"Li(\d+)E", mangled)]


@dataclasses.dataclass
class Launch:
    """One measured (or planned) call, with its kernel's facts."""

    direction: str
    norm: str
    form: str
    hidden: int
    rows: int
    bytes: float     # the op's minimal bytes (bench/byte_model.py)
    copy_gbs: float  # the GPU's copy bandwidth
    facts: dict      # a record of bench/model_facts.py


def rows_per_iteration(f: dict, hidden: int) -> float:
    k = f["kernel"]
    if "_rows_kernel" in k:
        chunks, vec = template_ints(k)[:2]
        return max(1, f["block"] // row_threads(hidden, chunks * vec))
    if f.get("cluster", 1) > 1:
        return 1.0 / f["cluster"]
    return 1.0


def column_steps(f: dict, hidden: int) -> int:
    """Column-loop steps per pass of a streamed kernel (block x VEC columns a step)."""
    if "streamed_kernel" in f["kernel"]:
        return math.ceil(hidden / (f["block"] * template_ints(f["kernel"])[0]))
    return 1


def read_share(direction: str, form: str) -> float:
    """Loads' share of a row's bytes (bf16): forward x, r in and y, h out; backward
    dy, saved (and d(residual_out) in pre-norm) in, dx out."""
    if direction == "fwd":
        return 0.5
    return 0.75 if form == "pre" else 4 / 6


def smooth_max(k: float, *terms: float) -> float:
    return sum(t ** k for t in terms) ** (1 / k)


def predict_us(p: Params, c: Launch) -> float:
    f = c.facts
    warps = max(1, f["block"] // 32)
    steps = column_steps(f, c.hidden)
    extra = max(0, steps - 1)
    inner = f.get("inner", [])
    trips = f["trips"] + sum(i["trips"] for i in inner) * extra
    instr = f["instructions"] + sum(i["instructions"] for i in inner) * extra
    bars = f["barriers"] + sum(i.get("barriers", 0) for i in inner) * extra
    waits = f.get("cluster_waits", 0)
    cluster = f.get("cluster", 1) or 1
    rpi = rows_per_iteration(f, c.hidden)
    row_warps = warps / rpi if rpi >= 1 else warps
    # Residency: CTAs per SM, the SMs the grid occupies, waves of CTAs.
    slots = (clusters_resident(cluster, f["ctas_per_sm"]) * cluster if cluster > 1
             else SMS * f["ctas_per_sm"])
    # A cluster grid is sized by the clusters the device reports resident (dispatch
    # asks cudaOccupancyMaxActiveClusters); the emulator's GPCs differ from the die's.
    grid = min(f["grid"], slots) if cluster > 1 else f["grid"]
    on_chip = min(grid, slots)
    resident = max(1, min(f["ctas_per_sm"], math.ceil(on_chip / SMS)))
    sms_used = min(SMS, math.ceil(on_chip / resident))
    waves = math.ceil(grid / slots)
    groups = math.ceil(c.rows / rpi) if rpi >= 1 else c.rows * cluster
    per_cta = math.ceil(groups / grid)
    cta_bytes = rpi * c.bytes / c.rows
    read = cta_bytes * read_share(c.direction, c.form)

    def issue_ns(resident_warps: int) -> float:  # the SM's 4 schedulers, each with its share of warps
        return resident_warps * instr / (4 * p.clock_ghz * min(1.0, resident_warps / (4 * p.warp_cpi)))

    issue = issue_ns(warps)
    load = read / (p.sm_share * c.copy_gbs / SMS)
    if f.get("async_copies", 0):
        # The next row's copy is in flight while this one computes: its round trip
        # and its transfer leave the CTA's serial path (the SM's bandwidth still counts).
        trips = max(0, trips - 1)
        load = 0.0
    t_cta = (trips * p.latency_ns + bars * (p.barrier_ns + p.barrier_warp_ns * row_warps)
             + waits * (p.cluster_wait_ns + p.cluster_peer_ns * cluster)
             + issue + load - p.overlap * min(issue, load))
    # A streamed kernel reads its row once per pass (one column loop each); the later
    # passes hit L2 only while the rows on chip fit in it.
    passes = len(inner) if "streamed_kernel" in f["kernel"] else 1
    hbm_bytes = cta_bytes + (read * (passes - 1) if on_chip * read > L2_BYTES else 0.0)
    t_bytes = resident * hbm_bytes / (p.cap * c.copy_gbs / sms_used)  # bytes / (GB/s) = ns
    t_iter = smooth_max(p.sharpness, t_cta, issue_ns(resident * warps), t_bytes)
    t = p.launch_us + waves * per_cta * t_iter / 1000.0
    if c.direction == "bwd":
        ctas = math.ceil(c.hidden / 16)
        t += p.launch_us + math.ceil(ctas / (SMS * 4)) * p.reduce_wave_us
    return t


def predict_pct(p: Params, c: Launch) -> float:
    return 100.0 * c.bytes / (predict_us(p, c) * 1e3) / c.copy_gbs


# ---- the measured rows ------------------------------------------------------------------


@dataclasses.dataclass
class Measured:
    run: str
    table: str
    norm: str
    form: str
    direction: str
    rows: int
    hidden: int
    bytes: float
    ms: float
    pct: float
    copy_gbs: float


def measured_rows(results: str = RESULTS) -> List[Measured]:
    """Every bf16 residual_fused row (all-bf16 tensors) of the committed runs."""
    out = []
    for run, name in RUNS.items():
        with open(os.path.join(results, name)) as f:
            for r in csv.DictReader(f):
                if (r["provider"], r["dtype"], r["residual"]) != ("residual_fused", "bfloat16", "bfloat16"):
                    continue
                if r["mode"] not in ("fwd", "bwd") or r.get("memory_efficient", "False") != "False":
                    continue
                if r.get("variant"):
                    continue
                pct, gbs = float(r["pct_copy"]), float(r["gbs"])
                out.append(Measured(run, r["table"], r["norm"], r["form"], r["mode"], int(r["rows"]),
                                    int(r["hidden"]), float(r["bytes"]), float(r["ms"]), pct,
                                    100.0 * gbs / pct))
    return out


def load_facts(path: str = FACTS) -> Dict[str, Dict[Tuple[str, str, int, int], dict]]:
    with open(path) as f:
        data = json.load(f)
    return {run: {(r["direction"], r["norm"], r["rows"], r["hidden"]): r for r in entry["launches"]}
            for run, entry in data.items()}


def time_miss(m: Measured, predicted_pct: float) -> float:
    """Predicted time over measured time, minus 1 (time is inverse to % of copy)."""
    return m.pct / predicted_pct - 1


def holdout(maxiter: int = 400) -> List[tuple]:
    """(run left out, its sweep rows within TOLERANCE, their count, root-mean-square,
    the fitted Params) of a fit to the other runs, for each run."""
    out = []
    for run in RUNS:
        p = fit(runs=tuple(r for r in RUNS if r != run), maxiter=maxiter)
        held = [(m, pred) for m, pred in compare(p) if m.run == run and m.table != "decode"]
        err = [pred - m.pct for m, pred in held]
        out.append((run, sum(abs(e) <= TOLERANCE for e in err), len(err),
                    (sum(e * e for e in err) / len(err)) ** 0.5, p))
    return out


def row_key(m: Measured) -> tuple:
    return (m.run, m.table, m.norm, m.form, m.direction, m.rows, m.hidden)


def launch_for(m: Measured, facts) -> Optional[Launch]:
    f = facts.get(m.run, {}).get((m.direction, m.norm, m.rows, m.hidden))
    if f is None:
        return None
    return Launch(m.direction, m.norm, m.form, m.hidden, m.rows, m.bytes, m.copy_gbs, f)


def compare(p: Params = CALIBRATED, results: str = RESULTS, facts_path: str = FACTS):
    """[(measured row, predicted %)] for every measured row the facts cover."""
    facts = load_facts(facts_path)
    out = []
    for m in measured_rows(results):
        c = launch_for(m, facts)
        if c is not None:
            out.append((m, predict_pct(p, c)))
    return out


# ---- calibration and the side-by-side table -------------------------------------------------

# The constants the fit may move, and the physical range each must stay in.
FITTED = {"latency_ns": (400.0, 1200.0), "warp_cpi": (1.0, 16.0), "barrier_ns": (60.0, 400.0),
          "barrier_warp_ns": (0.0, 40.0), "cluster_wait_ns": (20.0, 3000.0), "cluster_peer_ns": (0.0, 300.0),
          "cap": (0.8, 1.0),
          "sm_share": (0.5, 4.0), "sharpness": (1.5, 12.0), "overlap": (0.0, 1.0), "launch_us": (1.0, 8.0),
          "reduce_wave_us": (0.2, 4.0)}


def fit(start: Params = CALIBRATED, results: str = RESULTS, facts_path: str = FACTS, seed: int = 0,
        maxiter: int = 400, runs=tuple(RUNS)) -> Params:
    """Global fit (scipy's differential evolution) of the FITTED constants within their
    ranges: least squares on points of copy, plus a steep penalty past TOLERANCE - 1."""
    import numpy as np
    from scipy.optimize import differential_evolution

    facts = load_facts(facts_path)
    cases = [(m, launch_for(m, facts)) for m in measured_rows(results) if m.run in runs]
    cases = [(m, c) for m, c in cases if c is not None]
    names = list(FITTED)
    measured_pct = np.array([m.pct for m, _ in cases])

    def loss(x):
        p = dataclasses.replace(start, **dict(zip(names, map(float, x))))
        err = np.array([predict_pct(p, c) for _, c in cases]) - measured_pct
        return float(np.mean(err ** 2) + 20 * np.mean(np.maximum(np.abs(err) - (TOLERANCE - 1), 0) ** 2))

    best = differential_evolution(loss, [FITTED[n] for n in names], seed=seed, maxiter=maxiter, tol=1e-7,
                                  polish=True)
    return dataclasses.replace(start, **dict(zip(names, map(float, best.x))))


def markdown(p: Params = CALIBRATED, results: str = RESULTS, facts_path: str = FACTS) -> str:
    """Every measured row beside its prediction, pre- and post-norm side by side."""
    rows = compare(p, results, facts_path)
    facts = load_facts(facts_path)
    sweep = [(m, pred) for m, pred in rows if m.table != "decode"]
    decode = [time_miss(m, pred) for m, pred in rows if m.table == "decode"]
    worst = max(abs(pred - m.pct) for m, pred in sweep)
    within = sum(abs(pred - m.pct) <= TOLERANCE for m, pred in sweep)
    out = [f"Generated by `python bench/perf_model.py --notes`. Every bf16 row of the three committed "
           f"H200 runs (bench/results/nvidia_h200/) against the model on the kernels that run measured. "
           f"Sweep rows (rows x H = 2^26): {within} of {len(sweep)} within {TOLERANCE:.0f} points of copy, "
           f"the largest miss {worst:.1f} points, root-mean-square "
           f"{(sum((pred - m.pct) ** 2 for m, pred in sweep) / len(sweep)) ** 0.5:.1f}. Decode rows "
           f"(1-128 rows, launch-bound): predicted time {min(decode):+.0%} to {max(decode):+.0%} of the "
           f"measured time (tolerance {DECODE_TIME_TOLERANCE:.0%}). Constants: "
           + ", ".join(f"{k} = {getattr(p, k):g}" for k in FITTED) + ". Cells: measured / predicted "
           "(% of copy); * marks a miss over the tolerance.", "",
           "| run | table | norm | dir | rows | H | kernel | pre-norm | post-norm |",
           "|---|---|---|---|---|---|---|---|---|"]
    cells: Dict[tuple, Dict[str, str]] = {}
    for m, pred in rows:
        key = (m.run, m.table, m.norm, m.direction, m.rows, m.hidden)
        star = "*" if abs(pred - m.pct) > TOLERANCE else ""
        cells.setdefault(key, {})[m.form] = f"{m.pct:.0f} / {pred:.0f}{star}"
    for key, forms in cells.items():
        run, tab, norm, direction, n, hidden = key
        short = facts[run][(direction, norm, n, hidden)]["short"]
        out.append(f"| {run} | {tab} | {norm} | {direction} | {n} | {hidden} | `{short}` | "
                   f"{forms.get('pre', '')} | {forms.get('post', '')} |")
    return "\n".join(out)


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fit", action="store_true", help="refit the constants and print them")
    ap.add_argument("--notes", action="store_true", help="rewrite the model section of bench/NOTES.md")
    ap.add_argument("--holdout", action="store_true",
                    help="fit to every run but one and predict the one left out (minutes, scipy)")
    args = ap.parse_args(argv)
    if args.holdout:
        for run, within, n, rms, p in holdout():
            print(f"{run} left out: {within} of {n} sweep rows within {TOLERANCE:.0f} points, "
                  f"root-mean-square {rms:.1f}; " + ", ".join(f"{k} = {getattr(p, k):.3g}" for k in FITTED))
        return
    p = CALIBRATED
    if args.fit:
        p = fit()
        print(p)
    text = markdown(p)
    if args.notes:
        from bench import sass_audit

        sass_audit.write_notes(text, begin=NOTES_MARKERS[0], end=NOTES_MARKERS[1])
        print("updated bench/NOTES.md")
    else:
        print(text)


if __name__ == "__main__":
    main()
