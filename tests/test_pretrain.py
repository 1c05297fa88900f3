"""pretrain_bert.py end to end: one process, two DeepSpeed ranks, phase 1 -> phase 2,
resume, and the one-line errors. Each run is a real DeepSpeed engine on CPU (gloo)."""
from __future__ import annotations

import json
import sys

import pytest
import torch

from helpers import ROOT, deepspeed_cmd, run_cli, write_ds_config
from lbllm.utils import UserError, read_jsonl

REQUIRED = {"step", "loss", "lr", "global_batch_size", "samples", "seq_per_s", "tokens_per_s"}


def pretrain(data, out, config, *extra, procs: int = 1, shards: str = "shards_64", check=True, env=None):
    launcher = deepspeed_cmd(procs) if procs > 1 else [sys.executable]
    return run_cli(*launcher, "pretrain_bert.py", "--deepspeed_config", config, "--data_dir", data / shards,
                   "--output_dir", out, "--model_config", "tiny", "--seed", "3", *extra, check=check, env=env)


def test_single_process_run_writes_metrics_and_hf_model(tiny_data, tmp_path):
    from transformers import AutoModelForPreTraining, AutoModelForQuestionAnswering, AutoTokenizer

    cfg = write_ds_config(tmp_path / "ds.json")
    out = tmp_path / "out"
    # LBLLM_PEAK_TFLOPS: MFU against a given peak (here on CPU, where there is no table entry)
    pretrain(tiny_data, out, cfg, "--max_steps", "3", "--tensorboard", "--trust_ratio_interval", "2",
             env={"LBLLM_PEAK_TFLOPS": "1"})
    rows = read_jsonl(out / "metrics.jsonl")
    from lbllm.model import build_bert_config
    from lbllm.model.flops import training_flops

    tiny = build_bert_config("tiny", vocab_size=800)
    for r in rows:  # between a batch of 1-token samples and one of full 64-token samples with 10 predictions
        done = r["mfu"] * 1e12 * r["step_time_s"]
        assert training_flops(tiny, [1] * 8, 0) < done <= training_flops(tiny, [64] * 8, 80) * (1 + 1e-9)
    assert [r["step"] for r in rows] == [1, 2, 3]
    # --tensorboard alone: OUT/tensorboard holds the same figures as metrics.jsonl
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(out / "tensorboard"), size_guidance={"histograms": 0, "scalars": 0})
    board.Reload()
    loss = board.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in rows], rel=1e-6)
    assert {"schedule/lr", "speed/seq_per_s", "trust_ratio/trust_ratio_median", "train/mlm_acc"} <= set(
        board.Tags()["scalars"])
    assert [e.step for e in board.Histograms("trust_ratio/per_parameter")] == [2]
    # scripts/plot_run.py draws it (and a second run overlaid: here the same one)
    png = tmp_path / "plots" / "run.png"
    run_cli(sys.executable, "scripts/plot_run.py", out, out, "--names", "a,b", "--out", png, "--x", "step")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = run_cli(sys.executable, "scripts/plot_run.py", tmp_path / "nowhere", "--out", tmp_path / "x.png", check=False)
    assert bad.returncode == 2 and "no metrics.jsonl" in bad.stderr and not (tmp_path / "x.png").exists()
    assert all(REQUIRED <= r.keys() for r in rows)
    assert [r["samples"] for r in rows] == [8, 16, 24]
    assert all(r["tokens_per_s"] == pytest.approx(64 * r["seq_per_s"]) for r in rows)
    assert rows[0]["lr"] == pytest.approx(0.5e-3) and rows[1]["lr"] == pytest.approx(1e-3)  # warmup 2 steps
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    model = AutoModelForPreTraining.from_pretrained(out / "final")
    AutoModelForQuestionAnswering.from_pretrained(out / "final")
    tok = AutoTokenizer.from_pretrained(out / "final")
    assert model.config.vocab_size == len(tok)
    # Without ZeRO: scripts/export_hf.py reads the checkpoint file; the run's own export
    # took the live module's weights. Both must be the same model.
    run_cli(sys.executable, "scripts/export_hf.py", out, tmp_path / "exported")
    assert_same_logits(out / "final", tmp_path / "exported", tok)


