"""Batch-scaling readouts: steps to a target loss, and the critical-batch fit.

Shallue et al. 2018 measure data parallelism as the number of optimizer steps a run needs
to reach a target (held-out) loss, for the best learning rate at each batch size.
McCandlish et al. 2018 model the trade-off between steps S and samples E = B S at one
target as

    S = S_min (1 + B_noise / B),    E = E_min (1 + B / B_noise),    E_min = S_min B_noise,

so perfect scaling (S halves when B doubles) holds for B << B_noise and ends around it.
``fit_critical_batch`` fits S_min and B_noise to measured (B, S) pairs by least squares on
log S (every batch weighs the same, whatever its step count): for a given B_noise the best
log S_min is a mean, so the fit is a one-dimensional search over log B_noise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence


@dataclass(frozen=True)
class CriticalBatchFit:
    s_min: float  # steps needed with an infinite batch
    b_noise: float  # the batch where the steps are twice S_min
    rms_log_error: float  # root mean square of log(S_measured / S_fitted)

    @property
    def e_min(self) -> float:
        """Samples needed with a tiny batch."""
        return self.s_min * self.b_noise

    def steps(self, batch: float) -> float:
        return self.s_min * (1.0 + self.b_noise / batch)

    def samples(self, batch: float) -> float:
        return self.e_min * (1.0 + batch / self.b_noise)


def steps_to_target(rows: Iterable[dict], target: float, key: str = "eval_mlm_loss") -> tuple[int, int] | None:
    """(optimizer steps, samples) at the first logged evaluation with ``key`` <= target,
    or None when the run never reached it. The resolution is the evaluation interval."""
    for row in rows:
        value = row.get(key)
        if value is not None and value == value and value <= target:
            return int(row["step"]), int(row["samples"])
    return None


def _best_log_s_min(batches: Sequence[float], log_steps: Sequence[float], b_noise: float) -> tuple[float, float]:
    logs = [ls - math.log1p(b_noise / b) for b, ls in zip(batches, log_steps)]
    log_s_min = sum(logs) / len(logs)
    sse = sum((x - log_s_min) ** 2 for x in logs)
    return log_s_min, sse


def fit_critical_batch(batches: Sequence[float], steps: Sequence[float]) -> CriticalBatchFit:
    """Least-squares fit of S = S_min (1 + B_noise / B) in log S. Needs at least two
    distinct batch sizes; B_noise is searched between 1e-3x the smallest and 1e3x the
    largest batch (a fit on the edge means the data do not bracket the critical batch)."""
    pairs = [(float(b), float(s)) for b, s in zip(batches, steps) if s is not None]
    if len({b for b, _ in pairs}) < 2:
        raise ValueError(f"need steps at two or more batch sizes, got {pairs}")
    if any(b <= 0 or s <= 0 for b, s in pairs):
        raise ValueError(f"batches and steps must be positive, got {pairs}")
    bs, log_s = [b for b, _ in pairs], [math.log(s) for _, s in pairs]
    lo, hi = math.log(min(bs) * 1e-3), math.log(max(bs) * 1e3)

    def sse(log_b_noise: float) -> float:
        return _best_log_s_min(bs, log_s, math.exp(log_b_noise))[1]

    grid = [lo + (hi - lo) * i / 400 for i in range(401)]  # coarse, then golden-section around the best
    i = min(range(len(grid)), key=lambda k: sse(grid[k]))
    a, b = grid[max(0, i - 1)], grid[min(len(grid) - 1, i + 1)]
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(100):
        c, d = b - ratio * (b - a), a + ratio * (b - a)
        if sse(c) < sse(d):
            b = d
        else:
            a = c
    b_noise = math.exp((a + b) / 2)
    log_s_min, err = _best_log_s_min(bs, log_s, b_noise)
    return CriticalBatchFit(math.exp(log_s_min), b_noise, math.sqrt(err / len(bs)))
