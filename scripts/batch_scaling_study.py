#!/usr/bin/env python
"""The batch-scaling study: optimizer steps to a held-out MLM loss target against the
global batch, each optimizer tuned per batch, fitted to the critical-batch model.

The protocol (Shallue et al. 2018; McCandlish et al. 2018; Nado et al. 2021):

* Metric: held-out MLM loss (documents never trained on, fixed masks), evaluated every
  `eval_interval_samples` samples; never the training-batch loss.
* For each optimizer (AdamW, LAMB) and each global batch B of a geometric range: linear
  warmup over a fixed number of samples, then a constant LR. A grid of `grid_size` LRs a
  factor 2 apart, centred on the square-root rule from the best LR at the smallest batch
  in that optimizer's own units (at the smallest batch: on the preset's starting LR). The
  grid is extended by one LR past an edge whenever the best LR lies on that edge (at most
  `max_extensions` times per batch). Every optimizer gets the same grid rule.
* "Best" LR at a batch: the fewest steps to the lowest target reached by any LR of that
  batch (ties and misses: then the next target, then the final held-out loss).
* A run ends at the first evaluation at or below the lowest target
  (pretrain_bert.py --stop_at_eval_loss) or at its sample budget
  max(min_budget_samples, budget_steps x B).
* Readout per target: steps and samples to reach it at the best LR of each batch, and the
  fit S = S_min (1 + B_noise / B), E = E_min (1 + B / B_noise) (lbllm/scaling.py), next to
  the gradient noise scale B_simple the runs measured when they crossed the target.
* Seed spread: the best setting at the smallest and the largest batch again with
  seed + 1. At the largest batch, for AdamW: Goyal et al.'s linear rule from the smallest
  batch's best LR without warmup, and Smith et al.'s batch ramp (from the smallest batch at
  its best LR, the batch doubled every `ramp_interval_samples` up to the largest).

Every run is one pretrain_bert.py process (1 rank); `jobs` lanes run side by side (one per
optimizer), each with cores / jobs threads. Each run's DeepSpeed config, log and metrics
are kept in OUT/runs/NAME/; a finished run (OUT/runs/NAME/trial.json) is reused. A run
that does not finish (killed, preempted, crashed) stops the study; the same command then
continues that run from its last checkpoint (--resume auto, checkpoints every few minutes)
and the study after it. OUT/data is made once per preset and seed (data_recipe.json) and
refused for another; `--data DIR` uses prepared data as it is. OUT/results.json holds every trial and the fits; OUT/results.md the table;
OUT/batch_scaling_study.png the log-log plot. `--report_only` re-renders those from the
saved runs.

    nice python scripts/batch_scaling_study.py                     # CPU preset, ~2 h on 2 cores
    python scripts/batch_scaling_study.py --gpu --out out/bss_gpu  # one H200
    python scripts/batch_scaling_study.py --report_only            # table + plot again
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
sys.path.insert(0, str(ROOT))

from lbllm.scaling import fit_critical_batch, steps_to_target  # noqa: E402
from lbllm.utils import write_json_atomic, read_jsonl  # noqa: E402

OPTIMIZERS = {
    # DeepSpeed optimizer sections; the LR is filled in per trial.
    "AdamW": {"type": "AdamW", "params": {"betas": [0.9, 0.999], "eps": 1e-6, "weight_decay": 0.01,
                                          "torch_adam": True}},
    "LAMB": {"type": "LAMB", "params": {"betas": [0.9, 0.999], "eps": 1e-6, "weight_decay": 0.01}},
}


@dataclass(frozen=True)
class Preset:
    model_config: str
    num_docs: int  # synthetic corpus documents (data_prep/make_corpus.py)
    vocab_size: int
    seq: int
    max_predictions: int
    batches: tuple[int, ...]  # global batches, smallest first
    start_lr: dict  # optimizer -> centre of the LR grid at the smallest batch
    targets: tuple[float, ...]  # held-out MLM loss targets, highest first
    warmup_samples: int
    eval_interval_samples: int
    min_budget_samples: int
    budget_steps: int
    micro_max: int  # largest per-rank micro-batch (gradient accumulation above it)
    ramp_interval_samples: int
    grid_size: int = 3
    max_extensions: int = 2
    optimizers: tuple[str, ...] = ("AdamW", "LAMB")
    extras: bool = True  # seed repeats, linear rule without warmup, batch ramp
    heldout_fraction: float = 0.04
    eval_batch_size: int = 128
    jobs: int = 2
    bf16: bool = False  # bf16 with fp32 master weights (ZeRO 1, as LAMB needs), for GPUs

    def budget(self, batch: int) -> int:
        """Samples a run may use before it counts as not reaching the targets."""
        return max(self.min_budget_samples, self.budget_steps * batch)

    def micro(self, batch: int) -> int:
        # Below the global batch, so that the gradient noise scale has two batch sizes.
        micro = min(self.micro_max, max(1, batch // 2))
        while batch % micro:
            micro -= 1
        return micro


PRESETS = {
    "cpu": Preset(model_config="tiny", num_docs=6000, vocab_size=4096, seq=64, max_predictions=10,
                  batches=(8, 32, 128, 512), start_lr={"AdamW": 1e-3, "LAMB": 4e-3}, targets=(5.8, 5.4),
                  warmup_samples=2048, eval_interval_samples=2048, min_budget_samples=36864, budget_steps=224,
                  micro_max=128, ramp_interval_samples=8192),
    # One H200: a 4-layer 512-wide model, ~10x the text at seq 128, batches to 16k sequences.
    "gpu": Preset(model_config="small", num_docs=60000, vocab_size=8192, seq=128, max_predictions=20,
                  batches=(64, 256, 1024, 4096, 16384), start_lr={"AdamW": 1e-3, "LAMB": 4e-3},
                  targets=(5.6, 4.5), warmup_samples=16384, eval_interval_samples=16384,
                  min_budget_samples=400000, budget_steps=300, micro_max=1024, ramp_interval_samples=65536,
                  jobs=1, eval_batch_size=512, bf16=True),
    # Seconds per run: the machinery end to end (tests/test_experiment.py).
    "smoke": Preset(model_config="tiny", num_docs=150, vocab_size=800, seq=64, max_predictions=10,
                    batches=(4, 16), start_lr={"AdamW": 1e-3, "LAMB": 4e-3}, targets=(7.5, 6.5),
                    warmup_samples=16, eval_interval_samples=32, min_budget_samples=96, budget_steps=8,
                    micro_max=8, ramp_interval_samples=16, grid_size=2, max_extensions=1, jobs=2),
}


@dataclass(frozen=True)
class Trial:
    optimizer: str
    batch: int
    lr: float
    seed: int
    kind: str = "constant"  # constant | linear_no_warmup | ramp

    @property
    def name(self) -> str:
        return f"{self.optimizer.lower()}_b{self.batch:05d}_lr{self.lr:.3e}_s{self.seed}_{self.kind}"


def trial_config(p: Preset, t: Trial) -> dict:
    """The DeepSpeed config of one trial (warmup over a fixed number of samples, then constant)."""
    start = p.batches[0] if t.kind == "ramp" else t.batch
    budget = p.budget(t.batch)
    cfg = {"train_batch_size": start, "train_micro_batch_size_per_gpu": p.micro(start),
           "optimizer": {**OPTIMIZERS[t.optimizer], "params": {**OPTIMIZERS[t.optimizer]["params"], "lr": t.lr}},
           "gradient_clipping": 1.0, "zero_optimization": {"stage": 0}, "steps_per_print": 10**9}
    if p.bf16:
        cfg["bf16"], cfg["zero_optimization"] = {"enabled": True}, {"stage": 1}
    warmup = 0 if t.kind == "linear_no_warmup" else math.ceil(p.warmup_samples / start)
    if t.kind == "ramp":
        milestones, steps, seen, batch = [[0, start]], 0, 0, start
        while seen < budget:
            if batch < t.batch and seen >= p.ramp_interval_samples * len(milestones):
                batch *= 2
                milestones.append([steps, batch])
            steps += 1
            seen += batch
        cfg["batch_schedule"] = {"milestones": milestones}
        # Each micro-batch size must divide every batch of the ramp.
        cfg["train_micro_batch_size_per_gpu"] = p.micro(start)
    else:
        steps = math.ceil(budget / t.batch)
    cfg["scheduler"] = {"type": "WarmupConstant", "params": {"warmup_num_steps": min(warmup, steps),
                                                             "total_num_steps": steps}}
    return cfg


# --------------------------------------------------------------------------- readout

def readout(p: Preset, metrics: Path) -> dict:
    """Steps / samples to each target, the final held-out loss and B_simple at each crossing."""
    rows = read_jsonl(metrics) if metrics.is_file() and metrics.stat().st_size else []
    evals = [r for r in rows if r.get("eval_mlm_loss") is not None]
    out = {"steps": rows[-1]["step"] if rows else 0, "samples": rows[-1]["samples"] if rows else 0,
           "max_batch": max((r["global_batch_size"] for r in rows), default=0),
           "final_eval_mlm_loss": evals[-1]["eval_mlm_loss"] if evals else None,
           "best_eval_mlm_loss": min((r["eval_mlm_loss"] for r in evals), default=None),
           "steps_to_target": {}, "samples_to_target": {}, "b_simple_at_target": {}}
    for target in p.targets:
        hit = steps_to_target(rows, target)
        key = f"{target:g}"
        out["steps_to_target"][key] = hit[0] if hit else None
        out["samples_to_target"][key] = hit[1] if hit else None
        if hit:
            # The noise scale measured closest before the crossing (an EMA over recent steps).
            noise = [r["grad_noise_scale"] for r in rows if r["step"] <= hit[0] and r.get("grad_noise_scale")]
            out["b_simple_at_target"][key] = noise[-1] if noise else None
        else:
            out["b_simple_at_target"][key] = None
    return out


def rank_key(p: Preset, r: dict) -> tuple:
    """Sort key for "best": fewest steps to the lowest target reached, then the next target, ...
    then the lowest held-out loss; a failed run last."""
    key = []
    for target in reversed(p.targets):
        steps = r["steps_to_target"].get(f"{target:g}")
        key.append(math.inf if steps is None else steps)
    best = r.get("best_eval_mlm_loss")
    key.append(math.inf if best is None else best)
    return tuple(key)


# --------------------------------------------------------------------------- running

class Study:
    def __init__(self, out: Path, data: Path, preset_name: str, p: Preset, seed: int, quiet: bool = False,
                 data_given: bool = False):
        self.out, self.data, self.preset_name, self.p, self.seed = out, data, preset_name, p, seed
        self.data_given = data_given  # --data: used as it is
        self.stop = threading.Event()  # a run that failed stops the study (both lanes)
        self.running: set[subprocess.Popen] = set()
        self.lock = threading.Lock()
        self.t0 = time.perf_counter()
        self.done_runs = 0
        self.run_seconds: list[float] = []
        self.quiet = quiet
        self.threads = max(1, (os.cpu_count() or 1) // max(1, p.jobs))

    # ---- data
    def shards(self) -> Path:
        return self.data / f"shards_{self.p.seq}"

    def data_recipe(self) -> dict:
        p = self.p
        return {"num_docs": p.num_docs, "vocab_size": p.vocab_size, "seq": p.seq, "max_predictions": p.max_predictions,
                "heldout_fraction": p.heldout_fraction, "seed": self.seed}

    def prepare_data(self) -> None:
        """OUT/data made for this preset and seed (data_recipe.json says how), or --data as it is."""
        stamp = self.data / "data_recipe.json"
        ready = (self.shards() / "heldout" / "manifest.json").is_file() \
            and (self.data / "tokenizer" / "tokenizer_config.json").is_file()
        if ready and not self.data_given:
            made = json.loads(stamp.read_text()) if stamp.is_file() else None
            if made != self.data_recipe():
                sys.exit(f"batch_scaling_study.py: error: {self.data} was made with {made or 'an unknown recipe'}, "
                         f"this study needs {self.data_recipe()}; use another --out, delete {self.data}, or pass "
                         f"--data {self.data} to use it as it is")
        if ready:
            print(f"=== data: using {self.data}", flush=True)
            return
        if self.data_given:
            sys.exit(f"batch_scaling_study.py: error: --data {self.data}: no tokenizer/ and shards_{self.p.seq}/heldout/ "
                     "there; leave --data out to have the study make its data")
        p = self.p
        self.sh([PY, "data_prep/make_corpus.py", "--out", self.data, "--num_docs", p.num_docs, "--seed", self.seed,
                 "--squad_train", 10, "--squad_dev", 10], "make the synthetic corpus")
        corpus = sorted(glob.glob(str(self.data / "corpus" / "*.txt")))
        self.sh([PY, "data_prep/build_tokenizer.py", "--input", *corpus, "--vocab_size", p.vocab_size,
                 "--out", self.data / "tokenizer"], "train the WordPiece tokenizer")
        self.sh([PY, "data_prep/create_shards.py", "--input", *corpus, "--tokenizer", self.data / "tokenizer",
                 "--max_seq_length", p.seq, "--max_predictions_per_seq", p.max_predictions, "--dupe_factor", 1,
                 "--workers", 2, "--seed", self.seed, "--heldout_fraction", p.heldout_fraction,
                 "--out", self.shards()], f"seq-{p.seq} shards with a held-out set")
        write_json_atomic(stamp, self.data_recipe())

    def sh(self, cmd: list, title: str, log: Path | None = None) -> int:
        print(f"=== {title}", flush=True)
        env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false",
                   OMP_NUM_THREADS=str(self.threads))
        with open(log, "a") if log else open(os.devnull, "w") as f:
            kw = {"stdout": f, "stderr": subprocess.STDOUT} if log or self.quiet else {}
            proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=env, **kw)
            with self.lock:
                self.running.add(proc)
            rc = proc.wait()
            with self.lock:
                self.running.discard(proc)
        if rc != 0 and log is None:
            sys.exit(f"batch_scaling_study: '{title}' failed (exit {rc})")
        return rc

    # ---- one trial
    def run_trial(self, t: Trial, planned: int) -> dict:
        p, run_dir = self.p, self.out / "runs" / t.name
        cfg = trial_config(p, t)
        key = {"trial": asdict(t), "config": cfg, "model_config": p.model_config, "data": str(self.shards()),
               "targets": list(p.targets), "eval_interval_samples": p.eval_interval_samples}
        done = run_dir / "trial.json"
        if done.is_file():
            saved = json.loads(done.read_text())
            if saved["key"] == key:
                with self.lock:
                    self.done_runs += 1
                print(f"    [{self.done_runs}/{planned}+] {t.name}: reusing the finished run", flush=True)
                return saved
        run_dir.mkdir(parents=True, exist_ok=True)
        # The run in run_dir/train is continued only when it was started for this very key.
        started = run_dir / "key.json"
        same = started.is_file() and json.loads(started.read_text()) == key
        if same and (run_dir / "train" / "final" / "config.json").is_file():
            return self.finished(t, key, 0, 0.0, planned, "finished earlier")  # killed before trial.json
        write_json_atomic(started, key)
        cfg_path = run_dir / "ds_config.json"
        write_json_atomic(cfg_path, cfg)
        steps = cfg["scheduler"]["params"]["total_num_steps"]
        noise_every = max(1, steps // 60)
        resume = same and (run_dir / "train" / "checkpoints" / "latest").is_file()
        cmd = [PY, "pretrain_bert.py", "--deepspeed_config", cfg_path, "--data_dir", self.shards(),
               "--output_dir", run_dir / "train", "--model_config", p.model_config, "--seed", t.seed,
               "--eval_data", self.shards() / "heldout", "--eval_interval_samples", p.eval_interval_samples,
               "--eval_batch_size", p.eval_batch_size, "--stop_at_eval_loss", min(p.targets),
               "--noise_scale_interval", noise_every, "--save_interval_minutes", 5, "--keep_last", 1,
               *(["--resume", "auto"] if resume else ["--overwrite"])]
        if self.stop.is_set():
            raise StudyStopped()
        t_start = time.perf_counter()
        rc = self.sh(cmd, f"{t.name} (batch {t.batch}, lr {t.lr:.3g}{', resumed' if resume else ''})",
                     log=run_dir / "log.txt")
        # A result: a finished run (stopped at the target or at its budget), or one that
        # stopped on non-finite numbers (exit 3: diverged). Anything else (killed,
        # preempted with a checkpoint, crashed) is not recorded and is continued next time.
        if not ((rc == 0 and (run_dir / "train" / "final" / "config.json").is_file()) or rc == 3):
            self.stop.set()
            with self.lock:
                for other in self.running:
                    other.terminate()  # SIGTERM: the other lane's run checkpoints and exits
            raise StudyStopped(f"run {t.name} ended with exit {rc} before finishing (log: {run_dir / 'log.txt'}); "
                               "run the same command again to continue it and the study from where they stopped")
        return self.finished(t, key, rc, time.perf_counter() - t_start, planned)

    def finished(self, t: Trial, key: dict, rc: int, seconds: float, planned: int, note: str = "") -> dict:
        run_dir = self.out / "runs" / t.name
        result = {"key": key, **asdict(t), "name": t.name, "exit_code": rc, "wall_s": seconds,
                  **readout(self.p, run_dir / "train" / "metrics.jsonl")}
        write_json_atomic(run_dir / "trial.json", result)
        with self.lock:
            self.done_runs += 1
            if seconds:
                self.run_seconds.append(seconds)
            mean = statistics.mean(self.run_seconds) if self.run_seconds else 0.0
            left = max(0, planned - self.done_runs)
            reached = ", ".join(f"{k}: {v if v is not None else '-'}" for k, v in result["steps_to_target"].items())
            print(f"    [{self.done_runs}/{planned}+] {t.name}: {note or f'exit {rc}'}, {seconds / 60:.1f} min, "
                  f"steps to targets {{{reached}}}, best held-out {_f(result['best_eval_mlm_loss'], '.4f')}; "
                  f"study {(time.perf_counter() - self.t0) / 60:.1f} min, ETA >= "
                  f"{left * mean / max(1, self.p.jobs) / 60:.0f} min", flush=True)
        return result

    def planned(self) -> int:
        p = self.p
        extras = (4 + 2) if p.extras else 0
        return len(p.optimizers) * len(p.batches) * p.grid_size + extras

    # ---- one optimizer's lane: batches in order, each grid centred by the sqrt rule
    def tune(self, optimizer: str) -> list[dict]:
        p, planned = self.p, self.planned()
        results = []
        best_small = None
        for batch in p.batches:
            centre = p.start_lr[optimizer] if best_small is None else \
                best_small["lr"] * math.sqrt(batch / p.batches[0])
            half = (p.grid_size - 1) / 2
            exps = [round(i - half, 6) for i in range(p.grid_size)]
            tried: dict[float, dict] = {}
            for extension in range(p.max_extensions + 1):
                for e in exps:
                    if e not in tried:
                        tried[e] = self.run_trial(Trial(optimizer, batch, lr_at(centre, e), self.seed), planned)
                best_e = min(tried, key=lambda e: rank_key(p, tried[e]))
                lo, hi = min(tried), max(tried)
                if extension == p.max_extensions or best_e not in (lo, hi):
                    break
                exps = [best_e - 1] if best_e == lo else [best_e + 1]
            for e, r in tried.items():
                r = dict(r, best=(e == best_e))
                results.append(r)
            if best_small is None:
                best_small = tried[best_e]
        return results

    def extras(self, optimizer: str, tuned: list[dict]) -> list[dict]:
        p, planned = self.p, self.planned()
        best = {b: next(r for r in tuned if r["batch"] == b and r["best"]) for b in p.batches}
        small, large = p.batches[0], p.batches[-1]
        out = [self.run_trial(Trial(optimizer, b, best[b]["lr"], self.seed + 1), planned) for b in (small, large)]
        if optimizer == "AdamW":
            out.append(self.run_trial(Trial(optimizer, large, best[small]["lr"] * large / small, self.seed,
                                            "linear_no_warmup"), planned))
            out.append(self.run_trial(Trial(optimizer, large, best[small]["lr"], self.seed, "ramp"), planned))
        return out

    def lane(self, optimizer: str) -> list[dict]:
        tuned = self.tune(optimizer)
        return tuned + (self.extras(optimizer, tuned) if self.p.extras else [])

    def main(self, command: str) -> None:
        self.prepare_data()
        print(f"=== study: {self.planned()}+ runs in {self.p.jobs} lane(s), {self.threads} thread(s) each; logs in "
              f"{self.out}/runs/*/log.txt", flush=True)
        with ThreadPoolExecutor(max_workers=self.p.jobs) as pool:
            lanes = [pool.submit(self.lane, opt) for opt in self.p.optimizers]
            errors = [f.exception() for f in lanes]
        stopped = [e for e in errors if e is not None]
        if stopped:
            sys.exit("batch_scaling_study.py: " + "; ".join(str(e) for e in stopped if str(e)))
        trials = [r for f in lanes for r in f.result()]
        meta = {"preset": self.preset_name, "sizes": asdict(self.p), "seed": self.seed, "command": command,
                "data": str(self.shards()), "wall_s": time.perf_counter() - self.t0,
                "num_samples": json.loads((self.shards() / "manifest.json").read_text())["num_samples"]}
        results = {"meta": meta, "trials": trials, "fits": fits(self.p, trials)}
        write_json_atomic(self.out / "results.json", results)
        print(report(self.out), flush=True)


class StudyStopped(Exception):
    """A run did not finish: the study stops (both lanes) and can be continued."""


def lr_at(centre: float, exponent: float) -> float:
    return float(f"{centre * 2.0 ** exponent:.4g}")


# --------------------------------------------------------------------------- fits and report

def best_trials(trials: list[dict], optimizer: str) -> dict[int, dict]:
    return {r["batch"]: r for r in trials if r["optimizer"] == optimizer and r.get("best")}


def fits(p: Preset, trials: list[dict]) -> dict:
    out = {}
    for opt in p.optimizers:
        best = best_trials(trials, opt)
        out[opt] = {}
        for target in p.targets:
            key = f"{target:g}"
            pairs = [(b, r["steps_to_target"][key]) for b, r in sorted(best.items())
                     if r["steps_to_target"][key] is not None]
            if len({b for b, _ in pairs}) < 2:
                out[opt][key] = None
                continue
            fit = fit_critical_batch(*zip(*pairs))
            out[opt][key] = {"S_min": fit.s_min, "B_noise": fit.b_noise, "E_min": fit.e_min,
                             "rms_log_error": fit.rms_log_error, "batches": [b for b, _ in pairs]}
    return out


def preset_of(meta: dict) -> Preset:
    return Preset(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["sizes"].items()})


def _f(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def render(results: dict) -> str:
    meta, trials, fit = results["meta"], results["trials"], results["fits"]
    p = preset_of(meta)
    keys = [f"{t:g}" for t in p.targets]
    lines = ["| optimizer | batch | best LR (LRs tried) | " + " | ".join(
        f"steps to {k} | samples to {k} | B_simple at {k}" for k in keys) + " |",
        "|---" * (3 + 3 * len(keys)) + "|"]
    for opt in p.optimizers:
        for b, r in sorted(best_trials(trials, opt).items()):
            tried = sorted(x["lr"] for x in trials if x["optimizer"] == opt and x["batch"] == b
                           and x["kind"] == "constant" and x["seed"] == r["seed"])
            cells = []
            for k in keys:
                cells += [_f(r["steps_to_target"][k], "d"), _f(r["samples_to_target"][k], "d"),
                          _f(r["b_simple_at_target"][k], ".0f")]
            lines.append(f"| {opt} | {b} | {r['lr']:.3g} ({', '.join(f'{x:.3g}' for x in tried)}) | "
                         + " | ".join(cells) + " |")
    text = ["\n".join(lines), "", "Fits of S = S_min (1 + B_noise / B) to the best LR's steps at each batch:", ""]
    text.append("| optimizer | target | S_min (steps) | B_noise (sequences) | E_min (samples) | rms log error | batches |")
    text.append("|---|---|---|---|---|---|---|")
    for opt in p.optimizers:
        for k in keys:
            f = fit[opt][k]
            if f is None:
                text.append(f"| {opt} | {k} | - | - | - | - | reached at fewer than 2 batches |")
            else:
                text.append(f"| {opt} | {k} | {f['S_min']:.0f} | {f['B_noise']:.0f} | {f['E_min']:.0f} | "
                            f"{f['rms_log_error']:.3f} | {', '.join(map(str, f['batches']))} |")
    seeds = [r for r in trials if r["kind"] == "constant" and r["seed"] != meta["seed"]]
    if seeds:
        text += ["", "Seed spread (the best LR again with another seed):", "",
                 "| optimizer | batch | LR | " + " | ".join(f"steps to {k} (seed {meta['seed']}, {meta['seed'] + 1}; "
                                                            "mean +- std)" for k in keys) + " |",
                 "|---" * (3 + len(keys)) + "|"]
        for r in seeds:
            first = best_trials(trials, r["optimizer"])[r["batch"]]
            cells = []
            for k in keys:
                a, b = first["steps_to_target"][k], r["steps_to_target"][k]
                if a is None or b is None:
                    cells.append(f"{_f(a, 'd')}, {_f(b, 'd')}")
                else:
                    cells.append(f"{a}, {b}; {statistics.mean([a, b]):.0f} +- {statistics.stdev([a, b]):.0f}")
            text.append(f"| {r['optimizer']} | {r['batch']} | {r['lr']:.3g} | " + " | ".join(cells) + " |")
    others = [r for r in trials if r["kind"] != "constant"]
    if others:
        text += ["", "At the largest batch, against the tuned constant-batch runs:", "",
                 "| run | optimizer | LR | " + " | ".join(f"steps to {k} | samples to {k}" for k in keys)
                 + " | best held-out loss | batch reached |", "|---" * (3 + 2 * len(keys) + 2) + "|"]
        rows = [(f"tuned, batch {b}", best_trials(trials, "AdamW").get(b)) for b in (p.batches[0], p.batches[-1])]
        names = {"linear_no_warmup": f"linear rule from batch {p.batches[0]}, no warmup (Goyal et al.)",
                 "ramp": f"batch ramp {p.batches[0]} -> {p.batches[-1]}, constant LR (Smith et al.)"}
        rows += [(names[r["kind"]], r) for r in others]
        for label, r in rows:
            if r is None:
                continue
            cells = []
            for k in keys:
                cells += [_f(r["steps_to_target"][k], "d"), _f(r["samples_to_target"][k], "d")]
            text.append(f"| {label} | {r['optimizer']} | {r['lr']:.3g} | " + " | ".join(cells)
                        + f" | {_f(r['best_eval_mlm_loss'], '.3f')} | {r.get('max_batch', '-')} |")
    runs = len(trials)
    per_opt = {opt: sum(1 for r in trials if r["optimizer"] == opt and r["kind"] == "constant"
                        and r["seed"] == meta["seed"]) for opt in p.optimizers}
    text += ["", f"Preset {meta['preset']}: model {p.model_config}, {meta['num_samples']} training sequences of "
             f"length {p.seq}; warmup {p.warmup_samples} samples then constant LR; held-out evaluation every "
             f"{p.eval_interval_samples} samples (the resolution of samples-to-target); run budget "
             f"max({p.min_budget_samples}, {p.budget_steps} x B) samples. {runs} runs; LR trials per optimizer: "
             + ", ".join(f"{k} {v}" for k, v in per_opt.items())
             + f". Study wall time {meta['wall_s'] / 60:.0f} min. Command: `{meta['command']}`"]
    return "\n".join(text)


def plot(results: dict, png: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"batch_scaling_study: matplotlib is not installed; {png} not written", flush=True)
        return False
    meta, trials, fit = results["meta"], results["trials"], results["fits"]
    targets = [f"{t:g}" for t in meta["sizes"]["targets"]]
    batches = meta["sizes"]["batches"]
    colors = {"AdamW": "#1f77b4", "LAMB": "#d62728"}
    fig, axes = plt.subplots(1, len(targets) + 1, figsize=(6 * (len(targets) + 1), 5))
    for ax, k in zip(axes, targets):
        for opt in meta["sizes"]["optimizers"]:
            best = best_trials(trials, opt)
            pts = [(b, r["steps_to_target"][k]) for b, r in sorted(best.items()) if r["steps_to_target"][k]]
            c = colors.get(opt)
            if pts:
                ax.plot(*zip(*pts), "o", color=c, ms=7, label=f"{opt}, best LR per batch")
                b0, s0 = pts[0]
                ax.plot(batches, [s0 * b0 / b for b in batches], ":", color=c, lw=1,
                        label=f"{opt}: perfect scaling from batch {b0}")
            seeds = [(r["batch"], r["steps_to_target"][k]) for r in trials if r["optimizer"] == opt
                     and r["kind"] == "constant" and r["seed"] != meta["seed"] and r["steps_to_target"][k]]
            if seeds:
                ax.plot(*zip(*seeds), "x", color=c, ms=8, label=f"{opt}, second seed")
            f = fit[opt][k]
            if f:
                xs = [batches[0] * (batches[-1] / batches[0]) ** (i / 50) for i in range(51)]
                ax.plot(xs, [f["S_min"] * (1 + f["B_noise"] / x) for x in xs], "-", color=c, lw=1.5,
                        label=f"{opt} fit: S_min {f['S_min']:.0f}, B_noise {f['B_noise']:.0f}")
        ax.set(xscale="log", yscale="log", xlabel="global batch (sequences)", ylabel="optimizer steps to target",
               title=f"steps to held-out MLM loss {k}")
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
    ax = axes[-1]
    for opt in meta["sizes"]["optimizers"]:
        for b, r in sorted(best_trials(trials, opt).items()):
            path = Path(results["_out"]) / "runs" / r["name"] / "train" / "metrics.jsonl"
            if not path.is_file():
                continue
            ev = [(x["samples"], x["eval_mlm_loss"]) for x in read_jsonl(path) if "eval_mlm_loss" in x]
            if ev:
                alpha = 0.35 + 0.65 * (batches.index(b) + 1) / len(batches)
                ax.plot(*zip(*ev), color=colors.get(opt), alpha=alpha, lw=1.3, label=f"{opt} B={b}")
    for t in meta["sizes"]["targets"]:
        ax.axhline(t, color="gray", ls="--", lw=0.8)
    ax.set(xscale="log", xlabel="samples seen", ylabel="held-out MLM loss", title="best LR at each batch")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return True


def report(out: Path) -> str:
    """results.md and the PNG from results.json, with each run's readout taken again from its
    metrics.jsonl (the saved runs are the source; a readout that changed applies to them)."""
    results = json.loads((out / "results.json").read_text())
    p = preset_of(results["meta"])
    for r in results["trials"]:
        metrics = out / "runs" / r["name"] / "train" / "metrics.jsonl"
        if metrics.is_file():
            r.update(readout(p, metrics))
    results["fits"] = fits(p, results["trials"])
    text = render(results)
    (out / "results.md").write_text(text + "\n")
    plot({**results, "_out": str(out)}, out / "batch_scaling_study.png")
    return text


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="out/batch_scaling_study")
    ap.add_argument("--data", default=None, help="prepared data dir (default OUT/data, made if missing)")
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--gpu", dest="preset", action="store_const", const="gpu", help="the one-H200 preset")
    group.add_argument("--smoke", dest="preset", action="store_const", const="smoke", help="seconds per run (tests)")
    ap.set_defaults(preset="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--report_only", action="store_true", help="re-render results.md and the PNG from results.json")
    ap.add_argument("--quiet", action="store_true", help="data preparation output to /dev/null")
    ap.add_argument("--batches", default=None, help="override the preset's batches, e.g. 8,32")
    ap.add_argument("--no_extras", action="store_true", help="skip the seed repeats, linear rule and batch ramp")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    if args.report_only:
        if not (out / "results.json").is_file():
            sys.exit(f"batch_scaling_study.py: error: {out / 'results.json'} not found; run the study first "
                     "(or pass its --out)")
        print(report(out))
        return
    preset = PRESETS[args.preset]
    if args.batches:
        preset = replace(preset, batches=tuple(int(b) for b in args.batches.split(",")))
    if args.no_extras:
        preset = replace(preset, extras=False)
    data = Path(args.data).resolve() if args.data else out / "data"
    Study(out, data, args.preset, preset, args.seed, quiet=args.quiet, data_given=args.data is not None).main(
        " ".join(["python", *sys.argv]))


if __name__ == "__main__":
    main()
