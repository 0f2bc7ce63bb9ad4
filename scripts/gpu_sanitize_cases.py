"""Every CUDA launch path once, forward and backward, on small tensors.

Meant to run under compute-sanitizer (scripts/gpu_check.sh, stage `sanitizer`):
few rows, so each tool finishes in seconds, but every kernel of csrc/kernels and
both access widths (16-byte vectors, element-wise) are launched. Exits non-zero if
an output differs from the float64 reference.
"""

import sys

import torch

import residual_fused as rf

# One hidden size per launch path (see tests/test_cuda_kernels.py): rows kernels with
# one thread, a few lanes, several warps (and several rows per CTA) per row, 16 and 32
# elements per thread; wide rows (clusters of 3, 4, 8 and 16 CTAs on sm_90, staged and
# streamed elsewhere); an odd size and a misaligned row start for the element-wise
# variants. Hidden sizes given as arguments replace the list (racecheck, the slowest
# tool, runs a shorter one).
HIDDEN = [int(h) for h in sys.argv[1:]] or [8, 64, 1024, 1536, 5120, 8200, 16384, 16392, 32768, 65536,
                                            262144, 41, 3001, 5125]


def one(hidden: int, rms: bool, prenorm: bool, dtype, param=torch.float32, rows: int = 3,
        offset: int = 0) -> float:
    g = torch.Generator(device="cuda").manual_seed(hidden)
    base = torch.randn(rows * hidden + offset, device="cuda", generator=g).to(dtype)
    x = base[offset:].view(rows, hidden).requires_grad_()
    r = torch.randn(rows, hidden, device="cuda", generator=g).to(dtype).requires_grad_()
    w = (torch.rand(hidden, device="cuda", generator=g) + 0.5).to(param).requires_grad_()
    b = None if rms else torch.randn(hidden, device="cuda", generator=g).to(param).requires_grad_()
    fn = rf.add_rms_norm if rms else rf.add_layer_norm
    args = (x, r, w) if rms else (x, r, w, b)
    out = fn(*args, prenorm=prenorm)
    outs = out if isinstance(out, tuple) else (out,)
    torch.autograd.grad([o.float().sum() for o in outs], [x, r, w], allow_unused=True)
    with torch.no_grad():
        ref = (rf.reference.add_rms_norm if rms else rf.reference.add_layer_norm)(
            *[a.double() for a in args], prenorm=prenorm)
    ref = ref if isinstance(ref, tuple) else (ref,)
    return max((o.double() - e).abs().max().item() for o, e in zip(outs, ref))


def main() -> int:
    assert rf.cuda_kernels_available(), "the CUDA kernels are not loaded (python -m residual_fused says why)"
    worst = 0.0
    calls = 0
    # bf16 with fp32 parameters runs the generic kernel; with bf16 parameters (and all
    # fp32) the dtype-specialised ones
    mixes = ((torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
             (torch.float32, torch.float32))
    for hidden in HIDDEN:
        for rms in (False, True):
            for prenorm in (False, True):
                for dtype, param in mixes:
                    worst = max(worst, one(hidden, rms, prenorm, dtype, param))
                    calls += 1
        worst = max(worst, one(hidden, False, True, torch.bfloat16, offset=1))
        calls += 1
        print(f"hidden {hidden}: done", flush=True)  # where a tool that dies stopped
    torch.cuda.synchronize()
    print(f"sanitizer cases: {calls} calls, worst |y - ref| = {worst:.3g}")
    return 0 if worst < 0.25 else 1


if __name__ == "__main__":
    sys.exit(main())
