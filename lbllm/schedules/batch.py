"""Global batch size over training (the noise scales that say whether it is a good one
are measured by lbllm.train.telemetry).

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
"""
from __future__ import annotations

import bisect
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