def assert_same_logits(dir_a, dir_b, tok, weights=None) -> None:
    """Two exports (or an export and a by-name weight dict) give identical MLM and NSP logits."""
    from transformers import AutoModelForPreTraining

    a, b = AutoModelForPreTraining.from_pretrained(dir_a), AutoModelForPreTraining.from_pretrained(dir_b)
    if weights is not None:
        missing, unexpected = a.load_state_dict({k.removeprefix("model."): v for k, v in weights.items()}, strict=False)
        assert not unexpected and all("decoder" in k for k in missing), (missing, unexpected)
    batch = tok(["kalo mi ren tu", "mi kalo"], ["tu ren", "ren"], padding=True, return_tensors="pt")
    with torch.no_grad():
        out_a, out_b = a.eval()(**batch), b.eval()(**batch)
    assert torch.equal(out_a.prediction_logits, out_b.prediction_logits)
    assert torch.equal(out_a.seq_relationship_logits, out_b.seq_relationship_logits)


def test_two_rank_zero3_bf16_lamb_runs_and_exports(tiny_data, tmp_path):
    """LAMB under ZeRO 3 + bf16 through pretrain_bert.py: trains, saves, exports fp32 HF
    weights; --keep_last 2 leaves the newest two checkpoints, and scripts/export_hf.py
    exports any of them in one process from the 2 ranks' partitions. The ranks talk over
    gloo without JIT-building DeepSpeed's shared-memory op (a C++ build that can be killed
    for memory; lbllm.train.engine.use_gloo_collectives_on_cpu)."""
    from transformers import AutoModelForPreTraining, AutoModelForQuestionAnswering, AutoTokenizer

    cfg = write_ds_config(tmp_path / "z3.json", train_batch_size=8, train_micro_batch_size_per_gpu=4,
                          zero_optimization={"stage": 3}, bf16={"enabled": True})
    out = tmp_path / "z3"
    ext = tmp_path / "extensions"
    proc = pretrain(tiny_data, out, cfg, "--max_steps", "3", "--save_interval", "1", "--keep_last", "2", procs=2,
                    env={"TORCH_EXTENSIONS_DIR": str(ext)})
    assert "ZeRO 3" in proc.stderr
    assert not list(ext.glob("*shm*")) and "shm_comm" not in proc.stdout + proc.stderr
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["loss"] == r["loss"] for r in rows)
    model = AutoModelForPreTraining.from_pretrained(out / "final")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert sorted(p.name for p in (out / "checkpoints").glob("step*")) == ["step00000002", "step00000003"]

    tok = AutoTokenizer.from_pretrained(out / "final")
    run_cli(sys.executable, "scripts/export_hf.py", out, tmp_path / "last")  # latest = step 3
    # The reference is the live engine's fp32 masters, gathered by name at the end of the
    # run (phase_state.pt, DeepSpeed's safe_get_full_fp32_param): another path than the files.
    live = torch.load(out / "phase_state.pt")["weights"]
    assert_same_logits(out / "final", tmp_path / "last", tok, weights=live)
    run_cli(sys.executable, "scripts/export_hf.py", out, tmp_path / "two", "--tag", "step00000002")
    AutoModelForQuestionAnswering.from_pretrained(tmp_path / "two")
    step2 = AutoModelForPreTraining.from_pretrained(tmp_path / "two").state_dict()
    assert any(not torch.equal(v, model.state_dict()[k]) for k, v in step2.items())  # another step's weights
    proc = run_cli(sys.executable, "scripts/export_hf.py", out, tmp_path / "one", "--tag", "step00000001",
                   check=False)
    assert proc.returncode == 2 and "available: step00000002, step00000003" in proc.stderr
    assert not (tmp_path / "one").exists()


