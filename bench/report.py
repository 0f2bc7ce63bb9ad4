"""Output of the benchmark: terminal table, CSV, environment JSON, PNG plots, Markdown.

A row is a dict with the keys of ``FIELDS``; ``ms`` is None where the provider could
not run that config, and ``note`` then says why.
"""

import csv
import json
import os
import sys
from collections import defaultdict
from typing import Dict, List, Optional

from bench import variants


def _page_rows(rows: List[dict]) -> List[dict]:
    """The rows a page shows in its tables and plots: not the timed kernel variants
    (make gpu-tune summarises those on its own; the CSV keeps every row)."""
    return [r for r in rows if variants.variant_of_provider(str(r["provider"])) is None]

FIELDS = ("table", "norm", "form", "mode", "dtype", "residual", "memory_efficient", "rows",
          "hidden", "provider", "fused_add", "ms", "spread", "host_us", "bytes", "gbs",
          "copy_gbs", "pct_copy", "vs_eager", "vs_compile", "variant", "note")

LEGEND = """columns: time = median of the repeats; spread = interquartile range / median;
host = host time per call (decode rows, no synchronisation); GB/s = the bytes the
variant must move (bench/byte_model.py) per second; %copy = GB/s over the copy
bandwidth measured in this run (CPU: a clone of the row's tensor size and dtype);
vs eager / vs compile = their time over this row's time (> 1: this row is faster)."""


class Progress:
    """A one-line progress bar on stderr (no dependency)."""

    def __init__(self, total: int, stream=sys.stderr):
        self.total, self.done, self.stream = max(total, 1), 0, stream

    def step(self, label: str) -> None:
        self.done += 1
        width = 30
        filled = width * self.done // self.total
        self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                          f"{label[:50]:50}")
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


def add_speedups(rows: List[dict]) -> None:
    """Fill vs_eager / vs_compile by matching rows of the same table, config and mode."""
    groups = defaultdict(dict)
    key = lambda r: tuple(r[k] for k in FIELDS[:9])  # noqa: E731  (table .. hidden)
    for r in rows:
        if r["ms"] is not None:
            groups[key(r)][r["provider"]] = r["ms"]
    for r in rows:
        times = groups[key(r)]
        for base, field in (("eager", "vs_eager"), ("compile", "vs_compile")):
            r[field] = times[base] / r["ms"] if r["ms"] and base in times else None


def _fmt(v, spec, suffix=""):
    return "" if v is None else f"{v:{spec}}{suffix}"


def format_table(rows: List[dict]) -> str:
    """Rows that ran, as a fixed-width table; unavailable providers listed once below."""
    lines = []
    header = (f"{'norm':5} {'form':4} {'mode':7} {'dtype':8} {'rows':>6} {'H':>6} "
              f"{'provider':18} {'time':>10} {'spread':>6} {'host':>8} {'GB/s':>7} {'%copy':>6} "
              f"{'vs eager':>8} {'vs compile':>10}")
    lines += [header, "-" * len(header)]
    unavailable = {}
    for r in rows:
        if r["ms"] is None:
            unavailable.setdefault((r["provider"], r["note"]), 0)
            unavailable[(r["provider"], r["note"])] += 1
            continue
        name = r["provider"] + ("" if r["fused_add"] or r["provider"] == "eager" else " (add unfused)")
        lines.append(
            f"{r['norm']:5} {r['form']:4} {r['mode']:7} {r['dtype']:8} {r['rows']:>6} "
            f"{r['hidden']:>6} {name:18} {_fmt(r['ms'] * 1e3, '8.1f', 'us'):>10} "
            f"{_fmt(r.get('spread'), '5.0f', '%'):>6} "
            f"{_fmt(r['host_us'], '6.1f', 'us'):>8} {_fmt(r['gbs'], '7.1f'):>7} "
            f"{_fmt(r['pct_copy'], '5.0f', '%'):>6} {_fmt(r['vs_eager'], '.2f', 'x'):>8} "
            f"{_fmt(r['vs_compile'], '.2f', 'x'):>10}")
    for (provider, note), count in sorted(unavailable.items()):
        lines.append(f"  {provider}: not run ({note}) for {count} row(s)")
    return "\n".join(lines)


