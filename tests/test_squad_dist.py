"""SQuAD fine-tuning under the DeepSpeed launcher equals one process.

The same tiny BERT and SQuAD files are fine-tuned once as a plain process and once as
`deepspeed --num_gpus 2` (two CPU ranks, gloo), with dropout off. Data parallelism
must only change the order of floating-point sums, so every step's loss, EM/F1, the
predictions and every question's n-best logits must agree within the tolerances
below. The global batch (7) does not split evenly over the ranks, the run crosses an
epoch boundary (a short last batch), and the prediction windows are split unevenly,
so the slicing and gathering edge cases are exercised; two seeds exercise a fresh
model load and weight broadcast per seed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from helpers import deepspeed_cmd, run_cli
from test_squad import QLEN, SEQ, STRIDE, make_squad, save_tiny_bert, write_json

LOSS_TOL = 1e-5  # per-step global-batch loss, absolute
LOGIT_TOL = 1e-4  # n-best start/end logits, absolute


def _squad(out: Path, model_dir: Path, train: Path, dev: Path, procs: int) -> tuple[dict, dict, dict, str]:
    launcher = deepspeed_cmd(procs) if procs > 1 else [sys.executable]
    proc = run_cli(*launcher, "scripts/run_squad.py", "--model_dir", model_dir, "--train_file", train, "--predict_file", dev,
            "--output_dir", out, "--seeds", "5,6", "--dropout", "0", "--max_steps", 12, "--batch_size", 7,
            "--lr", "2e-3", "--max_seq_length", SEQ, "--doc_stride", STRIDE, "--max_query_length", QLEN,
            "--n_best_size", SEQ, "--eval_batch_size", 4, "--device", "cpu", "--no_progress",
            env={"OMP_NUM_THREADS": "1"}, timeout=300)  # fmt: skip
    read = lambda name: json.loads((out / name).read_text())  # noqa: E731
    return read("results.json"), read("predictions.json"), read("nbest_predictions.json"), proc.stdout


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("squad_dist")
    model_dir = save_tiny_bert(d / "model")
    train = write_json(d / "train.json", make_squad(30, seed=11, prefix="t", long_every=3))
    dev = write_json(d / "dev.json", make_squad(9, seed=13, prefix="d", long_every=3))
    return _squad(d / "one", model_dir, train, dev, 1), _squad(d / "two", model_dir, train, dev, 2)


def test_layout_exercises_uneven_slices(runs):
    (one, *_), (two, *_) = runs
    assert one["world_size"] == 1 and two["world_size"] == 2
    windows = one["num_train_features"]
    assert windows % 7 != 0 and 12 * 7 > windows  # a short last batch of the epoch is among the steps
    assert one["num_eval_features"] % 2 == 1  # rank 0 and rank 1 predict different numbers of windows
    assert one["num_eval_features"] == two["num_eval_features"] and windows == two["num_train_features"]


def test_two_ranks_train_like_one_process(runs):
    (one, *_), (two, *_) = runs
    for a, b in zip(one["per_seed"], two["per_seed"]):
        assert a["seed"] == b["seed"] and len(a["train_losses"]) == len(b["train_losses"]) == 12
        assert a["train_examples"] == b["train_examples"]
        assert b["train_losses"] == pytest.approx(a["train_losses"], abs=LOSS_TOL)
        assert (a["exact_match"], a["f1"]) == (b["exact_match"], b["f1"])
    # the two seeds are two different runs, so the comparison above is not vacuous
    assert one["per_seed"][0]["train_losses"][0] != pytest.approx(one["per_seed"][1]["train_losses"][0], abs=1e-3)
    assert (one["exact_match"], one["f1"], one["f1_std"]) == (two["exact_match"], two["f1"], two["f1_std"])


def test_two_ranks_predict_like_one_process(runs):
    (_, preds1, nbest1, _), (_, preds2, nbest2, _) = runs
    assert preds1 == preds2
    assert set(nbest1) == set(nbest2)
    for qid in nbest1:
        # n_best_size = window length keeps every valid span, so the candidate set does
        # not depend on near-ties at the n-th place; compare per text, not per rank
        a = {e["text"]: e for e in nbest1[qid]}
        b = {e["text"]: e for e in nbest2[qid]}
        assert set(a) == set(b), qid
        for text, e in a.items():
            assert b[text]["start_logit"] == pytest.approx(e["start_logit"], abs=LOGIT_TOL), (qid, text)
            assert b[text]["end_logit"] == pytest.approx(e["end_logit"], abs=LOGIT_TOL), (qid, text)
            assert b[text]["probability"] == pytest.approx(e["probability"], abs=LOGIT_TOL), (qid, text)


def test_only_rank_zero_reports(runs):
    (*_, out1), (*_, out2) = runs
    assert out1.count("squad: exact_match") == out2.count("squad: exact_match") == 1