def test_two_rank_zero2_phase1_then_phase2(tiny_data, tmp_path):
    """Phase 1 on seq 64 with 2 DeepSpeed ranks (ZeRO 2, LAMB), then phase 2 on seq 128 from it."""
    from transformers import AutoModelForPreTraining

    p1_cfg = write_ds_config(tmp_path / "p1.json", train_batch_size=16, train_micro_batch_size_per_gpu=4,
                             zero_optimization={"stage": 2})
    p2_cfg = write_ds_config(tmp_path / "p2.json", train_batch_size=8, train_micro_batch_size_per_gpu=2,
                             optimizer={"type": "LAMB", "params": {"lr": 5e-4, "weight_decay": 0.01}},
                             scheduler={"type": "WarmupPolyDecay", "params": {"warmup_num_steps": 2, "total_num_steps": 3}},
                             zero_optimization={"stage": 2})
    p1, p2 = tmp_path / "p1", tmp_path / "p2"
    pretrain(tiny_data, p1, p1_cfg, "--max_steps", "3", "--dropout", "0", procs=2)
    rows1 = read_jsonl(p1 / "metrics.jsonl")
    assert [r["global_batch_size"] for r in rows1] == [16] * 3
    assert rows1[-1]["samples"] == 48

    proc = pretrain(tiny_data, p2, p2_cfg, "--phase", "2", "--init_checkpoint", p1, "--dropout", "0",
                    procs=2, shards="shards_128")
    assert "optimizer moments" in proc.stderr
    rows2 = read_jsonl(p2 / "metrics.jsonl")
    # step count, samples and the schedule restart: re-warmup from lr/2 at phase-2 peak 5e-4
    assert [r["step"] for r in rows2] == [1, 2, 3]
    assert [r["samples"] for r in rows2] == [8, 16, 24]
    assert [r["lr"] for r in rows2] == pytest.approx([2.5e-4, 5e-4, 0.0])
    assert all(r["phase"] == 2 for r in rows2)
    # phase 2 starts from phase-1 weights: its first loss is far below a fresh model's
    fresh = tmp_path / "fresh"
    pretrain(tiny_data, fresh, p2_cfg, "--max_steps", "1", "--dropout", "0", procs=1, shards="shards_128")
    assert rows2[0]["mlm_loss"] < read_jsonl(fresh / "metrics.jsonl")[0]["mlm_loss"]
    m1 = AutoModelForPreTraining.from_pretrained(p1 / "final")
    m2 = AutoModelForPreTraining.from_pretrained(p2 / "final")
    w1, w2 = m1.bert.embeddings.word_embeddings.weight, m2.bert.embeddings.word_embeddings.weight
    assert not torch.equal(w1, w2)
    assert (w1 - w2).abs().max() < 0.1  # moved by 3 small steps, not re-initialized


def test_phase2_carries_moments_and_resets_step(tiny_data, tmp_path):
    """In-process: after init_from_previous_phase, LAMB's moments equal phase 1's, step is 0."""
    import os

    from lbllm.train import checkpoint as ckpt
    from lbllm.train.config import RunConfig
    from lbllm.train.engine import base_optimizer, ensure_distributed_env, initialize
    from lbllm.train.trainer import Trainer, prepare
    from lbllm.model import PretrainingModel, build_pretraining_model

    ensure_distributed_env()
    cfg = write_ds_config(tmp_path / "ds.json", zero_optimization={"stage": 1})
    p1 = tmp_path / "p1"
    setup = prepare(RunConfig(deepspeed_config=cfg, data_dir=tiny_data / "shards_64", output_dir=p1, max_steps=2, dropout=0.0))
    Trainer(setup).train()
    saved = torch.load(sorted((p1 / "checkpoints" / "step00000002").glob("*optim_states.pt"))[0], weights_only=False)

    cfg2 = write_ds_config(tmp_path / "ds2.json", optimizer={"type": "LAMB", "params": {"lr": 7e-4, "weight_decay": 0.02}},
                           zero_optimization={"stage": 1})
    setup2 = prepare(RunConfig(deepspeed_config=cfg2, data_dir=tiny_data / "shards_128", output_dir=tmp_path / "p2",
                               phase=2, init_checkpoint=p1, dropout=0.0))
    engine, opt = initialize(PretrainingModel(build_pretraining_model(setup2.bert_config)), setup2.resolved)
    ckpt.init_from_previous_phase(engine, p1, setup2.resolved.zero_stage)
    opt = base_optimizer(engine)
    assert all(g.get("step", 0) == 0 for g in opt.param_groups)
    assert opt.param_groups[0]["weight_decay"] == 0.02  # phase-2 hyperparameters, not phase 1's
    assert opt.param_groups[0]["lr"] == pytest.approx(3.5e-4)  # first warmup step of the phase-2 schedule
    base_state = saved["optimizer_state_dict"]["base_optimizer_state"]
    old = base_state["state"] if isinstance(base_state, dict) else base_state[0]["state"]
    new = opt.state_dict()["state"]
    assert old.keys() == new.keys()
    for k in old:
        torch.testing.assert_close(new[k]["exp_avg"], old[k]["exp_avg"], rtol=0, atol=0)
        assert new[k]["exp_avg"].abs().sum() > 0
    assert engine.global_steps == 0


