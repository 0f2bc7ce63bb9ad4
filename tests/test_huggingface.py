"""Hugging Face conversions (residual_fused.integrations.huggingface), random weights.

Models are built from tiny configs of each family (nothing is downloaded). Outputs
and every parameter gradient of the converted model must meet the project's rule
against the original: max|converted - ref| <= 2 * max|original - ref| + atol, where
ref is the original model in float64 and both others run in the tested dtype.
"""

import contextlib
import copy
import functools
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

transformers = pytest.importorskip("transformers")

from residual_fused.integrations import huggingface as hf  # noqa: E402

ATOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2}
HIDDEN, LAYERS, VOCAB = 64, 2, 100
DECODERS = sorted(t for t in hf.DECODERS if hf.DECODERS[t].style != "vit")  # token models
ENCODERS = sorted(hf.ENCODERS)
NORMS_ONLY = sorted(t for t in hf.NORMS_ONLY if t not in ("t5", "whisper"))  # token decoders
FAMILIES = DECODERS + ENCODERS + NORMS_ONLY


def _supported(family):
    try:
        hf._check_version(family)
    except RuntimeError as err:
        pytest.skip(str(err))


def _config(family):
    _supported(family)
    sizes = dict(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
                 vocab_size=VOCAB, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, resid_pdrop=0.0,
                 embd_pdrop=0.0, attn_pdrop=0.0, dropout=0.0, attention_dropout=0.0, hidden_dropout=0.0)
    defaults = transformers.AutoConfig.for_model(family)
    if family in hf.DECODERS or family in hf.NORMS_ONLY:
        sizes.update(num_key_value_heads=2, pad_token_id=0)
        if not isinstance(getattr(type(defaults), "head_dim", None), property):  # Falcon derives it
            sizes["head_dim"] = 16
    for key, value in dict(num_local_experts=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                           shared_expert_intermediate_size=32).items():
        if hasattr(defaults, key):
            sizes[key] = value
    cfg = transformers.AutoConfig.for_model(family, **sizes)
    cfg._experts_implementation = "eager"  # grouped_mm has no float64 (the reference)
    return cfg


def _model(family, causal=False):
    torch.manual_seed(0)
    cfg = _config(family)
    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    model = auto.from_config(cfg).eval()
    with torch.no_grad():  # norms away from their ones/zeros initialisation
        for name, p in model.named_parameters():
            if "norm" in name.lower():
                p.copy_(1 + 0.3 * torch.randn_like(p) if name.endswith("weight") else 0.3 * torch.randn_like(p))
    return model


def _converted(model):
    converted = copy.deepcopy(model)
    hf.apply(converted)
    return converted


