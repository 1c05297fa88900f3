"""Global batch size over training, and the noise scales that say whether it is a good one.

Batch-size ramp, Smith et al. 2018 ("Don't Decay the Learning Rate, Increase the Batch
Size"): where one would divide the LR by k, multiply the batch by k instead; the SGD noise
scale g = lr N / (B (1 - m)) falls the same way, with k times fewer updates. Config (a
top-level project section of the DeepSpeed JSON, removed before DeepSpeed sees it):

    "batch_schedule": {"milestones": [[0, 256], [100, 512], [200, 1024]]}

A milestone [s, B] means: once s optimizer steps are done, the global batch is B, i.e.
B is the batch of 1-based steps s + 1, s + 2, ... until the next milestone. The first
milestone is [0, B0] (the batch of step 1). Milestones are in steps, not samples, because
the LR schedule is a function of the step too; `samples_before` / `step_for_samples`
convert between the two for resume and for plotting against samples.

Noise scales:
- `sgd_noise_scale`: Smith et al.'s g = lr * N / (B * (1 - m)).
- `GradientNoiseScale`: McCandlish et al. 2018 ("An Empirical Model of Large-Batch
  Training") B_simple = tr(Sigma) / |G|^2, estimated from squared norms of mean gradients
  at two batch sizes (appendix A.1). Data-parallel training has both for free: a
  per-rank micro-batch gradient (small) and the all-reduced global-batch gradient (big).
  B_simple is the critical-batch estimate: much larger batches waste samples, much
  smaller ones waste steps.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

from lbllm.schedules.lr import ScheduleError, _is_int


@dataclass(frozen=True)
class BatchSchedule:
    """Global batch per optimizer step: ((start_after_steps, batch), ...), first start 0."""

    milestones: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        key = "batch_schedule.milestones"
        example = "[[0, 256], [100, 512]]"
        if not isinstance(self.milestones, (list, tuple)) or not self.milestones:
            raise ScheduleError(f"{key}={self.milestones!r}: must be a non-empty list of [step, global_batch] "
                                f"pairs, e.g. {example}")
        pairs = []
        for i, m in enumerate(self.milestones):
            if not (isinstance(m, (list, tuple)) and len(m) == 2 and all(_is_int(v) for v in m)):
                raise ScheduleError(f"{key}[{i}]={m!r}: must be a pair of integers [step, global_batch], "
                                    f"e.g. {example}")
            step, batch = m
            if batch <= 0:
                raise ScheduleError(f"{key}[{i}]={list(m)}: global batch must be > 0")
            if i == 0 and step != 0:
                raise ScheduleError(f"{key}[0]={list(m)}: the first milestone must be at step 0 (the batch of "
                                    f"the first step), e.g. [0, {batch}]")
            if i > 0 and step <= pairs[-1][0]:
                raise ScheduleError(f"{key}[{i}]={list(m)}: steps must increase (previous milestone is at step "
                                    f"{pairs[-1][0]})")
            pairs.append((step, batch))
        object.__setattr__(self, "milestones", tuple(pairs))

    @classmethod
    def constant(cls, batch: int) -> "BatchSchedule":
        """The same global batch at every step (a run without a batch_schedule section)."""
        return cls(((0, batch),))

    @property
    def _starts(self) -> list[int]:
        return [s for s, _ in self.milestones]

    @property
    def max_batch(self) -> int:
        return max(b for _, b in self.milestones)

    def batch_at(self, step: int) -> int:
        """Global batch of 1-based optimizer step `step`."""
        if not _is_int(step) or step < 1:
            raise ValueError(f"step {step!r}: optimizer steps are 1-based")
        i = bisect.bisect_right(self._starts, step - 1) - 1
        return self.milestones[i][1]

    def samples_before(self, step: int) -> int:
        """Samples consumed by steps 1 .. step - 1 (the data position at which `step` starts)."""
        if not _is_int(step) or step < 1:
            raise ValueError(f"step {step!r}: optimizer steps are 1-based")
        done = step - 1
        total = 0
        for i, (start, batch) in enumerate(self.milestones):
            end = self.milestones[i + 1][0] if i + 1 < len(self.milestones) else done
            total += batch * max(0, min(done, end) - start)
        return total

    def step_for_samples(self, consumed: int) -> int:
        """The 1-based step that starts after `consumed` samples: samples_before(result) == consumed.

        `consumed` must fall on a step boundary (exact resume); otherwise an error names
        the nearest boundaries.
        """
        if not _is_int(consumed) or consumed < 0:
            raise ScheduleError(f"consumed samples {consumed!r}: must be an integer >= 0")
        at = 0  # samples consumed when segment i starts
        for i, (start, batch) in enumerate(self.milestones):
            last = i + 1 == len(self.milestones)
            seg = None if last else batch * (self.milestones[i + 1][0] - start)
            if last or consumed < at + seg:
                done, rest = divmod(consumed - at, batch)
                if rest:
                    lo, hi = at + done * batch, at + (done + 1) * batch
                    raise ScheduleError(f"consumed samples {consumed}: not at a step boundary of the batch schedule "
                                        f"(steps of {batch} here; nearest boundaries {lo} and {hi})")
                return start + done + 1
            at += seg
        raise AssertionError("unreachable")  # pragma: no cover

    def validate(self, micro_batch_size: int, world_size: int, source: str) -> None:
        """Every batch must be micro x accumulation x world for a whole accumulation count."""
        unit = micro_batch_size * world_size
        for i, (step, batch) in enumerate(self.milestones):
            if batch % unit:
                lo, hi = (batch // unit) * unit, (batch // unit + 1) * unit
                nearest = f"{lo} or {hi}" if lo > 0 else f"{hi}"
                raise ScheduleError(
                    f"{source}: batch_schedule.milestones[{i}]=[{step}, {batch}]: global batch {batch} is not a "
                    f"multiple of train_micro_batch_size_per_gpu x world size = {micro_batch_size} x {world_size} = "
                    f"{unit}; use {nearest}")

    def describe(self) -> str:
        return ", ".join(f"batch {b} from step {s + 1}" for s, b in self.milestones)


def parse_batch_schedule(section: dict | None, source: str) -> BatchSchedule | None:
    """The `batch_schedule` section of a config, validated; None when the section is absent."""
    if section is None:
        return None
    try:
        if not isinstance(section, dict):
            raise ScheduleError(f"batch_schedule must be a JSON object like "
                                f'{{"milestones": [[0, 256], [100, 512]]}}, got {type(section).__name__}')
        unknown = sorted(set(section) - {"milestones"})
        if unknown:
            raise ScheduleError(f"batch_schedule has unknown key(s) {', '.join(unknown)}; valid keys: milestones")
        if "milestones" not in section:
            raise ScheduleError("batch_schedule.milestones is required, e.g. [[0, 256], [100, 512]]")
        return BatchSchedule(section["milestones"])
    except ScheduleError as exc:
        raise ScheduleError(f"{source}: {exc}") from None


def sgd_noise_scale(lr: float, dataset_size: int, batch: int, momentum: float = 0.0) -> float:
    """Smith et al. 2018: g = lr * N / (B * (1 - m)). Use m = 0 for Adam-type optimizers."""
    if not batch > 0 or not dataset_size > 0:
        raise ValueError(f"batch={batch}, dataset_size={dataset_size}: both must be > 0")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum={momentum}: must be in [0, 1)")
    return lr * dataset_size / (batch * (1.0 - momentum))


class GradientNoiseScale:
    """McCandlish et al. 2018's B_simple = tr(Sigma) / |G|^2 from two batch sizes (appendix A.1).

    For mean gradients over b examples, E|G_b|^2 = |G|^2 + tr(Sigma) / b. Two batch sizes
    b_small < b_big give unbiased estimates per measurement:
        |G|^2 ~ (b_big |G_big|^2 - b_small |G_small|^2) / (b_big - b_small)
        S     ~ (|G_small|^2 - |G_big|^2) / (1 / b_small - 1 / b_big)
    Each is noisy, so each is averaged with its own exponential moving average (bias
    corrected as in Adam), and B_simple = EMA(S) / EMA(|G|^2): the ratio of averages, not
    the average of ratios, which would be biased. `sqnorm_small` may be the mean of
    several small-batch squared norms (e.g. over ranks and accumulation micro-steps).
    B_simple is in the units of b (sequences, or tokens if the gradients are per-token means).
    """

    def __init__(self, ema_decay: float = 0.95) -> None:
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay={ema_decay}: must be in [0, 1)")
        self.ema_decay = ema_decay
        self.count = 0
        self._g2 = 0.0
        self._s = 0.0

    @staticmethod
    def estimates(b_small: float, sqnorm_small: float, b_big: float, sqnorm_big: float) -> tuple[float, float]:
        """One measurement's unbiased (|G|^2, tr(Sigma)) estimates."""
        if not 0 < b_small < b_big:
            raise ValueError(f"b_small={b_small}, b_big={b_big}: need 0 < b_small < b_big")
        sqnorm_small, sqnorm_big = float(sqnorm_small), float(sqnorm_big)  # also 0-d tensors
        for name, v in (("sqnorm_small", sqnorm_small), ("sqnorm_big", sqnorm_big)):
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name}={v!r}: must be a finite number >= 0")
        g2 = (b_big * sqnorm_big - b_small * sqnorm_small) / (b_big - b_small)
        s = (sqnorm_small - sqnorm_big) / (1.0 / b_small - 1.0 / b_big)
        return g2, s

    def update(self, b_small: float, sqnorm_small: float, b_big: float, sqnorm_big: float) -> float | None:
        """Add one measurement; returns the current `b_simple`."""
        g2, s = self.estimates(b_small, sqnorm_small, b_big, sqnorm_big)
        beta = self.ema_decay
        self._g2 = beta * self._g2 + (1.0 - beta) * g2
        self._s = beta * self._s + (1.0 - beta) * s
        self.count += 1
        return self.b_simple

    def _corrected(self, value: float) -> float | None:
        if self.count == 0:
            return None
        return value / (1.0 - self.ema_decay ** self.count)

    @property
    def grad_sqnorm(self) -> float | None:
        """Smoothed estimate of |G|^2 (None before the first measurement)."""
        return self._corrected(self._g2)

    @property
    def trace_cov(self) -> float | None:
        """Smoothed estimate of tr(Sigma), the per-example gradient variance (None before the first)."""
        return self._corrected(self._s)

    @property
    def b_simple(self) -> float | None:
        """tr(Sigma) / |G|^2, or None before the first measurement or while the |G|^2 estimate is <= 0."""
        if self.count == 0 or self._g2 <= 0:
            return None
        return self._s / self._g2  # the bias corrections cancel in the ratio

    def state_dict(self) -> dict:
        return {"ema_decay": self.ema_decay, "count": self.count, "g2": self._g2, "s": self._s}

    def load_state_dict(self, state: dict) -> None:
        self.ema_decay, self.count = float(state["ema_decay"]), int(state["count"])
        self._g2, self._s = float(state["g2"]), float(state["s"])
