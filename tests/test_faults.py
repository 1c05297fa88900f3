"""Faults a week-long run meets: kill -9 and resume (with dropout), an output dir that
already holds a run, configurations that would crash later. Real 2-rank DeepSpeed (gloo)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from helpers import DIST_VARS, ROOT, deepspeed_cmd, write_ds_config
from lbllm.utils import UserError, read_jsonl
from test_pretrain import pretrain

LOGGED = ("loss", "mlm_loss", "nsp_loss", "mlm_acc", "lr", "samples", "grad_norm")


def _signal_after(cmd: list, out, steps_logged: int, sig: int = signal.SIGKILL, timeout: float = 400.0
                  ) -> tuple[int, float]:
    """Start `cmd` in its own process group and send `sig` to the whole group (launcher
    and ranks, as a node failure or a scheduler does) once `steps_logged` steps are in
    metrics.jsonl. Returns the exit code and the seconds from the signal to the exit."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    log = open(out.parent / f"{out.name}.stderr", "w+")  # a file: a full pipe would block the run
    proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=log, text=True)
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
        t0 = time.monotonic()
        os.killpg(proc.pid, sig)
        proc.wait(timeout=120)
        while time.monotonic() - t0 < 120:  # the ranks may outlive the launcher: wait for the group
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        seconds = time.monotonic() - t0
        log.seek(0)
        _signal_after.stderr = log.read()
        return proc.returncode, seconds
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _cmd(procs: int, cfg, data, out, *flags) -> list:
    launcher = deepspeed_cmd(procs) if procs > 1 else [sys.executable]
    return [*launcher, "pretrain_bert.py", "--deepspeed_config", cfg, "--data_dir", data / "shards_64",
            "--output_dir", out, "--model_config", "tiny", "--seed", "3", *flags]


