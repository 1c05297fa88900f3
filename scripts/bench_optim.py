#!/usr/bin/env python
"""Time one LAMB step for the BERT-Base / BERT-Large parameter shapes, against baselines.

Contenders, all measured in this one process on the same parameters and gradients:
lbllm's LAMB as configured by default (``kernel="auto"``: on CPU lbllm's one-pass C kernel,
on CUDA torch's fused Adam kernel), lbllm's LAMB forced onto torch's fused Adam kernel
(``kernel="fused"``) and onto separate foreach ops (``kernel="foreach"``), a textbook
per-parameter LAMB loop,
``timm.optim.Lamb`` (loaded from an installed timm without importing timm itself, see
tests/timm_ref.py; on CPU timm runs its per-tensor implementation, its default there) and
NVIDIA apex ``FusedLAMB`` when importable. Before any timing, every contender is checked
to compute the same update as lbllm's LAMB on a small model.

Timing: ``--rounds`` rounds; in each, every contender builds its state, takes one untimed
warm-up step and then ``--steps`` timed steps, so background load spreads over all of
them. Reported: the minimum and the median step time, and ratios of the minima
(baseline / lbllm; above 1 means lbllm is faster). The minimum is the least disturbed
figure on a shared machine. A memory-bandwidth floor is printed for reference: 10 passes
of 4 bytes per parameter (read w, g, m, v; write m, v, w; and the ~3 passes any
layer-wise method needs for the update once the norms are known) at the bandwidth of a
large in-place add measured here, or at ``--peak-gbps``.

    python scripts/bench_optim.py [--model base|large|both] [--rounds 3] [--steps 1]
                                  [--threads N] [--device cpu|cuda] [--only NAME,...]
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

from lbllm.model import build_bert_config, build_pretraining_model
from lbllm.optim import create_optimizer

ROOT = Path(__file__).resolve().parent.parent
LBLLM = "lbllm LAMB"


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


def load_timm_lamb():
    """timm's Lamb via the tests' loader (no ``import timm``: that needs torchvision)."""
    spec = importlib.util.spec_from_file_location("timm_ref", ROOT / "tests" / "timm_ref.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.load_timm_optimizers()["Lamb"], module.timm_version()


def groups(model):
    """Decay / no-decay groups as in training (biases and LayerNorm: no decay, not adapted)."""
    return [{"params": [p for p in model.parameters() if p.ndim > 1], "weight_decay": 0.01},
            {"params": [p for p in model.parameters() if p.ndim <= 1], "weight_decay": 0.0}]


def contenders(lr: float) -> dict:
    """name -> factory(param groups) -> optimizer; same LAMB settings everywhere."""
    out = {
        LBLLM: lambda gs: create_optimizer("LAMB", gs, lr=lr),
        "lbllm LAMB kernel=fused": lambda gs: create_optimizer("LAMB", gs, lr=lr, kernel="fused"),
        "lbllm LAMB kernel=foreach": lambda gs: create_optimizer("LAMB", gs, lr=lr, kernel="foreach"),
        "per-parameter loop": lambda gs: LoopLamb(gs, lr=lr),
    }
    try:
        TimmLamb, version = load_timm_lamb()
        # timm defaults to max_grad_norm=1.0 (FusedLAMB); lbllm's LAMB has no clipping.
        out[f"timm {version} Lamb"] = lambda gs: TimmLamb(gs, lr=lr, eps=1e-6, max_grad_norm=None)
    except ImportError as exc:
        print(f"timm not measured: {exc}")
    try:
        from apex.optimizers import FusedLAMB  # type: ignore

        out["apex FusedLAMB"] = lambda gs: FusedLAMB(gs, lr=lr, eps=1e-6, max_grad_norm=0.0)
    except Exception:
        pass
    return out


def check_agreement(names: list[str], device: str) -> None:
    """Every contender computes lbllm's update: a few steps on a small BERT, same gradients."""
    torch.manual_seed(0)
    config = build_bert_config("tiny", vocab_size=100, max_position_embeddings=16)
    base = build_pretraining_model(config).to(device)
    grads = [[torch.randn_like(p) for p in base.parameters()] for _ in range(3)]
    finals = {}
    for name, make in contenders(1e-2).items():
        if name not in names:
            continue
        model = build_pretraining_model(config).to(device)
        model.load_state_dict(base.state_dict())
        opt = make(groups(model))
        for gs in grads:
            for p, g in zip(model.parameters(), gs):
                p.grad = g.clone()
            opt.step()
        finals[name] = [p.detach().clone() for p in model.parameters()]
    ours = finals.pop(LBLLM)
    for name, ps in finals.items():
        worst = max(((p - q).norm() / q.norm().clamp(min=1e-12)).item() for p, q in zip(ps, ours))
        assert worst < 1e-5, f"{name} disagrees with lbllm LAMB (max relative difference {worst:.2e})"
        print(f"agreement: {name:26s} vs {LBLLM}: max relative difference {worst:.1e}")


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure_bandwidth(numel: int, device: str) -> float:
    """Bytes/s of ``a += b`` over ``numel`` fp32 elements (3 passes: read a, b; write a)."""
    a = torch.ones(numel, device=device)
    b = torch.ones(numel, device=device)
    best = float("inf")
    for _ in range(8):
        sync(device)
        t = time.perf_counter()
        a.add_(b)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 3 * 4 * numel / best


