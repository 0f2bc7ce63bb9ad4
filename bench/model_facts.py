"""What the performance model needs to know of one launch, read from compiled code.

For each (direction, norm, hidden size) of the benchmark sweep: the kernel dispatch
picks (run on the CPU by tools/emulator), its block, grid, CTAs per SM and CTAs per
cluster, and from its sm_90 SASS the registers, the dependent global round trips per
iteration of its row loop, and the instructions, block barriers, cluster barrier
waits and shuffles on the longest path through that loop for an all-bf16 call of
that norm (tools/sass.py decodes the SASS).

The same code reads the kernels of any checkout of this project, so the facts of the
kernels a GPU run measured can be extracted once from the commit that ran and kept
beside the measurements (bench/results/<gpu>/kernel_facts.json); the model is then
checked against every measured row (tests/test_perf_model.py). For the kernels in
this checkout, bench/sass_audit.py calls `launch_facts` directly.

    python bench/model_facts.py --tree /path/to/checkout --run NAME [--out FILE]
"""

import argparse
import importlib
import json
import os
import sys
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
if __name__ == "__main__":  # run as a script: bench and tools are packages of the repository root
    sys.path.append(os.path.dirname(HERE))

from tools import cubin, cuda_emulator  # noqa: E402
from tools import sass as sa  # noqa: E402

SWEEP_HIDDEN = (512, 1024, 2048, 4096, 8192, 12288, 16384, 24576, 32768, 65536, 131072, 262144)
ELEMENTS = 1 << 26  # rows x H of the benchmark sweep
# The benchmark's decode shapes (forward, few rows): (rows, H).
DECODE = tuple((rows, hidden) for hidden in (4096, 8192) for rows in (1, 8, 32, 128))
DIRECTIONS = ("fwd", "bwd")
NORMS = ("layer", "rms")

# The instructions tallied along the longest path through a kernel's row loop.
TALLIED = {"BAR": "barriers", "UCGABAR_WAIT": "cluster_waits", "SHFL": "shuffles", "LDGSTS": "async_copies"}


def path_counts(bl, succ, header: int, latch: int) -> Dict[str, int]:
    """Instructions and TALLIED counts on the longest path (by instructions) through
    one iteration of the loop [header, latch], inner loops once."""
    best: Dict[int, tuple] = {header: (0, {})}
    out = (0, {})
    for n in range(header, latch + 1):
        if n not in best:
            continue
        length, counts = best[n]
        counts = dict(counts)
        for ins in bl[n]:
            key = TALLIED.get(ins.base)
            if key:
                counts[key] = counts.get(key, 0) + 1
        length += len(bl[n])
        outs = succ.get(n, [])
        forward = [m for m in outs if n < m <= latch]
        if len(forward) < len(outs) or not outs:
            if length > out[0]:
                out = (length, counts)
        for m in forward:
            if m not in best or best[m][0] < length:
                best[m] = (length, counts)
    result = {"instructions": out[0]}
    result.update({k: out[1].get(k, 0) for k in TALLIED.values()})
    return result


def kernel_facts(build, norm: str, kernel_dir: str = cubin.KERNEL_DIR) -> Dict[str, dict]:
    """{mangled kernel: facts} of every sm_90 kernel of `build` (compiled from
    `kernel_dir`) for an all-bf16 call of `norm`, read by this checkout's SASS audit."""
    saved = {k: dict(v) for k, v in sa.BF16_CALL.items()}
    for fields in sa.BF16_CALL.values():
        fields["is_rms_norm"] = int(norm == "rms")
        fields["mean"] = sa.NULL if norm == "rms" else sa.NONNULL
    try:
        offsets = sa.param_offsets(kernel_dir)
        out = {}
        for (source, arch), text in build.sass.items():
            if arch != "90":
                continue
            for name, instrs in sa.parse_sass(text).items():
                if (name, arch) not in build.kernels:
                    continue
                kernel = build.kernel(name, arch)
                a = sa.audit_kernel(kernel, instrs, offsets)
                bl, succ = sa.blocks(instrs)
                struct = "AddNormFwdParams" if "_fwd_" in name else "AddNormBwdParams"
                fields = sa.call_fields(offsets, struct)
                pruned = sa.feasible_successors(bl, succ, fields, sa.PARAM_BASE[arch])
                lp = sa.loops(bl, pruned)
                counts = path_counts(bl, pruned, *lp[0]) if lp else {"instructions": 0}
                # Inner loops of the row loop that load: the streamed kernels' column
                # loops, which run ceil(H / (block x VEC)) times per pass.
                inner = []
                for h, l in lp[1:]:
                    if lp[0][0] <= h and l <= lp[0][1]:
                        t = sa.round_trips(bl, pruned, h, l)[0]
                        if t:
                            inner.append(dict(trips=t, **path_counts(bl, pruned, h, l)))
                out[name] = dict(short=sa.short_name(name), registers=kernel.registers, trips=a.trips,
                                 inner=inner, **counts)
        return out
    finally:
        sa.BF16_CALL.clear()
        sa.BF16_CALL.update(saved)


