"""The fast paths of the training step against the plain computation (CPU here; the same
tests run on CUDA from scripts/gpu_check.sh with LBLLM_TEST_DEVICE=cuda), the FLOPs
count, and scripts/bench_pretrain.py / scripts/gpu_check.sh run briefly."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import ROOT, run_cli
from lbllm.data import PretrainingDataset
from lbllm.model import PretrainingModel, build_bert_config, build_pretraining_model
from lbllm.model.flops import (encoder_parameters, mlm_head_parameters, peak_flops, training_flops,
                               training_flops_per_sequence)

DEVICE = torch.device(os.environ.get("LBLLM_TEST_DEVICE", "cpu"))


def batch_with_padding(tiny_data, n=8):
    ds = PretrainingDataset(tiny_data / "shards_64", tokenizer_dir=tiny_data / "tokenizer")
    # Short sequences (padding) included: sort by length, take both ends.
    lengths = [(int(ds.get_batch([i], epoch=0)["attention_mask"].sum()), i) for i in range(min(200, len(ds)))]
    lengths.sort()
    idx = [i for _, i in lengths[: n // 2] + lengths[-n // 2:]]
    b = ds.get_batch(idx, epoch=0)
    assert (b["attention_mask"] == 0).any(), "the batch must hold padding"
    return {k: v.to(DEVICE) for k, v in b.items()}


def model_pair(attn=("sdpa", "sdpa"), sparse=(True, True)):
    cfg = build_bert_config("tiny", vocab_size=800, dropout=0.0)
    torch.manual_seed(0)
    a = build_pretraining_model(cfg)
    cfg_b = cfg.__class__.from_dict(cfg.to_dict())
    cfg_a = cfg.__class__.from_dict(cfg.to_dict())
    cfg_a._attn_implementation, cfg_b._attn_implementation = attn
    a = build_pretraining_model(cfg_a)
    b = build_pretraining_model(cfg_b)
    b.load_state_dict(a.state_dict())
    return (PretrainingModel(a, sparse_mlm_head=sparse[0]).to(DEVICE),
            PretrainingModel(b, sparse_mlm_head=sparse[1]).to(DEVICE))


def losses_and_grads(model, batch):
    model.zero_grad()
    out = model(**batch)
    (out.mlm_loss_sum + out.nsp_loss_sum).backward()
    return out, {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(ga, gb, rtol):
    """Every gradient equal up to rounding, at the scale of the largest gradient (the key
    bias's gradient is 0 in exact arithmetic: only rounding there)."""
    assert ga.keys() == gb.keys()
    scale = max(float(g.abs().max()) for g in ga.values())
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=rtol, atol=rtol * scale, msg=lambda m: f"{name}: {m}")


def test_exact_sparse_mlm_head_equals_the_dense_head(tiny_data):
    batch = batch_with_padding(tiny_data)
    sparse, dense = model_pair(sparse=(True, False))
    a, ga = losses_and_grads(sparse, batch)
    b, gb = losses_and_grads(dense, batch)
    assert a.mlm_count == b.mlm_count and a.mlm_correct == b.mlm_correct
    torch.testing.assert_close(a.mlm_loss_sum, b.mlm_loss_sum, rtol=1e-6, atol=0)
    assert_same_grads(ga, gb, 1e-5)


def test_exact_sdpa_attention_equals_eager_with_the_padding_mask(tiny_data):
    batch = batch_with_padding(tiny_data)
    sdpa, eager = model_pair(attn=("sdpa", "eager"))
    a, ga = losses_and_grads(sdpa, batch)
    b, gb = losses_and_grads(eager, batch)
    torch.testing.assert_close(a.mlm_loss_sum, b.mlm_loss_sum, rtol=1e-5, atol=0)
    assert_same_grads(ga, gb, 1e-4)
    # The mask is honoured: what sits in the padding changes nothing.
    noisy = dict(batch, input_ids=torch.where(batch["attention_mask"] == 0, torch.full_like(batch["input_ids"], 7),
                                              batch["input_ids"]))
    c, _ = losses_and_grads(sdpa, noisy)
    torch.testing.assert_close(c.mlm_loss_sum, a.mlm_loss_sum, rtol=1e-5, atol=0)


def test_flops_count_the_models_own_parameters():
    cfg = build_bert_config("mini", vocab_size=3000)
    model = build_pretraining_model(cfg)
    layers = sum(p.numel() for p in model.bert.encoder.parameters())
    assert encoder_parameters(cfg) == layers
    head = model.cls.predictions
    # the decoder weight is tied to the word embeddings: counted once in the head
    assert mlm_head_parameters(cfg) == sum(p.numel() for p in head.transform.parameters()) + \
        model.bert.embeddings.word_embeddings.weight.numel() + head.bias.numel()
    base = build_bert_config("base", vocab_size=30522)
    f = training_flops_per_sequence(base, 128, 20)
    # 6 x 85M x 128 tokens + attention + head: ~7.0e10 per sequence
    assert 6.5e10 < f < 7.5e10
    assert peak_flops("NVIDIA H200") == 989e12 and peak_flops("some other card") is None
    assert peak_flops("NVIDIA H100 PCIe") == 756e12 and peak_flops(None) is None
    # real tokens only: two half-length samples cost less attention than one full one, and
    # padding adds nothing
    assert training_flops(base, [64, 64], 20) < 2 * training_flops_per_sequence(base, 64, 10) + 1
    assert training_flops(base, [128], 20) == training_flops_per_sequence(base, 128, 20)


