"""The static SASS audit (bench/sass_audit.py; tools/sass.py reads the SASS): its
decoder and counters on synthetic code, and the properties every hot kernel must keep,
read from nvcc's sm_90 output (skipped where nvcc or cuobjdump is missing; CI installs
cuobjdump from pip).

Thresholds are the kernels' targets and today's values: a change that adds a
dependent round trip, spills to local memory, narrows a vector access, lowers
occupancy or makes the calibrated model predict it slower than the measured kernels
fails here.
"""

import re

import pytest

from bench import sass_audit as sa
from tools import cubin, cuda_emulator, sass

pytestmark = pytest.mark.slow

# ---- synthetic code ----------------------------------------------------------------------


def high_word(wait=0, wb=7, rb=7, stall=1):
    return ((stall | (1 << 4) | (wb << 5) | (rb << 8) | (wait << 11)) << 41)


def sass_text(lines):
    """cuobjdump-style text for [(text, high control word)]."""
    out = ["\t\tFunction : k"]
    for k, (text, high) in enumerate(lines):
        out.append(f"        /*{k * 16:04x}*/                   {text} ;    /* 0x{0:016x} */")
        out.append(f"                                                      /* 0x{high:016x} */")
    return "\n".join(out)


def trips_of(lines, fields=None):
    instrs = sass.parse_sass(sass_text(lines))["k"]
    bl, succ = sass.blocks(instrs)
    if fields is not None:
        succ = sass.feasible_successors(bl, succ, fields, 0x210)
    header, latch = sass.loops(bl, succ)[0]
    return sass.round_trips(bl, succ, header, latch)[0]


def test_control_bits_decode():
    c = sass.decode_control(high_word(wait=0b100001, wb=5, rb=2, stall=4))
    assert (c.stall, c.write_barrier, c.read_barrier, c.wait_mask) == (4, 5, 2, 0b100001)
    # A load and its first consumer in add_norm_fwd_rows_kernel<32,4,8,128>, sm_90, nvcc 13.0:
    #   @!P1 LDG.E.128.CONSTANT R36, desc[UR12][R64.64]   signals scoreboard 5
    #   @!P1 F2F.F32.F64 R40, R36                         waits on scoreboard 5
    assert sass.decode_control(0x000f68000c1e9d00).write_barrier == 5
    assert sass.decode_control(0x0200640000301000).wait_mask == 1 << 5


def test_independent_loads_cost_one_round_trip():
    loop = [("LDG.E.128 R4, desc[UR4][R2.64]", high_word(wb=0)),
            ("LDG.E.128 R8, desc[UR4][R2.64+0x10]", high_word(wb=1)),
            ("FADD R4, R4, R8", high_word(wait=0b11)),
            ("STG.E.128 desc[UR4][R2.64], R4", high_word()),
            ("BRA 0x0", high_word())]
    assert trips_of(loop) == 1


def test_a_load_issued_after_a_wait_is_a_second_round_trip():
    loop = [("LDG.E.128 R4, desc[UR4][R2.64]", high_word(wb=0)),
            ("FADD R4, R4, R4", high_word(wait=0b1)),
            ("LDG.E.128 R8, desc[UR4][R2.64+0x10]", high_word(wb=1)),
            ("FADD R8, R8, R4", high_word(wait=0b10)),
            ("BRA 0x0", high_word())]
    assert trips_of(loop) == 2


def test_a_late_wait_on_an_early_load_is_free():
    loop = [("LDG.E.128 R4, desc[UR4][R2.64]", high_word(wb=0)),
            ("LDG.E.128 R8, desc[UR4][R2.64+0x10]", high_word(wb=1)),
            ("FADD R4, R4, R4", high_word(wait=0b1)),
            ("FADD R8, R8, R4", high_word(wait=0b10)),  # issued before the first wait
            ("BRA 0x0", high_word())]
    assert trips_of(loop) == 1


