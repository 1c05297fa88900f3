#!/usr/bin/env python
"""The batch-scaling experiment (issue 5): does a 16x larger batch reach the same MLM loss
in 16x fewer optimizer steps, and which recipe gets it there?

Same model, same data (seq 128, phase 1 only), same number of epochs for every run:

  (a) AdamW at the small batch B0 (the baseline): lr0 at B0, linear warmup over a
      fraction w of the run, then linear decay to 0 (You et al.'s poly decay, power 1).
  (b) LAMB at 16 B0, lr = lr0 x sqrt(16) (You et al.'s sqrt rule, from (a)'s lr and batch),
      linear warmup over 16 w of the run (You et al.'s linear-epoch warmup: warmup epochs
      grow with the batch), then linear decay.
  (c) LARS at 16 B0, the same sqrt rule and warmup as (b). LARS's layer step is about
      lr x eta x ||w|| / (1 - m), so its base lr is lr0 x (1 - m) / eta: the same relative
      layer step as LAMB at lr0 (LARS lr is on another scale than Adam's; see its config).
  (d) AdamW at 16 B0, lr = 16 lr0 (Goyal et al.'s linear rule), no warmup: the failure
      Goyal et al. describe, with (a)'s optimizer so that only batch, rule and warmup change.
  (e) AdamW with a batch ramp (Smith et al. 2018, "Don't Decay the Learning Rate, Increase
      the Batch Size"): B0 doubled at the points where (a)'s linear decay has halved the
      LR (1/2, 1/4, ... in samples), up to 16 B0; the LR stays at lr0 after (a)'s warmup.

Each run is a DeepSpeed config under ds_configs/experiment/ (optimizer, lr_scaling rule and
base, schedule type); this script fills in the size-dependent numbers (batches, steps,
warmup, ramp milestones) for the chosen sizes and writes the configs it ran to
OUT/configs/. The committed configs are the CPU-sized instances. Then every pretrained
model is fine-tuned on the generated SQuAD v1.1 set with the same short settings.
Re-running with the same OUT reuses the data, every finished run whose config is unchanged
and its SQuAD result (delete OUT/runs/X to redo run X).

Writes OUT/results.json, OUT/results.md (the table) and OUT/batch_scaling.png (MLM loss,
LR and measured gradient noise scale vs samples seen). `--report_only` re-renders them
from OUT/results.json and the runs' metrics (it needs no torch, only matplotlib).

    nice python scripts/batch_scaling_experiment.py                 # CPU-sized, OUT=out/batch_scaling
    python scripts/batch_scaling_experiment.py --gpu --out gpu_out  # GPU-sized
    python scripts/batch_scaling_experiment.py --smoke --out /tmp/x # a minute or two, for tests
"""
from __future__ import annotations

import argparse
import copy
import glob
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo import PY, ROOT, Demo  # noqa: E402  (scripts/ is not a package)

from lbllm.utils import free_port, read_jsonl  # noqa: E402

