"""End-to-end training step with and without the fused Add & Norm.

    python bench/bench_model.py                  # both models, seq 512 and 2048 (GPU)
    python bench/bench_model.py --model llama --seq 2048 --layers 4
    python bench/bench_model.py --families all   # every Hugging Face family apply() converts
    python bench/bench_model.py --families all --accuracy   # their errors against float64

Two stacks with their real Add & Norm pattern, built from a config with random
weights (nothing is downloaded). With ``transformers`` installed (``--source hf``,
the default when it imports) they are Hugging Face ``BertModel`` / ``LlamaModel``
converted by ``residual_fused.integrations.huggingface``; otherwise (``--source
builtin``) small built-in blocks of the same shapes:

* ``bert``: a BERT-base-shaped post-norm encoder (H 768, 12 heads, FFN 3072),
  ``h = LayerNorm(f(h) + h)`` twice per layer;
* ``llama``: a Llama-shaped pre-RMSNorm decoder (H 4096, 32 heads, SwiGLU 11008),
  where the residual add is fused into the next norm.

Implementations: ``unfused`` (torch.nn norms, the add in PyTorch), ``fused``
(FusedAddNorm / FusedAddRMSNorm) and ``fused-mem`` (memory-efficient). The fused
models load the unfused model's state_dict and their outputs are checked against
it before anything is timed. Each row: median training-step time (forward,
backward, AdamW) and peak memory. Without a GPU the shapes are shrunk and the
times are of the reference path: they say nothing about the CUDA kernels.
"""

import argparse
import copy
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import residual_fused as rf

IMPLS = ("unfused", "fused", "fused-mem")
SHAPES = {  # hidden, heads, ffn, layers (GPU)
    "bert": (768, 12, 3072, 12),
    "llama": (4096, 32, 11008, 4),
}
CPU_SHAPES = {"bert": (128, 4, 512, 2), "llama": (128, 4, 352, 2)}


def _norm(kind: str, impl: str, hidden: int, eps: float, prenorm: bool = False):
    if impl == "unfused":
        return nn.LayerNorm(hidden, eps=eps) if kind == "layer" else nn.RMSNorm(hidden, eps=eps)
    mem = impl == "fused-mem"
    if kind == "layer":
        return rf.FusedAddNorm(hidden, eps=eps, prenorm=prenorm, memory_efficient=mem)
    return rf.FusedAddRMSNorm(hidden, eps=eps, prenorm=prenorm, memory_efficient=mem)


def _attention(qkv: torch.Tensor, heads: int, causal: bool) -> torch.Tensor:
    b, s, three_h = qkv.shape
    q, k, v = qkv.view(b, s, 3, heads, three_h // (3 * heads)).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return out.transpose(1, 2).reshape(b, s, three_h // 3)


class BertLayer(nn.Module):
    """Post-norm: h = LN(attn(h) + h); h = LN(ffn(h) + h)."""

    def __init__(self, hidden, heads, ffn, impl):
        super().__init__()
        self.heads, self.fused = heads, impl != "unfused"
        self.qkv, self.attn_out = nn.Linear(hidden, 3 * hidden), nn.Linear(hidden, hidden)
        self.up, self.down = nn.Linear(hidden, ffn), nn.Linear(ffn, hidden)
        self.norm1 = _norm("layer", impl, hidden, 1e-12)
        self.norm2 = _norm("layer", impl, hidden, 1e-12)

    def _add_norm(self, norm, x, residual):
        return norm(x, residual) if self.fused else norm(x + residual)

    def forward(self, h):
        h = self._add_norm(self.norm1, self.attn_out(_attention(self.qkv(h), self.heads, False)), h)
        return self._add_norm(self.norm2, self.down(F.gelu(self.up(h))), h)


class LlamaLayer(nn.Module):
    """Pre-norm with the residual add fused into the next norm:
    (h, residual) -> norm(h + residual) feeds attention, and so on."""

    def __init__(self, hidden, heads, ffn, impl):
        super().__init__()
        self.heads, self.fused = heads, impl != "unfused"
        self.qkv, self.o = nn.Linear(hidden, 3 * hidden, bias=False), nn.Linear(hidden, hidden, bias=False)
        self.gate_up = nn.Linear(hidden, 2 * ffn, bias=False)
        self.down = nn.Linear(ffn, hidden, bias=False)
        self.norm1 = _norm("rms", impl, hidden, 1e-6, prenorm=True)
        self.norm2 = _norm("rms", impl, hidden, 1e-6, prenorm=True)

    def _add_norm(self, norm, h, residual):
        if self.fused:
            return norm(h, residual)
        residual = h if residual is None else h + residual
        return norm(residual), residual

    def forward(self, h, residual):
        h, residual = self._add_norm(self.norm1, h, residual)
        h = self.o(_attention(self.qkv(h), self.heads, True))
        h, residual = self._add_norm(self.norm2, h, residual)
        gate, up = self.gate_up(h).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up), residual