def test_gpu_check_dry_run_on_cpu(tiny_data, tmp_path):
    """scripts/gpu_check.sh end to end at CPU size (GPU_CHECK_DRY=1): every command it runs on
    the H200 exists and accepts its flags; its benchmark (scripts/bench_pretrain.py through
    the real training step, each variant) writes the JSON rows and the markdown table."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT", "PYTEST_CURRENT_TEST")}
    env.update(GPU_CHECK_DRY="1", OUT=str(tmp_path / "gc"), PY=sys.executable, BENCH_DATA=str(tiny_data))
    proc = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "gc" / "bench.json").read_text())
    rows = result["rows"]
    assert [r["variant"] for r in rows] == ["hf", "lbllm", "lbllm-packed", "lbllm-dense", "lbllm-eager"]
    for r in rows:
        assert r["seq_per_s"] > 0 and r["tokens_per_s"] == pytest.approx(128 * r["seq_per_s"])
        assert r["mfu"] is None and r["model"] == "tiny" and r["seq"] == 128 and 0 <= r["data_wait_frac"] < 1
    assert set(result["speedup_vs_hf"]) == {f"tiny/128/{v}" for v in ("lbllm", "lbllm-packed", "lbllm-dense",
                                                                      "lbllm-eager")}
    assert "speedup vs hf" in (tmp_path / "gc" / "bench.txt").read_text()
    assert "| tiny | 128 | lbllm |" in (tmp_path / "gc" / "bench.md").read_text()
    assert " passed" in (tmp_path / "gc" / "exactness.txt").read_text()
    assert (tmp_path / "gc" / "optim.txt").read_text().strip()
    bad = run_cli(sys.executable, "scripts/bench_pretrain.py", "--variants", "hf,fast", "--data", tiny_data,
                  check=False)
    assert bad.returncode != 0 and "unknown --variants" in bad.stderr


def test_exact_compiled_model_trains_like_the_eager_one(tiny_data, tmp_path):
    """--compile (DeepSpeed's engine.compile): the same losses step by step, and the
    checkpoint/export names unchanged (the final HF model loads)."""
    from helpers import write_ds_config
    from lbllm.utils import read_jsonl
    from test_pretrain import pretrain

    cfg = write_ds_config(tmp_path / "ds.json", zero_optimization={"stage": 1})
    pretrain(tiny_data, tmp_path / "eager", cfg, "--max_steps", "3", "--dropout", "0")
    proc = pretrain(tiny_data, tmp_path / "compiled", cfg, "--max_steps", "3", "--dropout", "0",
                    "--compile", "aot_eager")
    assert "torch.compile: backend aot_eager" in proc.stderr
    a, b = (read_jsonl(tmp_path / d / "metrics.jsonl") for d in ("eager", "compiled"))
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5, abs=0)
    from transformers import AutoModelForPreTraining

    AutoModelForPreTraining.from_pretrained(tmp_path / "compiled" / "final")
    bad = pretrain(tiny_data, tmp_path / "bad", cfg, "--compile", "fastest", check=False)
    assert bad.returncode == 2 and "--compile fastest: not a torch.compile backend" in bad.stderr
    assert len(bad.stderr.strip().splitlines()[-1]) > 0 and not (tmp_path / "bad").exists()


def test_exact_packed_rows_give_the_unpacked_losses(tiny_data):
    """--pack_sequences: short samples share rows (block-diagonal attention, positions per
    sample, one CLS each), and the losses and gradients are the unpacked batch's."""
    from lbllm.data.packing import num_sequences, pack_batch

    ds = PretrainingDataset(tiny_data / "shards_64", tokenizer_dir=tiny_data / "tokenizer")
    lengths = sorted((int(ds.get_batch([i], epoch=0)["attention_mask"].sum()), i) for i in range(len(ds)))
    idx = [i for _, i in lengths[:6]] + [i for _, i in lengths[-2:]]  # six short samples and two full ones
    batch = ds.get_batch(idx, epoch=0)
    packed = pack_batch(batch)
    assert packed["input_ids"].shape[0] < len(idx) and num_sequences(packed) == len(idx) == num_sequences(batch)
    assert int(packed["attention_mask"].sum()) == int(batch["attention_mask"].sum())
    plain, pack = model_pair()
    a, ga = losses_and_grads(plain, {k: v.to(DEVICE) for k, v in batch.items()})
    b, gb = losses_and_grads(pack, {k: v.to(DEVICE) for k, v in packed.items()})
    assert (a.mlm_count, a.nsp_count, a.mlm_correct, a.nsp_correct) == (b.mlm_count, b.nsp_count, b.mlm_correct,
                                                                        b.nsp_correct)
    torch.testing.assert_close(b.mlm_loss_sum, a.mlm_loss_sum, rtol=1e-5, atol=0)
    torch.testing.assert_close(b.nsp_loss_sum, a.nsp_loss_sum, rtol=1e-5, atol=0)
    assert_same_grads(ga, gb, 1e-4)


def test_exact_pack_sequences_trains_like_unpacked(tiny_data, tmp_path):
    from helpers import write_ds_config
    from lbllm.utils import read_jsonl
    from test_pretrain import pretrain

    # micro-batches of 16: enough short samples to share rows
    cfg = write_ds_config(tmp_path / "ds.json", zero_optimization={"stage": 2}, train_batch_size=32,
                          train_micro_batch_size_per_gpu=16)
    for name, extra in (("plain", []), ("packed", ["--pack_sequences"])):
        pretrain(tiny_data, tmp_path / name, cfg, "--max_steps", "3", "--dropout", "0", *extra)
    a, b = (read_jsonl(tmp_path / d / "metrics.jsonl") for d in ("plain", "packed"))
    for x, y in zip(a, b):
        for key in ("loss", "mlm_loss", "nsp_loss", "mlm_acc", "nsp_acc"):
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-7), key
    # the rows were packed: less padding computed (on this data ~10% of positions are padding)
    assert sum(y["pad_fraction"] for y in b) < sum(x["pad_fraction"] for x in a)
