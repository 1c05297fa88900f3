"""scripts/batch_scaling_study.py: trial configs, the per-batch LR search, the readout and
a smoke study end to end (real pretrain_bert.py runs), resumed and re-rendered."""
from __future__ import annotations

import json
import math
import sys
from dataclasses import replace

import pytest

from helpers import load_script, run_cli

bss = load_script("scripts/batch_scaling_study.py")
CPU = bss.PRESETS["cpu"]


def test_warmup_is_a_fixed_number_of_samples_and_budgets_grow_with_the_batch():
    for batch in CPU.batches:
        cfg = bss.trial_config(CPU, bss.Trial("LAMB", batch, 1e-3, 0))
        params = cfg["scheduler"]["params"]
        assert cfg["scheduler"]["type"] == "WarmupConstant" and cfg["optimizer"]["params"]["lr"] == 1e-3
        assert params["warmup_num_steps"] == math.ceil(CPU.warmup_samples / batch)
        assert params["total_num_steps"] * batch >= CPU.budget(batch) > (params["total_num_steps"] - 1) * batch
        micro = cfg["train_micro_batch_size_per_gpu"]
        assert batch % micro == 0 and micro < batch  # two batch sizes for the gradient noise scale
    assert CPU.budget(CPU.batches[-1]) == CPU.budget_steps * CPU.batches[-1] > CPU.budget(CPU.batches[0])
    gpu = bss.trial_config(bss.PRESETS["gpu"], bss.Trial("LAMB", 1024, 1e-3, 0))
    assert gpu["bf16"] == {"enabled": True} and gpu["zero_optimization"]["stage"] == 1  # LAMB + bf16 needs ZeRO
    assert "bf16" not in cfg
    goyal = bss.trial_config(CPU, bss.Trial("AdamW", 512, 0.064, 0, "linear_no_warmup"))
    assert goyal["scheduler"]["params"]["warmup_num_steps"] == 0


def test_batch_ramp_doubles_every_interval_of_samples_up_to_the_largest_batch():
    cfg = bss.trial_config(CPU, bss.Trial("AdamW", 512, 1e-3, 0, "ramp"))
    milestones = cfg["batch_schedule"]["milestones"]
    assert [b for _, b in milestones] == [8, 16, 32, 64, 128, 256, 512]
    seen = 0
    for k, ((s0, b), (s1, _)) in enumerate(zip(milestones, milestones[1:]), start=1):
        seen += (s1 - s0) * b
        assert k * CPU.ramp_interval_samples <= seen < k * CPU.ramp_interval_samples + b  # the first step past it
    assert all(b % cfg["train_micro_batch_size_per_gpu"] == 0 for _, b in milestones)
    assert cfg["scheduler"]["params"]["warmup_num_steps"] == math.ceil(CPU.warmup_samples / 8)


def test_readout_takes_heldout_crossings_and_the_noise_scale_there(tmp_path):
    p = replace(CPU, targets=(5.8, 5.4))
    rows = [{"step": s, "samples": 32 * s, "global_batch_size": 32, "loss": 1.0, "grad_noise_scale": 10.0 * s}
            for s in range(1, 9)]
    for s, loss in ((2, 6.0), (4, 5.7), (6, 5.5), (8, 5.45)):
        rows[s - 1]["eval_mlm_loss"] = loss
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = bss.readout(p, path)
    assert r["steps_to_target"] == {"5.8": 4, "5.4": None} and r["samples_to_target"]["5.8"] == 128
    assert r["b_simple_at_target"] == {"5.8": 40.0, "5.4": None}
    assert r["best_eval_mlm_loss"] == 5.45 == r["final_eval_mlm_loss"] and r["max_batch"] == 32
    # Ranked on the lowest target first: reaching 5.4 at all beats reaching 5.8 sooner.
    slow_but_deep = {"steps_to_target": {"5.8": 90, "5.4": 200}, "best_eval_mlm_loss": 5.3}
    assert bss.rank_key(p, slow_but_deep) < bss.rank_key(p, r)