class Stack(nn.Module):
    def __init__(self, model, hidden, heads, ffn, layers, impl):
        super().__init__()
        self.model, self.fused = model, impl != "unfused"
        cls = BertLayer if model == "bert" else LlamaLayer
        self.layers = nn.ModuleList(cls(hidden, heads, ffn, impl) for _ in range(layers))
        if model == "llama":
            self.final_norm = _norm("rms", impl, hidden, 1e-6)

    def forward(self, h):
        if self.model == "bert":
            for layer in self.layers:
                h = layer(h)
            return h
        residual = None
        for layer in self.layers:
            h, residual = layer(h, residual)
        return self.final_norm(h, residual) if self.fused else self.final_norm(h + residual)


def build(model, impl, shape, device, dtype, reference=None):
    hidden, heads, ffn, layers = shape
    net = Stack(model, hidden, heads, ffn, layers, impl).to(device=device, dtype=dtype)
    if reference is not None:
        net.load_state_dict(reference.state_dict())  # the norms' keys match torch's
    else:
        with torch.no_grad():  # random norm parameters too, so the check is meaningful
            for name, p in net.named_parameters():
                if "norm" in name:
                    p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("weight") else 0.1 * torch.randn_like(p))
    return net


def build_hf(model, impl, shape, device, dtype, reference=None):
    """A transformers model of the same shape; fused variants convert a copy of
    ``reference`` (so the weights are identical)."""
    import transformers
    from residual_fused.integrations import huggingface as hf

    if reference is not None:
        convert = hf.convert_bert_model if model == "bert" else hf.convert_llama_model
        return convert(copy.deepcopy(reference), memory_efficient=impl == "fused-mem")
    hidden, heads, ffn, layers = shape
    if model == "bert":
        cfg = transformers.BertConfig(hidden_size=hidden, num_attention_heads=heads,
                                      intermediate_size=ffn, num_hidden_layers=layers,
                                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        net = transformers.BertModel(cfg, add_pooling_layer=False)
    else:
        cfg = transformers.LlamaConfig(hidden_size=hidden, num_attention_heads=heads,
                                       num_key_value_heads=heads, intermediate_size=ffn,
                                       num_hidden_layers=layers)
        net = transformers.LlamaModel(cfg)
    return net.to(device=device, dtype=dtype)


class _Hidden(nn.Module):
    """Adapts a transformers model to ``net(input_ids) -> last hidden state``."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, ids):
        return self.net(input_ids=ids).last_hidden_state


def timed_steps(net, x, steps, device):
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)

    def one():
        opt.zero_grad(set_to_none=True)
        net(x).float().square().mean().backward()
        opt.step()

    for _ in range(2):
        one()
    times = []
    for _ in range(steps):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            one()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            one()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run(args):
    device = args.device
    on_gpu = device.startswith("cuda")
    dtype = torch.bfloat16
    if not on_gpu:
        print("CPU only: shrunk shapes (sequence <= 128), reference path; "
              "CUDA numbers need a GPU.")
    results = []
    for model in args.model:
        if args.source == "hf":
            from residual_fused.integrations import huggingface as hf
            try:  # a transformers version the conversion refuses: skip that model, say why
                hf._check_version(model)
            except (RuntimeError, ImportError) as err:
                print(f"skipping {model}: {err}")
                continue
        shape = (SHAPES if on_gpu else CPU_SHAPES)[model]
        if args.layers:
            shape = shape[:3] + (args.layers,)
        for seq in (args.seq if on_gpu else sorted({min(s, 128) for s in args.seq})):
            torch.manual_seed(0)
            batch = args.batch or (8 if model == "bert" else 1)
            if args.source == "hf":
                x = torch.randint(0, 1000, (batch, seq), device=device)
                make = lambda impl, ref=None: _Hidden(  # noqa: E731
                    build_hf(model, impl, shape, device, dtype, None if ref is None else ref.net))
            else:
                x = torch.randn(batch, seq, shape[0], device=device, dtype=dtype)
                make = lambda impl, ref=None: build(model, impl, shape, device, dtype, ref)  # noqa: E731
            base = make("unfused")
            with torch.no_grad():
                expected = base(x).float()
            base_ms = None
            for impl in args.impls:
                net = base if impl == "unfused" else make(impl, base)
                with torch.no_grad():
                    err = (net(x).float() - expected).abs().max().item()
                scale = expected.abs().max().item()
                if not err <= 0.05 * max(1.0, scale):
                    raise AssertionError(f"{model} {impl}: output differs from unfused by {err:.3g}")
                net_for_timing = copy.deepcopy(net)
                if on_gpu:
                    torch.cuda.reset_peak_memory_stats(device)
                ms = timed_steps(net_for_timing, x, args.steps, device)
                peak = torch.cuda.max_memory_allocated(device) / 2**20 if on_gpu else None
                base_ms = base_ms or ms
                results.append(dict(model=model, source=args.source, seq=seq, batch=batch,
                                    layers=shape[3], impl=impl,
                                    step_ms=ms, peak_mib=peak, speedup=base_ms / ms,
                                    max_abs_diff=err))
                del net_for_timing
    return results


FAMILY_SHAPES = {"cuda": (2048, 16, 4, 1024, 4), "cpu": (512, 8, 4, 256, 4)}  # hidden, heads, layers, seq, batch


def all_families():
    from residual_fused.integrations import huggingface as hf

    return hf.supported_model_types()


def family_model(family: str, hidden: int, heads: int, layers: int, device, dtype, seq: int = 256):
    """A transformers model of ``family`` from its default config, resized, random weights."""
    import transformers

    sizes = dict(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                 num_attention_heads=heads, num_key_value_heads=heads, vocab_size=1000, pad_token_id=0,
                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
                 attn_pdrop=0.0)
    if family == "t5":
        sizes = dict(d_model=hidden, d_ff=4 * hidden, num_layers=layers, num_decoder_layers=layers, num_heads=heads,
                     d_kv=hidden // heads, vocab_size=1000, dropout_rate=0.0)
    elif family == "whisper":
        sizes = dict(d_model=hidden, encoder_layers=layers, decoder_layers=layers, encoder_attention_heads=heads,
                     decoder_attention_heads=heads, encoder_ffn_dim=4 * hidden, decoder_ffn_dim=4 * hidden,
                     num_mel_bins=80, max_source_positions=seq, vocab_size=1000, dropout=0.0, pad_token_id=0,
                     bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    elif family == "vit":
        sizes.update(image_size=256, patch_size=16)
    defaults = transformers.AutoConfig.for_model(family)
    if family not in ("t5", "whisper") and not isinstance(getattr(type(defaults), "head_dim", None), property):
        sizes["head_dim"] = hidden // heads
    for key, value in dict(num_local_experts=8, num_experts=8, num_experts_per_tok=2,
                           moe_intermediate_size=hidden, shared_expert_intermediate_size=hidden).items():
        if hasattr(defaults, key):
            sizes[key] = value
    config = transformers.AutoConfig.for_model(family, **sizes)
    if dtype == torch.float64:
        config._experts_implementation = "eager"  # grouped_mm has no float64
    torch.manual_seed(0)
    return transformers.AutoModel.from_config(config).to(device=device, dtype=dtype)


def family_inputs(family: str, model, batch: int, seq: int, device, dtype) -> dict:
    """Inputs of ``seq`` tokens per sequence (the encoder-decoders' decoders get seq / 4;
    ViT gets 256 patches, Whisper 2 * seq mel frames for seq encoder positions)."""
    ids = torch.randint(1, 1000, (batch, seq), device=device)
    if family == "t5":
        return dict(input_ids=ids, decoder_input_ids=ids[:, : seq // 4])
    if family == "whisper":
        frames = 2 * model.config.max_source_positions
        return dict(input_features=torch.randn(batch, model.config.num_mel_bins, frames, device=device, dtype=dtype),
                    decoder_input_ids=ids[:, : seq // 4])
    if family == "vit":
        size = model.config.image_size
        return dict(pixel_values=torch.randn(batch, 3, size, size, device=device, dtype=dtype))
    return dict(input_ids=ids)


def residual_adds(family: str, layers: int) -> int:
    """Residual adds of the unconverted model: 2 per layer, 3 per decoder layer of an
    encoder-decoder (a parallel residual's x + attn + mlp counts as 2)."""
    return 5 * layers if family in ("t5", "whisper") else 2 * layers


def run_families(args):
    """Per family: a training step (forward, backward, no optimizer) of the converted
    model against the unconverted one, timed in interleaved pairs; medians and the
    spread of the ratio, and the largest output difference."""
    from residual_fused.integrations import huggingface as hf

    device = args.device
    hidden, heads, layers, seq, batch = FAMILY_SHAPES["cuda" if device.startswith("cuda") else "cpu"]
    if args.layers:
        layers = args.layers
    if args.seq != [512, 2048]:
        seq = args.seq[0]
    dtype = torch.bfloat16
    names = all_families() if args.families == ["all"] else args.families
    rows = []
    for family in names:
        base = family_model(family, hidden, heads, layers, device, dtype, seq).train()
        conv = copy.deepcopy(base)
        report = hf.apply(conv)
        x = family_inputs(family, base, batch, seq, device, dtype)
        with torch.no_grad():
            want = base.eval()(**x).last_hidden_state.float()
            diff = (conv.eval()(**x).last_hidden_state.float() - want).abs().max().item()
        base.train(), conv.train()

        def step(model):
            model.zero_grad(set_to_none=True)
            model(**x).last_hidden_state.float().square().mean().backward()

        def timed(model):
            if device.startswith("cuda"):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                step(model)
                end.record()
                torch.cuda.synchronize()
                return start.elapsed_time(end)
            t0 = time.perf_counter()
            step(model)
            return (time.perf_counter() - t0) * 1e3

        for _ in range(2):
            step(base), step(conv)
        pairs = [(timed(base), timed(conv)) for _ in range(args.steps)]
        ratios = sorted(c / b for b, c in pairs)
        rows.append(dict(family=family, layers=layers, fused_adds=report.fused_adds,
                         adds=residual_adds(family, layers),
                         norms_on_kernel=report.norms_on_kernel,
                         unconverted_ms=statistics.median(b for b, _ in pairs),
                         converted_ms=statistics.median(c for _, c in pairs),
                         ratio=statistics.median(ratios), ratio_min=ratios[0], ratio_max=ratios[-1],
                         max_abs_diff=diff))
    print(f"families: bf16, hidden {hidden}, {heads} heads, {layers} layers, {batch} x {seq} tokens, "
          f"{device}, torch threads {torch.get_num_threads()}, {args.steps} interleaved pairs")
    print(f"{'family':12} {'adds fused':>10} {'unconverted':>12} {'converted':>10} {'ratio':>6} "
          f"{'(min-max)':>12} {'max|diff|':>10}")
    for r in rows:
        print(f"{r['family']:12} {r['fused_adds']:>4} of {r['adds']:<3} {r['unconverted_ms']:>10.1f}ms "
              f"{r['converted_ms']:>8.1f}ms {r['ratio']:>6.2f} ({r['ratio_min']:.2f}-{r['ratio_max']:.2f}) "
              f"{r['max_abs_diff']:>10.3g}")
    return rows


ACCURACY_SHAPE = (128, 4, 2, 32, 2)  # hidden, heads, layers, seq, batch


def _loss_grads(model, inputs):
    model.zero_grad(set_to_none=True)
    dtype = next(model.parameters()).dtype
    cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    out = model(**cast).last_hidden_state
    (out * torch.linspace(-1, 1, out.numel()).view(out.shape).to(out.dtype) / 8).sum().backward()
    return out.detach().double(), {n: p.grad.double() for n, p in model.named_parameters() if p.grad is not None}


def family_accuracy(family: str, dtype) -> dict:
    """Errors against the model in float64 (random weights, the norms' weights and
    biases drawn away from ones and zeros): the last hidden state's largest absolute
    error, and the largest error of any parameter's gradient relative to the largest
    gradient element of the model, for the converted and the unconverted model in
    ``dtype``."""
    from residual_fused.integrations import huggingface as hf

    hidden, heads, layers, seq, batch = ACCURACY_SHAPE
    ref = family_model(family, hidden, heads, layers, "cpu", torch.float64, seq).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name.lower():
                p.copy_(1 + 0.3 * torch.randn_like(p) if name.endswith("weight") else 0.3 * torch.randn_like(p))
    base = copy.deepcopy(ref).to(dtype)
    conv = copy.deepcopy(base)
    report = hf.apply(conv)
    inputs = family_inputs(family, ref, batch, seq, "cpu", torch.float64)
    want = _loss_grads(ref, inputs)
    row = dict(family=family, dtype=str(dtype).replace("torch.", ""), fused_adds=report.fused_adds,
               adds=residual_adds(family, layers))
    for name, model in (("converted", conv), ("unconverted", base)):
        out, grads = _loss_grads(model, inputs)
        row[f"{name}_out_err"] = (out - want[0]).abs().max().item()
        scale = max(g.abs().max().item() for g in want[1].values())
        row[f"{name}_grad_err"] = max((grads[n] - g).abs().max().item() for n, g in want[1].items()) / scale
    return row


def run_accuracy(args):
    names = all_families() if args.families == ["all"] else args.families
    rows = [family_accuracy(f, d) for f in names for d in (torch.float32, torch.bfloat16)]
    hidden, heads, layers, seq, batch = ACCURACY_SHAPE
    print(f"accuracy against float64: hidden {hidden}, {heads} heads, {layers} layers, {batch} x {seq} tokens; "
          f"out: max|last hidden state - ref|; grad: max|g - g_ref| over all parameters / max|g_ref|")
    print(f"{'family':12} {'dtype':8} {'adds fused':>10} {'out conv':>9} {'out base':>9} {'grad conv':>9} "
          f"{'grad base':>9}")
    for r in rows:
        print(f"{r['family']:12} {r['dtype']:8} {r['fused_adds']:>4} of {r['adds']:<3} {r['converted_out_err']:>9.2g} "
              f"{r['unconverted_out_err']:>9.2g} {r['converted_grad_err']:>9.2g} {r['unconverted_grad_err']:>9.2g}")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", nargs="+", default=["bert", "llama"], choices=list(SHAPES))
    p.add_argument("--seq", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--batch", type=int)
    p.add_argument("--layers", type=int)
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--source", choices=["hf", "builtin"],
                   help="model code: Hugging Face transformers (default when importable) or built-in")
    p.add_argument("--out", help="write model.csv into this folder")
    p.add_argument("--families", nargs="+",
                   help="instead: Hugging Face families by model_type (or 'all'), converted vs unconverted")
    p.add_argument("--accuracy", action="store_true",
                   help="with --families: errors against float64 (fp32 and bf16) instead of step times")
    args = p.parse_args(argv)
    if args.families:
        return run_accuracy(args) if args.accuracy else run_families(args)
    if args.source is None:
        try:
            import transformers  # noqa: F401
            args.source = "hf"
        except ImportError:
            args.source = "builtin"
    print(f"model source: {args.source}")
    results = run(args)
    print(f"{'model':6} {'seq':>5} {'batch':>5} {'layers':>6} {'impl':10} {'step':>10} "
          f"{'peak':>10} {'speedup':>8} {'max|diff|':>10}")
    for r in results:
        peak = "n/a" if r["peak_mib"] is None else f"{r['peak_mib']:.0f} MiB"
        print(f"{r['model']:6} {r['seq']:>5} {r['batch']:>5} {r['layers']:>6} {r['impl']:10} "
              f"{r['step_ms']:>8.1f}ms {peak:>10} {r['speedup']:>7.2f}x {r['max_abs_diff']:>10.3g}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        import csv
        with open(os.path.join(args.out, "model.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(results[0]))
            writer.writeheader()
            writer.writerows(results)
    return results


if __name__ == "__main__":
    main()
