#!/usr/bin/env python
"""The end-to-end demo on the embedded synthetic corpus (what `make demo` runs).

corpus -> tokenizer -> seq-128 and seq-512 shards -> for each pretraining recipe
(LAMB at a large batch, AdamW at a small batch, same data and epochs):
phase 1 (seq 128) -> phase 2 (seq 512, re-warmup) -> SQuAD v1.1 fine-tune + eval;
plus SQuAD from a randomly initialized model, to show what pretraining adds.
Prints a table and writes OUT/results.json and OUT/results.md.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Demo:
    def __init__(self, args: argparse.Namespace):
        self.a = args
        self.out = Path(args.out).resolve()
        self.data = self.out / "data"
        self.step_no = 0
        # 4 data stages + 2 recipes x 2 phases + the random-init export + 3 SQuAD runs
        self.total_steps = 4 + 2 * 2 + 1 + 3
        self.t0 = time.perf_counter()

    def sh(self, title: str, cmd: list[str]) -> float:
        """Run one stage with its progress on the terminal; stop the demo if it fails."""
        self.step_no += 1
        elapsed = time.perf_counter() - self.t0
        print(f"\n=== [{self.step_no}/{self.total_steps}] {title}  (demo time {elapsed / 60:.1f} min)", flush=True)
        t = time.perf_counter()
        env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
        rc = subprocess.call([str(c) for c in cmd], cwd=ROOT, env=env)
        if rc != 0:
            sys.exit(f"demo: stage '{title}' failed with exit code {rc}")
        return time.perf_counter() - t

    def pretrain(self, config: str, data_dir: Path, out: Path, extra: list[str] = (), world: int = 2) -> float:
        deepspeed = str(Path(PY).parent / "deepspeed")  # the launcher of this virtualenv
        launcher = [deepspeed, "--num_gpus", str(world), "--master_port", str(free_port())] if world > 1 else [PY]
        cmd = [*launcher, "pretrain_bert.py", "--deepspeed_config", f"ds_configs/{config}", "--data_dir", data_dir,
               "--output_dir", out, "--model_config", self.a.model_config, "--seed", str(self.a.seed), *extra]
        return self.sh(f"pretrain {out.relative_to(self.out)} ({config}, {world} ranks)", cmd)

    def squad(self, name: str, model_dir: Path) -> dict:
        out = self.out / "squad" / name
        self.sh(f"SQuAD v1.1 fine-tune + eval: {name}", [
            PY, "scripts/run_squad.py", "--model_dir", model_dir, "--train_file", self.data / "squad/train.json",
            "--predict_file", self.data / "squad/dev.json", "--output_dir", out, "--epochs", str(self.a.squad_epochs),
            "--batch_size", "16", "--lr", str(self.a.squad_lr), "--max_seq_length", "192", "--doc_stride", "64",
            "--seed", str(self.a.seed)])
        return json.loads((out / "results.json").read_text())

    def prepare_data(self) -> None:
        self.sh("generate the synthetic corpus + SQuAD files", [
            PY, "data_prep/make_corpus.py", "--out", self.data, "--num_docs", str(self.a.num_docs), "--seed", str(self.a.seed),
            "--squad_train", str(self.a.squad_train), "--squad_dev", str(self.a.squad_dev)])
        corpus = sorted(glob.glob(str(self.data / "corpus" / "*.txt")))
        self.sh("train the WordPiece tokenizer", [
            PY, "data_prep/build_tokenizer.py", "--input", *corpus, "--vocab_size", str(self.a.vocab_size),
            "--out", self.data / "tokenizer"])
        for seq, preds in ((128, 20), (512, 80)):
            self.sh(f"create seq-{seq} shards", [
                PY, "data_prep/create_shards.py", "--input", *corpus, "--tokenizer", self.data / "tokenizer",
                "--max_seq_length", str(seq), "--max_predictions_per_seq", str(preds), "--dupe_factor",
                str(self.a.dupe_factor), "--workers", "2", "--seed", str(self.a.seed), "--out", self.data / f"shards_{seq}"])

    def recipe(self, name: str, p1_config: str, p2_config: str) -> dict:
        p1, p2 = self.out / name / "phase1", self.out / name / "phase2"
        wall = self.pretrain(p1_config, self.data / "shards_128", p1)
        wall += self.pretrain(p2_config, self.data / "shards_512", p2, ["--phase", "2", "--init_checkpoint", p1])
        return {"recipe": name, "wall_s": wall, "phase1": summarize(p1 / "metrics.jsonl"),
                "phase2": summarize(p2 / "metrics.jsonl"), "model_dir": str(p2 / "final")}

    def main(self) -> None:
        self.prepare_data()
        runs = [self.recipe("lamb", "demo_lamb_p1.json", "demo_lamb_p2.json"),
                self.recipe("adamw", "demo_adamw_p1.json", "demo_adamw_p2.json")]
        scratch = self.out / "scratch"
        self.pretrain("demo_lamb_p1.json", self.data / "shards_128", scratch, ["--max_steps", "0"], world=1)
        for run in runs:
            run["squad"] = self.squad(run["recipe"], Path(run["model_dir"]))
        runs.append({"recipe": "none", "wall_s": 0.0, "phase1": None, "phase2": None,
                     "squad": self.squad("no_pretraining", scratch / "final")})
        table = render_table(runs)
        (self.out / "results.json").write_text(json.dumps(runs, indent=2))
        (self.out / "results.md").write_text(table + "\n")
        print(f"\n=== demo finished in {(time.perf_counter() - self.t0) / 60:.1f} min; results in {self.out}/results.md\n")
        print(table)


def summarize(metrics_path: Path) -> dict:
    """Steps, batch and a final MLM loss averaged over the last 10% of the phase's samples
    (one batch's loss is noisy, and averaging over samples rather than steps compares a
    large-batch run fairly with a small-batch one)."""
    rows = [json.loads(l) for l in metrics_path.read_text().splitlines() if l.strip()]
    total = rows[-1]["samples"]
    tail = [r for r in rows if r["samples"] > 0.9 * total] or rows[-1:]
    weight = sum(r["global_batch_size"] for r in tail)
    return {
        "steps": rows[-1]["step"],
        "global_batch_size": rows[-1]["global_batch_size"],
        "samples": total,
        "final_mlm_loss": sum(r["mlm_loss"] * r["global_batch_size"] for r in tail) / weight,
        "final_mlm_acc": sum(r["mlm_acc"] * r["global_batch_size"] for r in tail) / weight,
        "peak_lr": max(r["lr"] for r in rows),
        "seq_per_s": sum(r["global_batch_size"] for r in rows) / sum(r["step_time_s"] for r in rows),
    }


def render_table(runs: list[dict]) -> str:
    head = ("| pretraining | global batch (ph1/ph2) | optimizer steps (ph1+ph2) | wall time | final MLM loss ph1 / ph2 "
            "| SQuAD EM | SQuAD F1 |")
    lines = [head, "|---" * 7 + "|"]
    for r in runs:
        if r["phase1"] is None:
            lines.append(f"| none (random init) | - | 0 | - | - | {r['squad']['exact_match']:.1f} | {r['squad']['f1']:.1f} |")
            continue
        p1, p2 = r["phase1"], r["phase2"]
        name = {"lamb": "LAMB (large batch)", "adamw": "AdamW (small batch)"}.get(r["recipe"], r["recipe"])
        lines.append(
            f"| {name} | {p1['global_batch_size']} / {p2['global_batch_size']} | {p1['steps']} + {p2['steps']} "
            f"= {p1['steps'] + p2['steps']} | {r['wall_s'] / 60:.1f} min | {p1['final_mlm_loss']:.3f} / "
            f"{p2['final_mlm_loss']:.3f} | {r['squad']['exact_match']:.1f} | {r['squad']['f1']:.1f} |")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="demo_out")
    p.add_argument("--num_docs", type=int, default=2000,
                   help="corpus size; the demo configs' step counts are sized for ~2 epochs of the default")
    p.add_argument("--squad_train", type=int, default=2000)
    p.add_argument("--squad_dev", type=int, default=500)
    p.add_argument("--vocab_size", type=int, default=4096)
    p.add_argument("--dupe_factor", type=int, default=1)
    p.add_argument("--model_config", default="tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--squad_epochs", type=float, default=3)
    p.add_argument("--squad_lr", type=float, default=1e-3)
    return p.parse_args()


if __name__ == "__main__":
    Demo(parse_args()).main()
