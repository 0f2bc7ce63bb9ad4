"""Randomized differential testing of every launch path of csrc/kernels, through the
emulator, against the float64 reference.

    python tests/fuzz_emulated.py --seconds 120           # a fresh seed, for two minutes
    python tests/fuzz_emulated.py --seed 7 --cases 500    # a fixed batch
    python tests/fuzz_emulated.py --seed 7 --index 41     # case 41 of seed 7 again
    python tests/fuzz_emulated.py --replay '<json>'       # one case, as a failure printed it
    python tests/fuzz_emulated.py --regressions           # tests/fuzz_regressions.jsonl
    python tests/fuzz_emulated.py --cases-file F          # every case of F (one JSON per line)
    python tests/fuzz_emulated.py --target cpu --seconds 60   # the same cases on the CPU kernels

Cases come from tests/fuzz_space.py. Each runs the forward and then the backward op
under two thread orders (tensors flush against opposite guard pages), requires their
outputs to be bitwise identical, and checks every output against the float64
reference with the bounds of tests/numerics.py; the emulator itself reports any
out-of-bounds, uninitialised or racing access (tools/emulator). Inputs are random,
the padding between rows is NaN, and outputs are NaN until written. A failure prints
the case's one-line reproduction. ``make fuzz`` runs this for longer.
"""

import argparse
import collections
import contextlib
import dataclasses
import json
import os
import random
import sys
import time
import traceback
from typing import Dict, Optional

import repo_root

repo_root.rerun_with_root(__name__)

import torch  # noqa: E402

import fuzz_space  # noqa: E402
import numerics  # noqa: E402
from fuzz_space import Case, dtype_of  # noqa: E402
from tools import cuda_emulator  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

REGRESSIONS = os.path.join(HERE, "fuzz_regressions.jsonl")
SUMMARIES = []  # lines for the end of a pytest run (tests/conftest.py prints them)


class FuzzFailure(AssertionError):
    def __init__(self, case: Case, message: str, where: str = "", target: str = "emulator"):
        self.case, self.message = case, message
        super().__init__(f"{where}{case.summary()}: {message}\n  {repro(case, where, target)}")


def repro(case: Case, where: str = "", target: str = "emulator") -> str:
    tag = f"  # {where.strip(': ')}" if where else ""
    on = "" if target == "emulator" else f" --target {target}"
    return f"reproduce: python tests/fuzz_emulated.py{on} --replay '{case.to_json()}'{tag}"


# ---- inputs in their layouts ----------------------------------------------------------------

def _place(values: torch.Tensor, dtype: torch.dtype, layout) -> torch.Tensor:
    """`values` ([rows, H] or [H]) as a tensor of `dtype` whose address is layout[0]
    bytes past a 16-byte boundary and, for [rows, H], whose row stride is layout[1]. The
    bytes between padded rows are NaN; overlapping or repeated rows hold what their
    shared memory holds."""
    offset = layout[0]
    size = torch.empty((), dtype=dtype).element_size()
    if values.dim() == 1:
        shape, strides, span = tuple(values.shape), (1,), values.numel()
    else:
        rows, hidden = values.shape
        stride = layout[1]
        shape, strides = (rows, hidden), (stride, 1)
        span = (rows - 1) * stride + hidden
    buf = torch.empty(span * size + 64, dtype=torch.uint8)
    start = (offset - buf.data_ptr()) % 16  # CPU allocations are at least 16-byte aligned
    storage = buf[start: start + span * size].view(dtype)
    assert storage.data_ptr() % 16 == offset
    if values.dim() == 2 and strides[0] < shape[1]:  # rows overlap or repeat: fill the bytes once
        storage.copy_(values.flatten()[:span].to(dtype))
    else:
        storage.fill_(float("nan"))
        storage.as_strided(shape, strides).copy_(values.to(dtype))
    return storage.as_strided(shape, strides)


