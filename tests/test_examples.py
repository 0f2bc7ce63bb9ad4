"""The examples run, and show what they say they show.

examples/deep_residual.py: a stack of 128 Add & Norm blocks trains with residual
connections and stalls without them, and without them the first blocks get a small
fraction of the gradient the last ones get. A short run (40 steps instead of 200)
checks both, and that the plot and the numbers are written.
"""

import importlib.util
import json
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_deep_residual_demo(tmp_path):
    pytest.importorskip("matplotlib")
    demo = _load("deep_residual")
    results = demo.main(["--depth", "128", "--steps", "40", "--out", str(tmp_path)])
    assert (tmp_path / "deep_residual.png").stat().st_size > 10_000
    written = json.loads((tmp_path / "deep_residual.json").read_text())
    assert set(written["summary"]) == set(demo.FORMS)

    def first_to_last(form):  # the first 8 blocks' gradient norm over the last 8 blocks', at step 0
        grads = results[form]["grad_norms"]
        return (sum(grads[:8]) / 8) / (sum(grads[-8:]) / 8)

    pre = demo.summary(results["pre-norm, residual"])
    # with residuals (pre-norm) the loss falls to under a quarter of where it started
    assert pre["loss_end"] < 0.25 * pre["loss_start"], pre
    # and every block gets a gradient of the same order
    assert 0.2 < first_to_last("pre-norm, residual") < 10
    for form in ("pre-norm, no residual", "post-norm, no residual"):
        s = demo.summary(results[form])
        # without them it stays near predicting the mean (the targets have unit variance)
        assert s["loss_end"] > 0.8, (form, s)
        # and the first blocks get a twentieth or less of the last blocks' gradient
        assert first_to_last(form) < 0.05, (form, first_to_last(form))
