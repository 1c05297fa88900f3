"""scripts/compare_runs.py (the demo's table) and the demo's verdict lines, on hand-made runs."""
import json
from pathlib import Path

import pytest

from helpers import load_script

compare_runs = load_script("scripts/compare_runs.py")
demo = load_script("scripts/demo.py")


def write_phase(d: Path, batch: int, steps: int, evals: dict, noise=None, optimizer="AdamW"):
    d.mkdir(parents=True)
    rows = []
    for s in range(1, steps + 1):
        r = {"step": s, "loss": 5.0, "mlm_loss": 4.0, "mlm_acc": 0.2, "lr": 1e-3, "global_batch_size": batch,
             "samples": batch * s, "seq_per_s": 100.0, "step_time_s": 0.1}
        if s in evals:
            r.update(eval_mlm_loss=evals[s], eval_mlm_acc=0.5, eval_nsp_loss=0.6, eval_nsp_acc=0.7, eval_samples=50)
        if noise and s == steps:
            r["grad_noise_scale"] = noise
        rows.append(r)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "run.json").write_text(json.dumps({"optimizer": optimizer}))


def write_squad(d: Path, f1s):
    (d / "squad").mkdir(parents=True)
    mean = sum(f1s) / len(f1s)
    std = (sum((f - mean) ** 2 for f in f1s) / (len(f1s) - 1)) ** 0.5
    (d / "squad" / "results.json").write_text(json.dumps(
        {"exact_match": mean - 5, "f1": mean, "exact_match_std": std, "f1_std": std, "seeds": list(range(len(f1s)))}))


@pytest.fixture
def runs_dir(tmp_path):
    write_phase(tmp_path / "small" / "phase1", 32, 16, {8: 4.0, 16: 3.0}, noise=64.0)
    write_phase(tmp_path / "small" / "phase2", 16, 4, {4: 2.5}, noise=8.0)
    write_squad(tmp_path / "small", [40.0, 44.0, 42.0])
    write_phase(tmp_path / "large" / "phase1", 256, 2, {2: 3.5}, noise=20.0, optimizer="LAMB")
    write_phase(tmp_path / "large" / "phase2", 128, 1, {1: 2.75}, optimizer="LAMB")
    write_squad(tmp_path / "large", [30.0, 31.0, 32.0])
    (tmp_path / "none").mkdir()
    write_squad(tmp_path / "none", [10.0, 12.0, 14.0])
    return tmp_path


def test_table_rows_use_the_last_heldout_eval_and_seed_spread(runs_dir):
    runs, table = compare_runs.compare([runs_dir / "small", runs_dir / "large", runs_dir / "none"],
                                       ["AdamW", "LAMB", "none"], "AdamW")
    small, large, none = runs
    assert small["eval_mlm_loss"] == 2.5 and large["eval_mlm_loss"] == 2.75  # last phase's last evaluation
    assert small["global_batch"] == [32, 16] and small["steps"] == [16, 4] and small["samples"] == [512, 64]
    assert large["optimizer"] == "LAMB" and small["grad_noise_scale_phases"] == [64.0, 8.0] and small["grad_noise_scale"] == 8.0
    # curve over both phases: samples and steps continue across the phase boundary
    assert [(c["samples"], c["steps"]) for c in small["curve"]] == [(256, 8), (512, 16), (576, 20)]
    # McCandlish et al.: E(256)/E(32) with B_noise 64 = (1 + 4) / (1 + 0.5)
    assert large["predicted_sample_ratio"] == pytest.approx(5 / 1.5)
    assert small["squad"]["f1_mean"] == pytest.approx(42.0) and small["squad"]["f1_std"] == pytest.approx(2.0)
    lines = table.splitlines()
    assert "| AdamW | AdamW | 32 / 16 | 16 + 4 = 20 | 576 | 2.500 |" in lines[2]
    assert "1 (baseline)" in lines[2] and "| 3.33 |" in lines[3] and "42.0 ± 2.0" in lines[2]
    assert lines[4].startswith("| none | - | - | 0 |") and "12.0 ± 2.0" in lines[4]
    refs = [l for l in lines if "reference, not this run" in l]
    assert len(refs) == 2 and "90.395" in refs[0] and "90.584" in refs[1]


def test_demo_verdict_states_the_gap_and_the_match(runs_dir):
    names = [r.name for r in demo.RECIPES] + [demo.RANDOM_INIT]
    runs, _ = compare_runs.compare([runs_dir / "small", runs_dir / "large", runs_dir / "none"], names, names[0])
    text = demo.verdict(runs)
    assert "+30.0 points" in text and "larger seed std is 2.0" in text and "NOT" not in text.split("\n")[0]
    assert "+10.0%" in text and "**not matched**" in text and "3.33x the samples" in text


def test_cli_writes_md_json_png_and_rejects_bad_dirs(runs_dir, tmp_path, capsys):
    prefix = tmp_path / "report" / "cmp"
    assert compare_runs.main([str(runs_dir / "small"), str(runs_dir / "none"), "--out", str(prefix)]) == 0
    assert prefix.with_suffix(".md").read_text().startswith("| pretraining |")
    data = json.loads(prefix.with_suffix(".json").read_text())
    assert [r["name"] for r in data["runs"]] == ["small", "none"] and len(data["reference_rows"]) == 2
    assert prefix.with_suffix(".png").stat().st_size > 10_000
    assert compare_runs.main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert "not a directory" in capsys.readouterr().err and not (tmp_path / "x.md").exists()
    assert compare_runs.main([str(runs_dir / "small"), "--names", "a,b", "--out", str(tmp_path / "y")]) == 2