def test_resume_auto_continues_exactly(tiny_data, tmp_path):
    """Stop after 2 of 4 steps, resume: the losses equal an uninterrupted 4-step run, and
    the gradient noise scale's moving averages continue from the checkpoint."""
    cfg = write_ds_config(tmp_path / "ds.json", zero_optimization={"stage": 1})
    full, part = tmp_path / "full", tmp_path / "part"
    flags = ("--dropout", "0", "--noise_scale_interval", "1")
    pretrain(tiny_data, full, cfg, "--max_steps", "4", *flags)
    pretrain(tiny_data, part, cfg, "--max_steps", "2", *flags)
    proc = pretrain(tiny_data, part, cfg, "--max_steps", "4", *flags, "--resume", "auto")
    assert "resumed from step 2" in proc.stderr
    a, b = read_jsonl(full / "metrics.jsonl"), read_jsonl(part / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert [r["samples"] for r in b] == [r["samples"] for r in a]
    assert [r["lr"] for r in b] == pytest.approx([r["lr"] for r in a], rel=1e-12)
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-5)
    assert [r["grad_sqnorm_small"] for r in b] == pytest.approx([r["grad_sqnorm_small"] for r in a], rel=1e-4)
    # B_simple is a ratio of EMAs over all measurements so far: restarting them at step 3
    # would give a different value there (the first estimate alone).
    # (None where the |G|^2 estimate is still <= 0, e.g. at step 1 on some machines' data.)
    na, nb = ([r.get("grad_noise_scale") for r in rows] for rows in (a, b))
    assert any(x is not None for x in na[2:]), na  # measured after the resume point
    assert [x is None for x in nb] == [x is None for x in na], (na, nb)
    assert [x for x in nb if x is not None] == pytest.approx([x for x in na if x is not None], rel=1e-3)


def test_bf16_run(tiny_data, tmp_path):
    cfg = write_ds_config(tmp_path / "ds.json", bf16={"enabled": True}, zero_optimization={"stage": 1})
    out = tmp_path / "out"
    pretrain(tiny_data, out, cfg, "--max_steps", "2")
    rows = read_jsonl(out / "metrics.jsonl")
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert (out / "final" / "config.json").is_file()


def _expect_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [l for l in proc.stderr.splitlines() if "error:" in l]
    assert len(lines) == 1, proc.stderr[-2000:]
    for n in needles:
        assert n in lines[0], lines[0]


def test_errors_are_one_line_before_any_output(tiny_data, tmp_path):
    """The CLI contract, once through a real launch: exit 2, one line, nothing written."""
    out = tmp_path / "out"
    good = write_ds_config(tmp_path / "good.json")
    _expect_error(run_cli(sys.executable, "pretrain_bert.py", "--deepspeed_config", good, "--data_dir",
                          tmp_path / "nope", "--output_dir", out, check=False), "--data_dir", "create_shards.py")
    bad_opt = write_ds_config(tmp_path / "bad_opt.json", optimizer={"type": "Lamby", "params": {}})
    _expect_error(pretrain(tiny_data, out, bad_opt, check=False), "Lamby", "LAMB", "LARS")
    assert not out.exists()


def _prepare_error(data, out, config, **extra) -> str:
    """What prepare() (every check before DeepSpeed starts) raises, in this process."""
    from lbllm.train.config import RunConfig
    from lbllm.train.trainer import prepare

    with pytest.raises(UserError) as err:
        prepare(RunConfig(**{"deepspeed_config": config, "data_dir": data / "shards_64", "output_dir": out,
                             "model_config": "tiny", **extra}))
    assert "\n" not in str(err.value)
    return str(err.value)


