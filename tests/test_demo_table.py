"""The demo's summary: the final MLM loss averages the last 10% of samples, weighted by batch."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("demo", ROOT / "scripts" / "demo.py")
demo = importlib.util.module_from_spec(spec)
spec.loader.exec_module(demo)


def write_metrics(path, batch, losses):
    rows = [{"step": i + 1, "loss": l + 0.7, "mlm_loss": l, "mlm_acc": 0.1, "lr": 1e-3, "global_batch_size": batch,
             "samples": batch * (i + 1), "seq_per_s": 100.0, "step_time_s": batch / 100.0} for i, l in enumerate(losses)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_summarize_averages_last_tenth_of_samples(tmp_path):
    s = demo.summarize(write_metrics(tmp_path / "m.jsonl", 10, [9.0] * 18 + [4.0, 2.0]))
    # last 10% of 200 samples = samples > 180 = the final two steps
    assert s["final_mlm_loss"] == pytest.approx(3.0)
    assert (s["steps"], s["samples"], s["global_batch_size"]) == (20, 200, 10)
    assert s["seq_per_s"] == pytest.approx(100.0)


def test_table_has_a_row_per_recipe(tmp_path):
    p = demo.summarize(write_metrics(tmp_path / "a.jsonl", 8, [5.0] * 4))
    runs = [{"recipe": "lamb", "wall_s": 120.0, "phase1": p, "phase2": p, "squad": {"exact_match": 40.0, "f1": 50.0}},
            {"recipe": "none", "wall_s": 0.0, "phase1": None, "phase2": None, "squad": {"exact_match": 1.0, "f1": 2.0}}]
    table = demo.render_table(runs).splitlines()
    assert len(table) == 4 and table[2].startswith("| LAMB (large batch) | 8 / 8 | 4 + 4 = 8 | 2.0 min")
    assert table[3].endswith("| 1.0 | 2.0 |")
