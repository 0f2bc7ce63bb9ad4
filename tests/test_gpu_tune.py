"""make gpu-tune's logic without a GPU: the plan and its predicted device time, the
stages and their limits, the deadline, results appended as they come, resumption.
The timed runs here are on CPU with tiny shapes (their times mean nothing)."""

import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))

import gpu_tune  # noqa: E402
import report  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")
TINY = ["--device", "cpu", "--hidden", "64", "128", "--dtypes", "bf16", "--modes", "fwd", "bwd", "--no-decode",
        "--repeats", "2", "--elements", "2048", "--compile-workers", "0"]


def test_dry_run_fits_six_minutes_and_runs_the_main_rows_first(capsys):
    plan = gpu_tune.main(["--dry-run"])
    seconds = plan["predicted_seconds"]
    assert seconds["total"] <= 360 and seconds["build"] > 0 and seconds["sweep"] > 0
    assert plan["variants"] == list(gpu_tune.VARIANTS)
    assert plan["stages"] == ["build", "env", "correct", "sweep", "page"]
    jobs = gpu_tune.plan_jobs()
    # bf16 over every hidden size, then the decode shapes, before any other dtype mix
    assert [j.cfg.hidden for j in jobs[:60:4]] == list(gpu_tune.HIDDEN)
    assert {j.table for j in jobs[60:60 + 54]} == {"decode"}
    assert plan["jobs_that_fit"] >= 60 + 54, plan  # bf16 and decode fit the deadline
    assert plan["jobs"] == len(jobs) == 4 * 60 + 54
    out = capsys.readouterr().out
    assert "predicted device seconds" in out and "not a measurement" in out


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
    assert set(first["stages"]) == {"env", "correct", "sweep", "page"}
    again = gpu_tune.main(TINY + ["--providers", "eager", "residual_fused", "--out", out])
    assert again["resumed_past"] == 8 and again["measured_jobs"] == 0
    assert len(report.read_csv(os.path.join(out, "results.csv"))) == len(rows)
    assert os.path.exists(os.path.join(out, "stages.json")) and os.path.exists(os.path.join(out, "env.json"))
    with open(first["page"]) as f:  # the results page, with ours against the fastest other provider
        page = f.read()
    assert "## Ours against the fastest other provider" in page
    assert page.count("| sweep | ") >= 8 * 2  # every job and mode


def test_deadline_cuts_the_sweep_and_keeps_what_was_measured(tmp_path):
    out = str(tmp_path / "tune")
    summary = gpu_tune.main(TINY + ["--providers", "eager", "residual_fused", "--out", out, "--deadline", "0.5"])
    assert summary["measured_jobs"] < 8
    assert summary["stages"]["sweep"] == {"skipped": "deadline"} or summary["cut"]
    rows = report.read_csv(os.path.join(out, "results.csv")) if os.path.exists(os.path.join(out, "results.csv")) \
        else []
    assert len(rows) == summary["measured_jobs"] * 2 * 2


def test_compile_is_timed_from_graphs_a_worker_compiled(tmp_path):
    out = str(tmp_path / "tune")
    args = ["--device", "cpu", "--hidden", "64", "--dtypes", "bf16", "--modes", "fwd", "--no-decode",
            "--repeats", "2", "--elements", "1024", "--compile-workers", "1", "--out", out,
            "--providers", "eager", "compile", "residual_fused"]
    summary = gpu_tune.main(args)
    rows = report.read_csv(os.path.join(out, "results.csv"))
    assert summary["measured_jobs"] == 4 * 2  # each job twice: pass 1 (eager, ours), pass 2 (compile)
    assert {r["provider"] for r in rows} == {"eager", "compile", "residual_fused"}
    assert all(r["ms"] > 0 for r in rows)


def test_make_target_dry_run():
    done = subprocess.run(["bash", "scripts/gpu_tune.sh", "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, PYTHON=sys.executable), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "gpu-tune dry run" in done.stdout and "total" in done.stdout


@pytest.mark.parametrize("key", ["liger", "quack", "apex", "transformer_engine", "flash_attn"])
def test_peer_probe_names_each_peer(key):
    assert key in gpu_tune.probe_peers()