def variant_facts(build, emu, hidden_sizes=SWEEP_HIDDEN) -> List[dict]:
    """launch_facts of every candidate variant of bench/variants.py, each record with
    its "variant": the plan the override gets from this checkout's dispatch code (a
    variant that cannot run a size has no record there)."""
    from bench import variants

    entry = variants.Entry(emu.lib)
    per_norm = {norm: kernel_facts(build, norm) for norm in NORMS}
    out = []
    try:
        for direction, name in variants.all_candidates():
            entry.set(direction, name)
            for r in launch_facts(build, emu, hidden_sizes=hidden_sizes, directions=(direction,),
                                  decode=False, per_norm=per_norm):
                r["variant"] = name
                out.append(r)
            entry.set(direction, "")
    finally:
        entry.set("fwd", "")
        entry.set("bwd", "")
    return out


def launch_facts(build, emu, kernel_dir: str = cubin.KERNEL_DIR, hidden_sizes=SWEEP_HIDDEN,
                 directions=DIRECTIONS, decode: bool = True, per_norm=None) -> List[dict]:
    """One record per (direction, norm, rows, H) of the sweep and the decode shapes:
    the launch the dispatch code of that checkout picks on an emulated H100-class part (132 SMs) and its kernel's facts."""
    per_norm = per_norm or {norm: kernel_facts(build, norm, kernel_dir) for norm in NORMS}
    shapes = [(d, ELEMENTS // h, h) for d in directions for h in hidden_sizes]
    if decode:
        shapes += [("fwd", rows, h) for rows, h in DECODE]
    records = []
    emu.configure("h100", sm_count=0)
    try:
        for direction, rows, hidden in shapes:
            plan = emu.plan(direction == "bwd", hidden, rows)
            if plan is None:
                continue
            for norm in NORMS:
                k = per_norm[norm].get(plan["kernel"])
                if k is None:
                    continue
                records.append(dict(direction=direction, norm=norm, hidden=hidden, rows=rows,
                                    kernel=plan["kernel"], block=plan["block"], grid=plan["grid"],
                                    ctas_per_sm=plan["ctas_per_sm"], cluster=plan.get("cluster", 1) or 1,
                                    **{f: v for f, v in k.items()}))
    finally:
        emu.configure()
    return records


# The modules another checkout's kernels are compiled and emulated with: its tools
# package, or in a checkout from before tools/ existed, bench/cubin.py and
# bench/sass_audit.py (with make_emulator) beside tests/cuda_emulator.py.
_TREE_MODULES = ("tools", "cubin", "sass_audit", "cuda_emulator", "perf_model", "report", "byte_model")


def _tree_module(name: str) -> bool:
    return name in _TREE_MODULES or name.startswith("tools.")


def load_tree(tree: str):
    """(build, emulator, kernel dir) of another checkout: its kernels compiled by its
    own tools/cubin.py and its dispatch code in its own emulator (tools/emulator; in an
    older checkout, bench/cubin.py and tests/emulator). Only the reading of the SASS
    is this checkout's."""
    if os.path.samefile(tree, os.path.dirname(HERE)):
        build = cubin.build()
        return build, cuda_emulator.make_emulator(build), cubin.KERNEL_DIR
    saved = {n: sys.modules.pop(n) for n in list(sys.modules) if _tree_module(n)}
    path = list(sys.path)
    has_tools = os.path.exists(os.path.join(tree, "tools", "cubin.py"))
    sys.path[:0] = [tree] if has_tools else [os.path.join(tree, "bench"), os.path.join(tree, "tests")]
    try:
        if has_tools:
            tree_cubin = importlib.import_module("tools.cubin")
            make_emulator = importlib.import_module("tools.cuda_emulator").make_emulator
        else:
            tree_cubin = importlib.import_module("cubin")
            make_emulator = importlib.import_module("sass_audit").make_emulator
        build = tree_cubin.build()
        return build, make_emulator(build), tree_cubin.KERNEL_DIR
    finally:
        for n in [n for n in sys.modules if _tree_module(n)]:
            sys.modules.pop(n, None)
        sys.modules.update(saved)
        sys.path[:] = path


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tree", default=os.path.dirname(HERE), help="a checkout of this project")
    p.add_argument("--run", required=True, help="the measured run these kernels belong to")
    p.add_argument("--commit", default="", help="the commit of --tree, recorded with the facts")
    p.add_argument("--out", help="merge into this JSON file (default: print)")
    args = p.parse_args(argv)
    build, emu, kernel_dir = load_tree(os.path.abspath(args.tree))
    records = launch_facts(build, emu, kernel_dir)
    entry = {"commit": args.commit, "launches": records}
    if not args.out:
        json.dump(entry, sys.stdout, indent=1)
        return
    data = {}
    if os.path.exists(args.out):
        with open(args.out) as f:
            data = json.load(f)
    data[args.run] = entry
    with open(args.out, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"{args.out}: {args.run}, {len(records)} launches")


if __name__ == "__main__":
    main()
