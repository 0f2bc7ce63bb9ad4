"""make gpu-tune's logic without a GPU: the plan and its predicted device time, the
stages and their limits, the deadline, results appended as they come, resumption.
The timed runs here are on CPU with tiny shapes (their times mean nothing)."""

import contextlib
import json
import os
import subprocess
import sys
import time

import pytest

from bench import gpu_tune, report

ROOT = os.path.join(os.path.dirname(__file__), "..")
TINY = ["--device", "cpu", "--hidden", "64", "128", "--dtypes", "bf16", "--modes", "fwd", "bwd", "--no-decode",
        "--repeats", "2", "--elements", "2048", "--compile-workers", "0"]


def test_dry_run_fits_six_minutes_and_runs_the_main_rows_first(capsys):
    plan = gpu_tune.main(["--dry-run"])
    seconds = plan["predicted_seconds"]
    assert seconds["total"] <= 360 and seconds["build"] > 0 and seconds["sweep"] > 0
    assert plan["variants"] == {d: list(v) for d, v in gpu_tune.VARIANTS.items()}
    assert plan["stages"] == ["build", "imports and env", "correct", "sweep", "page"]
    jobs = gpu_tune.plan_jobs()
    # bf16 over every hidden size, then the decode shapes, before any other dtype mix
    assert [j.cfg.hidden for j in jobs[:60:4]] == list(gpu_tune.HIDDEN)
    assert {j.table for j in jobs[60:60 + 54]} == {"decode"}
    # then the bf16 kernel variants, the largest gain the calibrated model predicts first
    tune = jobs[114:174]
    assert all(j.tune and j.modes == ("fwd", "bwd") for j in tune) and not any(j.tune for j in jobs[:114])
    gains = [gpu_tune.predicted_gain(j.cfg.norm, j.cfg.hidden, j.modes) for j in tune]
    assert gains == sorted(gains, reverse=True) and gains[0] > 10 and gains[-1] < gains[0]
    assert {(j.cfg.norm, j.cfg.prenorm, j.cfg.hidden) for j in tune} == {
        (n, p, h) for n, p in gpu_tune.VARIANT_FORMS for h in gpu_tune.HIDDEN}
    # equal predictions keep the order of VARIANT_FORMS, then of hidden size
    ties = [(gpu_tune.VARIANT_FORMS.index((j.cfg.norm, j.cfg.prenorm)), j.cfg.hidden) for j in tune
            if gpu_tune.predicted_gain(j.cfg.norm, j.cfg.hidden, j.modes) == gains[-1]]
    assert len(ties) > 1 and ties == sorted(ties)
    assert plan["jobs_that_fit"] >= 60 + 54 + 15, plan  # bf16, decode and one form's variants fit
    assert plan["jobs_timing_variants"] >= 15
    assert plan["jobs"] == len(jobs) == 4 * 60 + 54 + 60
    out = capsys.readouterr().out
    assert "predicted device seconds" in out and "not a measurement" in out


def test_predicted_gain_reads_the_models_predictions(tmp_path):
    assert gpu_tune.predicted_gain("layer", 4096, ("fwd", "bwd"), path=str(tmp_path / "none.json")) == 0.0
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"bwd|layer|4096": {"rule": 50.0, "rows:pt=32,tb=512": 61.5},
                                "fwd|layer|4096": {"rule": 80.0}}))
    assert gpu_tune.predicted_gain("layer", 4096, ("fwd", "bwd"), path=str(path)) == 11.5
    assert gpu_tune.predicted_gain("layer", 4096, ("fwd",), path=str(path)) == 0.0
    assert gpu_tune.predicted_gain("rms", 4096, ("fwd", "bwd"), path=str(path)) == 0.0


def test_schedule_cuts_what_does_not_fit_and_keeps_order():
    jobs = gpu_tune.plan_jobs(hidden=[4096, 262144], dtypes=["bf16"], decode=False)
    model = gpu_tune.DeviceModel()
    each = [sum(model.provider_seconds(j, n, 30) for n in ("eager", "residual_fused")) for j in jobs]
    budget = sum(each[:3]) + 1e-9
    kept, cut, total = gpu_tune.schedule(jobs, ["eager", "residual_fused"], model, budget)
    assert kept[:3] == jobs[:3] and [j for j in jobs if j in kept] == kept  # in order, the first ones first
    assert total <= budget and len(kept) + len(cut) == len(jobs) and cut
    # the compiled provider is charged its graph loads on top of its calls
    job = jobs[0]
    assert model.provider_seconds(job, "compile", 30) > model.provider_seconds(job, "eager", 30)


