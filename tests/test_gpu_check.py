"""The logic of scripts/gpu_check.sh that runs without a GPU: stage selection, the
deadline, and the summary parsed from recorded logs."""

import os
import shutil
import subprocess

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "scripts", "gpu_check.sh")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def gpu_check(tmp_path, *stages, **env):
    full_env = {**os.environ, "GPU_CHECK_DIR": str(tmp_path), **env}
    return subprocess.run(["bash", SCRIPT, *stages], capture_output=True, text=True,
                          env=full_env, timeout=120)


def test_unknown_stage_is_refused_with_the_list(tmp_path):
    proc = gpu_check(tmp_path, "summary", "benchmark")
    assert proc.returncode == 2
    assert "unknown stage: benchmark" in proc.stdout and "sanitizer" in proc.stdout


def test_stages_past_the_deadline_are_skipped_not_run(tmp_path):
    proc = gpu_check(tmp_path, "tests", "summary", GPU_CHECK_DEADLINE="5")
    assert proc.returncode == 0
    assert "tests: skipped (deadline)" in (tmp_path / "stages.txt").read_text()
    assert not (tmp_path / "tests.log").exists()


def test_summary_reads_recorded_logs(tmp_path):
    (tmp_path / "stages.txt").write_text("build: rc=0 28s\ntests: rc=1 42s\n")
    (tmp_path / "tests.log").write_text("....F\n1 failed, 874 passed, 1 skipped in 43.61s\n")
    (tmp_path / "sanitizer.log").write_text(
        "--- memcheck\n========= ERROR SUMMARY: 0 errors\n"
        "--- racecheck\n========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)\n")
    (tmp_path / "ncu.log").write_text(
        "  void add_norm_fwd_rows_kernel<32, 4, 8, 128>(AddNormFwdParams) (16384, 1, 1)x(128, 1, 1)\n"
        "    DRAM Throughput                   %        60.46\n"
        "    Duration                         us       177.31\n")
    proc = gpu_check(tmp_path, "summary")
    assert proc.returncode == 0
    summary = (tmp_path / "summary.txt").read_text()
    assert proc.stdout.endswith(summary)
    for line in ("build: rc=0 28s", "tests: rc=1 42s", "tests: 1 failed, 874 passed, 1 skipped",
                 "--- racecheck", "ERROR SUMMARY: 0 errors", "DRAM Throughput % 60.46"):
        assert line in summary, line


def test_exit_status_reports_a_failed_stage(tmp_path):
    ok = gpu_check(tmp_path / "ok", "summary")
    assert ok.returncode == 0 and "failed stages: none" in ok.stdout
    # A stage that fails here for want of a GPU/nvcc toolchain: ncu is absent or has no GPU.
    failing = gpu_check(tmp_path / "bad", "ncu", "summary", PATH="/usr/bin:/bin")
    assert failing.returncode == 1 and "failed stages: ncu" in failing.stdout


def test_summary_sets_measured_beside_predicted(tmp_path):
    (tmp_path / "audit.log").write_text(
        "| dir | H | kernel | block | regs | CTAs/SM | warps/SM | inflight | trips | predicted H100 | "
        "predicted H200 | measured |\n|---|\n"
        "| fwd | 1024 | `add_norm_fwd_rows_kernel<32,4,8,128>` | 128 | 106 | 4 | 16 | 8.0 KB | 8 | 80% | "
        "57% | 70% |\n")
    proc = gpu_check(tmp_path, "summary")
    assert " fwd | 1024 | `add_norm_fwd_rows_kernel<32,4,8,128>` | 80% | 57% | 70% " in proc.stdout