def _storage_values(gen, rows, hidden, layout, mean=0.0, scale=1.0) -> torch.Tensor:
    """Random [rows, H] values, drawn per byte of storage when rows overlap or repeat
    (the tensor is then whatever the shared storage holds)."""
    stride = layout[1]
    if stride < hidden:
        span = (rows - 1) * stride + hidden
        flat = torch.randn(span, generator=gen, dtype=torch.float64) * scale + mean
        return flat.as_strided((rows, hidden), (stride, 1)).clone()
    return torch.randn(rows, hidden, generator=gen, dtype=torch.float64) * scale + mean


def _bitwise_equal(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


class OpsTarget:
    """The same cases through the library's own ops on a real device: the compiled CPU
    kernels, or the CUDA kernels on a GPU (inputs keep their layout there). The
    emulator's device, schedules and output placement do not apply: each call runs
    as often as the case has schedules, and the runs must agree bitwise; outputs are
    poisoned before each call (tests/oracle.py)."""

    def __init__(self, device: str):
        self.device = torch.device(device)
        self.flush_start = False

    @contextlib.contextmanager
    def threads_of(self, case: Case):
        """The CPU kernels split the backward's rows (and its weight-gradient partials)
        by thread count: each case runs with its own, 1 to 3 unless it names one, and a
        failure's reproduction carries it."""
        if self.device.type != "cpu":
            yield case
            return
        before = torch.get_num_threads()
        case = dataclasses.replace(case, threads=case.threads or 1 + case.seed % 3)
        torch.set_num_threads(case.threads)
        try:
            yield case
        finally:
            torch.set_num_threads(before)

    def configure(self, *args) -> None:
        pass

    def schedule(self, name: str, seed: int = 1) -> None:
        pass

    def _dev(self, t):
        if t is None or self.device.type == "cpu":
            return t
        # the same bytes at the same offset from a 16-byte boundary, with the same strides
        size = t.element_size()
        span = 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride())) if t.numel() else 0
        buf = torch.empty(span * size + 16, dtype=torch.uint8, device=self.device)
        start = (t.data_ptr() % 16 - buf.data_ptr()) % 16
        dst = buf[start: start + span * size].view(t.dtype)
        dst.copy_(torch.as_strided(t, (span,), (1,)))
        return dst.as_strided(tuple(t.shape), tuple(t.stride()))

    def fwd(self, x, residual, weight, bias, eps, is_rms_norm, store, residual_out_dtype, out_offsets=None,
            weight_offset=0.0, store_mean=False):
        import oracle

        with oracle.poisoned_outputs(self.device):
            y, res, rstd, mean = torch.ops.residual_fused.add_norm_fwd(
                self._dev(x), self._dev(residual), self._dev(weight), self._dev(bias), eps, is_rms_norm, store,
                residual_out_dtype, weight_offset, store_mean)
        return y.cpu(), (res.cpu() if store else None), rstd.cpu(), (mean.cpu() if store_mean else None)

    def bwd(self, dy, dresidual_out, saved, rstd, weight, bias, is_rms_norm, memory_efficient, dresidual_dtype,
            out_offsets=None, weight_offset=0.0, mean=None):
        import oracle

        with oracle.poisoned_outputs(self.device):
            dx, dres, dw, db = torch.ops.residual_fused.add_norm_bwd(
                self._dev(dy), self._dev(dresidual_out), self._dev(saved), self._dev(rstd), self._dev(weight),
                self._dev(bias), is_rms_norm, memory_efficient, dresidual_dtype, weight_offset, self._dev(mean))
        return (dx.cpu(), None if dresidual_dtype is None else dres.cpu(), None if weight is None else dw.cpu(),
                None if bias is None else db.cpu())


def _under_schedules(emu, case: Case, run):
    """run() under each of the case's schedules, tensors flush against the end of their
    mapping on one run and the start on the next; the outputs must agree bitwise."""
    results = []
    try:
        for k, name in enumerate(case.schedules):
            emu.schedule(name, seed=case.seed + 1)
            emu.flush_start = (k + case.seed) % 2 == 1
            results.append(run())
    finally:
        emu.schedule("round_robin")
        emu.flush_start = False
    first = results[0]
    for other, name in zip(results[1:], case.schedules[1:]):
        for key in first:
            if not _bitwise_equal(first[key], other[key]):
                diff = (first[key].double() - other[key].double()).abs().nan_to_num(float("inf")).max().item()
                raise AssertionError(f"{key} differs between schedules {case.schedules[0]} and {name} "
                                     f"(max |diff| {diff:.3g}): the result depends on thread order")
    return first


