"""Exact global-batch loss normalization (Goyal et al. 2017, remark 3).

The MLM loss of a step is the sum of token losses over every masked token of the whole
global batch divided by their number, and NSP likewise per sequence, however the batch is
split into ranks x accumulation steps x micro-batches. Three splits of the same global
batch of 16 (world 1 x accumulation 8 x micro 2; world 2 x 4 x 2; world 2 x 1 x 8) must
give the same weights after two steps (fp32, dropout 0, same seed and data; micro-batches
hold different numbers of masked tokens). The control: averaging per-micro-batch means
(NVIDIA's recipe, --loss_normalization micro) does depend on the split.
"""
from __future__ import annotations

import sys

import pytest
import torch
from safetensors.torch import load_file

from helpers import deepspeed_cmd, run_cli, write_ds_config

GLOBAL = 16
# label -> (world size, micro-batch size); accumulation = GLOBAL / (world x micro)
SPLITS = {"w1-acc8-mb2": (1, 2), "w2-acc4-mb2": (2, 2), "w2-acc1-mb8": (2, 8)}


def train(data, tmp_path, label: str, normalization: str) -> dict[str, torch.Tensor]:
    world, micro = SPLITS[label]
    cfg = write_ds_config(
        tmp_path / f"{label}-{normalization}.json", train_batch_size=GLOBAL, train_micro_batch_size_per_gpu=micro,
        # LARS: the update direction follows the gradient (Adam's first step is nearly sign(g)).
        optimizer={"type": "LARS", "params": {"lr": 0.5, "momentum": 0.9, "weight_decay": 0.01}},
        scheduler={"type": "WarmupPolyDecay", "params": {"warmup_num_steps": 0, "total_num_steps": 4}},
        gradient_clipping=0.0)
    out = tmp_path / f"{label}-{normalization}"
    launcher = deepspeed_cmd(world) if world > 1 else [sys.executable]
    run_cli(*launcher, "pretrain_bert.py", "--deepspeed_config", cfg, "--data_dir", data / "shards_64",
            "--output_dir", out, "--model_config", "tiny", "--seed", "5", "--dropout", "0", "--max_steps", "2",
            "--loss_normalization", normalization)
    return load_file(str(out / "final" / "model.safetensors"))


def max_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    # Attention key biases are left out: softmax is invariant to them, so their gradient is
    # exactly 0 in exact arithmetic and only rounding noise (~1e-9) in fp32, which LARS's
    # per-layer normalization g / ||g|| turns into a full-size step in a random direction.
    keys = [k for k in b if not k.endswith("attention.self.key.bias")]
    assert len(keys) > 20
    return max(((a[k] - b[k]).norm() / b[k].norm().clamp(min=1e-12)).item() for k in keys)


def test_masked_token_counts_differ_between_micro_batches(tiny_data):
    from lbllm.data import PretrainingDataset

    ds = PretrainingDataset(tiny_data / "shards_64")
    counts = {int(ds.get_batch(list(range(i, i + 2)))["masked_lm_weights"].sum()) for i in range(0, 32, 2)}
    assert len(counts) > 1  # otherwise every normalization would agree and the test proves nothing


@pytest.mark.parametrize("normalization", ["global", "micro"])
def test_step_is_independent_of_the_split(tiny_data, tmp_path, normalization):
    weights = {label: train(tiny_data, tmp_path, label, normalization)
               for label in (SPLITS if normalization == "global" else ("w1-acc8-mb2", "w2-acc1-mb8"))}
    ref = weights["w1-acc8-mb2"]
    diffs = {label: max_rel_diff(w, ref) for label, w in weights.items() if label != "w1-acc8-mb2"}
    print(normalization, diffs)
    if normalization == "global":
        assert all(d < 1e-6 for d in diffs.values()), diffs
    else:  # control: the mean of micro-batch means weights tokens by their micro-batch
        assert all(d > 1e-4 for d in diffs.values()), diffs
