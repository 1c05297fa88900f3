"""Batch-size ramp (Smith et al. 2018) and noise-scale metrics through pretrain_bert.py.

The ramp raises the global batch through gradient accumulation at the configured steps;
samples are counted with the batch in force, and a run interrupted after the change
resumes exactly (same losses as the uninterrupted run)."""
from __future__ import annotations

import sys

import pytest

from helpers import run_cli, write_ds_config
from lbllm.utils import read_jsonl


def ramp_config(tmp_path):
    return write_ds_config(
        tmp_path / "ramp.json", train_batch_size=8, train_micro_batch_size_per_gpu=4,
        batch_schedule={"milestones": [[0, 8], [2, 16]]},
        lr_scaling={"rule": "sqrt", "base_lr": 1e-3, "base_batch": 2},
        optimizer={"type": "LAMB", "params": {"weight_decay": 0.01}},
        scheduler={"type": "WarmupConstant", "params": {"warmup_num_steps": 1, "total_num_steps": 4}})


def run(data, cfg, out, *extra):
    return run_cli(sys.executable, "pretrain_bert.py", "--deepspeed_config", cfg, "--data_dir", data / "shards_64",
                   "--output_dir", out, "--model_config", "tiny", "--seed", "3", "--dropout", "0", *extra)


def test_ramp_noise_metrics_and_exact_resume(tiny_data, tmp_path):
    cfg = ramp_config(tmp_path)
    full = tmp_path / "full"
    proc = run(tiny_data, cfg, full, "--max_steps", "4", "--noise_scale_interval", "1")
    assert "lr 0.002 = 0.001 x sqrt(8/2)" in proc.stderr  # the LR scaling line at start
    rows = read_jsonl(full / "metrics.jsonl")
    assert [r["global_batch_size"] for r in rows] == [8, 8, 16, 16]
    assert [r["samples"] for r in rows] == [8, 16, 32, 48]
    assert all(r["lr"] == pytest.approx(2e-3) for r in rows)  # constant after 1 warmup step
    # g = lr N / B halves when the batch doubles at a constant LR.
    assert rows[2]["sgd_noise_scale"] == pytest.approx(rows[1]["sgd_noise_scale"] / 2)
    assert any("grad_noise_scale" in r for r in rows)

    part = tmp_path / "part"
    run(tiny_data, cfg, part, "--max_steps", "3")  # stops after the batch change, checkpoint at step 3
    run(tiny_data, cfg, part, "--max_steps", "4", "--resume", "auto")
    resumed = read_jsonl(part / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert [r["samples"] for r in resumed] == [8, 16, 32, 48]
    assert resumed[3]["loss"] == pytest.approx(rows[3]["loss"], rel=1e-6, abs=0)


def test_ramp_must_fit_the_batch_layout(tiny_data, tmp_path):
    bad = write_ds_config(tmp_path / "bad.json", train_batch_size=8, train_micro_batch_size_per_gpu=4,
                          batch_schedule={"milestones": [[0, 8], [2, 18]]})
    proc = run_cli(sys.executable, "pretrain_bert.py", "--deepspeed_config", bad, "--data_dir",
                   tiny_data / "shards_64", "--output_dir", tmp_path / "out", check=False)
    assert proc.returncode == 2 and "batch_schedule" in proc.stderr and "18" in proc.stderr
    assert not (tmp_path / "out").exists()