def write_csv(rows: List[dict], path: str, append: bool = False) -> None:
    """``rows`` as CSV; ``append`` adds them to the file (its header written once; a
    file with other columns, from an older version, is rewritten with these first)."""
    if append and os.path.exists(path):
        with open(path, newline="") as f:
            if next(csv.reader(f), None) != list(FIELDS):
                rows = read_csv(path) + list(rows)
                append = False
    header = not (append and os.path.exists(path))
    with open(path, "a" if append else "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(FIELDS))
        if header:
            writer.writeheader()
        writer.writerows({k: row.get(k) for k in FIELDS} for row in rows)


_INT_FIELDS = ("rows", "hidden", "bytes")
_FLOAT_FIELDS = ("ms", "spread", "host_us", "gbs", "copy_gbs", "pct_copy", "vs_eager", "vs_compile")
_BOOL_FIELDS = ("memory_efficient", "fused_add")


def read_csv(path: str) -> List[dict]:
    """Rows written by :func:`write_csv`, with their types restored (empty cells: None)."""
    rows = []
    with open(path, newline="") as f:
        for raw in csv.DictReader(f):
            row = dict(raw)
            for k in _INT_FIELDS + _FLOAT_FIELDS + _BOOL_FIELDS:
                v = raw.get(k, "")
                if v == "":
                    row[k] = None
                elif k in _INT_FIELDS:
                    row[k] = int(v)
                elif k in _FLOAT_FIELDS:
                    row[k] = float(v)
                else:
                    row[k] = v == "True"
            rows.append(row)
    return rows


def write_json(obj: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, default=str)


def _near(a: int, b: int) -> bool:
    return a == b


def plot(rows: List[dict], copy_gbs: float, out_dir: str, title: str) -> List[str]:
    """One PNG per (mode, dtype) of the sweep: achieved GB/s against H, a line per
    provider and a panel per norm/form, with the copy bandwidth as a ceiling.
    Returns the files written (none without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots skipped: matplotlib is not installed", file=sys.stderr)
        return []
    sweep = [r for r in _page_rows(rows) if r["table"] == "sweep" and r["gbs"] is not None]
    sizes = sorted({r["rows"] * r["hidden"] for r in sweep})
    sized = len(sizes) > 1  # then a plot per size too (rows * hidden is the same within a plot)
    written = []
    for mode, dtype, size in sorted({(r["mode"], r["dtype"], r["rows"] * r["hidden"] if sized else 0)
                                     for r in sweep}):
        sel = [r for r in sweep if r["mode"] == mode and r["dtype"] == dtype
               and (not sized or _near(r["rows"] * r["hidden"], size))]
        panels = sorted({(r["norm"], r["form"], r["memory_efficient"]) for r in sel})
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
        for ax, (norm, form, mem) in zip(axes[0], panels):
            lines: Dict[str, list] = defaultdict(list)
            for r in sel:
                if (r["norm"], r["form"], r["memory_efficient"]) == (norm, form, mem):
                    lines[r["provider"]].append((r["hidden"], r["gbs"]))
            for provider, points in sorted(lines.items()):
                xs, ys = zip(*sorted(points))
                ax.plot(xs, ys, marker="o", label=provider)
            ax.axhline(copy_gbs, color="black", linestyle="--", linewidth=1, label="copy bandwidth")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("hidden size H")
            ax.set_ylabel("GB/s of minimal bytes")
            ax.set_title(f"{norm} {form}-norm{' mem-eff' if mem else ''}")
            ax.grid(True, alpha=0.3)
        axes[0][0].legend(fontsize=8)
        suffix = f"_2e{size.bit_length() - 1}" if sized else ""
        fig.suptitle(f"{title}: {mode}, {dtype}" + (f", rows * H = {size}" if sized else ""))
        fig.tight_layout()
        path = os.path.join(out_dir, f"gbs_{mode.replace('+', '_')}_{dtype}{suffix}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def summary(rows: List[dict], provider: str = "residual_fused") -> List[str]:
    """One line per sweep config for ``provider``: per mode, % of copy bandwidth and the
    speedups over eager / torch.compile (markdown lines; none if it did not run)."""
    ran = [r for r in rows if r["table"] == "sweep" and r["provider"] == provider
           and r["ms"] is not None]
    modes = [m for m in ("fwd", "bwd", "fwd+bwd") if any(r["mode"] == m for r in ran)]
    if not ran:
        return []
    configs = {}
    for r in ran:
        key = (r["rows"] * r["hidden"], r["dtype"], r["hidden"], r["norm"], r["form"])
        configs.setdefault(key, {})[r["mode"]] = r
    out = [f"## Summary: {provider}", "",
           "Per mode: % of the copy bandwidth (vs eager, vs torch.compile).", "",
           "| rows * H | dtype | H | norm | form | " + " | ".join(modes) + " |",
           "|" + "---|" * (5 + len(modes))]
    for (elements, dtype, hidden, norm, form), by_mode in configs.items():
        cells = []
        for m in modes:
            r = by_mode.get(m)
            if r is None:
                cells.append("")
                continue
            speed = ", ".join(_fmt(r[k], ".2f", "x") or "-" for k in ("vs_eager", "vs_compile"))
            cells.append(f"{r['pct_copy']:.0f}% ({speed})")
        out.append(f"| 2^{elements.bit_length() - 1} | {dtype} | {hidden} | {norm} | {form} | "
                   + " | ".join(cells) + " |")
    return out + [""]


def markdown(rows: List[dict], env: dict, command: str, images: List[str],
             headline_hidden: Optional[List[int]] = None) -> str:
    """The results page: environment header, headline table, plots (``images``: paths
    relative to the page), full tables. The variant column says which kernel variant
    the library's rows ran, where the run recorded it."""
    rows = _page_rows(rows)
    out = [f"# Add & Norm benchmark: {env.get('gpu') or env.get('cpu') or env['device']}", ""]
    out += ["| environment | |", "|---|---|"]
    for k in ("date", "gpu", "driver", "cuda", "cpu", "threads", "cpu_capability", "torch",
              "python", "device", "cuda_kernels", "cpu_kernels", "copy_gbs"):
        if env.get(k) is not None:
            value = f"{env[k]:.0f} GB/s" if k == "copy_gbs" else env[k]
            out.append(f"| {k} | {value} |")
    out += ["", f"Regenerate with: `{command}`", ""]
    ran = [r for r in rows if r["ms"] is not None]
    heads = [r for r in ran if r["table"] == "sweep"
             and (headline_hidden is None or r["hidden"] in headline_hidden)]
    cols = ("norm", "form", "mode", "dtype", "rows", "hidden", "provider", "ms", "spread",
            "gbs", "pct_copy", "vs_eager", "vs_compile")
    if any(r.get("variant") for r in rows):
        cols += ("variant",)

    def table(sel):
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in sel:
            cells = []
            for c in cols:
                v = (r.get(c) or "") if c == "variant" else r[c]
                if c == "ms":
                    v = f"{v * 1e3:.1f} us"
                elif c == "gbs":
                    v = f"{v:.1f}" if v < 100 else f"{v:.0f}"
                elif c == "spread":
                    v = "" if v is None else f"{v:.0f}%"
                elif c == "pct_copy":
                    v = f"{v:.0f}%"
                elif c in ("vs_eager", "vs_compile"):
                    v = "" if v is None else f"{v:.2f}x"
                elif c == "provider" and not r["fused_add"] and v != "eager":
                    v = f"{v} (add unfused)"
                cells.append(str(v))
            lines.append("| " + " | ".join(cells) + " |")
        return lines

    out += summary(rows)
    if heads:
        out += ["## Headline", ""] + table(heads) + [""]
    if images:
        out += ["## Plots", ""] + [f"![{os.path.basename(p)}]({p})" for p in images] + [""]
    for name in ("sweep", "decode"):
        sel = [r for r in ran if r["table"] == name]
        if sel:
            out += [f"## {name} (all rows)", ""] + table(sel) + [""]
            if name == "decode":
                out += ["Decode rows also report host time per call in the CSV (`host_us`).", ""]
    skipped = sorted({(r["provider"], r["note"]) for r in rows if r["ms"] is None})
    if skipped:
        out += ["## Not run", ""] + [f"- {p}: {n}" for p, n in skipped] + [""]
    return "\n".join(out)
