"""Faults a week-long run meets: kill -9 and resume (with dropout), an output dir that
already holds a run, configurations that would crash later. Real 2-rank DeepSpeed (gloo)."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import time

import pytest
from safetensors.torch import load_file

from helpers import DIST_VARS, ROOT, deepspeed_cmd, write_ds_config
from lbllm.utils import UserError, read_jsonl
from test_pretrain import pretrain

LOGGED = ("loss", "mlm_loss", "nsp_loss", "mlm_acc", "lr", "samples", "grad_norm")


def _kill_after(cmd: list, out, steps_logged: int, timeout: float = 400.0) -> None:
    """Start `cmd` in its own process group and SIGKILL the whole group (launcher and
    ranks, as a node failure would) once `steps_logged` steps are in metrics.jsonl."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            metrics = out / "metrics.jsonl"
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= steps_logged:
                break
            if proc.poll() is not None:
                raise AssertionError(f"the run ended (exit {proc.returncode}) before step {steps_logged}")
            time.sleep(0.05)
        else:
            raise AssertionError(f"step {steps_logged} not reached in {timeout:.0f}s")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_kill9_then_resume_auto_is_exact_with_dropout(tiny_data, tmp_path):
    """Dropout 0.1, fp32, 2 ranks, ZeRO 2, a checkpoint every step. The whole run is
    killed with SIGKILL after a random step (possibly inside a save); --resume auto
    continues from the newest complete checkpoint, and every logged figure and the final
    weights equal the uninterrupted run's exactly (the RNG states are in the checkpoint)."""
    cfg = write_ds_config(tmp_path / "ds.json", train_batch_size=16, train_micro_batch_size_per_gpu=4,
                          zero_optimization={"stage": 2})
    flags = ("--dropout", "0.1", "--save_interval", "1", "--max_steps", "6")
    full, part = tmp_path / "full", tmp_path / "part"
    pretrain(tiny_data, full, cfg, *flags, procs=2)
    kill_at = random.Random().randint(2, 4)
    print(f"killing after step {kill_at} is logged")
    cmd = [*deepspeed_cmd(2), "pretrain_bert.py", "--deepspeed_config", cfg, "--data_dir", tiny_data / "shards_64",
           "--output_dir", part, "--model_config", "tiny", "--seed", "3", *flags]
    _kill_after(cmd, part, kill_at)
    proc = pretrain(tiny_data, part, cfg, *flags, "--resume", "auto", procs=2)
    assert "resumed from step" in proc.stderr and "new random streams" not in proc.stderr, proc.stderr[-3000:]
    a, b = read_jsonl(full / "metrics.jsonl"), read_jsonl(part / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b):
        assert {k: rb.get(k) for k in LOGGED} == {k: ra.get(k) for k in LOGGED}, (ra["step"], kill_at)
    wa, wb = load_file(full / "final" / "model.safetensors"), load_file(part / "final" / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert all((wa[k] == wb[k]).all() for k in wa), kill_at


def test_without_rng_state_the_resumed_run_differs(tiny_data, tmp_path):
    """The control: the same stop-and-resume with the checkpoint's RNG files removed
    continues on other dropout masks, so the test above would notice lost RNG state."""
    cfg = write_ds_config(tmp_path / "ds.json", zero_optimization={"stage": 1})
    flags = ("--dropout", "0.1", "--max_steps", "4")
    full, part = tmp_path / "full", tmp_path / "part"
    pretrain(tiny_data, full, cfg, *flags)
    pretrain(tiny_data, part, cfg, "--dropout", "0.1", "--max_steps", "2")
    for f in (part / "checkpoints").rglob("rng_state_rank*.pt"):
        f.unlink()
    proc = pretrain(tiny_data, part, cfg, *flags, "--resume", "auto")
    assert "new random streams" in proc.stderr
    a, b = read_jsonl(full / "metrics.jsonl"), read_jsonl(part / "metrics.jsonl")
    assert [r["loss"] for r in b[:2]] == [r["loss"] for r in a[:2]]
    assert [r["loss"] for r in b[2:]] != [r["loss"] for r in a[2:]]


def test_an_earlier_run_is_continued_or_replaced_never_mixed(tiny_data, tmp_path):
    cfg = write_ds_config(tmp_path / "ds.json")
    out = tmp_path / "out"
    pretrain(tiny_data, out, cfg, "--max_steps", "2")
    proc = pretrain(tiny_data, out, cfg, "--max_steps", "2", check=False)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "--resume auto" in errors[0] and "--overwrite" in errors[0], proc.stderr[-2000:]
    assert len(read_jsonl(out / "metrics.jsonl")) == 2  # untouched
    proc = pretrain(tiny_data, out, cfg, "--max_steps", "3", "--overwrite")
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3]
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step")) == ["step00000003"]


def test_noise_scale_needs_a_micro_batch_below_the_global_batch(tiny_data, tmp_path):
    from lbllm.train.config import RunConfig
    from lbllm.train.trainer import prepare

    cfg = write_ds_config(tmp_path / "ds.json", train_batch_size=4, train_micro_batch_size_per_gpu=4)
    with pytest.raises(UserError, match="noise_scale_interval 2.*train_micro_batch_size_per_gpu"):
        prepare(RunConfig(deepspeed_config=cfg, data_dir=tiny_data / "shards_64", output_dir=tmp_path / "o",
                          model_config="tiny", noise_scale_interval=2))
    assert not (tmp_path / "o").exists()
