"""This rank's micro-batches for each optimizer step, fetched one step ahead.

While step k computes, a background thread reads and masks step k+1's samples (the
sampler, the shard reader and the masking are numpy work that releases the GIL for most
of its time), so the data never waits on compute. On CUDA the batches are put in pinned
memory, so the copy to the device can be asynchronous.

The order of every sampler call is exactly that of fetching synchronously (one step at a
time, in step order, on one thread), so batches, masks and the sampler state are
bit-identical to a loop without prefetch. Because the sampler runs one step ahead, each
`StepBatch` carries the sampler state as it was right after its own step: that, not the
live sampler, is what a checkpoint after that step saves.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch

from lbllm.data import GlobalBatchSampler, PretrainingDataset
from lbllm.data.packing import pack_batch


@dataclass
class StepBatch:
    step: int  # the 1-based optimizer step these micro-batches feed
    global_batch_size: int
    micro: list[dict[str, torch.Tensor]]  # this rank's gradient-accumulation micro-batches
    sampler_state: dict  # the sampler right after this step: what a checkpoint stores

    @property
    def epoch(self) -> int:
        """The sampler's epoch after this step's indices."""
        return int(self.sampler_state["epoch"])


class StepLoader:
    """`next_step()` returns the StepBatch of steps first_step, first_step + 1, ...
    `batch_size_at(step)` gives each step's global batch (a batch ramp, or a constant)."""

    def __init__(self, dataset: PretrainingDataset, sampler: GlobalBatchSampler,
                 batch_size_at: Callable[[int], int], first_step: int, last_step: int,
                 pin_memory: bool = False, prefetch: bool = True, pack: bool = False) -> None:
        self.dataset, self.sampler = dataset, sampler
        self.batch_size_at = batch_size_at
        self.last_step = last_step
        self.pin_memory = pin_memory
        self.pack = pack  # several short samples per row (lbllm/data/packing.py)
        self._indices = iter(sampler)
        self._next = first_step
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lbllm-prefetch") if prefetch else None
        self._pending: Future | None = None
        self._schedule()

    def _fetch(self, step: int) -> StepBatch:
        batch_size = self.batch_size_at(step)
        if batch_size != self.sampler.global_batch_size:
            # Smith et al. 2018: a larger batch through more accumulation steps; the
            # sampler continues the same epoch permutation with the new step size.
            self.sampler.set_global_batch_size(batch_size)
        micro = []
        for _ in range(self.sampler.gradient_accumulation_steps):
            indices = next(self._indices)
            batch = self.dataset.get_batch(indices, epoch=self.sampler.epoch)  # masks depend on the epoch
            if self.pack:
                batch = pack_batch(batch)
            micro.append({k: v.pin_memory() for k, v in batch.items()} if self.pin_memory else batch)
        return StepBatch(step, batch_size, micro, self.sampler.state_dict())

    def _schedule(self) -> None:
        ahead = self._pool is not None and self._next <= self.last_step
        self._pending = self._pool.submit(self._fetch, self._next) if ahead else None

    def next_step(self) -> StepBatch:
        if self._next > self.last_step:
            raise StopIteration(f"no step after {self.last_step}")
        result = self._pending.result() if self._pending is not None else self._fetch(self._next)
        self._next += 1
        self._schedule()
        return result

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