# ---- one case -------------------------------------------------------------------------------------

def _variant_entry(emu):
    """The entry points that apply a case's kernel variant on this target: the
    emulator's, or the loaded library's on a GPU; None on the CPU kernels (no variants)."""
    from bench import variants

    if isinstance(emu, OpsTarget):
        return variants.loaded() if emu.device.type == "cuda" else None
    return variants.Entry(emu.lib)


def _under_variant(emu, case: Case, direction: str, run):
    """run() under the case's variant when it is for `direction`; None when the library
    refuses the variant for this call (with the reason naming it)."""
    entry = _variant_entry(emu) if case.variant and case.variant[0] == direction else None
    if entry is None:
        return run()
    with entry.override(*case.variant):
        try:
            got = run()
        except (cuda_emulator.EmulatorError, RuntimeError) as err:
            if f"the tuning variant '{case.variant[1]}'" in str(err):
                return None
            raise
    import emulated_cases

    ran = entry.last(direction)
    assert emulated_cases.variant_agrees(case.variant[1], ran, case.hidden), f"asked {case.variant[1]}, ran {ran}"
    return got


def run_case(emu, case: Case) -> Dict[str, float]:
    """Forward then backward of `case` (one of them under the case's kernel variant,
    if it has one); returns each output's worst error / bound."""
    dt = fuzz_space.tensor_dtypes(case)
    f, b = case.fwd, case.bwd
    lay = case.layout
    H, rows = case.hidden, case.rows
    gen = torch.Generator().manual_seed(case.seed)
    # x with a mean far from zero, as residual streams have: a wrong mean shows in rstd.
    x = _place(_storage_values(gen, rows, H, lay["x"], 3.0 * case.scale, case.scale), dt["x"], lay["x"])
    residual = (_place(_storage_values(gen, rows, H, lay["residual"], 0.0, case.scale), dt["residual"],
                       lay["residual"]) if dt["residual"] is not None else None)
    w = torch.randn(H, generator=gen, dtype=torch.float64)
    offset = case.weight_offset
    if b["memory_efficient"]:  # xhat = (y - b) / (w + offset): the weight used away from zero
        w = torch.sign(w) * (0.5 + w.abs().clamp(max=1.0)) - offset
    weight = _place(w, dt["weight"], lay["weight"]) if dt["weight"] is not None else None
    bias = (_place(torch.randn(H, generator=gen, dtype=torch.float64), dt["bias"], lay["bias"])
            if dt["bias"] is not None else None)
    inputs = [t.clone() for t in (x, residual, weight, bias) if t is not None]

    store, res_dtype, store_mean = f["store"], dtype_of(f["residual_out"]), bool(f.get("store_mean"))
    out_off = {"y": lay["y"][0], "residual_out": lay.get("residual_out", [0])[0], "rstd": lay["rstd_out"][0],
               "mean": lay.get("mean_out", [0])[0]}

    def forward():
        y, res, rstd, mean = emu.fwd(x, residual, weight, bias, case.eps, case.rms, store, res_dtype, out_off,
                                     weight_offset=offset, store_mean=store_mean)
        return {"y": y, "residual_out": res, "rstd": rstd, "mean": mean}

    emu.configure(*case.device)
    try:
        got = _under_variant(emu, case, "fwd", lambda: _under_schedules(emu, case, forward))
        worst = ({} if got is None else
                 numerics.check_forward(got, x, residual, weight, bias, case.eps, case.rms, store, offset,
                                        store_mean))

        # The backward's inputs: what the forward saved, as the float64 reference has it.
        (y64, s64, rstd64), _ = numerics.forward_reference(x, residual, weight, bias, case.eps, case.rms, offset)
        saved64 = y64 if b["memory_efficient"] else (s64 if store else x.double())
        saved = _place(saved64, dt["saved"], lay["saved"])
        rstd = _place(rstd64, dt["rstd"], lay["rstd"])
        # The forward's mean as autograd passes it (the backward's shift), where the case has one.
        mean = (_place(s64.mean(-1), dt["mean"], lay.get("mean", [0])) if dt["mean"] is not None else None)
        dy = _place(_storage_values(gen, rows, H, lay["dy"], 0.0, 1.0 / 8), dt["dy"], lay["dy"])
        dro = (_place(_storage_values(gen, rows, H, lay["dresidual_out"], 0.0, 1.0 / 8), dt["dresidual_out"],
                      lay["dresidual_out"]) if dt["dresidual_out"] is not None else None)
        inputs += [t.clone() for t in (saved, rstd, dy, dro, mean) if t is not None]
        dres_dtype = dtype_of(b["dresidual"])
        out_off = {k: lay[k][0] for k in fuzz_space.BWD_OUTPUTS if k in lay}

        def backward():
            dx, dres, dw, db = emu.bwd(dy, dro, saved, rstd, weight, bias, case.rms, b["memory_efficient"],
                                       dres_dtype, out_offsets=out_off, weight_offset=offset, mean=mean)
            return {"dx": dx, "dresidual": dres, "dweight": dw, "dbias": db}

        got = _under_variant(emu, case, "bwd", lambda: _under_schedules(emu, case, backward))
        if got is not None:
            worst.update(numerics.check_backward(got, dy, dro, saved, rstd, weight, bias, case.rms,
                                                 b["memory_efficient"], offset))
    finally:
        emu.configure()
    after = [t for t in (x, residual, weight, bias, saved, rstd, dy, dro, mean) if t is not None]
    for before, now in zip(inputs, after):
        assert _bitwise_equal(before, now), "an input changed"
    return worst


