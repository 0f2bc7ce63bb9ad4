"""Static audit of the kernels' SASS: bytes in flight as a property of the code.

A memory-bound kernel reaches the HBM floor only with enough independent bytes in
flight per SM (Little's law). That is visible in the compiled code, without a GPU
(tools/sass.py reads it):

- registers, static shared memory, local memory, the width of every global access and
  the dependent global-memory round trips per row iteration (tools/sass.py says how
  they are counted);
- the launch plan at each hidden size (from the real dispatch code, run on the CPU
  by tools/emulator) and the CTAs and warps per SM that registers and shared memory
  allow at its block size.

From those, the performance model calibrated on the H200 runs (bench/perf_model.py)
predicts the % of copy bandwidth. `python bench/sass_audit.py --notes` rewrites the table in
bench/NOTES.md; tests/test_sass_audit.py holds the thresholds every hot kernel must
keep. Predictions are predictions: a GPU measures.
"""

import argparse
import dataclasses
import json
import math
import os
import sys
from typing import Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
if __name__ == "__main__":  # run as a script: bench and tools are packages of the repository root
    sys.path.append(os.path.dirname(HERE))

from bench import perf_model  # noqa: E402
from tools import cubin, cuda_emulator, sass  # noqa: E402

NOTES = os.path.join(HERE, "NOTES.md")
BEGIN, END = "<!-- sass-audit:begin -->", "<!-- sass-audit:end -->"

# ---- per hidden size: plans from the real dispatch code, the calibrated model ------------

TABLE_HIDDEN = (512, 1024, 2048, 4096, 8192, 12288, 16384, 32768, 65536, 131072, 262144)
ELEMENTS = 1 << 26  # rows * H, as in the benchmark sweep


_args = perf_model.template_ints


@dataclasses.dataclass
class Row:
    direction: str
    hidden: int
    kernel: str
    block: int
    registers: int
    ctas_per_sm: int
    warps_per_sm: int
    inflight_kb: float      # bytes of loads in flight per SM, per round trip
    trips: str              # per row: the row loop's round trips + inner column loops
    predicted: Dict[str, float]           # norm -> % of H200 copy (bench/perf_model.py)
    measured: Dict[str, Optional[float]]  # norm -> % of copy in the benchmark run given
    measured_kernels: Dict[str, float]    # norm -> the model on the kernels that run measured


MEASURED = os.path.join(HERE, "results", "nvidia_h200", "results.csv")


def measured(path: str = MEASURED) -> Dict[Tuple[str, str, int], float]:
    """% of copy from a benchmark results.csv (bf16 pre-norm, residual_fused), by
    (direction, norm, H); by default the committed H200 run."""
    if not os.path.exists(path):
        return {}
    from bench import report

    out = {}
    for r in report.read_csv(path):
        if (r["table"], r["provider"], r["form"], r["dtype"]) == ("sweep", "residual_fused", "pre", "bfloat16") \
                and r["pct_copy"] is not None and not r.get("variant"):
            out[(r["mode"], r["norm"], r["hidden"])] = r["pct_copy"]
    return out


def predict_launch(record: dict, copy_gbs: float = None) -> float:
    """The calibrated model's % of H200 copy for one bf16 pre-norm launch record of
    bench/model_facts.py."""
    from bench import byte_model

    cfg = byte_model.Config(record["norm"], True, record["rows"], record["hidden"])
    launch = perf_model.Launch(record["direction"], record["norm"], "pre", record["hidden"], record["rows"],
                               float(byte_model.fused_bytes(cfg, record["direction"])),
                               copy_gbs or perf_model.H200_COPY_GBS, record)
    return perf_model.predict_pct(perf_model.CALIBRATED, launch)


