"""The kernel variants a tuning run times, and the library's tuning entry points.

A variant is a point of the launch-shape space of csrc/kernels/variant.h (its text
form is parsed by the library, which alone decides whether a variant can run a call:
a call it cannot run is refused, never run another way). The lists below are the
candidates ``make gpu-tune`` times per direction; the rule's own choice is always
timed too (``rule``).

The entry points are plain C symbols of the library that holds the CUDA kernels
(``residual_fused_set_variant`` and friends, csrc/kernels/variant.cu), reached with
ctypes; the emulator (tools/cuda_emulator.py) exports the same ones. Not a public API.
"""

import contextlib
import ctypes
from typing import Iterator, List, Optional

FWD, BWD = 0, 1
DIRECTIONS = {"fwd": FWD, "bwd": BWD}

#: forward candidates: the rows kernels at both thread widths and three CTA sizes,
#: persistent caps, with the next rows copied into a shared-memory ring (st=2), the
#: staged rows, clusters shaped as the rule shapes them (also
#: below the size where the rule starts splitting rows) and of every size at both
#: thread widths, and the streamed kernel. "rule" is timed too, under the override,
#: so the table's baseline is the rule itself whatever table the library has.
FWD_VARIANTS = (
    "rule",
    "rows:pt=16,tb=128", "rows:pt=16,tb=256", "rows:pt=16,tb=512",
    "rows:pt=32,tb=256", "rows:pt=32,tb=512",
    "rows:pt=16,tb=256,cps=1", "rows:pt=16,tb=256,cps=2", "rows:pt=32,tb=512,cps=1",
    "rows:pt=16,tb=256,st=2", "rows:pt=32,tb=512,st=2",
    "staged",
    "cluster", "cluster:pt=16", "cluster:pt=32",
    "cluster:pt=16,cs=2", "cluster:pt=16,cs=4", "cluster:pt=16,cs=8", "cluster:pt=16,cs=16",
    "cluster:pt=32,cs=2", "cluster:pt=32,cs=4", "cluster:pt=32,cs=6", "cluster:pt=32,cs=8", "cluster:pt=32,cs=16",
    "streamed", "streamed:cps=1",
)
#: backward candidates: as the forward (no staged kernel there), both
#: weight-gradient reductions, and the rows kernel with its next rows copied into a
#: shared-memory ring (st=2).
BWD_VARIANTS = (
    "rule",
    "rows:pt=16,tb=256", "rows:pt=16,tb=512", "rows:pt=32,tb=512",
    "rows:pt=16,tb=256,st=2", "rows:pt=16,tb=512,st=2",
    "rows:pt=16,tb=512,cps=1", "rows:pt=32,tb=512,cps=1",
    "rows:pt=16,tb=512,red=columns", "rows:pt=16,tb=512,red=sliced",
    "cluster", "cluster:pt=16", "cluster:pt=32",
    "cluster:pt=16,cs=2", "cluster:pt=16,cs=4", "cluster:pt=16,cs=8", "cluster:pt=16,cs=16",
    "cluster:pt=32,cs=2", "cluster:pt=32,cs=4", "cluster:pt=32,cs=6", "cluster:pt=32,cs=8", "cluster:pt=32,cs=16",
    "cluster:pt=16,red=sliced",
    "streamed", "streamed:cps=1", "streamed:red=columns",
)
CANDIDATES = {"fwd": FWD_VARIANTS, "bwd": BWD_VARIANTS}
#: the dtype mixes of the measured table, in the order of csrc/kernels/mixes.h's
#: FastMixes (bench_add_norm.DTYPES names)
TABLE_MIXES = ("bf16", "fp16", "fp32", "bf16-fp32res", "fp16-fp32res")


def provider_name(variant: str) -> str:
    """The CSV provider of a variant's rows."""
    return f"residual_fused[{variant}]"


def variant_of_provider(provider: str) -> Optional[str]:
    """The variant a provider name times, or None for any other provider."""
    if provider.startswith("residual_fused[") and provider.endswith("]"):
        return provider[len("residual_fused["):-1]
    return None


class VariantError(ValueError):
    """A variant's text that the library does not parse."""


class Entry:
    """The tuning entry points of one loaded library (``cdll``: ctypes.CDLL)."""

    def __init__(self, cdll):
        self.lib = cdll
        cdll.residual_fused_set_variant.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int]
        cdll.residual_fused_last_variant.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        cdll.residual_fused_tuned_table_source.restype = ctypes.c_char_p

    def set(self, direction: str, text: str) -> None:
        """Sets (or with "" clears) the override of ``direction`` ("fwd", "bwd")."""
        error = ctypes.create_string_buffer(512)
        if self.lib.residual_fused_set_variant(DIRECTIONS[direction], text.encode(), error, len(error)) != 0:
            raise VariantError(f"variant {text!r}: {error.value.decode()}")

    @contextlib.contextmanager
    def override(self, direction: str, text: str) -> Iterator[None]:
        """Every call of ``direction`` runs ``text`` inside the block; cleared after."""
        self.set(direction, text)
        try:
            yield
        finally:
            self.set(direction, "")

    def last(self, direction: str) -> str:
        """The variant the last launch of ``direction`` ran, every choice filled in."""
        out = ctypes.create_string_buffer(256)
        self.lib.residual_fused_last_variant(DIRECTIONS[direction], out, len(out))
        return out.value.decode()

    def table_source(self) -> str:
        return self.lib.residual_fused_tuned_table_source().decode()


def loaded() -> Entry:
    """The entry points of the loaded library holding residual_fused's CUDA kernels."""
    import torch

    from residual_fused import _loader, ops

    for attempt in range(2):
        for path in _loader.loaded_libraries:
            cdll = ctypes.CDLL(path)
            if hasattr(cdll, "residual_fused_set_variant"):
                return Entry(cdll)
        if attempt == 0 and torch.cuda.is_available():  # not built yet: build and load them now
            ops._build_on_first_use(torch.device("cuda"))
    raise RuntimeError("residual_fused's CUDA kernels are not loaded: no variant can be chosen")


def all_candidates() -> List[tuple]:
    """(direction, variant) of every candidate."""
    return [(d, v) for d, names in CANDIDATES.items() for v in names]
