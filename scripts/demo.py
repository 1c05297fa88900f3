#!/usr/bin/env python
"""The end-to-end demo on the embedded synthetic corpus (what `make demo` runs).

corpus -> tokenizer -> phase-1 (seq 64) and phase-2 (seq 128) shards, each with a
held-out set of documents never trained on -> for each recipe (AdamW at a small batch,
LAMB at 8x that batch; the same samples and epochs): phase 1 -> phase 2 (re-warmup,
moments carried) with held-out MLM evaluation and the gradient noise scale measured ->
SQuAD v1.1 fine-tuning with 3 seeds; plus the same fine-tuning from a random init, to
show what pretraining buys. Ends with scripts/compare_runs.py: OUT/results.md, .json, .png.

    python scripts/demo.py --out demo_out              # the demo (~12-15 min on 2 CPU cores)
    python scripts/demo.py --out demo_tune --tune_lr   # the LR tuning run behind the configs

The sizes are a quarter of the paper's sequence lengths (64 / 128 instead of 128 / 512)
so that a 2-layer model gets far below the unigram plateau of the MLM loss on 2 cores in
minutes; the learning rates in ds_configs/demo_*.json come from `--tune_lr` (the same
3 trials per optimizer, chosen on held-out MLM loss; output in docs/demo_lr_tuning.md).
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
sys.path.insert(0, str(ROOT / "scripts"))

from lbllm.utils import free_port  # noqa: E402

import compare_runs  # noqa: E402  (a sibling script: the demo's table is its table)


@dataclass(frozen=True)
class Recipe:
    key: str
    name: str
    phase1: str  # ds_configs/ file names
    phase2: str


RECIPES = (
    Recipe("adamw", "AdamW, batch 32 (baseline)", "demo_adamw_p1.json", "demo_adamw_p2.json"),
    Recipe("lamb", "LAMB, batch 256 (8x)", "demo_lamb_p1.json", "demo_lamb_p2.json"),
)
RANDOM_INIT = "no pretraining (random init)"
SEQ = {1: (64, 10), 2: (128, 20)}  # phase -> (sequence length, max predictions per sequence)
TUNE_FACTORS = (0.5, 1.0, 2.0)  # the LR grid around each config's LR: the same 3 trials per optimizer


class Demo:
    def __init__(self, args: argparse.Namespace):
        self.a = args
        self.out = Path(args.out).resolve()
        self.data = self.out / "data"
        self.step_no = 0
        self.total_steps = (4 + len(RECIPES) * len(TUNE_FACTORS) if args.tune_lr
                            else 4 + 2 * len(RECIPES) + 1 + len(RECIPES) + 1 + 1)
        self.t0 = time.perf_counter()
        self.lock = threading.Lock()
        self.running: set[subprocess.Popen] = set()
        self.threads = max(1, (os.cpu_count() or 1) // max(1, args.jobs))

    def sh(self, title: str, cmd: list, lane: str | None = None) -> float:
        """Run one stage; stop the demo if it fails. Inside a lane (stages that run
        concurrently) its output goes to OUT/logs/ and the terminal gets a start and an
        end line; otherwise the terminal shows its progress."""
        with self.lock:
            self.step_no += 1
            no = self.step_no
        elapsed = time.perf_counter() - self.t0
        print(f"\n=== [{no}/{self.total_steps}] {title}  (demo time {elapsed / 60:.1f} min)", flush=True)
        t = time.perf_counter()
        env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
        log = None
        if lane is not None:
            env["OMP_NUM_THREADS"] = str(self.threads)  # the lanes share the cores
            (self.out / "logs").mkdir(parents=True, exist_ok=True)
            log = self.out / "logs" / f"{no:02d}-{lane}.log"
        with open(log, "w") if log else contextlib.nullcontext() as f:
            proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=env,
                                    **({"stdout": f, "stderr": subprocess.STDOUT} if log else {}))
            with self.lock:
                self.running.add(proc)
            rc = proc.wait()
            with self.lock:
                self.running.discard(proc)
        seconds = time.perf_counter() - t
        if rc != 0:
            tail = log.read_text()[-3000:] if log else ""
            print(f"{tail}\ndemo: stage '{title}' failed with exit code {rc}", file=sys.stderr, flush=True)
            with self.lock:  # from any lane: stop everything
                for other in self.running:
                    other.terminate()
            os._exit(1)
        if log:
            print(f"    [{no}] done in {seconds / 60:.1f} min ({log.relative_to(self.out)})", flush=True)
        return seconds

    def shards(self, phase: int) -> Path:
        return self.data / f"shards_{SEQ[phase][0]}"

    def prepare_data(self) -> None:
        self.sh("generate the synthetic corpus + SQuAD files", [
            PY, "data_prep/make_corpus.py", "--out", self.data, "--num_docs", self.a.num_docs, "--seed", self.a.seed,
            "--squad_train", self.a.squad_train, "--squad_dev", self.a.squad_dev])
        corpus = sorted(glob.glob(str(self.data / "corpus" / "*.txt")))
        self.sh("train the WordPiece tokenizer", [
            PY, "data_prep/build_tokenizer.py", "--input", *corpus, "--vocab_size", self.a.vocab_size,
            "--out", self.data / "tokenizer"])
        for phase, (seq, preds) in SEQ.items():
            # The same documents are held out at both lengths (the choice hashes the document, not the length).
            self.sh(f"create seq-{seq} shards + held-out set", [
                PY, "data_prep/create_shards.py", "--input", *corpus, "--tokenizer", self.data / "tokenizer",
                "--max_seq_length", seq, "--max_predictions_per_seq", preds, "--workers", 2, "--seed", self.a.seed,
                "--heldout_fraction", self.a.heldout_fraction, "--out", self.shards(phase)])

    def pretrain(self, config: str | Path, phase: int, out: Path, extra: list = (), world: int | None = None,
                 lane: str | None = None) -> float:
        world = self.a.world if world is None else world
        deepspeed = str(Path(PY).parent / "deepspeed")  # the launcher of this virtualenv
        launcher = [deepspeed, "--num_gpus", world, "--master_port", free_port()] if world > 1 else [PY]
        config = config if Path(config).is_absolute() else ROOT / "ds_configs" / config
        cmd = [*launcher, "pretrain_bert.py", "--deepspeed_config", config, "--data_dir", self.shards(phase),
               "--output_dir", out, "--model_config", self.a.model_config, "--seed", self.a.seed,
               "--dropout", self.a.dropout, "--eval_data", self.shards(phase) / "heldout",
               "--eval_interval_samples", self.a.eval_interval_samples, "--noise_scale_interval",
               self.a.noise_scale_interval, "--overwrite", *extra]  # a demo run starts afresh
        return self.sh(f"pretrain {out.relative_to(self.out)} ({Path(config).name}, {world} ranks)", cmd, lane)

    def recipe(self, r: Recipe) -> None:
        """One lane: phase 1 -> phase 2 -> SQuAD."""
        p1, p2 = self.out / r.key / "phase1", self.out / r.key / "phase2"
        self.pretrain(r.phase1, 1, p1, lane=r.key)
        self.pretrain(r.phase2, 2, p2, ["--phase", 2, "--init_checkpoint", p1], lane=r.key)
        self.squad(self.out / r.key, p2 / "final", lane=r.key)

    def random_init(self) -> None:
        """The third lane: the same fine-tuning from an untrained model."""
        scratch = self.out / "none"
        self.pretrain(RECIPES[0].phase2, 2, scratch / "init", ["--max_steps", 0], world=1, lane="none")
        self.squad(scratch, scratch / "init" / "final", lane="none")

    def squad(self, run_dir: Path, model_dir: Path, lane: str | None = None) -> None:
        a = self.a
        self.sh(f"SQuAD v1.1 fine-tune + eval, seeds {a.squad_seeds}: {run_dir.name}", [
            PY, "scripts/run_squad.py", "--model_dir", model_dir, "--train_file", self.data / "squad/train.json",
            "--predict_file", self.data / "squad/dev.json", "--output_dir", run_dir / "squad",
            "--epochs", a.squad_epochs, "--batch_size", a.squad_batch_size, "--lr", a.squad_lr,
            "--max_seq_length", SEQ[2][0], "--doc_stride", a.squad_doc_stride, "--seeds", a.squad_seeds,
            "--no_progress"], lane)

    def main(self) -> None:
        self.prepare_data()
        if self.a.tune_lr:
            return self.tune()
        lanes = [lambda r=r: self.recipe(r) for r in RECIPES] + [self.random_init]
        print(f"\n{len(lanes)} independent lanes (AdamW, LAMB, random init), {self.a.jobs} at a time, "
              f"{self.threads} thread(s) per process; each stage's output is in {self.out}/logs/", flush=True)
        with ThreadPoolExecutor(self.a.jobs) as pool:
            for f in [pool.submit(lane) for lane in lanes]:
                f.result()
        scratch = self.out / "none"
        self.step_no += 1
        print(f"\n=== [{self.step_no}/{self.total_steps}] compare the runs (scripts/compare_runs.py)", flush=True)
        dirs = [self.out / r.key for r in RECIPES] + [scratch]
        runs, table = compare_runs.compare(dirs, [r.name for r in RECIPES] + [RANDOM_INIT], RECIPES[0].name)
        text = table + "\n\n" + verdict(runs)
        compare_runs.write_outputs(self.out / "results", runs, text)
        print(f"\n=== demo finished in {(time.perf_counter() - self.t0) / 60:.1f} min; "
              f"results in {self.out}/results.md (.json, .png)\n")
        print(text)

    def tune(self) -> None:
        """Phase 1 of each recipe at each LR of the grid; the best held-out MLM loss wins.
        The same number of trials for every optimizer (Nado et al. 2021)."""
        lines = ["| optimizer | global batch | lr | held-out MLM loss | held-out MLM acc |", "|---|---|---|---|---|"]
        best, grids = {}, {}
        for r in RECIPES:
            base = json.loads((ROOT / "ds_configs" / r.phase1).read_text())
            grids[r.key] = [base["optimizer"]["params"]["lr"] * f for f in TUNE_FACTORS]
            for lr in grids[r.key]:
                cfg = json.loads(json.dumps(base))
                cfg["optimizer"]["params"]["lr"] = lr
                path = self.out / "configs" / f"{r.key}_lr{lr:g}.json"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(cfg, indent=2))
                out = self.out / r.key / f"lr{lr:g}"
                self.pretrain(path, 1, out)
                rows = compare_runs.read_jsonl(out / "metrics.jsonl")
                last = next(x for x in reversed(rows) if "eval_mlm_loss" in x)
                lines.append(f"| {base['optimizer']['type']} | {base['train_batch_size']} | {lr:g} "
                             f"| {last['eval_mlm_loss']:.3f} | {last['eval_mlm_acc']:.3f} |")
                if r.key not in best or last["eval_mlm_loss"] < best[r.key][1]:
                    best[r.key] = (lr, last["eval_mlm_loss"])
        notes = []
        for r in RECIPES:
            lr, loss = best[r.key]
            edge = " (on the edge of the grid: extend it)" if lr in (grids[r.key][0], grids[r.key][-1]) else ""
            notes.append(f"- {r.name}: best lr {lr:g} (held-out MLM loss {loss:.3f}){edge}")
        text = "\n".join(lines) + "\n\n" + "\n".join(notes)
        (self.out / "lr_tuning.md").write_text(text + "\n")
        print(f"\n=== LR tuning finished in {(time.perf_counter() - self.t0) / 60:.1f} min\n\n{text}")


def verdict(runs: list[dict]) -> str:
    """The demo's own questions, answered from the table's figures."""
    by = {r["name"]: r for r in runs}
    base, large, none = by[RECIPES[0].name], by[RECIPES[1].name], by[RANDOM_INIT]
    out = []
    if base["squad"] and none["squad"]:
        gap = base["squad"]["f1_mean"] - none["squad"]["f1_mean"]
        spread = max(base["squad"]["f1_std"], none["squad"]["f1_std"])
        ok = gap >= 10 and gap > 3 * spread
        out.append(f"- What pretraining buys: the baseline's mean F1 is {gap:+.1f} points above the random init's; "
                   f"the larger seed std is {spread:.1f} ({'the gap is' if ok else 'NOT'} >= 10 points and > 3x "
                   f"that std{'' if ok else ': the gap is not established'}).")
    if base["eval_mlm_loss"] is not None and large["eval_mlm_loss"] is not None:
        rel = large["eval_mlm_loss"] / base["eval_mlm_loss"] - 1
        fewer = sum(base["steps"]) / max(1, sum(large["steps"]))
        noise = base["grad_noise_scale_phases"][0]
        ratio = large.get("predicted_sample_ratio")
        theory = (f" The baseline's phase-1 gradient noise scale is B_simple ~ {noise:.0f} sequences; at batch "
                  f"{large['global_batch'][0]} vs {base['global_batch'][0]} McCandlish et al.'s model predicts "
                  f"{ratio:.2f}x the samples for the same loss, and both got the same samples."
                  if noise and ratio else "")
        out.append(f"- Large batch vs baseline: held-out MLM loss {large['eval_mlm_loss']:.3f} vs "
                   f"{base['eval_mlm_loss']:.3f} ({rel:+.1%}; the paper's target is within 2%) with {fewer:.0f}x fewer "
                   f"optimizer steps: **{'matched' if rel <= 0.02 else 'not matched'}** at this size.{theory}")
        if large["squad"] and base["squad"]:
            out.append(f"- SQuAD F1: {large['squad']['f1_mean']:.1f} ± {large['squad']['f1_std']:.1f} (large batch) vs "
                       f"{base['squad']['f1_mean']:.1f} ± {base['squad']['f1_std']:.1f} (baseline), "
                       f"{len(base['squad']['seeds'])} fine-tuning seeds each.")
    return "\n".join(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="demo_out")
    p.add_argument("--tune_lr", action="store_true",
                   help="instead of the demo: phase 1 of each recipe at 0.5x/1x/2x its config's lr, held-out loss")
    p.add_argument("--num_docs", type=int, default=2000, help="corpus size; the demo configs are sized for it")
    p.add_argument("--squad_train", type=int, default=1500)
    p.add_argument("--squad_dev", type=int, default=500)
    p.add_argument("--vocab_size", type=int, default=4096)
    p.add_argument("--heldout_fraction", type=float, default=0.05)
    p.add_argument("--model_config", default="tiny")
    p.add_argument("--jobs", type=int, default=3,
                   help="lanes run at once (AdamW, LAMB, random init), the cores split among them; 3 on 2 cores "
                        "keeps both busy to the end (1 thread each); 1: one after another")
    p.add_argument("--world", type=int, default=1,
                   help="DeepSpeed ranks per pretraining run (2+: the deepspeed launcher; the math is the same, "
                        "and on 2 cores one rank is faster for a model this small)")
    p.add_argument("--dropout", type=float, default=0.0,
                   help="pretraining dropout; 0 because a few thousand steps are far from overfitting")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval_interval_samples", type=int, default=6400)
    p.add_argument("--noise_scale_interval", type=int, default=10)
    p.add_argument("--squad_seeds", default="1,2,3")
    p.add_argument("--squad_epochs", type=float, default=3)
    p.add_argument("--squad_lr", type=float, default=1e-3)
    p.add_argument("--squad_batch_size", type=int, default=8,
                   help="fine-tuning windows per step; 8 chosen from the grid in docs/demo_squad_settings.md")
    p.add_argument("--squad_doc_stride", type=int, default=32)
    return p.parse_args(argv)


if __name__ == "__main__":
    Demo(parse_args()).main()