CONFIG_DIR = ROOT / "ds_configs" / "experiment"


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the CPU-, GPU- and smoke-sized experiment."""

    model_config: str  # lbllm model size name
    num_docs: int  # synthetic corpus documents (sets the number of seq-128 samples N)
    epochs: float  # passes over the N samples, the same for every run
    small_batch: int  # B0: runs (a) and the start of (e)
    scale: int  # large batch = scale x B0 (b, c, d and the end of e); a power of 2
    micro_small: int  # per-rank micro-batch at B0 (also the small batch of the noise-scale estimate)
    micro_large: int  # per-rank micro-batch at the large batch
    world: int  # data-parallel ranks (DeepSpeed launcher when > 1)
    warmup_fraction: float  # w: warmup of (a) as a fraction of its steps; (b), (c) get scale x w
    noise_measurements: int  # aim for this many gradient-noise-scale measurements per run
    vocab_size: int
    squad_train: int  # generated SQuAD questions
    squad_dev: int
    squad_epochs: float  # 0 skips fine-tuning (the table shows "-")
    squad_lr: float

    @property
    def large_batch(self) -> int:
        return self.small_batch * self.scale

    def __post_init__(self) -> None:
        if self.scale < 2 or self.scale & (self.scale - 1):
            raise ValueError(f"--scale {self.scale}: must be a power of 2 >= 2 (the ramp doubles the batch)")
        for name, batch, micro in (("small", self.small_batch, self.micro_small),
                                   ("large", self.large_batch, self.micro_large)):
            if batch % (micro * self.world):
                raise ValueError(f"{name} batch {batch} is not a multiple of micro-batch {micro} x world {self.world}")
        if self.micro_small >= self.small_batch:
            raise ValueError(f"micro_small {self.micro_small} must be below small_batch {self.small_batch}: the "
                             "gradient noise scale compares a micro-batch gradient with the global one")
        if not 0 <= self.warmup_fraction * self.scale <= 1:
            raise ValueError(f"warmup fraction {self.warmup_fraction} x scale {self.scale} must be <= 1")


PRESETS = {
    # The demo's data; ~15 min of pretraining on 2 busy CPU cores plus ~2-3 min per SQuAD fine-tune.
    "cpu": Sizes(model_config="tiny", num_docs=2000, epochs=2, small_batch=32, scale=16, micro_small=16,
                 micro_large=64, world=2, warmup_fraction=0.02, noise_measurements=50, vocab_size=4096,
                 squad_train=2000, squad_dev=500, squad_epochs=1, squad_lr=1e-3),
    # One GPU: a 4-layer 512-wide model on ~10x the data, batches 128 -> 2048.
    "gpu": Sizes(model_config="small", num_docs=20000, epochs=3, small_batch=128, scale=16, micro_small=64,
                 micro_large=256, world=1, warmup_fraction=0.02, noise_measurements=100, vocab_size=8192,
                 squad_train=8000, squad_dev=1000, squad_epochs=2, squad_lr=5e-4),
    # A minute or two: every code path except SQuAD (tests/test_experiment.py).
    "smoke": Sizes(model_config="tiny", num_docs=150, epochs=0.25, small_batch=4, scale=16, micro_small=2,
                   micro_large=32, world=1, warmup_fraction=0.02, noise_measurements=10, vocab_size=800,
                   squad_train=60, squad_dev=30, squad_epochs=0, squad_lr=1e-3),
}


@dataclass(frozen=True)
class Run:
    key: str
    name: str
    config: str  # file in ds_configs/experiment/
    batch: str  # "small", "large" or "ramp"
    warmup: str  # "w", "scale*w" or "none"


RUNS = (
    Run("a", "AdamW, small batch (baseline)", "a_adamw_small_batch.json", "small", "w"),
    Run("b", "LAMB, sqrt scaling, warmup", "b_lamb_sqrt_warmup.json", "large", "scale*w"),
    Run("c", "LARS, sqrt scaling, warmup", "c_lars_sqrt_warmup.json", "large", "scale*w"),
    Run("d", "AdamW, linear scaling, no warmup", "d_adamw_linear_no_warmup.json", "large", "none"),
    Run("e", "AdamW, batch ramp, constant LR", "e_adamw_batch_ramp.json", "ramp", "w"),
)


# --------------------------------------------------------------------------- configs

def ramp_milestones(sizes: Sizes, total_samples: float, warmup_samples: int) -> tuple[list[list[int]], int]:
    """Smith et al.: double the batch where (a)'s linear decay halves the LR, in samples.

    (a)'s LR factor after warmup is 1 - (s - W) / (S - W), so it is 2^-k at
    s_k = W + (1 - 2^-k)(S - W). The batch B0 2^k runs from s_k to s_{k+1} (the last one,
    scale x B0, to S). Each segment gets a whole number of steps; one that rounds to no
    steps is skipped. Returns the milestones ([steps done before it, batch]) and the total steps.
    """
    levels = int(math.log2(sizes.scale))
    bounds = [warmup_samples + (1 - 2.0 ** -k) * (total_samples - warmup_samples) for k in range(1, levels + 1)]
    bounds.append(total_samples)
    milestones, steps, consumed = [], 0, 0
    for k, end in enumerate(bounds):
        batch = sizes.small_batch * 2 ** k
        n = max(0, round((end - consumed) / batch))
        if n:
            milestones.append([steps, batch])
            steps += n
            consumed += n * batch
    return milestones, steps


def build_configs(sizes: Sizes, num_samples: int, template_dir: Path = CONFIG_DIR) -> dict[str, dict]:
    """The DeepSpeed config of every run for these sizes and this many samples (N).

    Each run sees epochs x N samples, so a run at batch B takes round(epochs x N / B) steps.
    """
    total = sizes.epochs * num_samples
    small_steps = max(1, round(total / sizes.small_batch))
    small_warmup = round(sizes.warmup_fraction * small_steps)
    out = {}
    for run in RUNS:
        path = template_dir / run.config
        cfg = json.loads(path.read_text())
        if "lr_scaling" not in cfg or "lr" in cfg.get("optimizer", {}).get("params", {}):
            raise SystemExit(f"{path}: experiment configs set the LR through lr_scaling only (no optimizer.params.lr)")
        cfg = copy.deepcopy(cfg)
        cfg["lr_scaling"]["base_batch"] = sizes.small_batch  # every rule starts from (a)'s batch
        batch = sizes.large_batch if run.batch == "large" else sizes.small_batch
        micro = sizes.micro_large if run.batch == "large" else sizes.micro_small
        cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"] = batch, micro
        if run.batch == "ramp":
            milestones, steps = ramp_milestones(sizes, total, small_warmup * sizes.small_batch)
            cfg["batch_schedule"] = {"milestones": milestones}
        else:
            cfg.pop("batch_schedule", None)
            steps = max(1, round(total / batch))
        warmup = {"w": small_warmup, "scale*w": round(sizes.scale * sizes.warmup_fraction * steps),
                  "none": 0}[run.warmup]
        params = cfg["scheduler"]["params"]
        params["total_num_steps"], params["warmup_num_steps"] = steps, min(warmup, steps)
        out[run.key] = cfg
    return out


# --------------------------------------------------------------------------- running

class Experiment(Demo):
    """The demo's stage runner (progress lines, DeepSpeed launcher, SQuAD) on this experiment."""

    def __init__(self, args: argparse.Namespace, sizes: Sizes):
        ns = argparse.Namespace(out=args.out, model_config=sizes.model_config, seed=args.seed,
                                num_docs=sizes.num_docs, squad_train=sizes.squad_train, squad_dev=sizes.squad_dev,
                                vocab_size=sizes.vocab_size, dupe_factor=1, squad_epochs=sizes.squad_epochs,
                                squad_lr=sizes.squad_lr, tune_lr=False, jobs=1)
        super().__init__(ns)
        self.sizes = sizes
        self.preset = args.preset
        self.reused: list[str] = []  # stages taken from an earlier invocation (their wall times are theirs)
        if args.data is not None:
            self.data = Path(args.data).resolve()
        squad = len(RUNS) if sizes.squad_epochs > 0 else 0
        self.total_steps = (0 if self.has_data() else 3) + len(RUNS) + squad

    def has_data(self) -> bool:
        # The held-out set is optional here (runs are evaluated on it when it exists): data
        # given with --data is used as it is, never re-made.
        return ((self.data / "shards_128" / "manifest.json").is_file()
                and (self.data / "tokenizer" / "tokenizer_config.json").is_file()
                and (self.data / "squad" / "dev.json").is_file())

    def prepare_data(self) -> None:
        """The demo's corpus -> tokenizer -> shards, seq 128 only; kept when already there."""
        if self.has_data():
            print(f"=== data: using {self.data}", flush=True)
            return
        self.sh("generate the synthetic corpus + SQuAD files", [
            sys.executable, "data_prep/make_corpus.py", "--out", self.data, "--num_docs", str(self.a.num_docs),
            "--seed", str(self.a.seed), "--squad_train", str(self.a.squad_train), "--squad_dev", str(self.a.squad_dev)])
        corpus = sorted(glob.glob(str(self.data / "corpus" / "*.txt")))
        self.sh("train the WordPiece tokenizer", [
            sys.executable, "data_prep/build_tokenizer.py", "--input", *corpus, "--vocab_size", str(self.a.vocab_size),
            "--out", self.data / "tokenizer"])
        self.sh("create seq-128 shards", [
            sys.executable, "data_prep/create_shards.py", "--input", *corpus, "--tokenizer", self.data / "tokenizer",
            "--max_seq_length", "128", "--max_predictions_per_seq", "20", "--dupe_factor", "1",
            "--workers", "2", "--seed", str(self.a.seed), "--heldout_fraction", "0.05", "--out", self.data / "shards_128"])

    def main(self) -> None:
        self.prepare_data()
        num_samples = json.loads((self.data / "shards_128" / "manifest.json").read_text())["num_samples"]
        configs = build_configs(self.sizes, num_samples)
        cfg_dir = self.out / "configs"
        cfg_dir.mkdir(parents=True, exist_ok=True)
        results = []
        for run in RUNS:
            cfg_path = cfg_dir / run.config
            cfg_path.write_text(json.dumps(configs[run.key], indent=2) + "\n")
            steps = configs[run.key]["scheduler"]["params"]["total_num_steps"]
            interval = max(1, round(steps / self.sizes.noise_measurements))
            out = self.out / "runs" / run.key
            done = out / "run.json"  # written after a finished run: a re-run with the same config reuses it
            key = {"config": configs[run.key], "model_config": self.sizes.model_config, "seed": self.a.seed,
                   "world": self.sizes.world, "noise_scale_interval": interval,
                   "data": str(self.data / "shards_128"), "num_samples": num_samples}
            if done.is_file() and (out / "final" / "config.json").is_file() \
                    and json.loads(done.read_text())["key"] == key:
                self.step_no += 1
                self.reused.append(f"run {run.key}")
                print(f"=== ({run.key}) reusing the finished run in {out}", flush=True)
                wall = json.loads(done.read_text())["wall_s"]
            else:
                done.unlink(missing_ok=True)
                # Demo.pretrain takes a path under ds_configs/; a relative one reaches OUT/configs.
                rel = os.path.relpath(cfg_path, ROOT / "ds_configs")
                try:
                    wall = self.pretrain(rel, self.data / "shards_128", out, ["--noise_scale_interval", str(interval)],
                                         world=self.sizes.world)
                except SystemExit as exc:  # a run that crashes is a result too; the others still run
                    print(f"experiment: run ({run.key}) failed: {exc}", flush=True)
                    results.append(self.record(run, configs[run.key], out, None, interval, error=str(exc)))
                    continue
                done.write_text(json.dumps({"key": key, "wall_s": wall}) + "\n")
            results.append(self.record(run, configs[run.key], out, wall, interval))
        for r in results:
            r["squad"] = None
            if self.sizes.squad_epochs > 0 and r["error"] is None:
                r["squad"] = self.run_squad(r["key"], Path(r["model_dir"]))
        meta = {"preset": self.preset, "sizes": asdict(self.sizes), "num_samples": num_samples,
                "command": " ".join(sys.argv), "total_wall_s": time.perf_counter() - self.t0, "reused": self.reused}
        (self.out / "results.json").write_text(json.dumps({"meta": meta, "runs": results}, indent=2) + "\n")
        table = report(self.out)
        print(f"\n=== experiment finished in {(time.perf_counter() - self.t0) / 60:.1f} min; results in "
              f"{self.out}/results.md\n")
        print(table)

    def pretrain(self, config: str, data_dir: Path, out: Path, extra: list[str] = (), world: int = 2) -> float:
        """One pretraining run of this experiment (config relative to ds_configs/), evaluated
        on the data's held-out set (after the last step) when it has one."""
        if (data_dir / "heldout" / "manifest.json").is_file():
            extra = [*extra, "--eval_data", data_dir / "heldout"]
        deepspeed = str(Path(PY).parent / "deepspeed")
        launcher = [deepspeed, "--num_gpus", str(world), "--master_port", str(free_port())] if world > 1 else [PY]
        cmd = [*launcher, "pretrain_bert.py", "--deepspeed_config", f"ds_configs/{config}", "--data_dir", data_dir,
               "--output_dir", out, "--model_config", self.a.model_config, "--seed", str(self.a.seed),
               "--overwrite", *extra]  # an unfinished or outdated run is redone from scratch
        return self.sh(f"pretrain {out.relative_to(self.out)} ({Path(config).name}, {world} ranks)", cmd)

    def squad(self, name: str, model_dir: Path) -> dict:
        out = self.out / "squad" / name
        self.sh(f"SQuAD v1.1 fine-tune + eval: {name}", [
            PY, "scripts/run_squad.py", "--model_dir", model_dir, "--train_file", self.data / "squad/train.json",
            "--predict_file", self.data / "squad/dev.json", "--output_dir", out, "--epochs", str(self.a.squad_epochs),
            "--batch_size", "16", "--lr", str(self.a.squad_lr), "--max_seq_length", "192", "--doc_stride", "64",
            "--seeds", str(self.a.seed), "--no_progress"])
        return json.loads((out / "results.json").read_text())

    def run_squad(self, key: str, model_dir: Path) -> dict | None:
        """Fine-tune + evaluate (Demo.squad); reuses a result newer than the model it scored."""
        result = self.out / "squad" / f"run_{key}" / "results.json"
        if result.is_file() and result.stat().st_mtime > (model_dir / "config.json").stat().st_mtime:
            self.step_no += 1
            self.reused.append(f"squad {key}")
            print(f"=== ({key}) reusing the SQuAD result {result}", flush=True)
            return json.loads(result.read_text())
        try:
            return self.squad(f"run_{key}", model_dir)
        except SystemExit as exc:
            print(f"experiment: SQuAD for run ({key}) failed: {exc}", flush=True)
            return None

    def record(self, run: Run, cfg: dict, out: Path, wall: float | None, interval: int, error: str | None = None) -> dict:
        from lbllm.schedules import LRScaling

        # The LR the rule gives the run's (first) batch; the metrics' max can be lower when
        # there is no warmup (the decay already applies to step 1).
        lr = LRScaling(**cfg["lr_scaling"]).lr_for(cfg["train_batch_size"])
        r = {"key": run.key, "name": run.name, "config": f"configs/{run.config}", "optimizer": cfg["optimizer"]["type"],
             "lr": lr, "lr_rule": cfg["lr_scaling"]["rule"], "warmup_steps": cfg["scheduler"]["params"]["warmup_num_steps"],
             "batch_schedule": cfg.get("batch_schedule", {}).get("milestones"), "wall_s": wall,
             "noise_scale_interval": interval, "metrics": str((out / "metrics.jsonl").relative_to(self.out)),
             "model_dir": str(out / "final"), "error": error, "summary": None}
        metrics = out / "metrics.jsonl"
        if metrics.is_file() and metrics.stat().st_size:
            rows = read_jsonl(metrics)
            r["summary"] = summarize(metrics)
            r["summary"]["train_loop_s"] = sum(x["step_time_s"] for x in rows)
            r["summary"]["batches"] = sorted({x["global_batch_size"] for x in rows})
            r["summary"]["b_simple_end"] = next((x["grad_noise_scale"] for x in reversed(rows)
                                                 if x.get("grad_noise_scale") is not None), None)
        return r


