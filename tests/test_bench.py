"""The benchmark's own logic: byte model, provider registry, outputs. CPU only."""

import csv
import json
import os
import sys
import types

import pytest
import torch

import residual_fused as rf
from bench import bench_add_norm, bench_model, providers, report
from bench.byte_model import Config, eager_bytes, fused_bytes


def test_byte_model_matches_the_guide_table():
    rows, h = 1024, 4096
    e = rows * h
    post = Config(norm="layer", prenorm=False, rows=rows, hidden=h)  # bf16 everything
    params = 2 * h * 2  # weight + bias, bf16
    assert fused_bytes(post, "fwd") == e * 2 * 4 + params + rows * 4  # x, r -> y, s
    assert eager_bytes(post, "fwd") == e * 2 * 5 + params + rows * 8  # x, r, s -> s, y
    assert fused_bytes(post, "bwd") == e * 2 * 3 + 2 * params + rows * 4  # dy, s -> dx
    pre = Config(norm="rms", prenorm=True, rows=rows, hidden=h)
    assert fused_bytes(pre, "bwd") == e * 2 * 4 + 2 * h * 2 + rows * 4  # dy, dres, s -> dx
    assert eager_bytes(pre, "bwd") == e * 2 * 6 + 2 * h * 2 + rows * 4
    mem = Config(norm="layer", prenorm=False, rows=rows, hidden=h, memory_efficient=True)
    assert fused_bytes(mem, "fwd") == e * 2 * 3 + params + rows * 4  # y only
    mixed = Config(norm="rms", prenorm=True, rows=rows, hidden=h, residual_dtype=torch.float32,
                   weight_dtype=torch.float32)
    # bwd: dy (2), dres (4), saved fp32 (4) -> dx (2) and a separate fp32 dresidual (4)
    assert fused_bytes(mixed, "bwd") == e * (2 + 4 + 4 + 2 + 4) + 2 * h * 4 + rows * 4
    assert fused_bytes(post, "fwd+bwd") == fused_bytes(post, "fwd") + fused_bytes(post, "bwd")


def test_every_peer_is_registered_and_skips_cleanly_without_cuda():
    assert set(providers.PROVIDERS) >= {"eager", "compile", "residual_fused", "flash_attn", "liger",
                                        "apex", "quack", "transformer_engine"}
    cfg = Config(norm="rms", prenorm=True, rows=4, hidden=64)
    for name in providers.PROVIDERS:
        if name in providers.CPU_PROVIDERS:
            assert callable(providers.make(name, cfg, "cpu"))
        else:
            with pytest.raises(providers.Unavailable, match="CUDA only"):
                providers.make(name, cfg, "cpu")


