"""scripts/pretrain_two_phase.sh: phase 1 then phase 2 from its state, in one command."""
from __future__ import annotations

import sys

from helpers import run_cli, write_ds_config
from lbllm.utils import read_jsonl


def test_two_phase_script_runs_both_phases_and_skips_a_finished_phase_1(tiny_data, tmp_path):
    p1 = write_ds_config(tmp_path / "p1.json", train_batch_size=8, train_micro_batch_size_per_gpu=8,
                         scheduler={"type": "WarmupPolyDecay", "params": {"warmup_num_steps": 1, "total_num_steps": 3}})
    p2 = write_ds_config(tmp_path / "p2.json", train_batch_size=4, train_micro_batch_size_per_gpu=4,
                         scheduler={"type": "WarmupPolyDecay", "params": {"warmup_num_steps": 1, "total_num_steps": 2}})
    env = {"LAUNCHER": sys.executable, "PHASE1_CONFIG": str(p1), "PHASE2_CONFIG": str(p2), "MODEL_CONFIG": "tiny"}
    out = tmp_path / "run"
    proc = run_cli("bash", "scripts/pretrain_two_phase.sh", out, tiny_data / "shards_64", tiny_data / "shards_128",
                   env=env)
    rows1, rows2 = read_jsonl(out / "phase1" / "metrics.jsonl"), read_jsonl(out / "phase2" / "metrics.jsonl")
    assert [r["step"] for r in rows1] == [1, 2, 3] and [r["step"] for r in rows2] == [1, 2]
    assert all(r["phase"] == 2 and r["global_batch_size"] == 4 for r in rows2)
    assert rows2[0]["lr"] == rows1[0]["lr"]  # re-warmup: phase 2 step 1 is back at lr / warmup
    assert "optimizer moments" in proc.stderr
    assert (out / "phase2" / "final" / "config.json").is_file()

    again = run_cli("bash", "scripts/pretrain_two_phase.sh", out, tiny_data / "shards_64", tiny_data / "shards_128",
                    env=env)
    assert "phase 1 already finished" in again.stdout
    bad = run_cli("bash", "scripts/pretrain_two_phase.sh", out, tmp_path / "nope", tiny_data / "shards_128",
                  env=env, check=False)
    assert bad.returncode == 2 and "manifest.json" in bad.stderr