def test_dtype_switch_is_decided_by_the_parameters():
    """A switch on a dtype byte of the parameters: with bf16 (2) only the one-load path
    runs; with every branch open the two-load path counts."""
    loop = [("LDC.U8 R1, c[0x0][0x238]", high_word()),                 # 0x00: x_dtype
            ("PRMT R2, R1, 0x9910, RZ", high_word()),                   # 0x10
            ("ISETP.NE.AND P0, PT, R2, 0x2, PT", high_word()),          # 0x20: bf16?
            ("@P0 BRA 0x70", high_word()),                              # 0x30
            ("LDG.E.128 R4, desc[UR4][R2.64]", high_word(wb=0)),        # 0x40: bf16 path
            ("FADD R4, R4, R4", high_word(wait=0b1)),                   # 0x50
            ("BRA 0xb0", high_word()),                                  # 0x60
            ("LDG.E.128 R4, desc[UR4][R2.64]", high_word(wb=0)),        # 0x70: other dtypes
            ("FADD R4, R4, R4", high_word(wait=0b1)),                   # 0x80
            ("LDG.E.128 R8, desc[UR4][R2.64+0x10]", high_word(wb=1)),   # 0x90
            ("FADD R4, R4, R8", high_word(wait=0b10)),                  # 0xa0
            ("BRA 0x0", high_word())]                                   # 0xb0: next row
    assert trips_of(loop, fields={0x28: 2}) == 1
    assert trips_of(loop) == 2


def _flag_switch(before=(), after=()):
    """A switch on a flag byte loaded into UR8 (`before` runs between the load and the
    compare into P0, `after` between the compare and the branch): one load on the
    flag's path, two on the other."""
    between = list(before) + list(after)
    return ([("ULDC.U8 UR8, c[0x0][0x21d]", high_word())] + list(before) +          # memory_efficient
            [("ISETP.NE.AND P0, PT, RZ, UR8, PT", high_word())] + list(after) +
            [("@P0 BRA 0x{:x}".format(16 * (len(between) + 6)), high_word()),
             ("LDG.E.128 R4, desc[UR4][R2.64]", high_word(wb=0)),
             ("FADD R4, R4, R4", high_word(wait=0b1)),
             ("BRA 0x{:x}".format(16 * (len(between) + 10)), high_word()),
             ("LDG.E.128 R4, desc[UR4][R2.64]", high_word(wb=0)),
             ("FADD R4, R4, R4", high_word(wait=0b1)),
             ("LDG.E.128 R8, desc[UR4][R2.64+0x10]", high_word(wb=1)),
             ("FADD R4, R4, R8", high_word(wait=0b10)),
             ("BRA 0x0", high_word())])


def test_wide_loads_and_carry_outs_forget_exactly_what_they_write():
    """A 64-bit load into UR6 writes UR6 and UR7, so UR8 keeps the flag and the switch
    is decided; one into UR8, or a 128-bit one into UR6, overwrites it (both paths
    open). A carry-out predicate (IADD3 R14, P0, ...) or a shuffle's predicate
    overwrites P0; a shuffle writing PT does not."""
    flag = {0xd: 0}
    assert trips_of(_flag_switch(), fields=flag) == 1
    assert trips_of(_flag_switch(), fields=None) == 2
    assert trips_of(_flag_switch(before=[("ULDC.64 UR6, c[0x0][0x300]", high_word())]), fields=flag) == 1
    assert trips_of(_flag_switch(before=[("ULDC.64 UR8, c[0x0][0x300]", high_word())]), fields=flag) == 2
    assert trips_of(_flag_switch(before=[("ULDC.128 UR6, c[0x0][0x300]", high_word())]), fields=flag) == 2
    assert trips_of(_flag_switch(after=[("IADD3 R14, P0, R2, R3, RZ", high_word())]), fields=flag) == 2
    assert trips_of(_flag_switch(after=[("SHFL.BFLY P0, R3, R2, 0x1, 0x1f", high_word())]), fields=flag) == 2
    assert trips_of(_flag_switch(after=[("SHFL.BFLY PT, R3, R2, 0x1, 0x1f", high_word())]), fields=flag) == 1


# ---- the real kernels --------------------------------------------------------------------