def test_run_appends_as_it_goes_and_resumes(tmp_path):
    out = str(tmp_path / "tune")
    first = gpu_tune.main(TINY + ["--providers", "eager", "residual_fused", "--out", out])
    rows = report.read_csv(os.path.join(out, "results.csv"))
    assert first["measured_jobs"] == 8 and first["resumed_past"] == 0
    assert first["correctness"]["wrong"] == [] and first["correctness"]["checked"] == 6  # bf16: 3 sizes x 2 norms
    assert len(rows) == 8 * 2 * 2  # jobs x modes x providers
    assert all(r["ms"] > 0 and r["pct_copy"] > 0 for r in rows)
    assert set(first["stages"]) == {"correct", "sweep", "page"}
    again = gpu_tune.main(TINY + ["--providers", "eager", "residual_fused", "--out", out])
    assert again["resumed_past"] == 8 and again["measured_jobs"] == 0
    assert len(report.read_csv(os.path.join(out, "results.csv"))) == len(rows)
    assert os.path.exists(os.path.join(out, "stages.json")) and os.path.exists(os.path.join(out, "env.json"))
    with open(first["page"]) as f:  # the results page, with ours against the fastest other provider
        page = f.read()
    assert "## Ours against the fastest other provider" in page
    assert page.count("| sweep | ") >= 8 * 2  # every job and mode


class FakeEntry:
    """The library's variant entry points, as a CPU run can have them: the override is
    recorded, the library's CPU kernels run whatever it says, and the fake provider
    below refuses or corrupts the forward variants a test names."""

    def __init__(self):
        self.forced = {"fwd": "", "bwd": ""}

    @contextlib.contextmanager
    def override(self, direction, text):
        self.forced[direction] = text
        try:
            yield
        finally:
            self.forced[direction] = ""

    def last(self, direction):
        return self.forced[direction] or "rows:pt=16,tb=256"

    def table_source(self):
        return ""


def test_every_variant_is_checked_then_timed_or_reported(tmp_path, monkeypatch):
    """Through run() on CPU with FakeEntry: a forward variant refused for a shape and
    one that computes wrong (found by the correctness stage, then never timed) are rows
    that say so; every other candidate of each direction is timed with what ran; a
    rerun resumes past them all; the page summarises the variants."""
    entry = FakeEntry()
    refused, wrong = "staged", "streamed"
    make = gpu_tune.providers.make

    def fake_make(name, cfg, device):
        fn = make(name, cfg, device)
        if name != "residual_fused":
            return fn

        def call(*args):
            v = entry.forced["fwd"]
            if v == refused:
                raise RuntimeError(f"residual_fused::add_norm_fwd: kernel launch failed: the tuning variant '{v}' "
                                   f"cannot run this call (hidden {cfg.hidden}): staged: the row is too wide")
            out = fn(*args)
            return tuple(o * 1.5 for o in out) if v == wrong and isinstance(out, tuple) else (
                out * 1.5 if v == wrong else out)
        return call

    monkeypatch.setattr(gpu_tune, "tuning_entry", lambda device: entry)
    monkeypatch.setattr(gpu_tune.providers, "make", fake_make)
    monkeypatch.setattr(gpu_tune, "CORRECTNESS_HIDDEN", (768,))  # CPU: one size keeps it short
    out = str(tmp_path / "tune")
    args = TINY + ["--hidden", "64", "--providers", "eager", "residual_fused", "--out", out]
    summary = gpu_tune.main(args)
    rows = report.read_csv(os.path.join(out, "results.csv"))
    found = {(r["direction"], r["variant"]) for r in summary["correctness"]["wrong"]}
    assert found == {("fwd", wrong)}, summary["correctness"]
    tuned = [r for r in rows if gpu_tune.variants.variant_of_provider(r["provider"])]
    for mode, names in gpu_tune.VARIANTS.items():
        for v in names[1:]:
            got = [r for r in tuned if r["mode"] == mode and r["provider"] == gpu_tune.variants.provider_name(v)]
            assert len(got) == 4, (mode, v, got)  # one per (norm, form)
            for r in got:
                if (mode, v) == ("fwd", refused):
                    assert r["ms"] is None and r["note"].startswith("refused: ") and "staged" in r["note"]
                elif (mode, v) == ("fwd", wrong):
                    assert r["ms"] is None and r["note"].startswith("WRONG in the correctness stage")
                else:
                    assert r["ms"] > 0 and r["variant"] == v and r["pct_copy"] > 0, r
    forced = [r for r in tuned if r["provider"] == gpu_tune.variants.provider_name("rule")]
    assert len(forced) == 2 * 4 and all(r["ms"] > 0 for r in forced)  # the rule under the override: the baseline
    rule = [r for r in rows if r["provider"] == "residual_fused"]
    assert rule and all(r["variant"] for r in rule)  # which variant the rule's rows ran
    again = gpu_tune.main(args)
    assert again["resumed_past"] == 8 and len(report.read_csv(os.path.join(out, "results.csv"))) == len(rows)
    with open(summary["page"]) as f:
        page = f.read()
    assert "## Kernel variants: the rule against the fastest variant" in page
    assert "residual_fused[" not in page.split("## Ours against")[0]  # the main tables show no variant rows