def check(emu, case: Case, where: str = "") -> Dict[str, float]:
    target = emu.device.type if isinstance(emu, OpsTarget) else "emulator"
    with (emu.threads_of(case) if isinstance(emu, OpsTarget) else contextlib.nullcontext(case)) as case:
        try:
            return run_case(emu, case)
        except AssertionError as err:  # EmulatorError is one
            raise FuzzFailure(case, str(err), where, target) from None
        except Exception as err:  # a crash of the harness: still a reproducible failure
            message = "".join(traceback.format_exception_only(type(err), err)).strip()
            raise FuzzFailure(case, message, where, target) from None


# ---- batches ---------------------------------------------------------------------------------------

class Stats:
    """What a batch ran: cases, kernels launched, worst error / bound per output."""

    def __init__(self):
        self.cases = 0
        self.kernels = collections.Counter()
        self.worst = collections.defaultdict(float)

    def add(self, emu, case: Case, worst: Dict[str, float]) -> None:
        self.cases += 1
        for k, v in worst.items():
            self.worst[k] = max(self.worst[k], v)
        if emu is None:
            return
        emu.configure(*case.device)
        try:
            for launches in fuzz_space.plans(emu, case, case.rows):
                for launch in launches:
                    self.kernels[launch["kernel"]] += 1
        finally:
            emu.configure()

    def text(self) -> str:
        ratios = ", ".join(f"{k} {v:.3g}" for k, v in sorted(self.worst.items()) if not k.endswith("ulps"))
        ulps = ", ".join(f"{k[:-5]} {v:.3g}" for k, v in sorted(self.worst.items()) if k.endswith("ulps"))
        return (f"{self.cases} cases; worst error / bound: {ratios}; 16-bit outputs, worst distance in ulps "
                f"from the correctly rounded value: {ulps}")


def run_batch(emu, seed: int, seconds: Optional[float] = None, cases: Optional[int] = None,
              max_failures: int = 5, out=sys.stdout, boundaries=None, target=None) -> Stats:
    """Cases of `seed` (drawn with the emulator's plans) until the time or count runs
    out, run on the emulator or on `target` (an OpsTarget); raises with every failure's
    reproduction (up to max_failures)."""
    rng = random.Random(seed)
    boundaries = fuzz_space.plan_boundaries(emu.path) if boundaries is None else boundaries
    stats, failures = Stats(), []
    start = time.monotonic()
    k = 0
    while (cases is None or k < cases) and (seconds is None or time.monotonic() - start < seconds):
        case = fuzz_space.generate(rng, emu, boundaries)
        try:
            worst = check(target or emu, case, f"seed {seed} case {k}: ")
            stats.add(None if target else emu, case, worst)
        except FuzzFailure as failure:
            failures.append(str(failure))
            print(f"FAILED {failure}", file=out, flush=True)
            if len(failures) >= max_failures:
                break
        k += 1
    print(f"seed {seed}: {stats.text()}; {len(failures)} failed", file=out, flush=True)
    if failures:
        raise AssertionError(f"{len(failures)} of {k} fuzz cases failed:\n" + "\n".join(failures))
    return stats