# Most dependent global round trips per row-loop iteration of an all-bf16 LayerNorm
# call (sm_90, nvcc 13.0), and the fewest warps per SM at a launch of the bucket.
# Rows kernels with a compiled dtype mix: one round trip per row in the forward; in
# the backward one with 16 elements per thread and two with 32 (d(residual_out) is
# loaded after the reductions there, to stay clear of spills).
MAX_TRIPS_TYPED = {("fwd", 2): 1, ("fwd", 4): 1, ("bwd", 2): 1, ("bwd", 4): 2}
# The same for the typed cluster kernels (the exchange through peer shared memory is
# not a global round trip; the model adds it). With 16 elements per thread the row's
# inputs come from the thread's own cp.async buffer, and the trips left are the
# parameter staging and the next row's rstd.
MAX_TRIPS_CLUSTER = {("fwd", 2): 2, ("fwd", 4): 3, ("bwd", 2): 4, ("bwd", 4): 5}
MAX_TRIPS = {
    # the generic (run-time dtype) rows kernels: fallbacks for other mixes
    "add_norm_fwd_rows_kernel<any,2,8,512,1>": 4,
    "add_norm_fwd_rows_kernel<any,4,8,512,1>": 4,
    "add_norm_bwd_rows_kernel<any,2,8,512,1>": 6,
    "add_norm_bwd_rows_kernel<any,4,8,512,1>": 10,
    # with the ring (st=2) a row's inputs come from the thread's own copies (the
    # backward's trip left is the rstd loaded a row ahead)
    "add_norm_fwd_rows_kernel<any,2,8,512,2>": 0,
    "add_norm_fwd_rows_kernel<any,4,8,512,2>": 0,
    "add_norm_bwd_rows_kernel<any,2,8,512,2>": 1,
    # wide rows (H > 16384)
    # 48 on the path without a weight_offset (unchanged by it); 50 on the offset's path
    "add_norm_fwd_staged_kernel<16,8,512>": 50,
    "add_norm_fwd_streamed_kernel<8,f,512>": 6,
    "add_norm_bwd_streamed_kernel<8,f,512>": 14,  # 28 before its partials were vectorised
}
# H = 12288 runs the 32-element rows kernel with 384 threads, one CTA per SM (95
# registers): 12 warps.
MIN_WARPS_PER_SM = {("fwd", 12288): 12, ("bwd", 12288): 12, ("fwd", 32768): 8, ("bwd", 32768): 16}
DEFAULT_MIN_WARPS = 16
# The calibrated model (bench/perf_model.py) on today's kernels may predict at most
# this many points of H200 copy below its prediction for the kernels the H200 measured
# (bench/results/nvidia_h200/kernel_facts.json): a change it predicts slower fails.
MAX_PREDICTED_LOSS = 3.0


@pytest.fixture(scope="module")
def audits(kernel_build):
    if not kernel_build.sass:
        pytest.skip("cuobjdump/nvdisasm not found (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)")
    return sass.audit(kernel_build, "90")


@pytest.fixture(scope="module")
def rows(kernel_build, audits):
    return sa.table(kernel_build, cuda_emulator.make_emulator(kernel_build))


def test_no_kernel_uses_local_memory(audits):
    local = {a.short: a.local_accesses for a in audits.values() if a.local_accesses}
    assert not local, f"kernels with local memory accesses (LDL/STL): {local}"


def vec_of(name: str) -> int:
    """VEC, the elements per access, from the kernel's template arguments."""
    args = sa._args(name)
    if "rows_kernel" in name or "cluster_kernel" in name:
        return args[1]   # <MIX, CHUNKS, VEC, MAX_BLOCK>
    if "staged_kernel" in name:
        return args[1]   # <CHUNKS, VEC, MAX_BLOCK>
    if "streamed_kernel" in name:
        return args[0]   # <VEC, acc_t, BLOCK>
    return 1


def test_vectorised_kernels_use_16_byte_accesses(audits):
    for a in audits.values():
        if vec_of(a.name) != 8:
            continue
        assert a.loads.get(128) and a.stores.get(128), f"{a.short}: no 128-bit loads/stores"
        narrow = {w: n for w, n in (a.loads + a.stores).items() if w < 32}
        assert not narrow, f"{a.short}: global accesses narrower than 32 bits {narrow}"


