"""Shared fixtures: a tiny prepared dataset made with the project's own data_prep CLIs
(the functions tests share are in helpers.py).

Everything is generated here (synthetic corpus -> WordPiece tokenizer -> shards); tests
never read ../shared or the network.
"""
from __future__ import annotations

import glob
import os
import sys
from pathlib import Path

import pytest

from helpers import ROOT, run_cli

# DeepSpeed JIT-builds a CPU comm op once; share it across test processes and runs.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


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
