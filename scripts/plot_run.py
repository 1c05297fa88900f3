#!/usr/bin/env python
"""Plot pretraining runs from their metrics.jsonl: one PNG, several runs overlaid.

    python scripts/plot_run.py RUN_DIR [RUN_DIR ...] --out plot.png [--x samples|step] [--names A,B]

Panels: training loss (faint per step, bold running mean), MLM accuracy (training and,
where the run evaluated one, held-out), learning rate, global batch, LAMB/LARS trust-ratio
spread (median line, min-max band) and throughput (sequences/s), against samples seen
(default; runs at different batches line up) or optimizer steps. A RUN_DIR is a
pretrain_bert.py --output_dir (a metrics.jsonl inside) or a directory of phases
(phase1/, phase2/, ...), drawn one after the other.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from lbllm.utils import UserError, read_jsonl


def load_rows(run_dir: Path) -> list[dict]:
    """The run's rows; phases of a two-phase dir continue each other's step and sample axes."""
    if (run_dir / "metrics.jsonl").is_file():
        return read_jsonl(run_dir / "metrics.jsonl")
    phases = sorted(p for p in run_dir.glob("phase*") if (p / "metrics.jsonl").is_file())
    if not phases:
        raise UserError(f"{run_dir}: no metrics.jsonl there or in {run_dir}/phase*/ (pass a pretrain_bert.py "
                        "--output_dir)")
    rows, step0, samples0 = [], 0, 0
    for phase in phases:
        part = read_jsonl(phase / "metrics.jsonl")
        rows += [{**r, "step": r["step"] + step0, "samples": r["samples"] + samples0} for r in part]
        if part:
            step0, samples0 = rows[-1]["step"], rows[-1]["samples"]
    return rows


def running_mean(xs: list[float], ys: list[float], window: float) -> list[float]:
    out, lo, total = [], 0, 0.0
    for i, y in enumerate(ys):
        total += y
        while xs[i] - xs[lo] > window:
            total -= ys[lo]
            lo += 1
        out.append(total / (i - lo + 1))
    return out


def plot(runs: dict[str, list[dict]], out: Path, x_key: str = "samples") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(17, 9))
    (ax_loss, ax_acc, ax_lr), (ax_batch, ax_trust, ax_speed) = axes
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (name, rows) in enumerate(runs.items()):
        c = colors[k % len(colors)]
        x = [r[x_key] for r in rows]
        loss = [r["loss"] for r in rows]
        ax_loss.plot(x, loss, color=c, alpha=0.2, lw=0.8)
        ax_loss.plot(x, running_mean(x, loss, 0.03 * (x[-1] - x[0]) if len(x) > 1 else 0), color=c, lw=1.8,
                     label=name)
        ax_acc.plot(x, running_mean(x, [r["mlm_acc"] for r in rows], 0.03 * (x[-1] - x[0]) if len(x) > 1 else 0),
                    color=c, lw=1.2, alpha=0.7, label=f"{name} (training)")
        held = [(r[x_key], r["eval_mlm_acc"]) for r in rows if "eval_mlm_acc" in r]
        if held:
            ax_acc.plot(*zip(*held), color=c, lw=2, marker="o", ms=3, label=f"{name} (held-out)")
        ax_lr.plot(x, [r["lr"] for r in rows], color=c, lw=1.5, label=name)
        ax_batch.step(x, [r["global_batch_size"] for r in rows], where="post", color=c, lw=1.5, label=name)
        trust = [(r[x_key], r["trust_ratio_min"], r["trust_ratio_median"], r["trust_ratio_max"])
                 for r in rows if "trust_ratio_median" in r]
        if trust:
            tx, lo, mid, hi = zip(*trust)
            ax_trust.fill_between(tx, lo, hi, color=c, alpha=0.15)
            ax_trust.plot(tx, mid, color=c, lw=1.5, label=f"{name} (median; band: min-max)")
        ax_speed.plot(x, [r["seq_per_s"] for r in rows], color=c, lw=1, alpha=0.8, label=name)
    xlabel = "samples seen" if x_key == "samples" else "optimizer step"
    for ax, title, ylabel in ((ax_loss, "training loss (MLM + NSP)", "loss"),
                              (ax_acc, "MLM accuracy", "accuracy"),
                              (ax_lr, "learning rate", "lr"),
                              (ax_batch, "global batch", "sequences"),
                              (ax_trust, "trust ratio over parameters (LAMB/LARS)", "ratio"),
                              (ax_speed, "throughput", "sequences / s")):
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if any(ax_trust.get_lines()):
        ax_trust.set_yscale("log")
    else:
        ax_trust.text(0.5, 0.5, "no trust ratios logged\n(AdamW, or an older run)", ha="center", va="center",
                      transform=ax_trust.transAxes, color="gray")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=100)  # no half-written PNG under the asked-for name
    plt.close(fig)
    os.replace(tmp, out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="pretrain_bert.py output dirs (or dirs of phase*/)")
    ap.add_argument("--out", type=Path, required=True, help="PNG to write")
    ap.add_argument("--x", choices=("samples", "step"), default="samples", help="horizontal axis")
    ap.add_argument("--names", default=None, help="comma-separated legend names (default: the dir names)")
    args = ap.parse_args(argv)
    names = args.names.split(",") if args.names else [p.name for p in args.runs]
    if len(names) != len(args.runs):
        ap.error(f"--names has {len(names)} entries for {len(args.runs)} runs")
    if len(set(names)) < len(names):  # e.g. a/train b/train: name each by its path instead
        names = [str(p) for p in args.runs] if not args.names else [f"{n} ({i + 1})" for i, n in enumerate(names)]
    try:
        runs = {name: load_rows(path) for name, path in zip(names, args.runs)}
    except UserError as exc:
        print(f"plot_run.py: error: {exc}", file=sys.stderr)
        return 2
    empty = [n for n, rows in runs.items() if not rows]
    if empty:
        print(f"plot_run.py: error: no steps logged yet in {', '.join(empty)}", file=sys.stderr)
        return 2
    plot(runs, args.out, args.x)
    print(f"plot_run.py: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