def test_hot_kernels_keep_their_round_trips(audits):
    by_short = {a.short: a for a in audits.values()}
    for short, limit in MAX_TRIPS.items():
        assert short in by_short, f"{short} is no longer compiled: update MAX_TRIPS"
        got = by_short[short].trips
        assert got <= limit, f"{short}: {got} dependent round trips per row, limit {limit}"


@pytest.mark.parametrize("family,limits", [("_rows_kernel", MAX_TRIPS_TYPED), ("_cluster_kernel", MAX_TRIPS_CLUSTER)],
                         ids=["rows", "cluster"])
def test_typed_kernels_keep_their_round_trips(audits, family, limits):
    typed = [a for a in audits.values() if family in a.name and "<any," not in a.short]
    assert len(typed) >= 20, f"only {len(typed)} dtype-specialised {family.strip('_')}s compiled"
    for a in typed:
        direction = "fwd" if "_fwd_" in a.name else "bwd"
        limit = limits[(direction, sa._args(a.name)[0])]
        # every dtype mix: a typed kernel has no dtype branch left to prune
        assert a.trips_any <= limit, f"{a.short}: {a.trips_any} dependent round trips per row, limit {limit}"


def test_the_model_predicts_no_loss_against_the_measured_kernels(rows):
    checked = 0
    for r in rows:
        for norm, before in r.measured_kernels.items():
            now = r.predicted.get(norm)
            assert now is not None, f"{r.direction} {norm} H={r.hidden}: no prediction for today's kernel"
            assert now >= before - MAX_PREDICTED_LOSS, (
                f"{r.direction} {norm} H={r.hidden} {r.kernel}: predicted {now:.0f}% of copy, "
                f"{before:.0f}% for the kernels the H200 measured")
            checked += 1
    assert checked >= 30


def test_every_bucket_keeps_its_occupancy(rows):
    for r in rows:
        need = MIN_WARPS_PER_SM.get((r.direction, r.hidden), DEFAULT_MIN_WARPS)
        assert r.warps_per_sm >= need, f"{r.direction} H={r.hidden} {r.kernel}: {r.warps_per_sm} warps/SM"


def test_notes_table_is_current(kernel_build, audits, rows):
    """bench/NOTES.md carries the table this audit generates (python bench/sass_audit.py
    --notes), for the nvcc that wrote it."""
    with open(sa.NOTES) as f:
        notes = f.read()
    section = notes.split(sa.BEGIN, 1)[1].split(sa.END, 1)[0].strip()
    recorded = re.search(r"\(nvcc ([^)]*)\)", section)
    current = sa.markdown(rows, sa.kernel_table(kernel_build))
    if recorded and recorded.group(1) not in current:
        pytest.skip(f"the table was generated by nvcc {recorded.group(1)}")
    assert section == current.strip(), "bench/NOTES.md is stale: run python bench/sass_audit.py --notes"


def test_predicted_variants_are_current(kernel_build, audits):
    """bench/predicted_variants.json, the order in which make gpu-tune times the variant
    jobs, is what the calibrated model says of today's kernels (python
    bench/sass_audit.py --variants), at gpu-tune's sizes, for the nvcc that wrote it."""
    import json

    from bench import gpu_tune

    del audits  # skips without cuobjdump
    assert sa.VARIANT_HIDDEN == tuple(gpu_tune.HIDDEN)
    with open(sa.NOTES) as f:
        notes = f.read()
    section = notes.split(sa.VARIANTS_BEGIN, 1)[1].split(sa.VARIANTS_END, 1)[0].strip()
    recorded_nvcc = re.search(r"\(nvcc ([^)]*)\)", section)
    current_nvcc = cubin._nvcc_version().split(",")[-1].strip()
    if recorded_nvcc and recorded_nvcc.group(1) != current_nvcc:
        pytest.skip(f"the predictions were generated by nvcc {recorded_nvcc.group(1)}")
    with open(sa.PREDICTED_VARIANTS) as f:
        recorded = json.load(f)
    current = sa.predict_variants(kernel_build, cuda_emulator.make_emulator(kernel_build))
    assert current, "no candidate variant planned at any size"
    assert recorded == current, "bench/predicted_variants.json is stale: run python bench/sass_audit.py --variants"
    assert section == sa.variants_markdown(current).strip()

