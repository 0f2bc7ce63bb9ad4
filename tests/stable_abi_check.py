"""Checks a stable-ABI CUDA library (residual_fused/_cuda_stable*.abi3.so) under the
torch of the Python running this file, which may differ from the torch it was built
with: it loads, registers CUDA kernels for both ops under the schemas of
residual_fused/ops.py, and a call dispatched to each kernel comes back as a clean
RuntimeError (no GPU is needed: the inputs are CPU tensors, which the kernel refuses).

    python tests/stable_abi_check.py path/to/_cuda_stable.abi3.so

Used by tests/test_stable_abi.py, and by hand with another torch's Python. Prints
one line per check and exits non-zero on the first failure.
"""

import sys


def check(library: str) -> None:
    import torch

    import residual_fused  # noqa: F401  (defines the ops' schemas)

    print(f"torch {torch.__version__} (CUDA {torch.version.cuda})")
    torch.ops.load_library(library)
    ops = torch.ops.residual_fused
    for name in ("add_norm_fwd", "add_norm_bwd"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"residual_fused::{name}", "CUDA"), (
            f"{name}: no CUDA kernel registered")
        print(f"registered: {getattr(ops, name).default._schema}")
    x, w = torch.randn(4, 64), torch.ones(64)
    cuda = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    calls = {
        "add_norm_fwd": (x, x, w, None, 1e-5, False, True, torch.float32),
        "add_norm_bwd": (x, None, x, torch.ones(4), w, None, False, False, None),
    }
    for name, args in calls.items():
        try:
            getattr(ops, name).default.redispatch(cuda, *args)
        except RuntimeError as err:
            message = str(err).splitlines()[0]
            assert "must be a CUDA tensor for the CUDA kernel" in message, message
            print(f"{name} reached the CUDA kernel: {message}")
        else:
            raise AssertionError(f"{name}: the CUDA kernel accepted CPU tensors")


if __name__ == "__main__":
    check(sys.argv[1])
