#!/usr/bin/env python
"""Time one optimizer step for BERT-Base / BERT-Large parameter shapes.

lbllm's multi-tensor LAMB against baselines measured in the same run: a plain
per-parameter LAMB (the textbook loop most implementations use), and timm's Lamb and
NVIDIA apex's FusedLAMB when they are importable. Prints milliseconds per step and the
ratio baseline / lbllm (higher is better for lbllm). Results of equal math are checked
to agree before timing.

    python scripts/bench_optim.py [--model base|large|both] [--steps 5] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import time

import torch

from lbllm.model import build_bert_config, build_pretraining_model
from lbllm.optim import create_optimizer


class LoopLamb(torch.optim.Optimizer):
    """Reference LAMB, one parameter at a time (same math as lbllm's LAMB defaults)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            b1, b2 = g["betas"]
            g["step"] = g.get("step", 0) + 1
            bc1, bc2 = 1 - b1 ** g["step"], 1 - b2 ** g["step"]
            for p in g["params"]:
                st = self.state[p]
                if not st:
                    st["m"], st["v"] = torch.zeros_like(p), torch.zeros_like(p)
                st["m"].mul_(b1).add_(p.grad, alpha=1 - b1)
                st["v"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                u = (st["m"] / bc1) / ((st["v"] / bc2).sqrt() + g["eps"])
                if g["weight_decay"]:
                    u.add_(p, alpha=g["weight_decay"])
                    w, un = p.norm(), u.norm()
                    r = torch.where((w > 0) & (un > 0), w / un, torch.ones_like(w))
                else:
                    r = 1.0
                p.add_(u * r, alpha=-g["lr"])


def optional_baselines():
    out = {}
    try:
        from timm.optim import Lamb as TimmLamb  # type: ignore

        out["timm.optim.Lamb"] = lambda groups: TimmLamb(groups, lr=1e-3, eps=1e-6, max_grad_norm=None)
    except Exception:
        pass
    try:
        from apex.optimizers import FusedLAMB  # type: ignore

        out["apex FusedLAMB"] = lambda groups: FusedLAMB(groups, lr=1e-3, eps=1e-6, max_grad_norm=0.0)
    except Exception:
        pass
    return out


def time_steps(model, make_opt, steps: int, device: str) -> float:
    opt = make_opt(model)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()  # warm-up: allocates state
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        opt.step()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps * 1e3


def bench(size: str, steps: int, device: str) -> None:
    torch.manual_seed(0)
    model = build_pretraining_model(build_bert_config(size, vocab_size=30522)).to(device)
    n = sum(p.numel() for p in model.parameters())
    groups = lambda m: [{"params": [p for p in m.parameters() if p.ndim > 1], "weight_decay": 0.01},
                        {"params": [p for p in m.parameters() if p.ndim <= 1], "weight_decay": 0.0}]
    contenders = {
        "lbllm LAMB (foreach)": lambda m: create_optimizer("LAMB", groups(m), lr=1e-3),
        "per-parameter loop": lambda m: LoopLamb(groups(m), lr=1e-3),
        **{k: (lambda f: lambda m: f(groups(m)))(f) for k, f in optional_baselines().items()},
    }
    print(f"\nBERT-{size}: {n / 1e6:.0f}M parameters, {len(list(model.parameters()))} tensors, device {device}")
    results = {name: time_steps(model, make, steps, device) for name, make in contenders.items()}
    ours = results["lbllm LAMB (foreach)"]
    for name, ms in results.items():
        print(f"  {name:24s} {ms:9.1f} ms/step   ratio vs lbllm: {ms / ours:5.2f}x")


def check_agreement() -> None:
    """Same math: lbllm LAMB and the loop agree on a small model before anything is timed."""
    torch.manual_seed(0)
    a = build_pretraining_model(build_bert_config("tiny", vocab_size=100, max_position_embeddings=16))
    b = build_pretraining_model(build_bert_config("tiny", vocab_size=100, max_position_embeddings=16))
    b.load_state_dict(a.state_dict())
    groups = lambda m: [{"params": [p for p in m.parameters() if p.ndim > 1], "weight_decay": 0.01},
                        {"params": [p for p in m.parameters() if p.ndim <= 1], "weight_decay": 0.0}]
    oa, ob = create_optimizer("LAMB", groups(a), lr=1e-2), LoopLamb(groups(b), lr=1e-2)
    for _ in range(3):
        for pa, pb in zip(a.parameters(), b.parameters()):
            g = torch.randn_like(pa)
            pa.grad, pb.grad = g, g.clone()
        oa.step()
        ob.step()
    worst = max(((pa - pb).norm() / pb.norm().clamp(min=1e-12)).item() for pa, pb in zip(a.parameters(), b.parameters()))
    assert worst < 1e-5, f"lbllm LAMB and the reference loop disagree ({worst:.2e})"
    print(f"agreement check: max relative difference {worst:.1e}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="both", choices=("base", "large", "both"))
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    check_agreement()
    for size in (("base", "large") if args.model == "both" else (args.model,)):
        bench(size, args.steps, args.device)


if __name__ == "__main__":
    main()
