#!/usr/bin/env python
"""Compare pretraining runs on held-out MLM loss and SQuAD F1: a markdown table and a PNG.

    python scripts/compare_runs.py RUN_DIR... [--names A,B,..] [--baseline NAME] [--out PREFIX]

A RUN_DIR is a `pretrain_bert.py --output_dir` (one phase), a directory holding
`phase1/`, `phase2/`, ... of one recipe, or a directory with only `squad/results.json`
(fine-tuning from a random init: the "no pretraining" row). `RUN_DIR/squad/results.json`
(`scripts/run_squad.py --seeds ...`) adds EM / F1 as mean +- std over seeds.

The figures compared are the held-out ones (`--eval_data`: fixed sequences, fixed
masks), taken at the end of the last phase; the curves are held-out MLM loss vs samples
and vs optimizer steps. Next to each row: the last measured gradient noise scale B_simple
(`--noise_scale_interval`) per phase and, against the baseline row (default: the first
with a measured phase-1 B_simple), using its phase-1 batch and B_simple, the sample ratio McCandlish et al.'s model predicts for reaching the
same loss at its batch, E(B)/E(b) = (1 + B/B_noise) / (1 + b/B_noise).

The LAMB paper's BERT-Large rows (You et al. 2020, Table 1) are printed as reference rows,
never as results of these runs. Writes PREFIX.md, PREFIX.json and PREFIX.png.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from lbllm.utils import UserError, read_jsonl, write_json_atomic

# You et al. 2020, Table 1 (BERT-Large, SQuAD v1.1 dev F1): published figures, for scale.
PAPER_ROWS = (
    {"name": "paper: baseline (Devlin et al.), BERT-Large", "optimizer": "Adam", "global_batch": [512],
     "steps": [1_000_000], "f1": 90.395},
    {"name": "paper: LAMB 64k/32k mixed batch, BERT-Large", "optimizer": "LAMB", "global_batch": [65536, 32768],
     "steps": [7038, 1561], "f1": 90.584},
)


def phase_dirs(run_dir: Path) -> list[Path]:
    """The pretraining output directories of one recipe, in phase order."""
    if (run_dir / "metrics.jsonl").is_file():
        return [run_dir]
    phases = sorted((d for d in run_dir.glob("phase*") if (d / "metrics.jsonl").is_file()), key=lambda d: d.name)
    return phases


def load_run(run_dir: Path, name: str | None = None) -> dict[str, Any]:
    """One row: per phase batch / steps / optimizer, held-out figures at the end, B_simple,
    SQuAD mean +- std, and the held-out curve (samples, steps, loss) over all phases."""
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: not a directory; pass pretraining output dirs (or recipe dirs with phase*/)")
    phases = phase_dirs(run_dir)
    squad_path = run_dir / "squad" / "results.json"
    if not phases and not squad_path.is_file():
        raise UserError(f"{run_dir}: no metrics.jsonl, phase*/metrics.jsonl or squad/results.json there")
    run: dict[str, Any] = {"name": name or run_dir.name, "dir": str(run_dir), "optimizer": None, "global_batch": [],
                           "steps": [], "samples": [], "eval_mlm_loss": None, "eval_mlm_acc": None,
                           "grad_noise_scale": None, "grad_noise_scale_phases": [], "curve": [], "squad": None}
    samples_before = steps_before = 0
    for d in phases:
        rows = read_jsonl(d / "metrics.jsonl")
        if not rows:
            raise UserError(f"{d / 'metrics.jsonl'}: empty; the run did not take a step")
        info = json.loads((d / "run.json").read_text()) if (d / "run.json").is_file() else {}
        opt = info.get("optimizer")
        run["optimizer"] = opt if run["optimizer"] in (None, opt) else f"{run['optimizer']} / {opt}"
        batches = sorted({r["global_batch_size"] for r in rows})
        run["global_batch"].append(batches[0] if len(batches) == 1 else f"{batches[0]}-{batches[-1]}")
        run["steps"].append(rows[-1]["step"])
        run["samples"].append(rows[-1]["samples"])
        for r in rows:
            if "eval_mlm_loss" in r:
                run["curve"].append({"samples": samples_before + r["samples"], "steps": steps_before + r["step"],
                                     "eval_mlm_loss": r["eval_mlm_loss"], "phase": len(run["steps"])})
        evals = [r for r in rows if "eval_mlm_loss" in r]
        if evals:
            run["eval_mlm_loss"], run["eval_mlm_acc"] = evals[-1]["eval_mlm_loss"], evals[-1]["eval_mlm_acc"]
        noise = [r["grad_noise_scale"] for r in rows if r.get("grad_noise_scale") is not None]
        run["grad_noise_scale_phases"].append(noise[-1] if noise else None)
        if noise:
            run["grad_noise_scale"] = noise[-1]
        samples_before += rows[-1]["samples"]
        steps_before += rows[-1]["step"]
    if phases and run["eval_mlm_loss"] is None:
        print(f"compare_runs: warning: {run_dir} has no held-out evaluation (pretrain with --eval_data); "
              "its MLM column stays empty", file=sys.stderr)
    if squad_path.is_file():
        q = json.loads(squad_path.read_text())
        run["squad"] = {"f1_mean": q["f1"], "f1_std": q.get("f1_std", 0.0), "em_mean": q["exact_match"],
                        "em_std": q.get("exact_match_std", 0.0), "seeds": q.get("seeds", [])}
    return run


def predicted_sample_ratio(batch: float, base_batch: float, b_noise: float) -> float:
    """McCandlish et al. 2018: E = E_min (1 + B / B_noise), so E(B)/E(b)."""
    return (1 + batch / b_noise) / (1 + base_batch / b_noise)


def add_predictions(runs: list[dict], baseline: str | None) -> dict | None:
    """Fill `predicted_sample_ratio` of each pretrained row against the baseline's phase-1
    batch and phase-1 B_simple (phase 1 holds most of the samples); returns the baseline row."""
    pretrained = [r for r in runs if r["steps"]]
    if baseline is not None:
        base = next((r for r in runs if r["name"] == baseline), None)
        if base is None:
            raise UserError(f"--baseline {baseline}: no run of that name ({', '.join(r['name'] for r in runs)})")
    else:
        base = next((r for r in pretrained if r["grad_noise_scale_phases"][0]), pretrained[0] if pretrained else None)
    if base is None:
        return None
    for r in pretrained:
        b_noise = base["grad_noise_scale_phases"][0] if base["grad_noise_scale_phases"] else None
        ok = b_noise and isinstance(r["global_batch"][0], int) and isinstance(base["global_batch"][0], int)
        r["predicted_sample_ratio"] = (predicted_sample_ratio(r["global_batch"][0], base["global_batch"][0], b_noise)
                                       if ok else None)
    return base


def _f(value: Any, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _steps(steps: list[int]) -> str:
    return f"{steps[0]:,}" if len(steps) == 1 else f"{' + '.join(f'{s:,}' for s in steps)} = {sum(steps):,}"


def _squad(q: dict | None) -> tuple[str, str, str]:
    if not q:
        return "-", "-", "-"
    n = len(q["seeds"]) or 1
    return f"{q['em_mean']:.1f} ± {q['em_std']:.1f}", f"{q['f1_mean']:.1f} ± {q['f1_std']:.1f}", str(n)


def render_table(runs: list[dict], base: dict | None) -> str:
    head = ("| pretraining | optimizer | global batch (per phase) | optimizer steps (per phase) | samples "
            "| held-out MLM loss | held-out MLM acc | B_simple (per phase, last measured) | predicted E(B)/E(b) | SQuAD EM | SQuAD F1 "
            "| seeds |")
    lines = [head, "|---" * 12 + "|"]
    for r in runs:
        em, f1, seeds = _squad(r["squad"])
        if not r["steps"]:
            lines.append(f"| {r['name']} | - | - | 0 | 0 | - | - | - | - | {em} | {f1} | {seeds} |")
            continue
        ratio = r.get("predicted_sample_ratio")
        ratio_text = "1 (baseline)" if r is base else _f(ratio, ".2f")
        lines.append(
            f"| {r['name']} | {r['optimizer'] or '-'} | {' / '.join(map(str, r['global_batch']))} "
            f"| {_steps(r['steps'])} | {sum(r['samples']):,} "
            f"| {_f(r['eval_mlm_loss'], '.3f')} | {_f(r['eval_mlm_acc'], '.3f')} "
            f"| {' / '.join(_f(b, '.0f') for b in r['grad_noise_scale_phases'])} "
            f"| {ratio_text} | {em} | {f1} | {seeds} |")
    for p in PAPER_ROWS:
        lines.append(f"| *{p['name']} (reference, not this run)* | {p['optimizer']} "
                     f"| {' / '.join(map(str, p['global_batch']))} | {_steps(p['steps'])} "
                     f"| - | - | - | - | - | - | {p['f1']:.3f} | - |")
    return "\n".join(lines)


def plot(runs: list[dict], png: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"compare_runs: matplotlib is not installed; {png} not written", file=sys.stderr)
        return False
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for r in runs:
        if not r["curve"]:
            continue
        for ax, key in zip(axes, ("samples", "steps")):
            xs = [c[key] for c in r["curve"]]
            ax.plot(xs, [c["eval_mlm_loss"] for c in r["curve"]], marker="o", ms=3, lw=1.6, label=r["name"])
            bounds = [c[key] for c, n in zip(r["curve"], r["curve"][1:]) if n["phase"] != c["phase"]]
            for b in bounds:
                ax.axvline(b, color="gray", ls=":", lw=0.8)
    axes[0].set(xlabel="samples seen (all phases)", ylabel="held-out MLM loss", title="held-out MLM loss vs samples")
    axes[1].set(xlabel="optimizer steps (all phases)", ylabel="held-out MLM loss", xscale="log",
                title="held-out MLM loss vs optimizer steps")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=9)
    fig.text(0.5, 0.01, "dotted: phase boundary (phase 2 is scored on its own, longer held-out sequences)",
             ha="center", fontsize=8, color="gray")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    png.parent.mkdir(parents=True, exist_ok=True)
    tmp = png.with_name(f".{png.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(png)
    return True


def compare(run_dirs: list[Path], names: list[str] | None = None, baseline: str | None = None) -> tuple[list[dict], str]:
    if names is not None and len(names) != len(run_dirs):
        raise UserError(f"--names: {len(names)} names for {len(run_dirs)} run directories; give one per directory")
    runs = [load_run(d, names[i] if names else None) for i, d in enumerate(run_dirs)]
    base = add_predictions(runs, baseline)
    return runs, render_table(runs, base)


def write_outputs(prefix: Path, runs: list[dict], table: str) -> None:

    prefix.parent.mkdir(parents=True, exist_ok=True)
    md = prefix.with_suffix(".md")
    tmp = md.with_name(f".{md.name}.tmp")
    tmp.write_text(table + "\n", encoding="utf-8")
    tmp.replace(md)
    write_json_atomic(prefix.with_suffix(".json"), {"runs": runs, "reference_rows": list(PAPER_ROWS)})
    plot(runs, prefix.with_suffix(".png"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dirs", nargs="+", type=Path)
    p.add_argument("--names", default=None, help="comma-separated row names, one per RUN_DIR (default: dir names)")
    p.add_argument("--baseline", default=None, help="row whose batch and B_simple the predicted ratios use")
    p.add_argument("--out", type=Path, default=Path("comparison"), help="writes OUT.md, OUT.json, OUT.png")
    a = p.parse_args(argv)
    try:
        runs, table = compare(a.run_dirs, a.names.split(",") if a.names else None, a.baseline)
    except (UserError, OSError, json.JSONDecodeError, KeyError) as e:
        print(f"compare_runs: error: {e}", file=sys.stderr)
        return 2
    write_outputs(a.out, runs, table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