def summarize(metrics_path: Path) -> dict:
    """Steps, batch and the final MLM loss / accuracy: on the held-out set after the last
    step when the run evaluated one (`mlm_source` "held-out"), else, labelled as such, the
    training-batch average over the last 10% of the samples (weighted by batch)."""
    rows = read_jsonl(metrics_path)
    total = rows[-1]["samples"]
    tail = [r for r in rows if r["samples"] > 0.9 * total] or rows[-1:]
    weight = sum(r["global_batch_size"] for r in tail)
    heldout = next((r for r in reversed(rows) if "eval_mlm_loss" in r), None)
    if heldout is not None:
        loss, acc, source = heldout["eval_mlm_loss"], heldout["eval_mlm_acc"], "held-out"
    else:
        loss = sum(r["mlm_loss"] * r["global_batch_size"] for r in tail) / weight
        acc = sum(r["mlm_acc"] * r["global_batch_size"] for r in tail) / weight
        source = "training batches (no held-out set)"
    return {
        "steps": rows[-1]["step"],
        "global_batch_size": rows[-1]["global_batch_size"],
        "samples": total,
        "final_mlm_loss": loss,
        "final_mlm_acc": acc,
        "mlm_source": source,
        "peak_lr": max(r["lr"] for r in rows),
        "seq_per_s": sum(r["global_batch_size"] for r in rows) / sum(r["step_time_s"] for r in rows),
    }


