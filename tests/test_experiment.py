"""scripts/batch_scaling_experiment.py: the run configs it derives, and a smoke run end to end."""
import json
import math
import sys
from pathlib import Path

import pytest

from lbllm.utils import read_jsonl

from helpers import load_script, run_cli

ROOT = Path(__file__).resolve().parent.parent
exp = load_script("scripts/batch_scaling_experiment.py")


def test_cpu_configs_follow_the_recipes():
    sizes = exp.PRESETS["cpu"]
    n = 6502
    cfg = exp.build_configs(sizes, n)
    total = sizes.epochs * n
    # same epochs for every run: steps x batch within one step of epochs x N
    for key in "abcd":
        c = cfg[key]
        assert abs(c["scheduler"]["params"]["total_num_steps"] * c["train_batch_size"] - total) <= c["train_batch_size"] / 2
    assert cfg["a"]["train_batch_size"] * 16 == cfg["b"]["train_batch_size"] == cfg["c"]["train_batch_size"] == 512
    assert (cfg["b"]["lr_scaling"]["rule"], cfg["d"]["lr_scaling"]["rule"]) == ("sqrt", "linear")
    assert all(c["lr_scaling"]["base_batch"] == 32 for c in cfg.values())
    assert cfg["b"]["lr_scaling"]["base_lr"] == cfg["a"]["lr_scaling"]["base_lr"]  # (b) scales (a)'s lr
    # warmup: (b)/(c) 16x (a)'s fraction of the run (linear-epoch), (d) none, (e) (a)'s steps
    a_steps, b_steps = (cfg[k]["scheduler"]["params"]["total_num_steps"] for k in "ab")
    assert cfg["a"]["scheduler"]["params"]["warmup_num_steps"] == round(0.02 * a_steps)
    assert cfg["b"]["scheduler"]["params"]["warmup_num_steps"] == round(0.32 * b_steps)
    assert cfg["d"]["scheduler"]["params"]["warmup_num_steps"] == 0
    assert cfg["e"]["scheduler"]["params"]["warmup_num_steps"] == cfg["a"]["scheduler"]["params"]["warmup_num_steps"]
    assert cfg["e"]["scheduler"]["type"] == "WarmupConstant"


def test_batch_ramp_doubles_where_the_baseline_lr_halves():
    sizes = exp.PRESETS["cpu"]
    total, warm = 13004.0, 8 * 32
    milestones, steps = exp.ramp_milestones(sizes, total, warm)
    assert [b for _, b in milestones] == [32, 64, 128, 256, 512]
    assert milestones[0][0] == 0 and all(s1 < s2 for (s1, _), (s2, _) in zip(milestones, milestones[1:]))
    # samples before each doubling vs where (a)'s linear decay reaches 1/2, 1/4, 1/8, 1/16
    seen, at = 0, []
    for (s0, b), (s1, _) in zip(milestones, milestones[1:]):
        seen += (s1 - s0) * b
        at.append(seen)
    for k, samples in enumerate(at, start=1):
        expected = warm + (1 - 2.0 ** -k) * (total - warm)
        assert abs(samples - expected) <= milestones[k - 1][1], (k, samples, expected)
    seen += (steps - milestones[-1][0]) * milestones[-1][1]
    assert abs(seen - total) <= 512 / 2


CPU_SAMPLES = 6502  # seq-128 samples of the CPU preset's data (make_corpus --num_docs 2000 --seed 0)


def test_committed_configs_are_the_cpu_instances():
    """ds_configs/experiment/ holds exactly what the CPU-sized run runs (regenerate them if the preset changes)."""
    for key, cfg in exp.build_configs(exp.PRESETS["cpu"], CPU_SAMPLES).items():
        run = next(r for r in exp.RUNS if r.key == key)
        assert json.loads((exp.CONFIG_DIR / run.config).read_text()) == cfg, run.config