class Synthetic(bss.Study):
    """The search logic against a known optimum: steps to the targets are smallest at LR
    `best_lr[batch]` and grow with |log2(lr / best)|; no process is started."""

    def __init__(self, p, best_lr):
        super().__init__(None, None, "cpu", p, seed=0, quiet=True)
        self.best_lr, self.asked = best_lr, []

    def run_trial(self, t, planned):
        self.asked.append((t.optimizer, t.batch, t.lr))
        off = abs(math.log2(t.lr / self.best_lr[t.batch]))
        steps = {f"{x:g}": round(1000 / t.batch * (1 + off) * (2 if i else 1)) for i, x in enumerate(self.p.targets)}
        return {**bss.asdict(t), "name": t.name, "steps_to_target": steps, "samples_to_target": {},
                "b_simple_at_target": {}, "best_eval_mlm_loss": 5.0 + off}


def test_grid_is_extended_past_an_edge_and_centred_by_the_sqrt_rule():
    p = replace(CPU, batches=(8, 32), start_lr={"AdamW": 1e-3}, optimizers=("AdamW",), extras=False)
    # batch 8: the optimum is 4x the start (two extensions upward); batch 32: 2x sqrt(4) x that.
    study = Synthetic(p, {8: 4e-3, 32: 16e-3})
    results = study.tune("AdamW")
    asked8 = [lr for _, b, lr in study.asked if b == 8]
    assert asked8 == [5e-4, 1e-3, 2e-3, 4e-3, 8e-3]  # grid, then +1, +1: the optimum 4e-3 is inside
    asked32 = [lr for _, b, lr in study.asked if b == 32]
    assert asked32[:3] == [4e-3, 8e-3, 16e-3]  # centred on 4e-3 x sqrt(32 / 8)
    assert asked32[3:] == [32e-3]  # 16e-3 was on the upper edge: one more
    best = {r["batch"]: r["lr"] for r in results if r["best"]}
    assert best == {8: 4e-3, 32: 16e-3}
    # A capped search stops on the edge (max_extensions 0).
    capped = Synthetic(replace(p, max_extensions=0), {8: 4e-3, 32: 16e-3})
    capped.tune("AdamW")
    assert [lr for _, b, lr in capped.asked if b == 8] == [5e-4, 1e-3, 2e-3]


def test_a_run_that_does_not_finish_is_not_recorded_and_stops_the_study(tmp_path):
    """Exit 0 without final/ (preempted: checkpoint written) or a crash: no trial.json, the
    study stops (to be continued); exit 3 (non-finite numbers: diverged) is a result."""
    class FakeRuns(bss.Study):
        def __init__(self, rc, make_final):
            super().__init__(tmp_path / "out", tmp_path / "data", "smoke", bss.PRESETS["smoke"], seed=0, quiet=True)
            self.rc, self.make_final = rc, make_final

        def sh(self, cmd, title, log=None):
            out = cmd[cmd.index("--output_dir") + 1]
            if self.make_final:
                (out / "final").mkdir(parents=True, exist_ok=True)
                (out / "final" / "config.json").write_text("{}")
            return self.rc

    trial = bss.Trial("AdamW", 4, 1e-3, 0)
    done = tmp_path / "out" / "runs" / trial.name / "trial.json"
    for rc, final in ((0, False), (1, False), (-9, False)):
        study = FakeRuns(rc, final)
        with pytest.raises(bss.StudyStopped, match=f"exit {rc}"):
            study.run_trial(trial, 1)
        assert study.stop.is_set() and not done.exists()
        with pytest.raises(bss.StudyStopped):  # the other lane starts no new run
            study.run_trial(bss.Trial("LAMB", 4, 1e-3, 0), 1)
    assert FakeRuns(3, False).run_trial(trial, 1)["exit_code"] == 3 and done.is_file()
    done.unlink()
    assert FakeRuns(0, True).run_trial(trial, 1)["exit_code"] == 0 and done.is_file()


