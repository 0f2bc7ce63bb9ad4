"""The measured table dispatch follows (csrc/kernels/tuned_table.h, made by
bench/make_table.py from tuning runs): generated from the runs it names, an entry for
every hidden size of each (GPU, direction, norm, form, mix) it lists, only variants
the library parses, never one a run found wrong, and followed by dispatch (on an
emulator built with a table from a recorded run)."""

import json
import os
import re
import subprocess
import sys

import pytest

from bench import make_table, report, variants
from tools import cuda_emulator

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def committed_rows():
    with open(make_table.TABLE) as f:
        return make_table.parse_table(f.read())


def committed_sources():
    with open(make_table.TABLE) as f:
        text = f.read()
    source = json.loads(re.search(r"kTunedTableSource = (\".*\");", text).group(1))
    return [os.path.join(ROOT, s.split(" (")[0]) for s in source.split("; ") if s]


def check_coverage(rows):
    """Every (GPU, direction, norm, form, mix) listed covers 1..262144 exactly once."""
    groups = {}
    for r in rows:
        if r["device"]:
            groups.setdefault((r["device"], r["direction"], r["rms"], r["prenorm"], r["mix"]), []).append(r)
    for key, entries in groups.items():
        entries.sort(key=lambda r: r["lo"])
        assert entries[0]["lo"] == 1 and entries[-1]["hi"] == make_table.MAX_HIDDEN, key
        for a, b in zip(entries, entries[1:]):
            assert b["lo"] == a["hi"] + 1, (key, a, b)
        assert all(r["lo"] <= r["hi"] for r in entries), key
        assert 0 <= key[4] < len(variants.TABLE_MIXES), key
    return groups


def test_the_committed_table_is_what_its_runs_give():
    sources = committed_sources()
    assert sources, "the table names no run"
    for path in sources:
        assert os.path.exists(path), f"the table's run {path} is not committed"
    with open(make_table.TABLE) as f:
        assert f.read() == make_table.build(sources), "stale: rerun bench/make_table.py on its runs"


def test_the_committed_table_covers_every_size_of_what_it_lists():
    assert check_coverage(committed_rows())


def test_the_committed_table_matches_its_kernels_max_hidden():
    with open(os.path.join(cuda_emulator.KERNELS, "add_norm.h")) as f:
        assert int(re.search(r"kMaxHidden = (\d+);", f.read()).group(1)) == make_table.MAX_HIDDEN


def write_run(folder, rows, gpu="NVIDIA H200", wrong=()):
    """A recorded tuning run: results.csv, env.json and stages.json in `folder`."""
    os.makedirs(folder, exist_ok=True)
    report.write_csv(rows, os.path.join(folder, "results.csv"))
    with open(os.path.join(folder, "env.json"), "w") as f:
        json.dump({"gpu": gpu, "date": "2026-12-05", "torch": "test"}, f)
    with open(os.path.join(folder, "stages.json"), "w") as f:
        json.dump({"correctness": {"wrong": [dict(direction=d, variant=v, verdict="WRONG") for d, v in wrong]}}, f)
    return os.path.join(folder, "results.csv")


def row(hidden, provider, ms, mode="fwd", variant="", norm="layer", form="pre", dtype="bfloat16",
        residual="bfloat16", memory_efficient=False, table="sweep", note=""):
    return dict(table=table, norm=norm, form=form, mode=mode, dtype=dtype, residual=residual,
                memory_efficient=memory_efficient, rows=(1 << 26) // hidden, hidden=hidden, provider=provider, ms=ms,
                variant=variant, note=note)


V = variants.provider_name


def recorded_rows():
    """A run at 1024, 4096 and 65536 (bf16 LayerNorm pre-norm): a variant that wins
    clearly, one within the margin, one found wrong, one refused, memory-efficient and
    decode rows (which never count)."""
    return [
        row(1024, "residual_fused", 1.00, variant="rows:pt=16,tb=256"),
        row(1024, V("rows:pt=32,tb=512"), 0.80, variant="rows:pt=32,tb=512"),  # wins
        row(1024, V("rows:pt=16,tb=128"), 0.50, variant="rows:pt=16,tb=128"),  # fastest, but found wrong
        row(1024, V("staged"), None, note="refused"),
        row(1024, V("streamed"), 0.10, variant="streamed", memory_efficient=True),
        row(1024, V("streamed"), 0.10, variant="streamed", table="decode"),
        row(4096, "residual_fused", 1.00, variant="rows:pt=16,tb=256"),
        row(4096, V("rows:pt=32,tb=512"), 0.99, variant="rows:pt=32,tb=512"),  # within the margin: rule
        row(65536, "residual_fused", 2.00, variant="cluster:pt=16,cs=8"),
        row(65536, V("cluster:pt=32"), 1.50, variant="cluster:pt=32,cs=4"),  # what ran, choices filled in
        row(1024, "residual_fused", 1.00, mode="bwd", variant="rows:pt=16,tb=512,red=sliced"),
        row(1024, V("rows:pt=32,tb=512"), 0.70, mode="bwd", variant="rows:pt=32,tb=512,red=sliced"),
        row(1024, "eager", 0.01),  # another provider never wins
    ]


