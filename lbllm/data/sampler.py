"""Global-batch sampler: one shuffle per epoch shared by all workers, resumable.

Goyal et al. 2017 ("Accurate, Large Minibatch SGD"), remark 4: with k workers, use a
single random shuffle of the training set per epoch and divide it among the workers,
rather than shuffling per worker. Here the epoch's permutation is cut into global
batches of B samples; global step t takes permutation positions [t*B, (t+1)*B), and
within it accumulation micro-step a on rank r takes the micro-batch starting at
``(a * world + r) * micro``. Hence the samples of a global step -- and so the update,
since the loss is normalized by the whole batch -- are the same whatever the split
into world size x accumulation x micro-batch, and a run can resume on a different
number of GPUs and see exactly the global batches it would have seen.

The permutation is a keyed bijection on [0, N) (a Feistel network with cycle walking,
``FeistelPermutation``) evaluated only at the positions a rank needs: no O(N) array is
built at start or per epoch, which matters at billions of samples times many ranks.
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np

def _mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64 finalizer: a fast 64-bit avalanche (uint64 arithmetic wraps)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class FeistelPermutation:
    """A pseudo-random permutation of [0, n) keyed by ``key`` (any ints).

    A balanced Feistel network on 2h bits (4^h >= n) is a bijection on [0, 4^h) for any
    round function; positions that land outside [0, n) are fed through again ("cycle
    walking") until they land inside, which restricts the bijection to [0, n). Since
    4^h < 4n, fewer than four passes are needed on average. Vectorized over positions."""

    def __init__(self, n: int, key: Any, rounds: int = 6):
        if n < 1:
            raise ValueError(f"permutation of {n} elements")
        self.n = int(n)
        self.half_bits = max(1, (int(n - 1).bit_length() + 1) // 2)
        self._half_mask = np.uint64((1 << self.half_bits) - 1)
        self._keys = np.random.SeedSequence(key).generate_state(rounds, dtype=np.uint64)

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        h = np.uint64(self.half_bits)
        left, right = x >> h, x & self._half_mask
        for k in self._keys:
            left, right = right, left ^ (_mix64(right ^ k) & self._half_mask)
        return (left << h) | right

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        x = np.asarray(positions, dtype=np.int64)
        if x.size and (x.min() < 0 or x.max() >= self.n):
            raise IndexError(f"positions outside [0, {self.n})")
        y = self._encrypt(x.astype(np.uint64))
        out = y >= np.uint64(self.n)
        while out.any():
            y[out] = self._encrypt(y[out])
            out[out] = y[out] >= np.uint64(self.n)
        return y.astype(np.int64)


class GlobalBatchSampler:
    """Yields this rank's micro-batches (int64 index arrays), forever, epoch after epoch.

    Per global step every rank yields ``gradient_accumulation_steps`` micro-batches of
    ``micro_batch_size`` indices. Each epoch has ``num_samples // global_batch_size``
    steps; the tail that does not fill a global batch is dropped for that epoch (it is
    a different tail every epoch). ``consumed_samples`` counts samples of completed
    global steps and is updated as the last micro-batch of a step is handed out, so a
    checkpoint taken after the optimizer step resumes at the next step.

    One live iterator per sampler: iterating advances the sampler's own state."""

    def __init__(
        self,
        num_samples: int,
        global_batch_size: int,
        micro_batch_size: int,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        consumed_samples: int = 0,
    ):
        if num_samples < 1:
            raise ValueError(f"num_samples {num_samples}: the dataset is empty")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} of world_size {world_size}: need 0 <= rank < world_size")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size {micro_batch_size}: must be >= 1")
        if seed < 0:
            raise ValueError(f"seed {seed}: must be >= 0")
        self.num_samples = int(num_samples)
        self.micro_batch_size = int(micro_batch_size)
        self.world_size = int(world_size)
        self.rank = int(rank)
        self.seed = int(seed)
        self._set_batch(global_batch_size)
        if consumed_samples < 0 or consumed_samples % self.global_batch_size:
            raise ValueError(
                f"consumed_samples {consumed_samples}: must be a non-negative multiple of the global batch size "
                f"{self.global_batch_size} (resume at a global-step boundary)"
            )
        self.consumed_samples = int(consumed_samples)
        per_epoch = self.steps_per_epoch * self.global_batch_size
        self.epoch = self.consumed_samples // per_epoch
        self._epoch_offset = self.consumed_samples % per_epoch  # permutation position of the next step
        self._mid_step = False
        self._perm: FeistelPermutation | None = None
        self._perm_epoch = -1

    def _set_batch(self, global_batch_size: int) -> None:
        per_pass = self.micro_batch_size * self.world_size
        if global_batch_size < 1 or global_batch_size % per_pass:
            raise ValueError(
                f"global batch {global_batch_size} is not micro batch {self.micro_batch_size} x world size "
                f"{self.world_size} x an integer number of accumulation steps"
            )
        if self.num_samples // global_batch_size == 0:
            raise ValueError(
                f"global batch {global_batch_size} is larger than the dataset ({self.num_samples} samples): "
                "no full step per epoch"
            )
        self.global_batch_size = int(global_batch_size)
        self.gradient_accumulation_steps = global_batch_size // per_pass

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch_size

    def set_global_batch_size(self, global_batch_size: int) -> None:
        """Change B between global steps (batch ramps, Smith et al. 2018). The current
        epoch continues from where it is; its tail is whatever no longer fits a step."""
        if self._mid_step:
            raise RuntimeError("set_global_batch_size: only between global steps, not inside one")
        self._set_batch(global_batch_size)

    def permutation(self, epoch: int) -> FeistelPermutation:
        """The shuffle of ``epoch``, a function of (seed, epoch) only."""
        return FeistelPermutation(self.num_samples, [self.seed, epoch])

    def global_batch(self, epoch: int, offset: int) -> np.ndarray:
        """All B indices of the global step starting at permutation position ``offset``."""
        return self.permutation(epoch)(np.arange(offset, offset + self.global_batch_size))

    def __iter__(self) -> Iterator[np.ndarray]:
        while True:
            if self._epoch_offset + self.global_batch_size > self.num_samples:
                self.epoch += 1  # drop the tail
                self._epoch_offset = 0
            if self._perm_epoch != self.epoch:
                self._perm, self._perm_epoch = self.permutation(self.epoch), self.epoch
            base, micro = self._epoch_offset, self.micro_batch_size
            steps = self.gradient_accumulation_steps
            for a in range(steps):
                start = base + (a * self.world_size + self.rank) * micro
                batch = self._perm(np.arange(start, start + micro))
                if a == steps - 1:
                    self._epoch_offset = base + self.global_batch_size
                    self.consumed_samples += self.global_batch_size
                    self._mid_step = False
                else:
                    self._mid_step = True
                yield batch

    def state_dict(self) -> dict[str, int]:
        """Exact position, also after batch-size changes (where ``consumed_samples``
        alone no longer determines the epoch)."""
        if self._mid_step:
            raise RuntimeError("state_dict: only between global steps")
        return {
            "num_samples": self.num_samples,
            "seed": self.seed,
            "epoch": self.epoch,
            "epoch_offset": self._epoch_offset,
            "consumed_samples": self.consumed_samples,
            "global_batch_size": self.global_batch_size,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["num_samples"] != self.num_samples or state["seed"] != self.seed:
            raise ValueError(
                f"sampler state is for {state['num_samples']} samples / seed {state['seed']}, "
                f"this sampler has {self.num_samples} / {self.seed}"
            )
        self._set_batch(int(state["global_batch_size"]))
        self.epoch = int(state["epoch"])
        self._epoch_offset = int(state["epoch_offset"])
        self.consumed_samples = int(state["consumed_samples"])
        self._mid_step = False