def test_fits_use_the_best_lr_per_batch():
    p = replace(CPU, optimizers=("AdamW",), targets=(5.8,))
    trials = [{"optimizer": "AdamW", "batch": b, "best": True, "steps_to_target": {"5.8": 1000 * (1 + 64 / b)}}
              for b in (8, 32, 128, 512)]
    trials.append({"optimizer": "AdamW", "batch": 32, "best": False, "steps_to_target": {"5.8": 10}})
    fit = bss.fits(p, trials)["AdamW"]["5.8"]
    assert fit["S_min"] == pytest.approx(1000, rel=1e-5) and fit["B_noise"] == pytest.approx(64, rel=1e-5)
    assert fit["E_min"] == pytest.approx(64000, rel=1e-5) and fit["batches"] == [8, 32, 128, 512]


def test_smoke_study_runs_resumes_and_rerenders(tmp_path):
    out = tmp_path / "study"
    proc = run_cli(sys.executable, "scripts/batch_scaling_study.py", "--smoke", "--out", out, "--quiet", timeout=900)
    results = json.loads((out / "results.json").read_text())
    smoke = bss.PRESETS["smoke"]
    trials = results["trials"]
    for opt in smoke.optimizers:
        constant = [r for r in trials if r["optimizer"] == opt and r["kind"] == "constant" and r["seed"] == 0]
        assert {r["batch"] for r in constant} == set(smoke.batches)
        assert sum(r["best"] for r in constant) == len(smoke.batches)
        assert len(constant) >= smoke.grid_size * len(smoke.batches)
        for r in constant:
            assert r["exit_code"] == 0 and r["steps"] > 0 and set(r["steps_to_target"]) == {"7.5", "6.5"}
            assert (out / "runs" / r["name"] / "ds_config.json").is_file()
        assert {r["batch"] for r in trials if r["optimizer"] == opt and r["seed"] == 1} == {4, 16}
    assert {r["kind"] for r in trials} == {"constant", "linear_no_warmup", "ramp"}
    assert set(results["fits"]) == {"AdamW", "LAMB"}
    ramp = next(r for r in trials if r["kind"] == "ramp")
    metrics = [json.loads(x) for x in (out / "runs" / ramp["name"] / "train" / "metrics.jsonl").read_text().split("\n") if x]
    assert metrics[0]["global_batch_size"] == 4 and max(m["global_batch_size"] for m in metrics) > 4
    assert any("eval_mlm_loss" in m for m in metrics)
    table = (out / "results.md").read_text()
    assert "| AdamW | 4 |" in table and "Goyal" in table and "Smith" in table and "B_noise" in table
    assert (out / "batch_scaling_study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "ETA" in proc.stdout

    # A second invocation reuses every finished run; one whose trial.json was lost (killed
    # after the run finished) is read back from its run directory, not trained again.
    lost = out / "runs" / trials[0]["name"] / "trial.json"
    lost.unlink()
    again = run_cli(sys.executable, "scripts/batch_scaling_study.py", "--smoke", "--out", out, "--quiet")
    assert "finished earlier" in again.stdout and "exit 0" not in again.stdout
    assert json.loads((out / "results.json").read_text())["trials"] == [
        {**r, "wall_s": r["wall_s"] if r["name"] != trials[0]["name"] else 0.0} for r in trials]

    table = (out / "results.md").read_text()
    (out / "results.md").unlink()
    run_cli(sys.executable, "scripts/batch_scaling_study.py", "--report_only", "--out", out)
    assert (out / "results.md").read_text() == table

    # OUT/data was made for this preset and seed: another seed (or preset) refuses it
    other = run_cli(sys.executable, "scripts/batch_scaling_study.py", "--smoke", "--out", out, "--seed", "1",
                    check=False)
    assert other.returncode != 0 and "was made with" in other.stderr and "--data" in other.stderr