# --------------------------------------------------------------------------- report

def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def render_table(runs: list[dict]) -> str:
    head = ("| run | optimizer | global batch | lr (rule) | warmup steps | optimizer steps | wall time (loop) "
            "| final MLM loss | MLM acc | B_simple at end | SQuAD EM | SQuAD F1 |")
    sources = {r["summary"]["mlm_source"] for r in runs if r["summary"]}
    if sources:
        head = head.replace("final MLM loss", f"final MLM loss ({' / '.join(sorted(sources))})")
    lines = [head, "|---" * 12 + "|"]
    for r in runs:
        s, q = r["summary"], r["squad"] or {}
        if s is None:
            lines.append(f"| ({r['key']}) {r['name']} (failed) | {r['optimizer']} | - | - | - | - | - | - | - | - | - | - |")
            continue
        batches = s["batches"]
        batch = str(batches[0]) if len(batches) == 1 else f"{batches[0]} → {batches[-1]}"
        wall = "-" if r["wall_s"] is None else f"{r['wall_s'] / 60:.1f} min ({s['train_loop_s'] / 60:.1f})"
        failed = " (failed)" if r["error"] else ""
        lines.append(
            f"| ({r['key']}) {r['name']}{failed} | {r['optimizer']} | {batch} | {r['lr']:.3g} ({r['lr_rule']}) "
            f"| {r['warmup_steps']} | {s['steps']} | {wall} | {_fmt(s['final_mlm_loss'], '.3f')} "
            f"| {_fmt(s['final_mlm_acc'], '.3f')} | {_fmt(s['b_simple_end'], '.0f')} "
            f"| {_fmt(q.get('exact_match'), '.1f')} | {_fmt(q.get('f1'), '.1f')} |")
    return "\n".join(lines)