def test_absent_peer_says_not_importable(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # import raises ImportError
    with pytest.raises(providers.Unavailable, match="flash_attn is not importable"):
        providers.PROVIDERS["flash_attn"].build(Config(norm="layer", prenorm=False, rows=2, hidden=8))
    with pytest.raises(providers.Unavailable, match="no memory-efficient mode"):
        providers.PROVIDERS["flash_attn"].build(
            Config(norm="layer", prenorm=False, rows=2, hidden=8, memory_efficient=True))
    with pytest.raises(providers.Unavailable, match="no LayerNorm"):
        providers.PROVIDERS["quack"].build(Config(norm="layer", prenorm=False, rows=2, hidden=8))


def _fake_flash_attn(monkeypatch, wrong=False):
    def layer_norm_fn(x, weight, bias, residual=None, eps=1e-6, prenorm=False,
                      residual_in_fp32=False, is_rms_norm=False, **_):
        fn = rf.reference.add_rms_norm if is_rms_norm else rf.reference.add_layer_norm
        args = (x, residual, weight) if is_rms_norm else (x, residual, weight, bias)
        out = fn(*args, eps, prenorm=prenorm,
                 residual_dtype=torch.float32 if residual_in_fp32 else None)
        return (out[0] * 2, out[1]) if wrong and prenorm else out

    names = ["flash_attn", "flash_attn.ops", "flash_attn.ops.triton", "flash_attn.ops.triton.layer_norm"]
    for name in names:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules["flash_attn.ops.triton.layer_norm"].layer_norm_fn = layer_norm_fn


@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_present_peer_runs_and_is_checked(monkeypatch, norm):
    _fake_flash_attn(monkeypatch)
    cfg = Config(norm=norm, prenorm=True, rows=8, hidden=64, x_dtype=torch.float32,
                 residual_dtype=torch.float32, weight_dtype=torch.float32)
    fn = providers.PROVIDERS["flash_attn"].build(cfg)
    inputs, _ = bench_add_norm.make_inputs(cfg, "cpu")
    bench_add_norm.check_output("flash_attn", cfg, fn, inputs)  # passes
    assert providers.fuses_add("flash_attn", cfg)

    _fake_flash_attn(monkeypatch, wrong=True)
    fn = providers.PROVIDERS["flash_attn"].build(cfg)
    with pytest.raises(providers.Unavailable, match="differs from the reference"):
        bench_add_norm.check_output("flash_attn", cfg, fn, inputs)


def test_sweep_writes_csv_json_and_plots(tmp_path, capsys):
    out = tmp_path / "out"
    bench_add_norm.main(["--device", "cpu", "--hidden", "64", "256", "--elements", "1024",
                         "--dtypes", "bf16", "--threads", "1",
                         "--norms", "rms", "--modes", "fwd", "bwd", "--repeats", "2",
                         "--providers", "eager", "residual_fused", "liger", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "torch threads" in printed and "liger: not run (liger runs on CUDA only)" in printed
    assert "copy bandwidth, clone of" in printed and "columns:" in printed
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert set(rows[0]) == set(report.FIELDS)
    ran = [r for r in rows if r["ms"]]
    assert {r["provider"] for r in ran} == {"eager", "residual_fused"}
    assert {r["table"] for r in ran} == {"sweep", "decode"}
    assert all(float(r["gbs"]) > 0 and float(r["ms"]) > 0 for r in ran)
    ours = [r for r in ran if r["provider"] == "residual_fused" and r["table"] == "sweep"]
    assert all(r["vs_eager"] for r in ours)
    env = json.loads((out / "env.json").read_text())
    assert {"date", "torch", "device", "copy_gbs", "cuda_kernels"} <= set(env)
    pytest.importorskip("matplotlib")
    assert sorted(p.name for p in out.glob("*.png")) == ["gbs_bwd_bfloat16.png", "gbs_fwd_bfloat16.png"]


def test_results_page_has_environment_and_tables():
    cfg = Config(norm="rms", prenorm=True, rows=16, hidden=4096)
    rows = [bench_add_norm._row("sweep", cfg, "fwd", name, fused_add=True, ms=ms, bytes=10**6,
                                gbs=10**6 / (ms * 1e-3) / 1e9, pct_copy=50.0)
            for name, ms in (("eager", 2.0), ("compile", 1.5), ("residual_fused", 1.0))]
    rows.append(bench_add_norm._row("sweep", cfg, "fwd", "liger", note="liger is not importable"))
    report.add_speedups(rows)
    page = report.markdown(rows, {"date": "2026-01-01", "device": "cuda", "gpu": "H100",
                                  "copy_gbs": 3000.0}, "python bench/bench_add_norm.py --results",
                           ["h100/gbs_fwd_bfloat16.png"], headline_hidden=[4096])
    assert page.startswith("# Add & Norm benchmark: H100")
    assert "| copy_gbs | 3000 GB/s |" in page and "--results" in page
    assert "| rms | pre | fwd | bfloat16 | 16 | 4096 | residual_fused | 1000.0 us" in page
    assert "2.00x | 1.50x |" in page and "- liger: liger is not importable" in page
    assert "![gbs_fwd_bfloat16.png](h100/gbs_fwd_bfloat16.png)" in page


@pytest.mark.parametrize("source", ["builtin", "hf"])
def test_model_benchmark_checks_and_times_both_stacks(source):
    if source == "hf":
        pytest.importorskip("transformers")
    models = ["bert", "llama"]
    if source == "hf":  # a conversion that refuses this transformers is skipped, not failed
        from residual_fused.integrations import huggingface as hf

        def supported(model):
            try:
                hf._check_version(model)
                return True
            except RuntimeError:
                return False

        models = [m for m in models if supported(m)]
    results = bench_model.main(["--device", "cpu", "--seq", "32", "--steps", "1", "--layers", "1",
                                "--batch", "2", "--source", source])
    assert {(r["model"], r["impl"]) for r in results} == {
        (m, i) for m in models for i in bench_model.IMPLS}
    assert all(r["step_ms"] > 0 for r in results)


def test_model_benchmark_of_hugging_face_families():
    pytest.importorskip("transformers")
    from residual_fused.integrations import huggingface as hf

    try:
        hf._check_version("qwen3")
    except RuntimeError as err:
        pytest.skip(str(err))
    rows = bench_model.main(["--device", "cpu", "--families", "qwen3", "olmo2", "t5", "--steps", "1", "--layers",
                             "1", "--seq", "16"])
    assert [(r["family"], r["fused_adds"], r["adds"]) for r in rows] == [("qwen3", 2, 2), ("olmo2", 0, 2),
                                                                          ("t5", 5, 5)]
    assert all(r["converted_ms"] > 0 and r["max_abs_diff"] < 0.1 for r in rows)


def test_results_page_from_a_recorded_folder(tmp_path):
    """A folder copied back from a GPU machine (results.csv + env.json) becomes the
    committed page without re-running anything, with types restored from the CSV."""
    rec = tmp_path / "recorded"
    rec.mkdir()
    rows = [bench_add_norm._row("sweep", Config(norm="rms", prenorm=True, rows=16384, hidden=4096),
                                "fwd", name, fused_add=True, ms=ms, bytes=537_000_000,
                                gbs=537 / ms, pct_copy=100 * 537 / ms / 4220)
            for name, ms in (("eager", 0.2015), ("residual_fused", 0.1821))]
    report.add_speedups(rows)
    report.write_csv(rows, str(rec / "results.csv"))
    report.write_json({"device": "cuda", "gpu": "Test GPU 80GB", "copy_gbs": 4220.0},
                      str(rec / "env.json"))
    back = report.read_csv(str(rec / "results.csv"))
    assert back[1]["ms"] == pytest.approx(0.1821) and back[1]["hidden"] == 4096
    assert back[1]["fused_add"] is True and back[1]["memory_efficient"] is False
    assert back[0]["host_us"] is None
    page = bench_add_norm.page_from(str(rec), "make gpu-check", base=str(tmp_path / "results"))
    assert os.path.basename(page) == "test_gpu_80gb.md"
    text = open(page).read()
    assert "| copy_gbs | 4220 GB/s |" in text and "`make gpu-check`" in text
    assert "| rms | pre | fwd | bfloat16 | 16384 | 4096 | residual_fused | 182.1 us |" in text
    assert os.path.exists(tmp_path / "results" / "test_gpu_80gb" / "results.csv")


def test_overhead_table_times_every_call_against_the_eager_pair():
    from bench import overhead

    rows = overhead.run("cpu", with_compile=False, sizes=((1, 64),), batches=4)
    calls = {(r["norm"], r["grad"], r["call"]) for r in rows}
    for norm in ("layer", "rms"):
        for call in ("bare torch.add", "eager pair", "eager module pair", "rf functional", "rf module", "rf out=",
                     "rf in place"):
            assert (norm, False, call) in calls
        for call in ("bare torch.add", "eager pair", "rf functional"):
            assert (norm, True, call) in calls
    assert all(r["host_us"] > 0 and r["vs_eager"] > 0 for r in rows)
    assert all(r["vs_eager"] == 1.0 for r in rows if r["call"] == "eager pair")
    assert "| layer | 1 x 64 | no | rf in place |" in overhead.format_rows(rows, "cpu")