def test_committed_configs_resolve_with_the_rule_lrs():
    from lbllm.train.engine import resolve_config

    base = 1e-3
    expected = {"a": base, "b": base * 4, "c": 0.1 * 4, "d": base * 16, "e": base}
    for run in exp.RUNS:
        path = exp.CONFIG_DIR / run.config
        resolved = resolve_config(json.loads(path.read_text()), 2, str(path))
        assert resolved.peak_lr == pytest.approx(expected[run.key], rel=1e-12), run.config
    ramp = resolve_config(json.loads((exp.CONFIG_DIR / "e_adamw_batch_ramp.json").read_text()), 2, "e").batch_schedule
    assert ramp.max_batch == 512


def test_smoke_run_writes_table_json_and_plot(tiny_data, tmp_path):
    out = tmp_path / "exp"
    proc = run_cli(sys.executable, "scripts/batch_scaling_experiment.py", "--smoke", "--out", out, "--data", tiny_data,
                   timeout=600)
    data = json.loads((out / "results.json").read_text())
    runs = {r["key"]: r for r in data["runs"]}
    assert list(runs) == list("abcde")
    for r in runs.values():
        assert r["error"] is None and r["summary"]["steps"] > 0 and math.isfinite(r["summary"]["final_mlm_loss"])
        assert (out / r["config"]).is_file()
    small, large = exp.PRESETS["smoke"].small_batch, exp.PRESETS["smoke"].large_batch
    assert runs["a"]["summary"]["batches"] == [small]
    assert runs["b"]["summary"]["batches"] == runs["c"]["summary"]["batches"] == [large]
    assert runs["e"]["summary"]["batches"][0] == small and len(runs["e"]["summary"]["batches"]) > 1
    # lr from the rules: (b) sqrt(16) x base, (d) 16 x base; the trainer ran (b) at it after warmup
    base = runs["a"]["lr"]
    assert (runs["b"]["lr"], runs["d"]["lr"]) == (pytest.approx(4 * base), pytest.approx(16 * base))
    assert runs["b"]["summary"]["peak_lr"] == pytest.approx(4 * base, rel=1e-6)
    # The noise scale was measured (B_simple itself can be undefined on tiny data, where the
    # |G|^2 estimate may stay <= 0, and the fixture's tokenizer varies from run to run:
    # huggingface/tokenizers#1794); when defined, it is the summary's figure.
    rows = read_jsonl(out / "runs" / "a" / "metrics.jsonl")
    assert any("grad_sqnorm_small" in r for r in rows)
    defined = [r["grad_noise_scale"] for r in rows if r.get("grad_noise_scale") is not None]
    assert runs["a"]["summary"]["b_simple_end"] == (defined[-1] if defined else None)

    table = (out / "results.md").read_text()
    for key in "abcde":
        assert f"| ({key}) " in table
    assert "Target (b) vs (a)" in table
    png = out / "batch_scaling.png"  # matplotlib is a dependency (pyproject.toml)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # --report_only re-renders from results.json
    (out / "results.md").unlink()
    run_cli(sys.executable, "scripts/batch_scaling_experiment.py", "--report_only", "--out", out)
    assert (out / "results.md").read_text() == table


def test_summary_reads_the_heldout_evaluation_not_the_training_batches(tmp_path):
    rows = [{"step": s, "samples": 32 * s, "global_batch_size": 32, "mlm_loss": 9.0 - s, "mlm_acc": 0.1 * s,
             "lr": 1e-3, "step_time_s": 0.1} for s in range(1, 11)]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train = exp.summarize(path)
    assert train["mlm_source"].startswith("training batches") and train["final_mlm_loss"] == pytest.approx(-1.0)
    rows[-1].update(eval_mlm_loss=3.5, eval_mlm_acc=0.4)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    held = exp.summarize(path)
    assert (held["mlm_source"], held["final_mlm_loss"], held["final_mlm_acc"]) == ("held-out", 3.5, 0.4)