def target_verdict(runs: list[dict]) -> str:
    """The issue's target: (b) within 2% of (a)'s final MLM loss with >= 16x fewer optimizer steps."""
    by = {r["key"]: r for r in runs}
    a, b = (by.get(k, {}).get("summary") for k in "ab")
    if not a or not b:
        return "Target: not evaluated (run (a) or (b) has no metrics)."
    gap = b["final_mlm_loss"] / a["final_mlm_loss"] - 1
    fewer = a["steps"] / b["steps"]
    met = gap <= 0.02 and fewer >= 16
    noise = ", ".join(f"({r['key']}) {_fmt(r['summary']['b_simple_end'], '.0f')}" for r in runs if r["summary"])
    small, large = max(a["batches"]), max(b["batches"])
    text = (f"Target (b) vs (a): final MLM loss {b['final_mlm_loss']:.3f} vs {a['final_mlm_loss']:.3f} "
            f"({gap:+.1%}; target <= +2.0%) with {fewer:.1f}x fewer optimizer steps (target >= 16x): "
            f"**{'met' if met else 'not met'}**. Gradient noise scale B_simple at the end of each run "
            f"(sequences): {noise}; the batches are {small} and {large}.")
    b_noise = a["b_simple_end"]
    if b_noise and b_noise > 0:
        # McCandlish et al. 2018, eq. 2.11: samples to a given loss E = E_min (1 + B / B_noise).
        ratio = (1 + large / b_noise) / (1 + small / b_noise)
        text += (f" With B_noise ~ {b_noise:.0f} (the end of (a)), McCandlish et al.'s E = E_min (1 + B / B_noise) "
                 f"says batch {large} needs {ratio:.1f}x the samples of batch {small} to reach the same loss, "
                 f"i.e. {ratio:.1f}x the epochs the runs were given.")
    return text