def test_the_generator_picks_the_fastest_correct_variant_per_bucket(tmp_path):
    path = write_run(str(tmp_path / "run"), recorded_rows(), wrong=[("fwd", "rows:pt=16,tb=128")])
    rows = make_table.parse_table(make_table.build([path]))
    groups = check_coverage(rows)
    assert set(groups) == {("NVIDIA H200", "fwd", False, True, 0), ("NVIDIA H200", "bwd", False, True, 0)}
    fwd = [(r["lo"], r["hi"], r["variant"]) for r in groups[("NVIDIA H200", "fwd", False, True, 0)]]
    # variants as asked: what they resolved at the run's row count (cs=4, red=sliced) stays automatic
    assert fwd == [(1, 2048, "rows:pt=32,tb=512"), (2049, 16384, "rule"), (16385, 262144, "cluster:pt=32")]
    bwd = [(r["lo"], r["hi"], r["variant"]) for r in groups[("NVIDIA H200", "bwd", False, True, 0)]]
    assert bwd == [(1, 262144, "rows:pt=32,tb=512")]


def test_the_baseline_is_the_rule_under_the_override_when_the_run_has_it(tmp_path):
    """The library's own row ran whatever table it had; with the rule timed under the
    override beside it, only that counts as the rule."""
    rows_in = [row(1024, "residual_fused", 0.50, variant="rows:pt=32,tb=512"),  # the old table's choice
               row(1024, V("rule"), 1.00, variant="rows:pt=16,tb=256"),
               row(1024, V("rows:pt=32,tb=512"), 0.52, variant="rows:pt=32,tb=512")]
    path = write_run(str(tmp_path / "run"), rows_in)
    rows = make_table.parse_table(make_table.build([path]))
    assert [(r["lo"], r["hi"], r["variant"]) for r in rows] == [(1, 262144, "rows:pt=32,tb=512")]


def test_a_variant_found_wrong_never_wins_even_alone(tmp_path):
    rows_in = [row(1024, V("rows:pt=32,tb=512"), 0.5, variant="rows:pt=32,tb=512")]
    path = write_run(str(tmp_path / "run"), rows_in, wrong=[("fwd", "rows:pt=32,tb=512")])
    assert [r["device"] for r in make_table.parse_table(make_table.build([path]))] == [""]  # no entry


def test_a_cpu_run_or_no_run_gives_a_table_that_matches_no_gpu(tmp_path):
    path = write_run(str(tmp_path / "run"), recorded_rows(), gpu=None)
    text = make_table.build([path])
    assert [r["device"] for r in make_table.parse_table(text)] == [""]


@pytest.mark.slow
def test_every_committed_entry_names_a_variant_the_library_parses():
    try:
        lib = cuda_emulator.build_cached()
    except FileNotFoundError as why:
        pytest.skip(str(why))
    entry = variants.Entry(cuda_emulator.Emulator(lib).lib)
    for r in committed_rows():
        entry.set(r["direction"] if r["device"] else "fwd", r["variant"])
    entry.set("fwd", "")
    entry.set("bwd", "")


@pytest.mark.slow
def test_dispatch_follows_a_table_made_from_a_recorded_run(tmp_path, request):
    """An emulator built with the table of recorded_rows(): on a GPU of that name, the
    table's variant runs where it can; the rule runs where the table says "rule",
    where its variant cannot run the call, for another GPU and for another mix."""
    import emulated_cases as cases

    import mutants

    if cuda_emulator.compiler() is None or cuda_emulator.cuda_include_dir() is None:
        pytest.skip("needs a C++17 compiler and the CUDA headers")
    path = write_run(str(tmp_path / "run"), recorded_rows(), wrong=[("fwd", "rows:pt=16,tb=128")])
    table = str(tmp_path / "tuned_table.h")
    subprocess.run([sys.executable, os.path.join(ROOT, "bench", "make_table.py"), path, "--out", table],
                   check=True, capture_output=True)
    with open(table) as f:
        text = f.read()
    # Today's emulator objects, with the sources that include the table rebuilt against this one.
    lib = mutants.build_mutant("tuned_table.h", text, mutants.baseline_objects(), str(tmp_path / "build"))
    try:
        build = request.getfixturevalue("kernel_build")
    except pytest.skip.Exception:
        build = None
    emu = cuda_emulator.Emulator(lib, build)
    entry = variants.Entry(emu.lib)

    def ran(device, hidden, flags="ln_bf16_pre"):
        emu.configure("h100", sm_count=16)
        emu.set_device_name(device)
        cases.check(emu, 3, hidden, cases.FLAGS[flags])
        return entry.last("fwd"), entry.last("bwd")

    assert ran("NVIDIA H200", 1024) == ("rows:pt=32,tb=512,st=1", "rows:pt=32,tb=512,red=columns,st=1")
    assert ran("NVIDIA H100 80GB HBM3", 1024) == ("rows:pt=16,tb=256,st=1", "rows:pt=16,tb=512,red=columns,st=1")
    assert ran("NVIDIA H200", 4096)[0] == "rows:pt=16,tb=256,st=1"  # "rule"
    assert ran("NVIDIA H200", 1001)[0] == "rows:tb=256,st=1"  # element-wise: the table's pt cannot run
    assert ran("NVIDIA H200", 1024, "ln_mixed_pre")[0] == "rows:pt=16,tb=256,st=1"  # a mix the table does not list
    assert ran("NVIDIA H200", 16392)[0] == "cluster:pt=32,cs=2"  # a cluster the rule would not pick
    assert ran("NVIDIA H100 80GB HBM3", 16392)[0] == "cluster:pt=16,cs=3"
    cases.check_tuned_table(emu, table)
    assert entry.table_source().endswith("(NVIDIA H200, 2026-12-05, torch test)")