def test_deadline_cuts_the_sweep_and_keeps_what_was_measured(tmp_path, monkeypatch):
    class Slow(gpu_tune.DeviceModel):  # each job predicted at 4 s: more than the sweep has
        def __init__(self):
            super().__init__(setup_s=2.0)

    monkeypatch.setattr(gpu_tune, "DeviceModel", Slow)
    monkeypatch.setattr(gpu_tune, "PAGE_RESERVE_S", 1.0)
    monkeypatch.setattr(gpu_tune, "correctness", lambda *args: [])
    out = str(tmp_path / "tune")
    t0 = time.time()
    summary = gpu_tune.main(TINY + ["--providers", "eager", "residual_fused", "--out", out, "--deadline", "3"])
    assert time.time() - t0 < 3 + 5
    assert summary["measured_jobs"] < 8 and summary["cut"]
    rows = report.read_csv(os.path.join(out, "results.csv")) if os.path.exists(os.path.join(out, "results.csv")) \
        else []
    assert len(rows) == summary["measured_jobs"] * 2 * 2
    assert os.path.exists(os.path.join(out, "stages.json"))


def test_compile_rows_load_the_graphs_workers_compiled_and_the_run_ends_on_time(tmp_path):
    """In a process of its own with a cache of its own (shared with its worker), as
    make gpu-tune runs it: the timed pass compiles nothing cold."""
    out = tmp_path / "tune"
    args = ["--device", "cpu", "--hidden", "64", "--dtypes", "bf16", "--modes", "fwd", "--no-decode",
            "--repeats", "2", "--elements", "1024", "--compile-workers", "1", "--out", str(out),
            "--providers", "eager", "compile", "residual_fused"]
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    done = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_tune.py"), *args, "--deadline", "150"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(out / "stages.json") as f:
        summary = json.load(f)
    rows = report.read_csv(str(out / "results.csv"))
    compiled = [r for r in rows if r["provider"] == "compile"]
    assert summary["measured_jobs"] == 4 and len(compiled) == 4 and not summary["cut"]
    assert all(r["ms"] > 0 for r in rows)
    cache = summary["compile_cache"]
    assert cache["inductor_misses"] == 0 and cache["aot_autograd_hits"] + cache["inductor_hits"] > 0, cache
    # a short deadline with the worker still compiling: the run returns on time anyway
    t0 = time.time()
    gpu_tune.main(args[:-8] + ["--compile-workers", "1", "--providers", "eager", "compile", "--deadline", "8",
                               "--out", str(tmp_path / "short"), "--hidden", "96", "128", "160"])
    assert time.time() - t0 < 8 + 6


def test_resumption_keys_on_mode_and_retries_failed_rows(tmp_path):
    out = str(tmp_path / "tune")
    base = ["--device", "cpu", "--hidden", "64", "--dtypes", "bf16", "--no-decode", "--repeats", "2",
            "--elements", "1024", "--compile-workers", "0", "--providers", "eager", "residual_fused", "--out", out]
    gpu_tune.main(base + ["--modes", "fwd"])
    path = os.path.join(out, "results.csv")
    assert len(report.read_csv(path)) == 4 * 2
    second = gpu_tune.main(base + ["--modes", "fwd", "bwd"])  # only the bwd rows are new
    rows = report.read_csv(path)
    assert second["resumed_past"] == 0 and len(rows) == 4 * 2 * 2
    assert sorted(r["mode"] for r in rows).count("bwd") == 4 * 2
    rows[0]["ms"], rows[0]["note"] = None, "failed: RuntimeError: out of memory"
    report.write_csv(rows, path)
    assert gpu_tune.row_key(rows[0]) not in gpu_tune.done_keys(path)
    third = gpu_tune.main(base + ["--modes", "fwd", "bwd"])
    assert third["measured_jobs"] == 1  # the job of the failed row, tried again


def test_a_failing_check_is_reported_and_the_run_goes_on(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(gpu_tune, "check_backward", broken)
    summary = gpu_tune.main(TINY + ["--providers", "eager", "residual_fused", "--out", str(tmp_path / "t")])
    assert len(summary["correctness"]["wrong"]) == 6 and "illegal memory access" in \
        summary["correctness"]["wrong"][0]["verdict"]
    assert summary["measured_jobs"] == 8


def test_results_of_another_machine_are_kept_aside(tmp_path):
    out = tmp_path / "tune"
    out.mkdir()
    report.write_json({"gpu": "NVIDIA H200", "device": "cuda"}, str(out / "env.json"))
    (out / "results.csv").write_text(",".join(report.FIELDS) + "\n")
    gpu_tune.main(TINY + ["--providers", "eager", "residual_fused", "--out", str(out), "--hidden", "64"])
    assert (out / "results.nvidia_h200.csv").exists()
    assert len(report.read_csv(str(out / "results.csv"))) == 4 * 2 * 2


def test_make_target_dry_run():
    done = subprocess.run(["bash", "scripts/gpu_tune.sh", "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, PYTHON=sys.executable), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "gpu-tune dry run" in done.stdout and "total" in done.stdout


@pytest.mark.parametrize("key", ["liger", "quack", "apex", "transformer_engine", "flash_attn"])
def test_peer_probe_names_each_peer(key):
    assert key in gpu_tune.probe_peers()
