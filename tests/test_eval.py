"""Held-out MLM evaluation (pretrain_bert.py --eval_data): the same figure for any
number of ranks or ZeRO stage, at the asked-for sample intervals, and one-line errors."""
from __future__ import annotations

import glob
import sys

import pytest

from helpers import run_cli, write_ds_config
from lbllm.train.eval import due, slice_bounds
from lbllm.utils import read_jsonl
from test_pretrain import pretrain

EVAL_KEYS = ("eval_mlm_loss", "eval_mlm_acc", "eval_nsp_loss", "eval_nsp_acc")


@pytest.fixture(scope="module")
def heldout_data(tiny_data):
    """shards_64h/ (training) and shards_64h/heldout/ (documents never trained on)."""
    corpus = sorted(glob.glob(str(tiny_data / "corpus" / "*.txt")))
    out = tiny_data / "shards_64h"
    if not (out / "manifest.json").is_file():
        run_cli(sys.executable, "data_prep/create_shards.py", "--input", *corpus, "--tokenizer",
                tiny_data / "tokenizer", "--max_seq_length", 64, "--max_predictions_per_seq", 10, "--out", out,
                "--seed", "1", "--workers", "1", "--heldout_fraction", "0.15")
    return tiny_data


def test_slices_cover_the_set_once():
    for n in (0, 1, 7, 100):
        for world in (1, 2, 3, 8):
            bounds = [slice_bounds(n, world, r) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            assert max(hi - lo for lo, hi in bounds) - min(hi - lo for lo, hi in bounds) <= 1


def test_due_every_interval_of_samples():
    # batch 8, interval 20: evaluations after the steps that cross 20, 40, 60
    crossings = [s for s in range(1, 9) if due(8 * (s - 1), 8 * s, 20)]
    assert crossings == [3, 5, 8]
    assert not any(due(a, a + 8, 0) for a in range(0, 80, 8))


@pytest.mark.parametrize("stage", [2, 3])
def test_heldout_eval_is_the_same_on_one_and_two_ranks(heldout_data, tmp_path, stage):
    """fp32, dropout 0: the weights after each step agree across world sizes (the loss is
    split-invariant), so the held-out figures must too; only the summation order differs."""
    # ZeRO 2 with round_robin_gradients: DeepSpeed reorders each group's parameters; the
    # trust ratios must still be logged under their own names.
    cfg = write_ds_config(tmp_path / "ds.json", train_batch_size=8, train_micro_batch_size_per_gpu=4,
                          zero_optimization={"stage": stage, **({"round_robin_gradients": True} if stage == 2 else {})})
    runs = {}
    for procs in (1, 2):
        out = tmp_path / f"w{procs}"
        extra = ["--max_steps", "3", "--dropout", "0", "--eval_data", heldout_data / "shards_64h" / "heldout",
                 "--eval_interval_samples", "16", "--eval_batch_size", "3", "--trust_ratio_interval", "2"]
        if procs == 1:
            cfg1 = write_ds_config(tmp_path / "ds1.json", train_batch_size=8, train_micro_batch_size_per_gpu=4,
                                   zero_optimization={"stage": min(stage, 2)})  # ZeRO 3 needs no partner here
            pretrain(heldout_data, out, cfg1, *extra, shards="shards_64h")
        else:
            pretrain(heldout_data, out, cfg, *extra, procs=2, shards="shards_64h")
        runs[procs] = read_jsonl(out / "metrics.jsonl")
    one, two = runs[1], runs[2]
    # Evaluated after step 2 (16 samples) and after the last step (3), not after step 1.
    assert [("eval_mlm_loss" in r) for r in one] == [False, True, True]
    assert [("eval_mlm_loss" in r) for r in two] == [False, True, True]
    for a, b in zip(one[1:], two[1:]):
        assert a["eval_samples"] == b["eval_samples"] > 20
        for key in EVAL_KEYS:
            assert b[key] == pytest.approx(a[key], rel=2e-6, abs=1e-7), key
    # LAMB's trust ratios as logged: the whole model's, by parameter name, on any layout.
    for a, b in zip(one, two):
        for key in ("trust_ratio_min", "trust_ratio_median", "trust_ratio_max"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), key
        assert a["trust_ratio_min"] < a["trust_ratio_max"]
    assert [("trust_ratios" in r) for r in one] == [False, True, False]
    layers_one, layers_two = one[1]["trust_ratios"], two[1]["trust_ratios"]
    assert layers_one.keys() == layers_two.keys() and "model.bert.encoder.layer.0.attention.self.query.weight" in layers_one
    assert all(layers_two[k] == pytest.approx(v, rel=1e-5) for k, v in layers_one.items())
    assert min(layers_one.values()) == pytest.approx(one[1]["trust_ratio_min"], rel=1e-6)
    # The model changed between the two evaluations: the figure measures it.
    assert one[1]["eval_mlm_loss"] != one[2]["eval_mlm_loss"]


def test_stop_at_eval_loss_finishes_at_the_first_evaluation_below(heldout_data, tmp_path):
    """--stop_at_eval_loss ends the run (checkpoint, export) after the first evaluation at or
    below the target: the same step a full run's evaluations say."""
    cfg = write_ds_config(tmp_path / "ds.json", scheduler={"type": "WarmupConstant", "params": {
        "warmup_num_steps": 1, "total_num_steps": 6}})
    extra = ["--dropout", "0", "--eval_data", heldout_data / "shards_64h" / "heldout", "--eval_interval_samples", "8"]
    full = pretrain(heldout_data, tmp_path / "full", cfg, *extra, shards="shards_64h")
    assert "throughput over steps 2-6:" in full.stderr and "the remaining 0 steps take about" in full.stderr
    # no terminal: plain progress lines (6 steps / 50 -> every step), and the run described at start
    assert "step 3/6 | loss" in full.stderr and "ETA" in full.stderr
    assert "precision fp32 | data" in full.stderr and "6 steps x batch = 48 samples" in full.stderr
    losses = [r["eval_mlm_loss"] for r in read_jsonl(tmp_path / "full" / "metrics.jsonl")]
    assert len(losses) == 6
    target = sorted(losses)[2]  # reached somewhere before the end
    expect = next(i for i, x in enumerate(losses) if x <= target) + 1
    assert expect < 6
    proc = pretrain(heldout_data, tmp_path / "stop", cfg, *extra, "--stop_at_eval_loss", repr(target),
                    shards="shards_64h")
    rows = read_jsonl(tmp_path / "stop" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, expect + 1)) and "finishing" in proc.stderr
    assert rows[-1]["eval_mlm_loss"] == losses[expect - 1]
    assert (tmp_path / "stop" / "final" / "config.json").is_file()


def test_eval_options_are_checked(heldout_data, tmp_path):
    cfg = write_ds_config(tmp_path / "ds.json")
    proc = pretrain(heldout_data, tmp_path / "s", cfg, "--stop_at_eval_loss", "3", check=False, shards="shards_64h")
    assert proc.returncode == 2 and "--stop_at_eval_loss 3.0: needs --eval_data" in proc.stderr
    proc = pretrain(heldout_data, tmp_path / "a", cfg, "--eval_interval_samples", "8", check=False, shards="shards_64h")
    assert proc.returncode == 2 and "--eval_interval_samples needs --eval_data" in proc.stderr
    proc = pretrain(heldout_data, tmp_path / "b", cfg, "--eval_data", heldout_data / "shards_64h", check=False,
                    shards="shards_64h")
    assert proc.returncode == 2 and "is the training set" in proc.stderr
    proc = pretrain(heldout_data, tmp_path / "c", cfg, "--eval_data", tmp_path / "nowhere", check=False,
                    shards="shards_64h")
    assert proc.returncode == 2 and "--heldout_fraction" in proc.stderr
    assert not any((tmp_path / d).exists() for d in "abcs")