def _forward_backward(model, ids, upstream):
    model.zero_grad(set_to_none=True)
    out = model(ids).last_hidden_state
    (out * upstream.to(out.dtype)).sum().backward()
    grads = {n: p.grad.detach().double() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach().double(), grads


def _check(what, got, want, base, atol):
    err = (got - want).abs().max().item()
    bound = 2 * (base - want).abs().max().item() + atol
    assert err <= bound, f"{what}: error {err:.3g} > bound {bound:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_converted_model_matches_original(family, dtype):
    original = _model(family)
    ref_model = copy.deepcopy(original).double()
    original = original.to(dtype)
    converted = _converted(original)
    ids = torch.randint(0, VOCAB, (2, 12))
    upstream = torch.randn(2, 12, HIDDEN) / 8
    ref = _forward_backward(ref_model, ids, upstream)
    eager = _forward_backward(original, ids, upstream)
    ours = _forward_backward(converted, ids, upstream)
    _check(f"{family} output", ours[0], ref[0], eager[0], ATOL[dtype])
    assert ours[1].keys() == ref[1].keys()
    for name in ref[1]:
        _check(f"{family} grad of {name}", ours[1][name], ref[1][name], eager[1][name], ATOL[dtype])


class _CountOps(TorchDispatchMode):
    """Counts, during a forward, the adds whose result has the hidden states' shape
    (the residual adds) and the fused op's calls."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.adds, self.fused = tuple(shape), 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket is torch.ops.aten.add and isinstance(out, torch.Tensor) \
                and tuple(out.shape) == self.shape:
            self.adds += 1
        if func.overloadpacket is torch.ops.residual_fused.add_norm_fwd:
            self.fused += 1
        return out


def _parallel_shape(family, cfg):
    """(layers with a parallel residual, of them with a second norm of x) for the
    families whose attention and MLP read the same input (their branches' sum is one
    PyTorch add, x + sum is fused; GPT-NeoX's ln2 and Falcon's ln_mlp run without a
    residual)."""
    if family == "gpt_neox" and cfg.use_parallel_residual:
        return LAYERS, LAYERS
    if family == "falcon" and (cfg.parallel_attn or cfg.new_decoder_architecture):
        two = cfg.new_decoder_architecture and cfg.num_ln_in_parallel_attn == 2
        return LAYERS, LAYERS if two else 0
    return 0, 0


def _check_counts(family, original, converted, shape=(2, 12, HIDDEN)):
    ids = torch.randint(0, VOCAB, shape[:2])
    counts = {}
    for name, model in (("original", original), ("converted", converted)):
        with torch.no_grad(), _CountOps(shape) as mode:
            model(ids)
        counts[name] = (mode.adds, mode.fused)
    spec = hf.DECODERS[family]
    alone = LAYERS * ((2 if spec.qk_norm else 0) + (2 if spec.sandwich else 0))  # norms without an add
    other = 1 if spec.style == "gpt2" else 0  # GPT-2 adds its position embeddings: not a residual add
    parallel, second = _parallel_shape(family, original.config)
    # Falcon sums its parallel branches in place (add_, not counted)
    assert counts["original"] == (2 * LAYERS + other - (parallel if family == "falcon" else 0), 0)
    # every residual add fused: 2 per layer (1 for a parallel residual, whose branches'
    # sum stays a PyTorch add) in one norm call each, plus the first input norm, the
    # QK-norms, Gemma 2/3's norms of each sublayer's output, and a parallel layer's second norm
    fused = 2 * LAYERS - parallel
    assert counts["converted"] == (other + parallel, fused + 1 + alone + second)
    report = hf.apply(copy.deepcopy(original))
    assert (report.fused_adds, report.layers, report.norms_on_kernel, report.norms_without_residual) == (
        fused, LAYERS, fused + 1 + alone + second, 1 + alone + second)
    assert f"{fused} residual adds fused" in str(report)


@pytest.mark.parametrize("family", DECODERS)
def test_every_residual_add_of_a_decoder_is_fused(family):
    original = _model(family)
    _check_counts(family, original, _converted(original))


def test_olmo2_norms_run_on_the_kernel_and_its_adds_are_reported():
    original = _model("olmo2")
    converted = _converted(original)
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad(), _CountOps((2, 12, HIDDEN)) as mode:
        converted(ids)
    norms = 4 * LAYERS + 1  # two sublayer-output norms and two QK-norms per layer, the final norm
    assert (mode.adds, mode.fused) == (2 * LAYERS, norms)
    report = hf.apply(_model("olmo2"))
    assert (report.fused_adds, report.norms_on_kernel, report.norms_without_residual) == (0, norms, norms)
    assert "residual adds: each follows its norm" in str(report)


FALCON_SHAPES = {"sequential": dict(parallel_attn=False), "parallel": dict(parallel_attn=True),
                 "new_two_norms": dict(new_decoder_architecture=True, num_ln_in_parallel_attn=2),
                 "new_one_norm": dict(new_decoder_architecture=True, num_ln_in_parallel_attn=1)}


@pytest.mark.parametrize("shape", sorted(FALCON_SHAPES))
def test_falcon_shapes_fuse_every_residual_add(shape):
    """Falcon's three layer shapes (Falcon-RW's sequential layer; Falcon-7B's parallel
    attention with one norm; the new architecture of 40B/180B with ln_attn and ln_mlp)."""
    cfg = _config("falcon")
    for key, value in FALCON_SHAPES[shape].items():
        setattr(cfg, key, value)
    cfg._attn_implementation = "eager"  # attention weights are returned
    torch.manual_seed(0)
    original = transformers.AutoModel.from_config(cfg).eval()
    converted = copy.deepcopy(original)
    hf.apply(converted)
    _check_counts("falcon", original, converted)
    ids = torch.randint(0, VOCAB, (2, 12))
    upstream = torch.randn(2, 12, HIDDEN) / 8
    ref, eager, ours = (_forward_backward(m, ids, upstream)
                        for m in (copy.deepcopy(original).double(), original, converted))
    _check("falcon output", ours[0], ref[0], eager[0], ATOL[torch.float32])
    assert ours[1].keys() == ref[1].keys()
    for name in ref[1]:
        _check(f"falcon grad of {name}", ours[1][name], ref[1][name], eager[1][name], ATOL[torch.float32])
    with torch.no_grad():  # Falcon's loop collects them itself: hidden states, not pairs
        flags = dict(output_hidden_states=True, output_attentions=True, return_dict=False, use_cache=False)
        got, want = converted(ids, **flags), original(ids, **flags)
    assert len(got) == len(want)
    for g, w in zip(got[1:], want[1:]):
        assert len(g) == len(w) and all(isinstance(t, torch.Tensor) for t in g)
        for a, b in zip(g, w):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", DECODERS + NORMS_ONLY)
def test_generate_and_hidden_states_match(family):
    original = _model(family, causal=True)
    converted = _converted(original)
    ids = torch.randint(1, VOCAB, (2, 7))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding: the attention mask must reach the converted layers
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(original.generate(ids, **kwargs), converted.generate(ids, **kwargs))
    ref_model = copy.deepcopy(original).double()
    with torch.no_grad():
        want = ref_model(ids, output_hidden_states=True).hidden_states
        base = original(ids, output_hidden_states=True).hidden_states
        got = converted(ids, output_hidden_states=True).hidden_states
    assert len(got) == len(want) == LAYERS + 1
    for k, (g, w, b) in enumerate(zip(got, want, base)):
        assert isinstance(g, torch.Tensor) and g.shape == w.shape
        _check(f"{family} hidden state {k}", g.double(), w, b.double(), ATOL[torch.float32])


def _set_checkpointing(model, checkpointing):
    if checkpointing is None:
        getattr(model, "activation_checkpointing_disable", model.gradient_checkpointing_disable)()
    elif hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": checkpointing})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing})


def _grads(model, inputs, checkpointing):
    """Every parameter's gradient of a fixed loss on the model's last hidden state."""
    model.train()
    _set_checkpointing(model, checkpointing)
    model.zero_grad(set_to_none=True)
    out = model(inputs).last_hidden_state
    (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize("family", FAMILIES)
def test_activation_checkpointing(family, reentrant):
    model = _converted(_model(family))
    ids = torch.randint(0, VOCAB, (2, 12))
    plain = _grads(model, ids, None)
    checkpointed = _grads(model, ids, reentrant)
    _same_grads(checkpointed, plain, exact=not reentrant)


def _same_grads(got, want, exact):
    """Non-reentrant checkpointing recomputes the same computation: the same bits.
    Under reentrant checkpointing the layers return hidden states (the last add of
    each in PyTorch, not fused into the next norm), so the sums of gradients differ
    in rounding only."""
    assert got.keys() == want.keys()
    scale = max(g.abs().max().item() for g in want.values())  # rounding of the largest sums
    for name in want:
        if exact:
            assert torch.equal(got[name], want[name]), name
        else:
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6 * scale, msg=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_state_dict_loads_both_ways_and_parameters_are_shared(family):
    original = _model(family)
    params_before = {n: p for n, p in original.named_parameters()}
    hf.apply(original)  # in place
    assert {n: p for n, p in original.named_parameters()} == params_before
    fresh = _model(family)
    fresh.load_state_dict(original.state_dict())  # converted -> original
    again = _model(family)
    hf.apply(again)
    again.load_state_dict(fresh.state_dict())  # original -> converted
    for (n, a), b in zip(again.state_dict().items(), original.state_dict().values()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_converted_model_trains(family):
    model = _converted(_model(family)).train()
    torch.manual_seed(1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, VOCAB, (4, 16))
    target = torch.randn(4, 16, HIDDEN)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(ids).last_hidden_state, target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.parametrize("family", ["qwen3", "falcon", "roberta"])
def test_save_pretrained_into_unconverted_and_torch_save(family, tmp_path):
    original = _model(family)
    converted = _converted(original)
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        want = converted(ids).last_hidden_state
    converted.save_pretrained(tmp_path / "hf")
    loaded = transformers.AutoModel.from_pretrained(tmp_path / "hf").eval()
    assert not any(type(m).__module__ == hf.__name__ for m in loaded.modules())  # unconverted
    with torch.no_grad():
        _check(f"{family} reloaded", loaded(ids).last_hidden_state.double(), want.double(),
               want.double(), ATOL[torch.float32])
    # torch.save of the converted model, loaded in a fresh process (classes found by name)
    torch.save(converted, tmp_path / "model.pt")
    torch.save({"ids": ids, "want": want}, tmp_path / "io.pt")
    code = ("import torch, sys; m = torch.load(sys.argv[1], weights_only=False); io = torch.load(sys.argv[2]);"
            f"torch.set_num_threads({torch.get_num_threads()});"  # as want was computed (matmul splits)
            "got = m(io['ids']).last_hidden_state;"
            "assert any(type(x).__module__ == 'residual_fused.integrations.huggingface' for x in m.modules());"
            "assert torch.equal(got, io['want']), (got - io['want']).abs().max()")
    if family == "falcon":  # the hook that turns collected pairs into hidden states survives
        code += (";states = m(io['ids'], output_hidden_states=True).hidden_states;"
                 "assert len(states) == 3 and all(isinstance(h, torch.Tensor) for h in states), states")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "model.pt"), str(tmp_path / "io.pt")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("family", FAMILIES)
def test_torch_compile_fullgraph_of_a_converted_model(family):
    model = _model(family)
    if hasattr(model.config, "_experts_implementation"):  # eager experts break the graph unconverted too
        model.config._experts_implementation = "grouped_mm"
    hf.apply(model)
    ids = torch.randint(0, VOCAB, (2, 8))
    torch._dynamo.reset()  # the shared code of earlier families' graphs counts towards the recompile limit
    with torch.no_grad():
        want = model(ids, output_hidden_states=True)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        got = compiled(ids, output_hidden_states=True)
    assert torch.equal(got.last_hidden_state, want.last_hidden_state)
    assert len(got.hidden_states) == len(want.hidden_states) == LAYERS + 1
    for g, w in zip(got.hidden_states, want.hidden_states):
        assert torch.equal(g, w)


def test_unknown_model_type_names_the_supported_ones():
    _supported("llama")
    model = transformers.AutoModel.from_config(transformers.AutoConfig.for_model(
        "gpt_bigcode", n_embd=32, n_layer=1, n_head=2, vocab_size=10))
    with pytest.raises(ValueError, match="model_type 'gpt_bigcode' is not supported .* supported model types: "
                                         "bert, distilbert, falcon, gemma, gemma2, gemma3_text, gpt2, gpt_neox, "
                                         "granite, llama"):
        hf.apply(model)
    with pytest.raises(ValueError, match="needs a transformers model"):
        hf.apply(torch.nn.Linear(2, 2))


def test_partly_supported_composite_model_warns():
    _supported("llama")

    class VlmConfig(transformers.PretrainedConfig):
        model_type = "some_vlm"
        sub_configs = {"text_config": transformers.AutoConfig, "vision_config": transformers.AutoConfig}

    class Composite(torch.nn.Module):  # a language model and a vision tower, as in a VLM
        def __init__(self):
            super().__init__()
            self.language_model = _model("llama")
            self.vision_tower = torch.nn.Linear(4, 4)
            self.config = VlmConfig()
            self.config.text_config = self.language_model.config
            self.config.vision_config = transformers.AutoConfig.for_model("siglip_vision_model")

    model = Composite()
    with pytest.warns(UserWarning, match="some_vlm converted partly \\(llama\\); left unconverted: "
                                         "siglip_vision_model"):
        report = hf.apply(model)
    assert report.fused_adds == 2 * LAYERS
    assert report.left_alone == ["sub-model of type 'siglip_vision_model' (not supported)"]


def test_version_guard(monkeypatch):
    monkeypatch.setattr(hf, "_installed_version", lambda: "3.5.1")
    with pytest.raises(RuntimeError, match="written for transformers >= 4.40, < 6.0; the installed version is 3.5.1"):
        hf.convert_bert_model(torch.nn.Linear(2, 2))
    with pytest.raises(RuntimeError, match="the llama conversion was written for transformers >= 5.0"):
        hf.convert_llama_model(torch.nn.Linear(2, 2))


def test_nothing_to_convert_is_an_error():
    _supported("bert")
    with pytest.raises(ValueError, match="no BertSelfOutput or BertOutput"):
        hf.convert_bert_model(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no LlamaModel found"):
        hf.convert_llama_model(torch.nn.Linear(2, 2))


def test_converted_layer_refuses_positional_arguments():
    model = _converted(_model("llama"))
    with pytest.raises(TypeError, match="takes hidden_states positionally and every other argument by keyword"):
        model.layers[0](torch.randn(1, 3, HIDDEN), None)


def test_apply_twice_is_harmless():
    model = _model("llama")
    hf.apply(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = hf.apply(model)
    assert report.fused_adds == 2 * LAYERS


def test_gemma3_vision_language_model_converts_its_text_model():
    _supported("gemma3_text")
    text = dict(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, vocab_size=300)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    torch.manual_seed(0)
    cfg = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)
    original = transformers.Gemma3ForConditionalGeneration(cfg).eval()
    converted = copy.deepcopy(original)
    with pytest.warns(UserWarning, match="gemma3 converted partly \\(gemma3_text\\); left unconverted: "
                                         "siglip_vision_model"):
        report = hf.apply(converted)
    assert report.fused_adds == 2 * LAYERS
    ids = torch.randint(1, 200, (2, 8))
    with torch.no_grad():
        ref = copy.deepcopy(original).double()(input_ids=ids).logits
        _check("gemma3 logits", converted(input_ids=ids).logits.double(), ref,
               original(input_ids=ids).logits.double(), ATOL[torch.float32])


def _vit():
    _supported("vit")
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS,
                                 num_attention_heads=4, image_size=32, patch_size=8, hidden_dropout_prob=0.0,
                                 attention_probs_dropout_prob=0.0)
    model = transformers.ViTModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p) if name.endswith("weight") else 0.3 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_vit_every_residual_add_fused_and_matches(dtype):
    original = _vit()
    ref_model = copy.deepcopy(original).double()
    original = original.to(dtype)
    converted = copy.deepcopy(original)
    report = hf.apply(converted)
    assert (report.fused_adds, report.norms_on_kernel) == (2 * LAYERS, 2 * LAYERS + 1)
    pixels = torch.randn(2, 3, 32, 32)
    upstream = torch.randn(2, 17, HIDDEN) / 8

    def run(model):
        model.zero_grad(set_to_none=True)
        out = model(pixels.to(next(model.parameters()).dtype)).last_hidden_state
        (out * upstream.to(out.dtype)).sum().backward()
        return out.detach().double(), {n: p.grad.double() for n, p in model.named_parameters() if p.grad is not None}

    ref, eager, ours = run(ref_model), run(original), run(converted)
    _check("vit output", ours[0], ref[0], eager[0], ATOL[dtype])
    assert ours[1].keys() == ref[1].keys()
    for name in ref[1]:
        _check(f"vit grad of {name}", ours[1][name], ref[1][name], eager[1][name], ATOL[dtype])
    with torch.no_grad(), _CountOps((2, 17, HIDDEN)) as mode:
        converted(pixels.to(dtype))
    assert (mode.adds, mode.fused) == (1, 2 * LAYERS + 1)  # the position embeddings' add remains
    with torch.no_grad():
        got = converted(pixels.to(dtype), output_hidden_states=True).hidden_states
        want = original(pixels.to(dtype), output_hidden_states=True).hidden_states
    assert len(got) == len(want) and all(isinstance(g, torch.Tensor) for g in got)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_vit_activation_checkpointing(reentrant):
    model = _vit()
    hf.apply(model)
    pixels = torch.randn(2, 3, 32, 32)
    _same_grads(_grads(model, pixels, reentrant), _grads(model, pixels, None), exact=not reentrant)


def test_gpt_neox_without_parallel_residual_fuses_every_add():
    cfg = _config("gpt_neox")
    cfg.use_parallel_residual = False
    torch.manual_seed(0)
    original = transformers.AutoModel.from_config(cfg).eval()
    ref_model = copy.deepcopy(original).double()
    converted = copy.deepcopy(original)
    report = hf.apply(converted)
    assert (report.fused_adds, report.left_alone) == (2 * LAYERS, [])
    ids = torch.randint(0, VOCAB, (2, 12))
    upstream = torch.randn(2, 12, HIDDEN) / 8
    ref, eager, ours = (_forward_backward(m, ids, upstream) for m in (ref_model, original, converted))
    _check("gpt_neox output", ours[0], ref[0], eager[0], ATOL[torch.float32])
    for name in ref[1]:
        _check(f"gpt_neox grad of {name}", ours[1][name], ref[1][name], eager[1][name], ATOL[torch.float32])
    with torch.no_grad(), _CountOps((2, 12, HIDDEN)) as mode:
        converted(ids)
    assert (mode.adds, mode.fused) == (0, 2 * LAYERS + 1)


def _seq2seq(family):
    _supported(family)
    torch.manual_seed(0)
    if family == "t5":
        cfg = transformers.T5Config(d_model=HIDDEN, d_ff=128, num_layers=LAYERS, num_decoder_layers=LAYERS,
                                    num_heads=4, d_kv=16, vocab_size=VOCAB, dropout_rate=0.0)
        model = transformers.T5Model(cfg)
        inputs = dict(input_ids=torch.randint(0, VOCAB, (2, 9)), decoder_input_ids=torch.randint(0, VOCAB, (2, 5)))
        norms = 2 * LAYERS + 3 * LAYERS + 2  # encoder 2 per block, decoder 3, two final norms
    else:
        cfg = transformers.WhisperConfig(d_model=HIDDEN, encoder_layers=LAYERS, decoder_layers=LAYERS,
                                         encoder_attention_heads=4, decoder_attention_heads=4,
                                         encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=8,
                                         max_source_positions=8, vocab_size=VOCAB, dropout=0.0, pad_token_id=0,
                                         bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
        model = transformers.WhisperModel(cfg)
        inputs = dict(input_features=torch.randn(2, 8, 16), decoder_input_ids=torch.randint(0, VOCAB, (2, 5)))
        norms = 2 * LAYERS + 3 * LAYERS + 2
    model.eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p) if name.endswith("weight") else 0.3 * torch.randn_like(p))
    return model, inputs, norms


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", ["t5", "whisper"])
def test_encoder_decoder_models(family, dtype):
    original, inputs, norms = _seq2seq(family)
    ref_model = copy.deepcopy(original).double()
    original = original.to(dtype)
    converted = copy.deepcopy(original)
    report = hf.apply(converted)
    # every add of both stacks fused: 2 per encoder layer, 3 per decoder layer
    assert (report.fused_adds, report.norms_on_kernel, report.norms_without_residual) == (5 * LAYERS, norms, 2)
    assert "in fp16 only" in str(report)
    counts = []
    source = 9 if family == "t5" else 8
    cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    for model in (original, converted):
        with torch.no_grad(), _CountOps((2, 5, HIDDEN)) as dec, _CountOps((2, source, HIDDEN)) as enc:
            model(**cast)
        counts.append((dec.adds, enc.adds, dec.fused))
    # the residual adds of the decoder (3 per layer) and the encoder (2) all fused; what
    # is left is Whisper's add of each stack's position embeddings (T5 has none)
    position = 0 if family == "t5" else 1
    assert counts == [(position + 3 * LAYERS, position + 2 * LAYERS, 0), (position, position, norms)]

    def run(model):
        model.zero_grad(set_to_none=True)
        cast = {k: v.to(next(model.parameters()).dtype) if v.is_floating_point() else v for k, v in inputs.items()}
        out = model(**cast).last_hidden_state
        (out * torch.linspace(-1, 1, out.numel()).view(out.shape).to(out.dtype) / 8).sum().backward()
        return out.detach().double(), {n: p.grad.double() for n, p in model.named_parameters() if p.grad is not None}

    ref, eager, ours = run(ref_model), run(original), run(converted)
    _check(f"{family} output", ours[0], ref[0], eager[0], ATOL[dtype])
    assert ours[1].keys() == ref[1].keys()
    for name in ref[1]:
        _check(f"{family} grad of {name}", ours[1][name], ref[1][name], eager[1][name], ATOL[dtype])


def test_whisper_generate_checkpointing_and_fp16_clamp():
    model, inputs, _ = _seq2seq("whisper")
    cfg = model.config
    torch.manual_seed(0)
    original = transformers.WhisperForConditionalGeneration(cfg).eval()
    original.model.load_state_dict(model.state_dict())
    converted = copy.deepcopy(original)
    hf.apply(converted)
    features = inputs["input_features"]
    kwargs = dict(max_new_tokens=5, do_sample=False, decoder_start_token_id=1)
    assert torch.equal(original.generate(features, **kwargs), converted.generate(features, **kwargs))
    with torch.no_grad():  # hidden states of both stacks are the unconverted model's
        got = converted(input_features=features, decoder_input_ids=inputs["decoder_input_ids"],
                        output_hidden_states=True)
        want = original(input_features=features, decoder_input_ids=inputs["decoder_input_ids"],
                        output_hidden_states=True)
    for g, w in zip(got.encoder_hidden_states + got.decoder_hidden_states,
                    want.encoder_hidden_states + want.decoder_hidden_states):
        assert isinstance(g, torch.Tensor)
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    core = converted.model
    grads = []
    for mode in (None, False, True):
        core.train()
        _set_checkpointing(core, mode)
        core.zero_grad(set_to_none=True)
        out = core(**inputs).last_hidden_state
        (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
        grads.append({n: p.grad.clone() for n, p in core.named_parameters() if p.grad is not None})
    for other in grads[1:]:  # reentrant mode also sums encoder_hidden_states' gradient in another order
        _same_grads(other, grads[0], exact=False)
    # fp16: each encoder layer's sum is clamped before the next norm, as in the original
    half = copy.deepcopy(model).half().eval()
    half_conv = copy.deepcopy(half)
    hf.apply(half_conv)
    enc_in = inputs["input_features"].half()
    with torch.no_grad(), _CountOps((2, 8, HIDDEN)) as enc:
        b = half_conv.encoder(enc_in).last_hidden_state
    with torch.no_grad():
        a = half.encoder(enc_in).last_hidden_state
    assert enc.adds == 1 + LAYERS  # position embeddings, and each layer's clamped last add
    torch.testing.assert_close(b.float(), a.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2", "gpt_neox"])
def test_reentrant_checkpointing_with_hidden_states(family):
    """Under reentrant checkpointing the recompute runs in backward with no output
    collector: the layers return hidden states in both runs (a pair in one and a sum
    in the other would not match)."""
    model = _converted(_model(family)).train()
    ids = torch.randint(0, VOCAB, (2, 12))

    def grads(mode):
        _set_checkpointing(model, mode)
        model.zero_grad(set_to_none=True)
        out = model(ids, output_hidden_states=True)
        loss = out.last_hidden_state.square().mean() + sum(h.square().mean() for h in out.hidden_states[1:-1])
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads(None)
    for mode in (True, False):
        got = grads(mode)
        assert got.keys() == plain.keys()
        for n in plain:
            torch.testing.assert_close(got[n], plain[n], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "falcon", "t5"])
def test_reentrant_recompute_returns_what_the_forward_returned(family):
    """Reentrant checkpointing runs the layer's forward with grad disabled and its
    recompute with grad enabled; both must return the same structure (a pair in one
    and a sum in the other would pair each gradient with the wrong output)."""
    if family == "t5":
        model, inputs, _ = _seq2seq("t5")
    else:
        model, inputs = _model(family), {"input_ids": torch.randint(0, VOCAB, (2, 12))}
    hf.apply(model)
    model.train()
    _set_checkpointing(model, True)
    shapes = []

    def recording(function, *args, **kwargs):
        def run(*a):
            out = function(*a)
            shapes.append((torch.is_grad_enabled(), [tuple(t.shape) if isinstance(t, torch.Tensor) else t
                                                     for t in out]))
            return out
        return torch.utils.checkpoint.checkpoint(run, *args, **kwargs)

    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
    assert layers
    for layer in layers:
        layer._gradient_checkpointing_func = functools.partial(recording, use_reentrant=True)
    out = model(**inputs).last_hidden_state
    forward = list(shapes)
    assert forward and not any(grad for grad, _ in forward)
    out.square().sum().backward()
    recompute = shapes[len(forward):]
    assert all(grad for grad, _ in recompute)
    assert sorted(map(str, recompute)) == sorted(str((True, s)) for _, s in forward)


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_layers_compiled_one_by_one_keep_hidden_states_and_fusion(family):
    """Regional compilation (each layer compiled on its own, as accelerate's
    compile_regions does): the output collector is set outside the compiled code,
    and the layers still return hidden states to it, pairs otherwise."""
    if family == "t5":
        original, inputs, _ = _seq2seq("t5")
        shapes, adds = [(2, 5, HIDDEN), (2, 9, HIDDEN)], (0, 0)
    else:
        original, inputs = _model(family), {"input_ids": torch.randint(0, VOCAB, (2, 12))}
        shapes, adds = [(2, 12, HIDDEN)], (0,)
    converted = copy.deepcopy(original)
    hf.apply(converted)
    torch._dynamo.reset()
    for layer in converted.modules():
        if type(layer).__name__.startswith(("Fused_llama_LlamaDecoderLayer", "Fused_t5_T5Block")):
            layer.compile(backend="eager")  # (transformers' own capture hooks break the graph)
    with torch.no_grad():
        got = converted(**inputs, output_hidden_states=True)
        want = original(**inputs, output_hidden_states=True)
    keys = ["hidden_states"] if family != "t5" else ["encoder_hidden_states", "decoder_hidden_states"]
    for key in keys:
        assert len(got[key]) == len(want[key])
        for g, w in zip(got[key], want[key]):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    with torch.no_grad(), contextlib.ExitStack() as stack:
        modes = [stack.enter_context(_CountOps(shape)) for shape in shapes]
        converted(**inputs)
    assert tuple(m.adds for m in modes) == adds


def test_hooks_on_t5_sublayers_see_the_original_tensors():
    model, inputs, _ = _seq2seq("t5")
    converted = copy.deepcopy(model)
    hf.apply(converted)
    seen = {}
    for name, m in (("original", model), ("converted", converted)):
        outs, ins = [], []
        handles = [m.encoder.block[1].layer[0].register_forward_hook(lambda mod, a, o: outs.append(o[0])),
                   m.decoder.block[0].layer[-1].register_forward_pre_hook(lambda mod, a: ins.append(a[0]))]
        with torch.no_grad():
            out = m(**inputs).last_hidden_state
        for h in handles:
            h.remove()
        seen[name] = (outs[0], ins[0], out)
    for got, want in zip(seen["converted"], seen["original"]):
        assert isinstance(got, torch.Tensor)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_falcon_hooks_see_hidden_states_and_invalid_configs_are_refused():
    cfg = _config("falcon")
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(cfg).eval()
    seen = []
    model.register_forward_hook(lambda mod, a, out: seen.extend(out.hidden_states))
    hf.apply(model)  # the conversion's own hook runs before the user's
    with torch.no_grad():
        model(torch.randint(0, VOCAB, (2, 12)), output_hidden_states=True)
    assert len(seen) == LAYERS + 1 and all(isinstance(h, torch.Tensor) for h in seen)
    cfg.new_decoder_architecture, cfg.parallel_attn = True, False  # transformers' forward fails on it
    with pytest.raises(ValueError, match="new_decoder_architecture=True with parallel_attn=False"):
        hf.apply(transformers.AutoModel.from_config(cfg))


def test_hooks_and_custom_loops_see_hidden_states():
    original = _model("llama")
    converted = _converted(original)
    ids = torch.randint(0, VOCAB, (2, 12))
    seen = {}
    for name, model in (("original", original), ("converted", converted)):
        outs, ins = [], []
        handles = [model.layers[1].register_forward_hook(lambda m, a, o: outs.append(o)),
                   model.layers[1].register_forward_pre_hook(lambda m, a: ins.append(a[0]))]
        with torch.no_grad():
            model(ids)
        for h in handles:
            h.remove()
        seen[name] = (ins[0], outs[0])
    for got, want in zip(seen["converted"], seen["original"]):
        assert isinstance(got, torch.Tensor)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # without hooks the layers hand pairs on again
        with _CountOps((2, 12, HIDDEN)) as mode:
            converted(ids)
    assert mode.adds == 0
    # a layer called by hand returns a pair, which cannot be mistaken for the hidden state
    hidden = converted.embed_tokens(ids)
    pos = converted.rotary_emb(hidden, torch.arange(12)[None])
    with torch.no_grad():
        pair = converted.layers[0](hidden, position_embeddings=pos)
    assert isinstance(pair, hf.ResidualPair)
    with pytest.raises(TypeError):
        pair[0]
    with pytest.raises(TypeError):
        pair + 1
    assert pair.hidden_state().shape == hidden.shape


def test_t5_generate_hidden_states_attentions_checkpointing_and_fp16():
    _supported("t5")
    model, inputs, norms = _seq2seq("t5")
    torch.manual_seed(0)
    original = transformers.T5ForConditionalGeneration(model.config).eval()
    with torch.no_grad():  # norms away from their ones
        for name, p in original.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    original.set_attn_implementation("eager")  # attention weights are returned
    converted = copy.deepcopy(original)
    hf.apply(converted)
    ids = inputs["input_ids"]
    kwargs = dict(max_new_tokens=5, do_sample=False, decoder_start_token_id=0, pad_token_id=0)
    assert torch.equal(original.generate(ids, **kwargs), converted.generate(ids, **kwargs))
    with torch.no_grad():
        got = converted(**inputs, output_hidden_states=True, output_attentions=True)
        want = original(**inputs, output_hidden_states=True, output_attentions=True)
    for key in ("encoder_hidden_states", "decoder_hidden_states", "encoder_attentions", "decoder_attentions",
                "cross_attentions"):
        assert len(got[key]) == len(want[key]) > 0, key
        for g, w in zip(got[key], want[key]):
            assert isinstance(g, torch.Tensor)
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    core = converted.train()
    grads = []
    for mode in (None, False, True):
        _set_checkpointing(core, mode)
        core.zero_grad(set_to_none=True)
        core(**inputs, labels=inputs["decoder_input_ids"]).loss.backward()
        grads.append({n: p.grad.clone() for n, p in core.named_parameters() if p.grad is not None})
    for other in grads[1:]:  # the encoder output's gradient (from every cross-attention) sums in another order
        _same_grads(other, grads[0], exact=False)
    # fp16: T5 clamps each sum before the next norm, so every add stays in PyTorch
    half = copy.deepcopy(model).half().eval()
    half_conv = copy.deepcopy(half)
    hf.apply(half_conv)
    for m in (half, half_conv):
        with torch.no_grad(), _CountOps((2, 5, HIDDEN)) as dec, _CountOps((2, 9, HIDDEN)) as enc:
            out = m(**inputs).last_hidden_state
        assert (dec.adds, enc.adds, dec.fused) == (3 * LAYERS, 2 * LAYERS, norms if m is half_conv else 0)
        if m is half:
            want = out
    torch.testing.assert_close(out.float(), want.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("family", ["t5", "whisper"])
def test_torch_compile_fullgraph_of_a_converted_encoder_decoder(family):
    model, inputs, _ = _seq2seq(family)
    hf.apply(model)
    torch._dynamo.reset()
    with torch.no_grad():
        want = model(**inputs).last_hidden_state
        got = torch.compile(model, fullgraph=True, backend="aot_eager")(**inputs).last_hidden_state
    assert torch.equal(got, want)


@pytest.mark.parametrize("family", ["t5", "whisper"])
def test_torch_save_of_a_converted_encoder_decoder(family, tmp_path):
    model, inputs, _ = _seq2seq(family)
    hf.apply(model)
    with torch.no_grad():
        want = model(**inputs).last_hidden_state
    torch.save(model, tmp_path / "model.pt")
    torch.save({"inputs": inputs, "want": want}, tmp_path / "io.pt")
    code = ("import torch, sys; m = torch.load(sys.argv[1], weights_only=False); io = torch.load(sys.argv[2]);"
            "names = {type(x).__name__ for x in m.modules()};"
            "assert {'Fused_t5_T5Block', 'Fused_t5_T5LayerFF'} <= names or 'Fused_whisper_encoder_WhisperEncoderLayer'"
            " in names, names;"
            f"torch.set_grad_enabled(False); torch.set_num_threads({torch.get_num_threads()});"  # as want was computed
            "torch.testing.assert_close(m(**io['inputs']).last_hidden_state, io['want'], rtol=1e-5, atol=1e-6)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "model.pt"), str(tmp_path / "io.pt")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_t5_in_fp16_keeps_its_fp32_layers_and_norm_dtypes():
    model, inputs, _ = _seq2seq("t5")
    model = model.half()
    for name, module in model.named_modules():  # as from_pretrained(dtype=float16) leaves T5
        if name.endswith(".wo"):
            module.float()
    converted = copy.deepcopy(model)
    hf.apply(converted)
    with torch.no_grad():
        want = model(**inputs).last_hidden_state
        got = converted(**inputs).last_hidden_state
    assert got.dtype == want.dtype
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_instance_forwards_and_hooked_norms_are_refused():
    model = _model("llama")
    layer = model.layers[0]
    layer.forward = functools.partial(type(layer).forward, layer)  # as accelerate's dispatch does
    with pytest.raises(ValueError, match=r"LlamaModel.layers\[0\] has a per-instance forward"):
        hf.apply(model)
    model = _model("llama")
    model.norm.register_forward_hook(lambda m, a, o: None)
    with pytest.raises(ValueError, match="LlamaRMSNorm has hooks or a per-instance forward"):
        hf.apply(model)