def demangle(symbol: str) -> str:
    """A kernel symbol as `add_norm_fwd_rows_kernel<Mix<bf16, ...>, 2, 8, 512>`."""
    import ctypes

    lib = ctypes.CDLL("libstdc++.so.6")
    status = ctypes.c_int()
    lib.__cxa_demangle.restype = ctypes.c_char_p
    lib.__cxa_demangle.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_int)]
    text = lib.__cxa_demangle(symbol.encode(), None, None, ctypes.byref(status))
    if status.value != 0 or not text:
        return symbol
    name = text.decode().replace("residual_fused::", "").replace("__nv_bfloat16", "bf16").replace("__half", "f16")
    name = name.replace("AnyType, AnyType, AnyType, AnyType", "any")
    return name[: name.rfind("(")] if "(" in name else name


def regressions():
    """The fixed cases of tests/fuzz_regressions.jsonl: (why, case)."""
    out = []
    with open(REGRESSIONS) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                entry = json.loads(line)
                out.append((entry["why"], Case(**entry["case"])))
    return out


def case_at(emu, seed: int, index: int) -> Case:
    rng = random.Random(seed)
    boundaries = fuzz_space.plan_boundaries(emu.path)
    for _ in range(index):
        fuzz_space.generate(rng, emu, boundaries)
    return fuzz_space.generate(rng, emu, boundaries)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lib", help="an emulator library (default: build/emulator, built if missing)")
    p.add_argument("--seed", type=int, help="default: a fresh one")
    p.add_argument("--seconds", type=float)
    p.add_argument("--cases", type=int)
    p.add_argument("--index", type=int, help="run only case INDEX of --seed")
    p.add_argument("--replay", help="one case, as JSON")
    p.add_argument("--regressions", action="store_true", help="the fixed regression cases")
    p.add_argument("--cases-file", help="run every case of this file (one JSON case per line)")
    p.add_argument("--target", choices=("emulator", "cpu", "cuda"), default="emulator",
                   help="run the cases on the emulated CUDA kernels (default), or through the library's ops "
                        "on the CPU kernels or a GPU")
    args = p.parse_args(argv)
    lib = args.lib or cuda_emulator.build_cached()
    emu = cuda_emulator.Emulator(lib, fuzz_space.kernel_build())
    target = emu
    if args.target != "emulator":
        import residual_fused  # noqa: F401  (registers the ops)

        target = OpsTarget(args.target)
    try:
        if args.replay:
            case = Case.from_json(args.replay)
            print(case.summary())
            print(check(target, case))
        elif args.regressions:
            for why, case in regressions():
                check(target, case, f"regression ({why}): ")
            print(f"{len(regressions())} regression cases passed")
        elif args.cases_file:
            with open(args.cases_file) as f:
                listed = [Case.from_json(line) for line in f if line.strip()]
            for k, case in enumerate(listed):
                check(target, case, f"{os.path.basename(args.cases_file)} case {k}: ")
            print(f"{len(listed)} cases passed")
        elif args.index is not None:
            case = case_at(emu, args.seed, args.index)
            print(case.to_json())
            print(check(target, case, f"seed {args.seed} case {args.index}: "))
        else:
            seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
            if args.seconds is None and args.cases is None:
                args.seconds = 60.0
            stats = run_batch(emu, seed, args.seconds, args.cases, target=None if target is emu else target)
            print("launches per kernel:")
            for kernel, n in sorted(stats.kernels.items(), key=lambda kv: demangle(kv[0])):
                print(f"  {n:6d}  {demangle(kernel)}")
    except AssertionError as err:
        print(f"FAILED: {err}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