def plot(out: Path, runs: list[dict], png: Path) -> bool:
    """MLM loss, LR and measured B_simple vs samples seen, one line per run."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"experiment: matplotlib is not installed; {png} not written (the table and JSON are)", flush=True)
        return False
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2))
    colors = dict(zip("abcde", ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e")))
    small = large = None
    for r in runs:
        path = out / r["metrics"]
        if not path.is_file() or not path.stat().st_size:
            continue
        rows = read_jsonl(path)
        # A step's loss is measured before its update: plot it at the samples seen before its batch.
        x = [row["samples"] - row["global_batch_size"] for row in rows]
        loss = [row["mlm_loss"] for row in rows]
        label, c = f"({r['key']}) {r['name']}", colors.get(r["key"])
        # Small batches give noisy per-step losses: raw faint, a sample-weighted running
        # mean over ~4% of the run on top.
        window = max(1.0, 0.04 * x[-1])
        smooth, lo = [], 0
        for i in range(len(rows)):
            while x[i] - x[lo] >= window:
                lo += 1
            w = [rows[j]["global_batch_size"] for j in range(lo, i + 1)]
            smooth.append(sum(loss[j] * wj for j, wj in zip(range(lo, i + 1), w)) / sum(w))
        axes[0].plot(x, loss, color=c, alpha=0.2, lw=0.8)
        axes[0].plot(x, smooth, color=c, lw=1.8, label=label, marker="o" if len(rows) < 40 else None, ms=3)
        heldout = [(row["samples"], row["eval_mlm_loss"]) for row in rows if "eval_mlm_loss" in row]
        if heldout:  # the held-out evaluation after the last step: the figure the table reports
            axes[0].plot(*zip(*heldout), color=c, marker="*", ms=11, ls="none")
        axes[1].step(x, [row["lr"] for row in rows], where="post", color=c, lw=1.5, label=label)
        noise = [(row["samples"] - row["global_batch_size"], row["grad_noise_scale"]) for row in rows if row.get("grad_noise_scale") is not None]
        if noise:
            axes[2].plot(*zip(*noise), color=c, lw=1.5, label=label)
        batches = [row["global_batch_size"] for row in rows]
        small = min(batches) if small is None else min(small, min(batches))
        large = max(batches) if large is None else max(large, max(batches))
    axes[0].set(xlabel="samples seen", ylabel="MLM loss (train batch, before the update)",
                title="MLM loss vs samples (faint: per step; bold: running mean; star: held-out)")
    axes[1].set(xlabel="samples seen", ylabel="learning rate", yscale="log", title="LR vs samples")
    axes[2].set(xlabel="samples seen", ylabel="B_simple (sequences)", yscale="log",
                title="measured gradient noise scale")
    if small is not None:
        for b, ls in ((small, ":"), (large, "--")):
            axes[2].axhline(b, color="gray", ls=ls, lw=1)
            axes[2].annotate(f"batch {b}", (0, b), textcoords="offset points", xytext=(4, 3), fontsize=8,
                             color="gray", xycoords=("axes fraction", "data"))
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return True


def report(out: Path) -> str:
    """results.md and batch_scaling.png from OUT/results.json; returns the markdown."""
    data = json.loads((out / "results.json").read_text())
    runs, meta = data["runs"], data["meta"]
    s = meta["sizes"]
    text = "\n\n".join([
        render_table(runs),
        target_verdict(runs),
        f"Sizes ({meta['preset']}): model {s['model_config']}, {meta['num_samples']} seq-128 samples x "
        f"{s['epochs']:g} epochs, batch {s['small_batch']} vs {s['small_batch'] * s['scale']}, {s['world']} "
        f"rank(s); SQuAD {s['squad_epochs']:g} epoch(s) at lr {s['squad_lr']:g}. Command: `{meta['command']}`",
    ])
    (out / "results.md").write_text(text + "\n")
    plot(out, runs, out / "batch_scaling.png")
    return text


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Sizes]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/batch_scaling", help="results, configs, runs and (by default) data")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--gpu", dest="preset", action="store_const", const="gpu", help="GPU-sized preset")
    size.add_argument("--smoke", dest="preset", action="store_const", const="smoke",
                      help="a-minute-or-two preset without SQuAD (tests/test_experiment.py)")
    p.set_defaults(preset="cpu")
    p.add_argument("--data", default=None,
                   help="prepared data dir (corpus/, tokenizer/, shards_128/, squad/); default OUT/data, made if missing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report_only", action="store_true", help="re-render results.md and the PNG from OUT/results.json")
    for f in fields(Sizes):
        p.add_argument(f"--{f.name}", type={"int": int, "float": float, "str": str}[f.type], default=None,
                       help=f"override the preset's {f.name}")
    args = p.parse_args(argv)
    base = PRESETS[args.preset]
    overrides = {f.name: getattr(args, f.name) for f in fields(Sizes) if getattr(args, f.name) is not None}
    try:
        sizes = replace(base, **overrides)
    except ValueError as exc:
        p.error(str(exc))
    return args, sizes


def main(argv: list[str] | None = None) -> None:
    args, sizes = parse_args(argv)
    if args.report_only:
        out = Path(args.out).resolve()
        if not (out / "results.json").is_file():
            sys.exit(f"batch_scaling_experiment.py: error: {out / 'results.json'} not found; run the experiment "
                     "first (or pass its --out)")
        print(report(out))
        return
    Experiment(args, sizes).main()


if __name__ == "__main__":
    main()
