"""Learning-rate schedules: warmup then decay, as pure functions of the optimizer step.

- Linear ("gradual") warmup, Goyal et al. 2017 sec. 2.2: the LR climbs linearly from
  lr/W to lr over the first W steps, avoiding the early instability of a large LR.
- Polynomial decay, You et al. 2020: lr_t = lr * (1 - t/T)^p after warmup; p = 1 is the
  paper's linear decay, NVIDIA's BERT recipe uses p = 0.5. Here t counts from the end of
  warmup, so the LR is continuous at the switch (NVIDIA's variant measures progress from
  step 0 and drops at the end of warmup).

Step numbers are 1-based optimizer steps: `lr_at(1)` is the LR of the first update.
The `scheduler.type` of a DeepSpeed config picks a schedule from `SCHEDULES`; any other
type is left to DeepSpeed's own schedules.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


class ScheduleError(ValueError):
    """A scheduler section that cannot be used."""


@dataclass(frozen=True)
class WarmupPolyDecay:
    """Linear warmup over `warmup_num_steps`, then (1 - progress)^power down to `min_lr_ratio`."""

    total_num_steps: int
    warmup_num_steps: int = 0
    power: float = 1.0
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.total_num_steps <= 0:
            raise ScheduleError(f"scheduler.params.total_num_steps={self.total_num_steps}: must be > 0")
        if not 0 <= self.warmup_num_steps <= self.total_num_steps:
            raise ScheduleError(
                f"scheduler.params.warmup_num_steps={self.warmup_num_steps}: must be in [0, total_num_steps={self.total_num_steps}]"
            )
        if self.power < 0:
            raise ScheduleError(f"scheduler.params.power={self.power}: must be >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ScheduleError(f"scheduler.params.min_lr_ratio={self.min_lr_ratio}: must be in [0, 1]")

    def factor(self, step: int) -> float:
        """Multiplier of the peak LR for 1-based optimizer step `step`."""
        if step <= self.warmup_num_steps:
            return step / self.warmup_num_steps
        decay_steps = self.total_num_steps - self.warmup_num_steps
        progress = min(1.0, (step - self.warmup_num_steps) / decay_steps)
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * (1.0 - progress) ** self.power


SCHEDULES: dict[str, type] = {
    "WarmupPolyDecay": WarmupPolyDecay,
}


def list_schedules() -> list[str]:
    return sorted(SCHEDULES)


def is_project_schedule(name: str) -> bool:
    return name in SCHEDULES


def build_scheduler(name: str, params: dict) -> Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LambdaLR]:
    """A factory `optimizer -> LambdaLR` for the named schedule.

    DeepSpeed calls the factory with the optimizer it finally uses (the ZeRO wrapper), so
    the LR lands in the param groups that are really stepped. LambdaLR's counter is the
    number of completed steps k, so the LR set for the next update is factor(k + 1).
    """
    if name not in SCHEDULES:
        raise ScheduleError(f"scheduler.type {name!r}: not a project schedule ({', '.join(list_schedules())})")
    cls = SCHEDULES[name]
    try:
        schedule = cls(**params)
    except TypeError as exc:
        valid = ", ".join(cls.__dataclass_fields__)
        raise ScheduleError(f"scheduler.params for {name}: {exc}; valid keys: {valid}") from None

    def factory(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: schedule.factor(k + 1))

    factory.schedule = schedule  # type: ignore[attr-defined]
    return factory
