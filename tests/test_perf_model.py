"""The performance model (bench/perf_model.py) against every bf16 row the H200 measured.

The kernels each run measured are described by bench/results/nvidia_h200/kernel_facts.json
(bench/model_facts.py, read from the commit that ran); the model, with its calibrated
constants, must predict every measured sweep row within TOLERANCE points of copy
bandwidth (the rows listed in KNOWN_MISSES no further off than recorded there), and
every decode row's time within DECODE_TIME_TOLERANCE. A change
of the model or of its constants that moves any row further away fails here.
"""

import dataclasses
import os
import re

import pytest

from bench import perf_model as pm


@pytest.fixture(scope="module")
def compared():
    return pm.compare()


def test_every_measured_row_has_the_facts_of_its_kernels():
    facts = pm.load_facts()
    rows = pm.measured_rows()
    assert len(rows) >= 240, f"only {len(rows)} bf16 rows in the committed runs"
    missing = [m for m in rows if pm.launch_for(m, facts) is None]
    assert not missing, f"measured rows without kernel facts (python bench/model_facts.py): {missing[:5]}"
    assert {m.run for m in rows} == set(pm.RUNS)


def test_the_model_reproduces_every_measured_row(compared):
    bad = []
    for m, pred in compared:
        if m.table == "decode":  # launch-bound, a few % of copy: checked on time
            if abs(pm.time_miss(m, pred)) > pm.DECODE_TIME_TOLERANCE:
                bad.append(f"{pm.row_key(m)}: predicted time {pm.time_miss(m, pred):+.0%} of the measured")
            continue
        miss = pred - m.pct
        allowed = pm.KNOWN_MISSES.get(pm.row_key(m))
        if allowed is None:
            if abs(miss) > pm.TOLERANCE:
                bad.append(f"{pm.row_key(m)}: measured {m.pct:.1f}%, predicted {pred:.1f}%")
        elif abs(miss) > abs(allowed) + 0.5 or miss * allowed < 0:
            bad.append(f"{pm.row_key(m)}: miss {miss:+.1f}, recorded {allowed:+.1f}")
    assert not bad, "the model drifted from the H200 measurements:\n" + "\n".join(bad)


def test_known_misses_are_real_rows_and_still_misses(compared):
    """Every listed exception is a measured row that the model still misses by more
    than TOLERANCE: a row it now reproduces leaves the list."""
    by_key = {pm.row_key(m): pred - m.pct for m, pred in compared}
    for key, recorded in pm.KNOWN_MISSES.items():
        assert key in by_key, f"{key} is not a measured row"
        assert abs(by_key[key]) > pm.TOLERANCE, f"{key} is now within {pm.TOLERANCE} points: drop it"
    assert len(pm.KNOWN_MISSES) <= len(by_key) // 20


def test_constants_stay_in_their_physical_ranges():
    for name, (lo, hi) in pm.FITTED.items():
        value = getattr(pm.CALIBRATED, name)
        assert lo <= value <= hi, f"{name} = {value} outside [{lo}, {hi}]"


def _record(**over):
    f = dict(direction="bwd", norm="layer", hidden=4096, rows=16384, block=512, grid=132, ctas_per_sm=1,
             cluster=1, kernel="_ZN14residual_fused24add_norm_bwd_rows_kernelILi2ELi8ELi512EEEvNS_16AddNormBwdParamsE",
             short="add_norm_bwd_rows_kernel<2,8,512>", registers=128, trips=1, inner=[],
             instructions=900, barriers=4, cluster_waits=0, shuffles=3, async_copies=0)
    f.update(over)
    return f


def _pct(**over):
    f = _record(**over)
    c = pm.Launch(f["direction"], f["norm"], "pre", f["hidden"], f["rows"], 8.0 * f["rows"] * f["hidden"],
                  pm.H200_COPY_GBS, f)
    return pm.predict_pct(pm.CALIBRATED, c)


def test_the_model_answers_the_way_the_hardware_does():
    base = _pct()
    assert 0 < base < 100
    assert _pct(trips=3) < base, "more dependent round trips must cost time"
    assert _pct(instructions=1800) < base, "more instructions must cost time"
    assert _pct(barriers=8) < base, "more barriers must cost time"
    assert _pct(async_copies=4) > base, "copying the next row ahead must help a serial CTA"
    assert _pct(ctas_per_sm=2, grid=264, block=256) > _pct(block=256), "a second CTA per SM overlaps"
    # A cluster that leaves SMs idle moves fewer bytes than one that fills them.
    cluster = dict(hidden=65536, rows=1024, kernel="_ZN14residual_fused27add_norm_bwd_cluster_kernelI",
                   cluster_waits=1)
    assert _pct(cluster=16, grid=128, **cluster) < _pct(cluster=8, grid=120, **cluster)
    assert pm.clusters_resident(8, 1) == 15 and pm.clusters_resident(16, 1) == 7
    assert pm.clusters_resident(8, 2) == 30  # as ncu reported on the H200


def test_notes_carry_the_current_comparison():
    with open(os.path.join(os.path.dirname(pm.HERE), "bench", "NOTES.md")) as f:
        notes = f.read()
    begin, end = pm.NOTES_MARKERS
    assert begin in notes, f"bench/NOTES.md has no {begin} section"
    section = notes.split(begin, 1)[1].split(end, 1)[0].strip()
    assert section == pm.markdown().strip(), "bench/NOTES.md is stale: run python bench/perf_model.py --notes"


def test_fitted_constants_are_fields_of_params_and_predictions_say_so():
    fields = {f.name for f in dataclasses.fields(pm.Params)}
    assert set(pm.FITTED) <= fields
    assert re.search(r"predicted \(model calibrated on H200 runs\)", pm.__doc__)
