"""Why residual connections: a deep stack of blocks trains with them and stalls without.

Builds a stack of ``--depth`` blocks (128 by default) from this library's modules, each
block a two-layer MLP branch joined to the stream by Add & Norm, and trains it on a
small synthetic regression task (match a fixed random "teacher" network) on CPU, in
four forms:

- pre-norm with residuals (GPT, Llama): ``y, stream = norm(x, stream); x = branch(y)``,
  one ``FusedAddNorm(prenorm=True)`` call per block;
- pre-norm without residuals: ``x = branch(norm(x))``;
- post-norm with residuals (the original Transformer, BERT): ``x = norm(branch(x), x)``;
- post-norm without residuals: ``x = norm(branch(x))``.

It records the loss at every step and, at the first step, the gradient norm of every
block's first weight, then draws both (``deep_residual.png``) and writes the numbers
(``deep_residual.json``) into ``--out``.

    python examples/deep_residual.py                      # about a minute on 2 cores
    python examples/deep_residual.py --depth 32 --steps 100 --out /tmp/demo
"""

import argparse
import json
import math
import os
import time

import torch
from torch import nn

import residual_fused as rf

FORMS = ("pre-norm, residual", "pre-norm, no residual", "post-norm, residual", "post-norm, no residual")


class Block(nn.Module):
    """One block: the branch ``W2 gelu(W1 .)`` and its Add & Norm."""

    def __init__(self, width: int, prenorm: bool):
        super().__init__()
        self.branch = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.norm = rf.FusedAddNorm(width, prenorm=prenorm)


class DeepStack(nn.Module):
    """``depth`` blocks between an input projection and a linear head, in one of FORMS."""

    def __init__(self, form: str, depth: int, width: int, inputs: int, outputs: int):
        super().__init__()
        self.prenorm, self.residual = form.startswith("pre"), "no residual" not in form
        self.embed = nn.Linear(inputs, width)
        self.blocks = nn.ModuleList(Block(width, self.prenorm) for _ in range(depth))
        self.final_norm = rf.FusedAddNorm(width)
        self.head = nn.Linear(width, outputs)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x, stream = self.embed(inputs), None
        for block in self.blocks:
            if self.prenorm and self.residual:
                y, stream = block.norm(x, stream)  # y = norm(x + stream); stream = x + stream
                x = block.branch(y)
            elif self.prenorm:
                x = block.branch(block.norm(x)[0])
            elif self.residual:
                x = block.norm(block.branch(x), x)  # LayerNorm(branch(x) + x)
            else:
                x = block.norm(block.branch(x))
        return self.head(self.final_norm(x, stream) if self.prenorm and self.residual else self.final_norm(x))


def make_task(inputs: int, outputs: int, samples: int, seed: int):
    """Inputs and the outputs of a fixed random two-layer tanh network (the teacher)."""
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(inputs, 4 * inputs, generator=g) / math.sqrt(inputs)
    w2 = torch.randn(4 * inputs, outputs, generator=g) / math.sqrt(4 * inputs)
    x = torch.randn(samples, inputs, generator=g)
    y = torch.tanh(x @ w1) @ w2
    return x, y / y.std()


def train(form: str, args, data) -> dict:
    torch.manual_seed(args.seed)  # the same initial weights for every form
    x, y = data
    model = DeepStack(form, args.depth, args.width, x.shape[1], y.shape[1])
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    g = torch.Generator().manual_seed(args.seed + 1)
    losses, grad_norms = [], None
    for step in range(args.steps):
        batch = torch.randint(0, x.shape[0], (args.batch,), generator=g)
        loss = nn.functional.mse_loss(model(x[batch]), y[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if step == 0:  # at initialisation: how much gradient reaches each block
            grad_norms = [block.branch[0].weight.grad.norm().item() for block in model.blocks]
        optimizer.step()
        losses.append(loss.item())
    return {"losses": losses, "grad_norms": grad_norms}


def summary(result: dict) -> dict:
    """The numbers the plot shows, reduced: the loss at the start and over the last
    tenth of training, and the first and last blocks' gradient norms at step 0."""
    losses, grads = result["losses"], result["grad_norms"]
    tail = losses[-max(1, len(losses) // 10):]
    return {"loss_start": losses[0], "loss_end": sum(tail) / len(tail), "grad_first_block": grads[0],
            "grad_last_block": grads[-1]}


def plot(results: dict, args, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_grad) = plt.subplots(1, 2, figsize=(12, 4.5))
    for form, result in results.items():
        style = "-" if "no residual" not in form else "--"
        ax_loss.plot(result["losses"], style, label=form)
        ax_grad.plot(range(1, args.depth + 1), result["grad_norms"], style, label=form)
    ax_loss.set(yscale="log", xlabel="step", ylabel="training loss (MSE)",
                title=f"{args.depth} blocks of width {args.width}: loss")
    ax_grad.set(yscale="log", xlabel="block (1 = nearest the input)",
                ylabel="gradient norm of the block's first weight",
                title="gradient reaching each block, first step")
    for ax in (ax_loss, ax_grad):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=int, default=128, help="blocks in the stack (default 128)")
    p.add_argument("--width", type=int, default=64, help="width of the residual stream (default 64)")
    p.add_argument("--steps", type=int, default=200, help="training steps per form (default 200)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--forms", nargs="+", default=list(FORMS), choices=FORMS)
    p.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)),
                   help="where deep_residual.png and deep_residual.json go (default: next to this script)")
    p.add_argument("--no-plot", action="store_true", help="write only the JSON")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    data = make_task(inputs=16, outputs=4, samples=4096, seed=args.seed)
    results, start = {}, time.perf_counter()
    for form in args.forms:
        results[form] = train(form, args, data)
        s = summary(results[form])
        print(f"{form:24s} loss {s['loss_start']:.3f} -> {s['loss_end']:.4f}   gradient norm at step 0: "
              f"block 1 {s['grad_first_block']:.2e}, block {args.depth} {s['grad_last_block']:.2e}")
    print(f"{time.perf_counter() - start:.0f} s for {len(args.forms)} forms x {args.steps} steps")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "deep_residual.json"), "w") as f:
        json.dump({"args": vars(args), "results": results,
                   "summary": {form: summary(r) for form, r in results.items()}}, f, indent=1)
    if not args.no_plot:
        path = os.path.join(args.out, "deep_residual.png")
        plot(results, args, path)
        print(f"plot: {path}")
    return results


if __name__ == "__main__":
    main()