def table(build: cubin.Build, emu, arch: str = "90", measured_csv: str = MEASURED) -> List[Row]:
    from bench import model_facts

    got = measured(measured_csv)
    launches = {(r["direction"], r["norm"], r["hidden"]): r
                for r in model_facts.launch_facts(build, emu, hidden_sizes=TABLE_HIDDEN)
                if r["rows"] == ELEMENTS // r["hidden"]}
    ran = perf_model.load_facts().get("final", {})
    rows = []
    for direction in ("fwd", "bwd"):
        for hidden in TABLE_HIDDEN:
            f = launches.get((direction, "layer", hidden))
            if f is None:
                continue
            steps = perf_model.column_steps(f, hidden)
            inner_trips = [i["trips"] for i in f["inner"]]
            trips = f["trips"] + sum(inner_trips) * (steps - 1)
            cl = f["cluster"]
            grid = min(f["grid"], perf_model.clusters_resident(cl, f["ctas_per_sm"]) * cl) if cl > 1 else f["grid"]
            resident = max(1, min(f["ctas_per_sm"], math.ceil(grid / perf_model.SMS)))
            per_iter = perf_model.rows_per_iteration(f, hidden)
            read = perf_model.read_share(direction, "pre") * 8 * hidden
            inflight = resident * per_iter * read / max(trips, 1) / 1024
            trip_text = f"{f['trips']}"
            if inner_trips and steps > 1:
                trip_text += f" + {steps - 1}x{'+'.join(map(str, inner_trips))}"
            predicted, before = {}, {}
            for norm in ("layer", "rms"):
                rec = launches.get((direction, norm, hidden))
                if rec is not None:
                    predicted[norm] = predict_launch(rec)
                old = ran.get((direction, norm, ELEMENTS // hidden, hidden))
                if old is not None:
                    before[norm] = predict_launch(old)
            rows.append(Row(direction, hidden, f["short"], f["block"], f["registers"], f["ctas_per_sm"],
                            f["ctas_per_sm"] * f["block"] // 32, inflight, trip_text, predicted,
                            {n: got.get((direction, n, hidden)) for n in ("layer", "rms")}, before))
    return rows


# The tuning sizes of bench/gpu_tune.py (HIDDEN there; a test keeps the two equal).
VARIANT_HIDDEN = (512, 768, 1024, 2048, 2560, 4096, 5120, 8192, 12288, 16384, 24576, 32768, 65536, 131072,
                  262144)
PREDICTED_VARIANTS = os.path.join(HERE, "predicted_variants.json")
VARIANTS_BEGIN, VARIANTS_END = "<!-- predicted-variants:begin -->", "<!-- predicted-variants:end -->"


def predict_variants(build: cubin.Build, emu) -> Dict[str, Dict[str, float]]:
    """{"dir|norm|H": {variant: predicted % of H200 copy}} for every candidate variant
    of bench/variants.py that this checkout's dispatch code runs at H (bf16 pre-norm,
    rows x H = 2^26), by the calibrated model: the order in which make gpu-tune times
    the variant jobs, most promising first."""
    from bench import model_facts

    out: Dict[str, Dict[str, float]] = {}
    for r in model_facts.variant_facts(build, emu, hidden_sizes=VARIANT_HIDDEN):
        out.setdefault(f"{r['direction']}|{r['norm']}|{r['hidden']}", {})[r["variant"]] = \
            round(predict_launch(r), 1)
    def order(item):
        direction, norm, hidden = item[0].split("|")
        return direction != "fwd", norm, int(hidden)

    return dict(sorted(out.items(), key=order))


def variants_markdown(predicted: Dict[str, Dict[str, float]]) -> str:
    out = ["Generated by `python bench/sass_audit.py --variants` (bench/predicted_variants.json) from the "
           f"sm_90 SASS (nvcc {cubin._nvcc_version().split(',')[-1].strip()}): "
           "predicted (model calibrated on H200 runs) % of H200 copy, bf16 pre-norm, rows x H = 2^26; "
           "the rule and the three best candidates. Not measured: make gpu-tune times them, in the "
           "order of the largest predicted gain.", "",
           "| dir | norm | H | rule | best predicted variants |", "|---|---|---|---|---|"]
    for key, by_variant in predicted.items():
        direction, norm, hidden = key.split("|")
        best = sorted(((v, n) for n, v in by_variant.items() if n != "rule"), reverse=True)[:3]
        out.append(f"| {direction} | {norm} | {hidden} | {by_variant.get('rule', float('nan')):.0f}% | "
                   + ", ".join(f"`{n}` {v:.0f}%" for v, n in best) + " |")
    return "\n".join(out)


def kernel_table(build: cubin.Build, arch: str = "90") -> List[sass.KernelAudit]:
    return sorted(sass.audit(build, arch).values(), key=lambda a: a.short)


def markdown(rows: List[Row], kernels: List[sass.KernelAudit], measured_csv: str = MEASURED) -> str:
    source = os.path.relpath(measured_csv, cubin.ROOT) if os.path.exists(measured_csv) else "none"
    pct = lambda v: "" if v is None else f"{v:.0f}%"  # noqa: E731
    out = ["Generated by `python bench/sass_audit.py --notes` from the sm_90 SASS (nvcc "
           f"{cubin._nvcc_version().split(',')[-1].strip()}); predictions, not measurements, from the "
           "model calibrated on the H200 runs (bench/perf_model.py). bf16 pre-norm, rows x H = 2^26. "
           f"Measured: `{source}`; \"model, measured kernels\": the same model on the kernels that run "
           "measured (bench/results/nvidia_h200/kernel_facts.json).", "",
           "| dir | H | kernel | block | regs | CTAs/SM | warps/SM | loads in flight/SM | "
           "round trips per row | LayerNorm: predicted, model on measured kernels, measured | "
           "RMSNorm: predicted, model on measured kernels, measured |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{pct(r.predicted.get(n))}, {pct(r.measured_kernels.get(n))}, {pct(r.measured.get(n))}"
                 for n in ("layer", "rms")]
        out.append(f"| {r.direction} | {r.hidden} | `{r.kernel}` | {r.block} | {r.registers} | "
                   f"{r.ctas_per_sm} | {r.warps_per_sm} | {r.inflight_kb:.1f} KB | {r.trips} | "
                   f"{cells[0]} | {cells[1]} |")
    out += ["", "Every kernel (sm_90): static global access widths in bits (count of "
            "instruction sites), local memory accesses, round trips per iteration of the "
            "outermost loop for an all-bf16 LayerNorm call (in brackets: the most over every "
            "dtype mix; inner loops once).", "",
            "| kernel | regs | smem | LDG widths | STG widths | local | round trips | inner loops |",
            "|---|---|---|---|---|---|---|---|"]
    for k in kernels:
        widths = lambda c: ", ".join(f"{w}:{n}" for w, n in sorted(c.items(), reverse=True)) or "-"  # noqa: E731
        out.append(f"| `{k.short}` | {k.registers} | {k.static_smem} | {widths(k.loads)} | "
                   f"{widths(k.stores)} | {k.local_accesses} | {k.trips} ({k.trips_any}) | "
                   f"{'+'.join(map(str, k.inner_trips)) or '-'} |")
    return "\n".join(out)


def write_notes(text: str, path: str = NOTES, begin: str = BEGIN, end: str = END) -> None:
    """Replace the text between the `begin` and `end` markers of bench/NOTES.md."""
    with open(path) as f:
        notes = f.read()
    if begin not in notes:
        raise SystemExit(f"{path} has no {begin} ... {end} section")
    head, rest = notes.split(begin, 1)
    tail = rest.split(end, 1)[1]
    with open(path, "w") as f:
        f.write(f"{head}{begin}\n{text}\n{end}{tail}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--notes", action="store_true", help=f"rewrite the audit section of {NOTES}")
    p.add_argument("--variants", action="store_true",
                   help=f"write {os.path.relpath(PREDICTED_VARIANTS, cubin.ROOT)} and its section of the notes")
    p.add_argument("--measured", default=MEASURED,
                   help="a benchmark results.csv for the measured column (default: the H200 run)")
    args = p.parse_args(argv)
    build = cubin.build()
    if not build.sass:
        raise SystemExit("cuobjdump not found: pip install nvidia-cuda-cuobjdump")
    if args.variants:
        predicted = predict_variants(build, cuda_emulator.make_emulator(build))
        with open(PREDICTED_VARIANTS, "w") as f:
            json.dump(predicted, f, indent=1)
            f.write("\n")
        write_notes(variants_markdown(predicted), begin=VARIANTS_BEGIN, end=VARIANTS_END)
        print(f"updated {PREDICTED_VARIANTS} and {NOTES}")
        return
    text = markdown(table(build, cuda_emulator.make_emulator(build), measured_csv=args.measured), kernel_table(build),
                    args.measured)
    if args.notes:
        write_notes(text)
        print(f"updated {NOTES}")
    else:
        print(text)


if __name__ == "__main__":
    main()
