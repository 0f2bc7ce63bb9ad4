"""Hugging Face conversions: BERT (post-norm) and Llama (pre-norm), random weights.

Models are built from small configs (nothing is downloaded). Outputs and every
parameter gradient of the converted model must meet the project's rule against the
original: max|converted - ref| <= 2 * max|original - ref| + atol, where ref is the
original model in float64 and both are run in float32.
"""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from residual_fused.integrations import huggingface as hf  # noqa: E402

ATOL_FP32 = 1e-4


def _supported(family):
    try:
        hf._check_version(family)
    except RuntimeError as err:
        pytest.skip(str(err))


def _bert():
    _supported("bert")
    cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, vocab_size=100, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    return transformers.BertModel(cfg), hf.convert_bert_model


def _llama():
    _supported("llama")
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
    return transformers.LlamaModel(cfg), hf.convert_llama_model


FAMILIES = {"bert": _bert, "llama": _llama}


def _randomize_norms(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower():
                p.copy_(1 + 0.3 * torch.randn_like(p) if name.endswith("weight") else 0.3 * torch.randn_like(p))


def _forward_backward(model, ids, upstream):
    model.zero_grad(set_to_none=True)
    out = model(ids).last_hidden_state
    (out * upstream.to(out.dtype)).sum().backward()
    grads = {n: p.grad.detach().double() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach().double(), grads


@pytest.mark.parametrize("family", list(FAMILIES))
def test_converted_model_matches_original(family):
    torch.manual_seed(0)
    original, convert = FAMILIES[family]()
    _randomize_norms(original)
    converted = convert(copy.deepcopy(original))
    ids = torch.randint(0, 100, (2, 12))
    upstream = torch.randn(2, 12, 64) / 8
    ref = _forward_backward(copy.deepcopy(original).double(), ids, upstream)
    eager = _forward_backward(original, ids, upstream)
    ours = _forward_backward(converted, ids, upstream)

    def check(name, got, want, base):
        err = (got - want).abs().max().item()
        bound = 2 * (base - want).abs().max().item() + ATOL_FP32
        assert err <= bound, f"{family} {name}: error {err:.3g} > bound {bound:.3g}"

    check("output", ours[0], ref[0], eager[0])
    assert ours[1].keys() == ref[1].keys()
    for name in ref[1]:
        check(name, ours[1][name], ref[1][name], eager[1][name])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_state_dict_loads_both_ways_and_parameters_are_shared(family):
    original, convert = FAMILIES[family]()
    params_before = {n: p for n, p in original.named_parameters()}
    converted = convert(original)  # in place
    assert {n: p for n, p in converted.named_parameters()} == params_before
    fresh, _ = FAMILIES[family]()
    fresh.load_state_dict(converted.state_dict())  # converted -> original
    again = convert(FAMILIES[family]()[0])
    again.load_state_dict(fresh.state_dict())  # original -> converted
    for (n, a), b in zip(again.state_dict().items(), converted.state_dict().values()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("family", list(FAMILIES))
def test_converted_model_trains(family):
    torch.manual_seed(1)
    model, convert = FAMILIES[family]()
    model = convert(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 100, (4, 16))
    target = torch.randn(4, 16, 64)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(ids).last_hidden_state, target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


def test_version_guard(monkeypatch):
    monkeypatch.setattr(hf, "_installed_version", lambda: "3.5.1")
    with pytest.raises(RuntimeError, match="written for transformers >= 4.40, < 6.0; the installed version is 3.5.1"):
        hf.convert_bert_model(torch.nn.Linear(2, 2))
    with pytest.raises(RuntimeError, match="convert_llama_model was written for transformers >= 5.0"):
        hf.convert_llama_model(torch.nn.Linear(2, 2))


def test_nothing_to_convert_is_an_error():
    _supported("bert")
    with pytest.raises(ValueError, match="no BertSelfOutput or BertOutput"):
        hf.convert_bert_model(torch.nn.Linear(2, 2))