def bench(size: str, names: list[str], rounds: int, steps: int, device: str, peak_gbps: float | None) -> None:
    torch.manual_seed(0)
    model = build_pretraining_model(build_bert_config(size, vocab_size=30522)).to(device)
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    makers = {k: v for k, v in contenders(1e-3).items() if k in names}
    times: dict[str, list[float]] = {k: [] for k in makers}
    print(f"\nBERT-{size}: {n / 1e6:.0f}M parameters, {len(params)} tensors, device {device}, "
          f"{torch.get_num_threads()} threads, {rounds} rounds x {steps} steps")
    for _ in range(rounds):
        for name, make in makers.items():
            opt = make(groups(model))
            opt.step()  # warm-up: allocates state and scratch
            for _ in range(steps):
                sync(device)
                t = time.perf_counter()
                opt.step()
                sync(device)
                times[name].append((time.perf_counter() - t) * 1e3)
            del opt
            gc.collect()
    bw = peak_gbps * 1e9 if peak_gbps else measure_bandwidth(n, device)
    floor_ms = 10 * 4 * n / bw * 1e3
    ours = min(times[LBLLM])
    print(f"  bandwidth floor: 10 passes x 4 B x {n / 1e6:.0f}M at {bw / 1e9:.1f} GB/s "
          f"({'given' if peak_gbps else 'measured a += b'}) = {floor_ms:.1f} ms")
    print(f"  {'':26s} {'min ms':>9s} {'median ms':>10s}   {'min / lbllm':>11s}")
    for name, ts in times.items():
        print(f"  {name:26s} {min(ts):9.1f} {statistics.median(ts):10.1f}   {min(ts) / ours:10.2f}x")
    print(f"  lbllm LAMB / floor: {ours / floor_ms:.2f}x")
    del model, params
    gc.collect()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="both", choices=("base", "large", "both"))
    p.add_argument("--rounds", type=int, default=3, help="rounds over all contenders (default 3)")
    p.add_argument("--steps", type=int, default=1, help="timed steps per contender per round (default 1)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--only", default=None, help="comma-separated contender names to run (lbllm LAMB always)")
    p.add_argument("--peak-gbps", type=float, default=None,
                   help="memory bandwidth for the floor, e.g. 4800 for an H200 (default: measured)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = list(contenders(1e-3))
    if args.only:
        wanted = [s.strip().lower() for s in args.only.split(",")]
        names = [n for n in names if n == LBLLM or any(w in n.lower() for w in wanted)]
    check_agreement(names, args.device)
    for size in (("base", "large") if args.model == "both" else (args.model,)):
        bench(size, names, args.rounds, args.steps, args.device, args.peak_gbps)


if __name__ == "__main__":
    sys.exit(main())
