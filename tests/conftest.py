"""Shared fixtures: a tiny prepared dataset made with the project's own data_prep CLIs.

Everything is generated here (synthetic corpus -> WordPiece tokenizer -> shards); tests
never read ../shared or the network.
"""
from __future__ import annotations

import glob
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# DeepSpeed JIT-builds a CPU comm op once; share it across test processes and runs.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


DIST_VARS = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT", "CROSS_RANK", "CROSS_SIZE"}


def run_cli(*args, check: bool = True, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a project command the way a user would, from the repository root."""
    # An in-process DeepSpeed test may have set the rendezvous variables of its own world
    # of one; a child process must not join that world.
    child_env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    proc = subprocess.run([str(a) for a in args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**child_env, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_cmd(num_procs: int) -> list[str]:
    return [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(num_procs), "--master_port", str(free_port())]


def write_ds_config(path: Path, **overrides) -> Path:
    """A tiny DeepSpeed config (LAMB, warmup + poly decay); keyword args override sections."""
    config = {
        "train_batch_size": 8,
        "train_micro_batch_size_per_gpu": 4,
        "optimizer": {"type": "LAMB", "params": {"lr": 1e-3, "weight_decay": 0.01}},
        "scheduler": {"type": "WarmupPolyDecay", "params": {"warmup_num_steps": 2, "total_num_steps": 6}},
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 0},
    }
    config.update(overrides)
    path.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """corpus/, squad/, tokenizer/, shards_64/ and shards_128/ under one directory."""
    root = tmp_path_factory.mktemp("data")
    run_cli(sys.executable, "data_prep/make_corpus.py", "--out", root, "--num_docs", "150", "--seed", "1",
            "--squad_train", "60", "--squad_dev", "30")
    corpus = sorted(glob.glob(str(root / "corpus" / "*.txt")))
    run_cli(sys.executable, "data_prep/build_tokenizer.py", "--input", *corpus, "--vocab_size", "800",
            "--out", root / "tokenizer")
    for seq, preds in ((64, 10), (128, 20)):
        run_cli(sys.executable, "data_prep/create_shards.py", "--input", *corpus, "--tokenizer", root / "tokenizer",
                "--max_seq_length", seq, "--max_predictions_per_seq", preds, "--out", root / f"shards_{seq}",
                "--seed", "1", "--workers", "1")
    return root