def test_config_errors_name_the_key_and_the_fix(tiny_data, tmp_path):
    out = tmp_path / "out"
    bad_key = write_ds_config(tmp_path / "bad_key.json", optimizer={"type": "LAMB", "params": {"lr": 1e-3, "beta1": 0.9}})
    bf16_stage0 = write_ds_config(tmp_path / "bf16_0.json", bf16={"enabled": True})
    bad_batch = write_ds_config(tmp_path / "bad_batch.json", train_batch_size=8, train_micro_batch_size_per_gpu=4,
                                gradient_accumulation_steps=3)
    small = tmp_path / "small.json"
    small.write_text(json.dumps({"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                 "intermediate_size": 64, "max_position_embeddings": 32}))
    (tmp_path / "malformed.json").write_text("{not json")
    good = write_ds_config(tmp_path / "good.json")
    cases = [
        (dict(config=bad_key), ["beta1", "valid keys", "betas"]),
        (dict(config=bf16_stage0), ["stage 1, 2 or 3"]),
        (dict(config=bad_batch), ["train_batch_size=8"]),
        (dict(config=good, model_config=small), ["max_position_embeddings is 32"]),
        (dict(config=good, tokenizer=tmp_path), ["--tokenizer"]),
        (dict(config=tmp_path / "malformed.json"), ["malformed JSON"]),
    ]
    for kw, needles in cases:
        config = kw.pop("config")
        msg = _prepare_error(tiny_data, out, config, **kw)
        for n in needles:
            assert n in msg, (kw, msg)
    assert not out.exists()


@pytest.mark.parametrize("optimizer", [
    {"type": "LAMB", "params": {"lr": 1e-3, "weight_decay": 0.01}},
    # DeepSpeed's own optimizer (torch AdamW: moments plus a per-parameter step tensor).
    {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01, "torch_adam": True}},
], ids=["LAMB", "AdamW"])
def test_phase2_on_another_world_size_and_zero_stage_carries_state_exactly(tiny_data, tmp_path, optimizer):
    """Phase 1 on 2 ranks (ZeRO 2) -> phase 2 on 1 rank (ZeRO 3): weights and moments arrive
    unchanged. With --max_steps 0 phase 2 only loads and re-saves, so its phase_state.pt
    must equal phase 1's tensor for tensor; then one phase-2 step runs from it."""
    p1_cfg = write_ds_config(tmp_path / "p1.json", train_batch_size=16, train_micro_batch_size_per_gpu=4,
                             zero_optimization={"stage": 2}, optimizer=optimizer)
    p2_cfg = write_ds_config(tmp_path / "p2.json", train_batch_size=8, train_micro_batch_size_per_gpu=8,
                             zero_optimization={"stage": 3}, optimizer=optimizer)
    p1, p2 = tmp_path / "p1", tmp_path / "p2"
    pretrain(tiny_data, p1, p1_cfg, "--max_steps", "2", procs=2)
    proc = pretrain(tiny_data, p2, p2_cfg, "--phase", "2", "--init_checkpoint", p1, "--max_steps", "0",
                    shards="shards_128")
    assert "optimizer moments" in proc.stderr
    a, b = torch.load(p1 / "phase_state.pt"), torch.load(p2 / "phase_state.pt")
    assert sorted(a["moments"]) == ["exp_avg", "exp_avg_sq"]
    assert a["weights"].keys() == b["weights"].keys()
    for name in a["weights"]:
        assert torch.equal(a["weights"][name], b["weights"][name]), name
        for k in a["moments"]:
            assert torch.equal(a["moments"][k][name], b["moments"][k][name]), (k, name)
    assert any(v.abs().sum() > 0 for v in a["moments"]["exp_avg"].values())  # moments were really trained
    pretrain(tiny_data, tmp_path / "p2b", p2_cfg, "--phase", "2", "--init_checkpoint", p1, "--max_steps", "1",
             shards="shards_128")
    assert [r["step"] for r in read_jsonl(tmp_path / "p2b" / "metrics.jsonl")] == [1]


def test_lamb_64k_recipe_runs_through_the_registry_under_zero(tiny_data, tmp_path):
    """ds_configs/lamb_64k.json as shipped (LAMB by name, schedule, bf16, ZeRO), with only the
    batch sizes shrunk to the tiny data: 2 DeepSpeed ranks, 2 steps."""
    recipe = json.loads((ROOT / "ds_configs" / "lamb_64k.json").read_text())
    assert recipe["optimizer"]["type"] == "LAMB" and recipe["zero_optimization"]["stage"] >= 1
    cfg = tmp_path / "lamb_64k_small.json"
    cfg.write_text(json.dumps({**recipe, "train_batch_size": 16, "train_micro_batch_size_per_gpu": 4}))
    out = tmp_path / "recipe"
    proc = pretrain(tiny_data, out, cfg, "--max_steps", "2", procs=2)
    assert "LAMB" in proc.stderr and f"ZeRO {recipe['zero_optimization']['stage']}" in proc.stderr
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["lr"] == pytest.approx(6e-3 / 2000)  # step 1 of the 2000-step warmup
