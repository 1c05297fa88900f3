"""LR scaling rules: the peak LR for a global batch, from a reference (base_lr at base_batch).

- "linear", Goyal et al. 2017: k times the batch, k times the LR:
  lr = base_lr * batch / base_batch.
- "sqrt", You et al. 2020 (LAMB): lr = base_lr * sqrt(batch / base_batch), which keeps
  the variance of the update roughly constant for Adam-type optimizers.
- "none": lr = base_lr at any batch.

Config: a top-level project section of the DeepSpeed JSON (removed before DeepSpeed sees it)
    "lr_scaling": {"rule": "sqrt", "base_lr": 1e-4, "base_batch": 256}
`rule` defaults to "linear"; `base_lr` and `base_batch` are required.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

from lbllm.schedules.lr import ScheduleError, _is_int, _is_number

RULES = ("linear", "sqrt", "none")


def _ratio(base_batch: int, batch: int, rule: str) -> float:
    if rule == "linear":
        return batch / base_batch
    if rule == "sqrt":
        return math.sqrt(batch / base_batch)
    return 1.0


def scale_lr(base_lr: float, base_batch: int, batch: int, rule: str) -> float:
    """The LR for global batch `batch` under `rule`, given `base_lr` at `base_batch`."""
    return LRScaling(base_lr, base_batch, rule).lr_for(batch)


@dataclass(frozen=True)
class LRScaling:
    """A reference point (base_lr at base_batch) and a rule that carries it to other batches."""

    base_lr: float
    base_batch: int
    rule: str = "linear"

    def __post_init__(self) -> None:
        if not _is_number(self.base_lr) or not self.base_lr > 0:
            raise ScheduleError(f"lr_scaling.base_lr={self.base_lr!r}: must be a number > 0 "
                                "(the LR tuned at base_batch)")
        if not _is_int(self.base_batch) or self.base_batch <= 0:
            raise ScheduleError(f"lr_scaling.base_batch={self.base_batch!r}: must be an integer > 0 "
                                "(the global batch at which base_lr was tuned)")
        if self.rule not in RULES:
            raise ScheduleError(f"lr_scaling.rule={self.rule!r}: must be one of {', '.join(RULES)}")

    def ratio(self, batch: int) -> float:
        """lr_for(batch) / base_lr: the multiplier the rule gives this batch."""
        if not _is_int(batch) or batch <= 0:
            raise ScheduleError(f"global batch {batch!r}: must be an integer > 0")
        return _ratio(self.base_batch, batch, self.rule)

    def lr_for(self, batch: int) -> float:
        return self.base_lr * self.ratio(batch)

    def describe(self, batch: int) -> str:
        """One line for the start-up log, e.g. 'lr 0.0016 = 0.0001 x sqrt(65536/256) [sqrt rule]'."""
        lr = self.lr_for(batch)
        how = {"linear": f"{batch}/{self.base_batch}", "sqrt": f"sqrt({batch}/{self.base_batch})"}.get(self.rule)
        if how is None:
            return f"lr {lr:.6g} = {self.base_lr:g}, not scaled from batch {self.base_batch} to {batch} [none rule]"
        return f"lr {lr:.6g} = {self.base_lr:g} x {how} [{self.rule} rule]"


def parse_lr_scaling(section: dict | None, source: str) -> LRScaling | None:
    """The `lr_scaling` section of a config, validated; None when the section is absent."""
    if section is None:
        return None
    valid = [f.name for f in fields(LRScaling)]
    try:
        if not isinstance(section, dict):
            raise ScheduleError(f"lr_scaling must be a JSON object like "
                                f'{{"rule": "sqrt", "base_lr": 1e-4, "base_batch": 256}}, got {type(section).__name__}')
        unknown = sorted(set(section) - set(valid))
        if unknown:
            raise ScheduleError(f"lr_scaling has unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(valid)}")
        for key in ("base_lr", "base_batch"):
            if key not in section:
                raise ScheduleError(f"lr_scaling.{key} is required (valid keys: {', '.join(valid)})")
        return LRScaling(**section)
    except ScheduleError as exc:
        raise ScheduleError(f"{source}: {exc}") from None