def _assert_same_run(full, part, label) -> None:
    a, b = read_jsonl(full / "metrics.jsonl"), read_jsonl(part / "metrics.jsonl")
    assert [r["step"] for r in b] == [r["step"] for r in a]
    for ra, rb in zip(a, b):
        assert {k: rb.get(k) for k in LOGGED} == {k: ra.get(k) for k in LOGGED}, (ra["step"], label)
    wa, wb = load_file(full / "final" / "model.safetensors"), load_file(part / "final" / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert all((wa[k] == wb[k]).all() for k in wa), label


def test_chaos_kills_and_resumes_exactly_with_dropout(tiny_data, tmp_path):
    """scripts/chaos_run.py, short: dropout 0.1, fp32, 2 ranks, ZeRO 2, a checkpoint every
    step by the clock (--save_interval_minutes below a step's time: the ranks must agree
    on it) with the newest 2 kept. The whole process group is killed twice at random moments
    (SIGKILL, then SIGTERM; during a step or while a checkpoint is written) and resumed with
    --resume auto; every logged figure and the final weights must equal the uninterrupted
    run's bit for bit (the RNG states are in the checkpoint)."""
    from helpers import run_cli

    proc = run_cli(sys.executable, "scripts/chaos_run.py", "--workdir", tmp_path, "--data", tiny_data / "shards_64",
                   "--kills", "2", "--steps", "6", "--no_world_change", "--dropout", "0.1", check=False)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "SIGKILL while saving" in proc.stdout and "SIGTERM" in proc.stdout, proc.stdout
    assert "bit-identical) -> AGREE" in proc.stdout
    assert sorted(p.name for p in (tmp_path / "chaos" / "checkpoints").glob("step*")) == ["step00000005",
                                                                                         "step00000006"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_guard_catches_the_signals_and_restores_handlers(sig):
    from lbllm.train.preemption import PreemptionGuard

    before = signal.getsignal(sig)
    with PreemptionGuard() as guard:
        assert guard.agreed() == (False, False) and guard.agreed(True) == (False, True)
        os.kill(os.getpid(), sig)  # would end this process without the guard
        time.sleep(0.01)
        assert guard.agreed()[0] and guard.name == signal.Signals(sig).name
    assert signal.getsignal(sig) is before


@pytest.mark.parametrize("procs,sig", [(2, signal.SIGTERM)])
def test_preemption_signal_checkpoints_exits_and_resumes_exactly(tiny_data, tmp_path, procs, sig):
    """SIGTERM to the whole process group of a 2-rank launch (what a scheduler sends;
    DeepSpeed's launcher also forwards it to its ranks one by one): the ranks
    agree on a step, finish it, checkpoint and exit 0 within seconds (the launcher itself
    dies of the signal: the exit code a scheduler sees); --resume auto then continues exactly."""
    cfg = write_ds_config(tmp_path / "ds.json", train_batch_size=16, train_micro_batch_size_per_gpu=4,
                          zero_optimization={"stage": 2}, scheduler={"type": "WarmupPolyDecay", "params": {
                              "warmup_num_steps": 2, "total_num_steps": 20}})
    flags = ("--dropout", "0.1", "--max_steps", "20")
    full, part = tmp_path / "full", tmp_path / "part"
    pretrain(tiny_data, full, cfg, *flags, procs=procs)
    code, seconds = _signal_after(_cmd(procs, cfg, tiny_data, part, *flags), part, 3, sig)
    err = _signal_after.stderr
    # One process exits 0. Under the launcher the ranks exit 0, but the `deepspeed` runner
    # dies of the signal itself (-15, a shell's 143), or its launch.py exits 1.
    assert code in ((-signal.SIGTERM, 1) if procs > 1 else (0,)), (code, err[-3000:])
    assert seconds < 30, seconds  # inside the launcher's 30 s grace period
    assert err.count(f"stopped by {signal.Signals(sig).name}") + err.count("stopped by a signal on another rank") >= 1
    assert not (part / "final").exists()  # stopped, not finished
    stopped_at = len(read_jsonl(part / "metrics.jsonl"))
    assert 3 <= stopped_at < 20
    assert (part / "checkpoints" / f"step{stopped_at:08d}").is_dir()
    proc = pretrain(tiny_data, part, cfg, *flags, "--resume", "auto", procs=procs)
    assert f"resumed from step {stopped_at}" in proc.stderr
    _assert_same_run(full, part, f"{signal.Signals(sig).name} after step {stopped_at}")


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


def _same(a, b, path="") -> None:
    """Deep equality of two loaded checkpoint files (tensors exactly)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{path}[{i}]")
    elif hasattr(a, "__dict__"):  # e.g. DeepSpeed's loss scaler
        assert type(a) is type(b), path
        _same(vars(a), vars(b), path)
    else:
        assert a == b, (path, a, b)


@pytest.mark.parametrize("procs,stage", [(1, 0), (2, 2)], ids=["1-rank-no-ZeRO", "2-rank-ZeRO-2"])
def test_non_finite_steps_are_skipped_on_every_rank(tiny_data, tmp_path, procs, stage):
    """--inject_nan_at_steps 3,4: those steps are skipped everywhere. The checkpoint after
    step 4 holds exactly the weights, optimizer moments and LR schedule of the one after
    step 2, metrics.jsonl counts the skips, and step 5 uses the LR step 3 would have used.
    Without ZeRO the trainer skips the step itself; under ZeRO DeepSpeed does."""
    cfg = write_ds_config(tmp_path / "ds.json", train_batch_size=16, train_micro_batch_size_per_gpu=4,
                          zero_optimization={"stage": stage}, scheduler={"type": "WarmupPolyDecay", "params": {
                              "warmup_num_steps": 2, "total_num_steps": 20}})
    out = tmp_path / "run"
    proc = pretrain(tiny_data, out, cfg, "--max_steps", "6", "--save_interval", "1", "--inject_nan_at_steps", "3,4",
                    procs=procs)
    assert proc.stderr.count("skipped on every rank") == 2
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 2, 2, 2]
    assert all(r["loss"] == r["loss"] for r in rows)  # the logged statistics are the batch's own, never NaN
    assert rows[4]["lr"] == rows[2]["lr"] and rows[3]["lr"] == rows[2]["lr"]
    two, four = out / "checkpoints" / "step00000002", out / "checkpoints" / "step00000004"
    files = sorted(p.name for p in two.glob("*.pt") if not p.name.startswith("rng_state"))
    assert files == sorted(p.name for p in four.glob("*.pt") if not p.name.startswith("rng_state"))
    for name in files:
        a, b = (torch.load(d / name, map_location="cpu", weights_only=False) for d in (two, four))
        if "model_states" in name:
            _same(a["module"], b["module"], "module")
            _same(a["lr_scheduler"], b["lr_scheduler"], "lr_scheduler")
            _same(a.get("optimizer"), b.get("optimizer"), "optimizer")
        else:  # ZeRO: this rank's partition of the fp32 masters and moments (and the flag of the skip)
            assert b["optimizer_state_dict"].pop("overflow") and not a["optimizer_state_dict"].pop("overflow")
            _same(a["optimizer_state_dict"], b["optimizer_state_dict"], name)
    six = torch.load(out / "checkpoints" / "step00000006" / files[-1], map_location="cpu", weights_only=False)
    with pytest.raises(AssertionError):  # the control: steps 5 and 6 did change the state
        _same(torch.load(four / files[-1], map_location="cpu", weights_only=False), six)


def test_a_run_stuck_on_non_finite_steps_stops_with_exit_3(tiny_data, tmp_path):
    cfg = write_ds_config(tmp_path / "ds.json")
    out = tmp_path / "run"
    proc = pretrain(tiny_data, out, cfg, "--max_steps", "6", "--save_interval", "1", "--inject_nan_at_steps", "2,3,4",
                    "--max_consecutive_skips", "3", check=False)
    assert proc.returncode == 3, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "3 non-finite steps in a row (--max_consecutive_skips 3)" in errors[0]
    assert "Traceback" not in proc.stderr
    assert (out / "checkpoints" / "latest").read_text().strip() == "step00000003"  # saved before the stop
    assert not (out / "final").exists()
    assert [r["skipped_steps"] for r in read_jsonl(out / "metrics.jsonl")] == [0, 1, 2, 3]


def _layout_cfg(directory, stage):
    return write_ds_config(directory / f"z{stage}.json", train_batch_size=24, train_micro_batch_size_per_gpu=4,
                           zero_optimization={"stage": stage}, scheduler={"type": "WarmupPolyDecay", "params": {
                               "warmup_num_steps": 2, "total_num_steps": 8}})


MOVE_FLAGS = ("--dropout", "0", "--save_interval", "2")


@pytest.fixture(scope="module")
def uninterrupted(tiny_data, tmp_path_factory):
    """4 steps never interrupted, 1 rank without ZeRO: since the step does not depend on
    how the global batch is split, every layout's run equals it up to summation order."""
    root = tmp_path_factory.mktemp("uninterrupted")
    pretrain(tiny_data, root / "run", _layout_cfg(root, 0), *MOVE_FLAGS, "--max_steps", "4")
    return root / "run"


@pytest.mark.parametrize("before,after", [((2, 2), (3, 1)), ((1, 0), (2, 3)), ((2, 3), (1, 0))],
                         ids=["2-ranks-ZeRO-2-to-3-ranks-ZeRO-1", "1-rank-no-ZeRO-to-2-ranks-ZeRO-3",
                              "2-ranks-ZeRO-3-to-1-rank-no-ZeRO"])
def test_resume_on_another_world_size_and_zero_stage(tiny_data, tmp_path, uninterrupted, before, after):
    """A checkpoint of step 2, resumed with --resume auto on another number of ranks and
    ZeRO stage, continues as a run that was never interrupted: losses and LRs of steps 3-4
    and the final weights agree with such a run within floating-point summation order
    (dropout 0, fp32, LAMB: weights, moments, LAMB's step, schedule all re-partitioned)."""
    run = tmp_path / "run"
    pretrain(tiny_data, run, _layout_cfg(tmp_path, before[1]), *MOVE_FLAGS, "--max_steps", "2", procs=before[0])
    proc = pretrain(tiny_data, run, _layout_cfg(tmp_path, after[1]), *MOVE_FLAGS, "--max_steps", "4",
                    "--resume", "auto", procs=after[0])
    assert (f"saved by {before[0]} rank(s) with ZeRO {before[1]}; re-partitioned for {after[0]} rank(s) with "
            f"ZeRO {after[1]}") in proc.stderr
    a, b = read_jsonl(run / "metrics.jsonl"), read_jsonl(uninterrupted / "metrics.jsonl")
    assert [r["step"] for r in a] == [1, 2, 3, 4] and [r["samples"] for r in a] == [r["samples"] for r in b]
    for ra, rb in zip(a, b):
        assert ra["lr"] == pytest.approx(rb["lr"], rel=1e-12) and ra["loss"] == pytest.approx(rb["loss"], rel=1e-6)
    wa, wb = load_file(run / "final" / "model.safetensors"), load_file(uninterrupted / "final" / "model.safetensors")
    va, vb = (torch.cat([w[k].flatten() for k in sorted(wa)]) for w in (wa, wb))
    assert ((va - vb).norm() / vb.norm()).item() < 1e-5


def test_an_unwritable_output_dir_or_a_failed_save_is_one_line(tiny_data, tmp_path):
    """An --output_dir that cannot be written fails before DeepSpeed starts; a checkpoint
    that cannot be written (here: its directory name is taken by a file, as a full disk
    fails a write) stops the run with one line that names the intact previous checkpoint."""
    cfg = write_ds_config(tmp_path / "ds.json")
    (tmp_path / "a_file").write_text("x")
    proc = pretrain(tiny_data, tmp_path / "a_file" / "out", cfg, "--max_steps", "2", check=False)
    assert proc.returncode == 2 and "cannot write there" in proc.stderr and "Traceback" not in proc.stderr
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "step00000002").write_text("in the way")
    proc = pretrain(tiny_data, out, cfg, "--max_steps", "3", "--save_interval", "1", "--resume", "auto", check=False)
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "writing the checkpoint failed" in errors[0] and "previous checkpoint step00000001 is intact" in errors[0]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step00000001"


def test_resume_or_init_from_another_model_phase_or_tokenizer_is_refused_before_deepspeed(tiny_data, tmp_path):
    cfg = write_ds_config(tmp_path / "ds.json")
    out = tmp_path / "p1"
    pretrain(tiny_data, out, cfg, "--max_steps", "1")

    def refused(*flags, expect: str) -> None:
        proc = pretrain(tiny_data, tmp_path / "p2", cfg, "--max_steps", "2", *flags, check=False)
        errors = [line for line in proc.stderr.splitlines() if "error:" in line]
        assert proc.returncode == 2 and len(errors) == 1 and expect in errors[0], proc.stderr[-2000:]
        assert "[lbllm] phase" not in proc.stderr  # DeepSpeed never started

    import shutil
    shutil.copytree(out, tmp_path / "p2")  # the run to resume
    refused("--resume", "auto", "--model_config", "mini", expect="trained --model_config tiny, this one asks for mini")
    refused("--resume", "auto", "--phase", "2", "--init_checkpoint", out, expect="holds a phase-1 run")
    shutil.rmtree(tmp_path / "p2")
    info = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**info, "tokenizer_fingerprint": "another"}))
    refused("--phase", "2", "--init_checkpoint", out, expect="made with another tokenizer")
