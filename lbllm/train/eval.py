"""Held-out MLM evaluation: the figure every comparison in the project uses.

A training-batch loss is a moving target (each step sees other samples, a large batch
averages over more of them, the model changes during the average). The held-out set is
fixed instead: documents never trained on, masks drawn once at preparation
(`create_shards.py --heldout_fraction`, written to DATA/heldout), so two runs, two
optimizers or two batch sizes are scored on exactly the same predictions.

All ranks share the work: rank r scores a contiguous slice of the set, and one
all-reduce of six numbers (loss sums and counts, in float64) gives the totals. Under
ZeRO 3 a forward gathers parameters collectively, so every rank runs the same number of
forwards; a rank whose slice ran out scores a filler batch and discards it.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from lbllm.data import PretrainingDataset
from lbllm.model import StepStats


def slice_bounds(num_samples: int, world_size: int, rank: int) -> tuple[int, int]:
    """[lo, hi) of the samples rank `rank` scores: contiguous, sizes differ by <= 1."""
    lo = num_samples * rank // world_size
    hi = num_samples * (rank + 1) // world_size
    return lo, hi


def due(samples_before: int, samples_after: int, interval: int) -> bool:
    """Whether an evaluation falls in (samples_before, samples_after]: every `interval`
    consumed samples, wherever the step boundaries lie (batch sizes may change)."""
    return interval > 0 and samples_after // interval > samples_before // interval


@torch.no_grad()
def evaluate_mlm(engine: Any, dataset: PretrainingDataset, batch_size: int, rank: int = 0,
                 world_size: int = 1) -> dict[str, float]:
    """MLM loss / accuracy (per masked token) and NSP loss / accuracy (per sequence)
    over the whole held-out set, with dropout off; the model's train/eval mode is
    restored afterwards."""
    n = len(dataset)
    lo, hi = slice_bounds(n, world_size, rank)
    num_batches = math.ceil(math.ceil(n / world_size) / batch_size)  # the same on every rank
    module = engine.module
    was_training = module.training
    module.eval()
    totals = torch.zeros(6, dtype=torch.float64)
    try:
        for b in range(num_batches):
            idx = np.arange(lo + b * batch_size, min(hi, lo + (b + 1) * batch_size))
            real = idx.size > 0
            if not real:
                idx = np.arange(min(batch_size, n))  # filler: keeps the collective forwards in step
            batch = dataset.get_batch(idx)
            out = engine(**{k: v.to(engine.device) for k, v in batch.items()})
            if real:
                totals += out.as_vector().double().cpu()
    finally:
        module.train(was_training)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(totals)  # one small all-reduce; a host sync point
    stats = StepStats.from_vector(totals)
    return {**stats.metrics(prefix="eval_"), "eval_samples": int(stats.nsp_count)}
