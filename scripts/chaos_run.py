#!/usr/bin/env python
"""Kill a small pretraining run again and again, resume it each time, and check that it
ends where a run that was never interrupted ends.

    python scripts/chaos_run.py --workdir /tmp/chaos                  # 4 kills, one on another world size
    python scripts/chaos_run.py --workdir W --data DIR --kills 2 --no_world_change --dropout 0.1   # CI

It prepares a tiny corpus (or takes prepared seq-64 shards with --data), runs the
reference (2 ranks, ZeRO 2, fp32, LAMB, a checkpoint after every step by the clock, so
the ranks must agree on each, the newest 2 kept),
then the same command with --resume auto, killed K times at random moments: SIGKILL and
SIGTERM in turn, to the whole process group as a node failure or a scheduler does: the
first a SIGKILL while a checkpoint is being written, the second a SIGTERM during a step,
the rest at random moments. Unless --no_world_change,
one restart runs on 1 rank (the checkpoint is re-partitioned). Then it compares every
logged loss and the final weights with the reference: bit-identical when the world size
never changed, within 1e-5 relative otherwise (summation order; and dropout must be 0
then, since a per-rank RNG stream cannot move to another number of ranks). Prints what
it did and the comparison; exit 0 when they agree, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
sys.path.insert(0, str(ROOT))

from lbllm.utils import free_port, read_jsonl  # noqa: E402

DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def sh(*cmd) -> None:
    subprocess.run([str(c) for c in cmd], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def prepare_data(work: Path) -> Path:
    data = work / "data"
    if not (data / "shards_64" / "manifest.json").is_file():
        sh(PY, "data_prep/make_corpus.py", "--out", data, "--num_docs", 200, "--squad_train", 10, "--squad_dev", 10)
        corpus = sorted(str(p) for p in (data / "corpus").glob("*.txt"))
        sh(PY, "data_prep/build_tokenizer.py", "--input", *corpus, "--vocab_size", 800, "--out", data / "tokenizer")
        sh(PY, "data_prep/create_shards.py", "--input", *corpus, "--tokenizer", data / "tokenizer",
           "--max_seq_length", 64, "--max_predictions_per_seq", 10, "--out", data / "shards_64")
    return data / "shards_64"


def command(world: int, cfg: Path, data: Path, out: Path, a: argparse.Namespace, *extra) -> list[str]:
    launcher = ([str(Path(PY).parent / "deepspeed"), "--num_gpus", str(world), "--master_port", str(free_port())]
                if world > 1 else [PY])
    return [*launcher, "pretrain_bert.py", "--deepspeed_config", str(cfg), "--data_dir", str(data),
            "--output_dir", str(out), "--model_config", "tiny", "--seed", "3", "--dropout", str(a.dropout),
            "--max_steps", str(a.steps), "--save_interval_minutes", "0.00001", "--keep_last", "2", *extra]


def env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in DIST_VARS}


def saving(out: Path) -> bool:
    """A checkpoint directory newer than the one `latest` names: a save is under way."""
    root = out / "checkpoints"
    latest = (root / "latest").read_text().strip() if (root / "latest").is_file() else ""
    return any(p.name > latest for p in root.glob("step*")) if root.is_dir() else False


def logged(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def kill_once(cmd: list[str], out: Path, sig: int, during_save: bool, rng: random.Random, timeout: float) -> str:
    """Start `cmd`, wait for a moment to strike (a few more steps logged, or a save under
    way), signal the whole process group, wait for it to end. Returns what happened."""
    log = open(out.parent / "chaos.stderr", "a")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), start_new_session=True, stdout=subprocess.DEVNULL, stderr=log)
    start, target = logged(out), logged(out) + rng.randint(1, 3)
    deadline, moment = time.monotonic() + timeout, None
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            n = logged(out)
            if n > start and (saving(out) if during_save else n >= target):
                moment = f"{'while saving' if saving(out) else 'during a step'} after step {n}"
                break
            time.sleep(0.002 if during_save else 0.01)  # a save of the tiny model lasts tens of ms
        if moment is None:
            return f"no moment found (run ended with {proc.poll()})"
        os.killpg(proc.pid, sig)
        code = proc.wait(timeout=120)
        for _ in range(2400):  # the ranks may outlive the launcher
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        return f"{signal.Signals(sig).name} {moment}: exit {code}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def compare(ref: Path, run: Path, exact: bool) -> tuple[bool, str]:
    import torch
    from safetensors.torch import load_file

    a, b = read_jsonl(ref / "metrics.jsonl"), read_jsonl(run / "metrics.jsonl")
    if [r["step"] for r in a] != [r["step"] for r in b]:
        return False, f"logged steps differ: {[r['step'] for r in b]}"
    loss = max(abs(x["loss"] - y["loss"]) / abs(x["loss"]) for x, y in zip(a, b))
    wa, wb = load_file(ref / "final" / "model.safetensors"), load_file(run / "final" / "model.safetensors")
    va, vb = (torch.cat([w[k].flatten() for k in sorted(wa)]) for w in (wa, wb))
    weights = ((va - vb).norm() / va.norm()).item()
    ok = (loss == 0 and weights == 0) if exact else (loss < 1e-5 and weights < 1e-5)
    rule = "bit-identical" if exact else "within 1e-5 relative"
    return ok, (f"{len(a)} steps: largest relative loss difference {loss:.2e}, weights {weights:.2e} "
                f"(required: {rule}) -> {'AGREE' if ok else 'DIFFER'}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, help="default: a temporary directory")
    p.add_argument("--data", type=Path, help="prepared seq-64 shards (default: made in the workdir)")
    p.add_argument("--kills", type=int, default=4)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--no_world_change", action="store_true", help="every restart on 2 ranks")
    p.add_argument("--seed", type=int, help="for the moments and signals (default: random, printed)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for each moment")
    a = p.parse_args(argv)
    if not a.no_world_change and a.dropout > 0:
        p.error("a world-size change cannot carry dropout's per-rank RNG streams: pass --dropout 0 "
                "or --no_world_change")
    seed = a.seed if a.seed is not None else random.randrange(10**6)
    rng = random.Random(seed)
    work = a.workdir or Path(tempfile.mkdtemp(prefix="chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    data = a.data or prepare_data(work)
    cfg = work / "ds.json"
    cfg.write_text(json.dumps({
        "train_batch_size": 16, "train_micro_batch_size_per_gpu": 4, "gradient_clipping": 1.0,
        "optimizer": {"type": "LAMB", "params": {"lr": 1e-3, "weight_decay": 0.01}},
        "scheduler": {"type": "WarmupPolyDecay", "params": {"warmup_num_steps": 2, "total_num_steps": a.steps}},
        "zero_optimization": {"stage": 2}}))
    ref, run = work / "reference", work / "chaos"
    print(f"chaos_run: seed {seed}; {a.kills} kills over {a.steps} steps; work in {work}", flush=True)
    subprocess.run(command(2, cfg, data, ref, a, "--overwrite"), cwd=ROOT, env=env(), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    other = -1 if a.no_world_change else rng.randrange(1, a.kills + 1)  # which restart runs on 1 rank
    first = ["--overwrite"]
    for k in range(a.kills):
        world = 1 if k == other else 2
        sig = (signal.SIGKILL, signal.SIGTERM)[k % 2]
        # The first kill is a SIGKILL while a checkpoint is being written, the second a
        # SIGTERM during a step; then at random.
        during_save = k == 0 or (k > 1 and rng.random() < 0.5)
        what = kill_once(command(world, cfg, data, run, a, *(first or ["--resume", "auto"])), run, sig,
                         during_save=during_save, rng=rng, timeout=a.timeout)
        first = []
        print(f"  kill {k + 1}: {world} rank(s), {what}", flush=True)
    world = 1 if other == a.kills else 2
    subprocess.run(command(world, cfg, data, run, a, "--resume", "auto"), cwd=ROOT, env=env(), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(f"  finished on {world} rank(s)", flush=True)
    ok, text = compare(ref, run, exact=a.no_world_change)
    print(f"chaos_run: {text}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
