"""Learning-rate schedules: warmup then decay, as pure functions of the optimizer step.

Warmup (the first W = `warmup_num_steps` updates):
- "linear" (gradual), Goyal et al. 2017 sec. 2.2: the factor climbs linearly from
  `warmup_factor` (its value at step 0, before the first update; default 0) to 1 at step
  W, so step t gets f0 + (1 - f0) * t / W. With f0 = 0 that is t / W, the first update
  already moves (lr / W) and there is no jump at the switch.
- "constant", Goyal et al. 2017 sec. 2.2: the factor is `warmup_factor` (e.g. 0.1, or
  lr_small / lr: the small-batch LR before linear scaling) for steps 1..W, then the
  schedule jumps to 1 at step W + 1. `warmup_factor` has no default here.

Decay (steps W + 1 .. T, T = `total_num_steps`; progress p = (t - W) / (T - W), capped at 1):
- "poly", You et al. 2020: min + (1 - min) * (1 - p)^power; power 1 is the paper's linear
  decay, NVIDIA's BERT recipe uses 0.5. Progress counts from the end of warmup, so the LR
  is continuous after a linear warmup (NVIDIA measures from step 0 and drops at the switch).
- "cosine" (Loshchilov & Hutter 2017, no restarts): min + (1 - min) * (1 + cos(pi p)) / 2.
- "none": 1 after warmup (the constant LR of Smith et al. 2018, who raise the batch instead).
Past T every decay stays at its floor `min_lr_ratio` (a ratio of the peak LR).

Step numbers are 1-based optimizer steps: `factor(1)` multiplies the LR of the first
update. The `scheduler.type` of a DeepSpeed config picks a record from `SCHEDULES` (its
params are the dataclass fields); any other type is left to DeepSpeed's own schedules.
Named variants are records with fixed fields, not copies of the class.
"""
from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Callable

import torch

from lbllm.utils import UserError


class ScheduleError(UserError):
    """A scheduler / lr_scaling / batch_schedule section that cannot be used."""


WARMUP_TYPES = ("linear", "constant")
DECAYS = ("poly", "cosine", "none")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class WarmupDecay:
    """Warmup over `warmup_num_steps` ("linear" or "constant"), then "poly", "cosine" or no decay.

    Multiplies the optimizer's peak LR (`optimizer.params.lr`); see the module docstring
    for the formulas. `warmup_factor=None` means 0 for linear warmup and is an error for
    constant warmup.
    """

    total_num_steps: int
    warmup_num_steps: int = 0
    warmup_type: str = "linear"
    warmup_factor: float | None = None
    decay: str = "poly"
    power: float = 1.0
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        key = "scheduler.params."
        if not _is_int(self.total_num_steps) or self.total_num_steps <= 0:
            raise ScheduleError(f"{key}total_num_steps={self.total_num_steps!r}: must be an integer > 0 "
                                "(the number of optimizer steps the schedule spans)")
        if not _is_int(self.warmup_num_steps) or not 0 <= self.warmup_num_steps <= self.total_num_steps:
            raise ScheduleError(f"{key}warmup_num_steps={self.warmup_num_steps!r}: must be an integer in "
                                f"[0, total_num_steps={self.total_num_steps}]")
        if self.warmup_type not in WARMUP_TYPES:
            raise ScheduleError(f"{key}warmup_type={self.warmup_type!r}: must be one of {', '.join(WARMUP_TYPES)}")
        if self.decay not in DECAYS:
            raise ScheduleError(f"{key}decay={self.decay!r}: must be one of {', '.join(DECAYS)}")
        if self.warmup_factor is None:
            if self.warmup_type == "constant":
                raise ScheduleError(f"{key}warmup_factor is required for warmup_type 'constant': the LR multiplier "
                                    "during warmup, e.g. 0.1 or lr_small / lr")
            object.__setattr__(self, "warmup_factor", 0.0)
        f0 = self.warmup_factor
        low_ok = _is_number(f0) and (f0 > 0 if self.warmup_type == "constant" else f0 >= 0)
        if not (low_ok and f0 <= 1):
            bound = "(0, 1]" if self.warmup_type == "constant" else "[0, 1]"
            raise ScheduleError(f"{key}warmup_factor={self.warmup_factor!r}: must be a number in {bound} "
                                f"for warmup_type {self.warmup_type!r}")
        if not _is_number(self.power) or self.power < 0:
            raise ScheduleError(f"{key}power={self.power!r}: must be a number >= 0")
        if self.decay != "poly" and self.power != 1.0:
            raise ScheduleError(f"{key}power={self.power!r} applies to decay 'poly' only (decay is {self.decay!r}); "
                                "remove it or use decay 'poly'")
        if not _is_number(self.min_lr_ratio) or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ScheduleError(f"{key}min_lr_ratio={self.min_lr_ratio!r}: must be a number in [0, 1]")
        if self.decay == "none" and self.min_lr_ratio != 0.0:
            raise ScheduleError(f"{key}min_lr_ratio={self.min_lr_ratio!r} has no effect with decay 'none'; "
                                "remove it or choose decay 'poly' or 'cosine'")

    def factor(self, step: int) -> float:
        """Multiplier of the peak LR for 1-based optimizer step `step` (step 0: the warmup start)."""
        if step < 0:
            raise ValueError(f"step {step}: optimizer steps are >= 0")
        w = self.warmup_num_steps
        if w > 0 and step <= w:
            f0 = self.warmup_factor
            if self.warmup_type == "constant":
                return f0
            return f0 + (1.0 - f0) * step / w
        if self.decay == "none":
            return 1.0
        decay_steps = self.total_num_steps - w
        progress = 1.0 if decay_steps == 0 else min(1.0, (step - w) / decay_steps)
        if self.decay == "cosine":
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            shape = (1.0 - progress) ** self.power
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * shape

    def lr(self, step: int, peak_lr: float) -> float:
        """The LR of 1-based optimizer step `step` for peak LR `peak_lr`."""
        return peak_lr * self.factor(step)

    def describe(self) -> str:
        """One line for the start-up log."""
        if self.warmup_num_steps == 0:
            warm = "no warmup"
        elif self.warmup_type == "constant":
            warm = f"constant warmup at {self.warmup_factor:g} x lr for {self.warmup_num_steps} steps"
        else:
            start = f" from {self.warmup_factor:g} x lr" if self.warmup_factor else ""
            warm = f"linear warmup{start} over {self.warmup_num_steps} steps"
        if self.decay == "none":
            tail = f"then constant lr to step {self.total_num_steps}"
        else:
            shape = f"poly(power {self.power:g})" if self.decay == "poly" else "cosine"
            tail = f"then {shape} decay to {self.min_lr_ratio:g} x lr at step {self.total_num_steps}"
        return f"{warm}, {tail}"


# Keys that only some decays read: a variant that fixes the decay does not accept the others.
_DECAY_ONLY_KEYS = frozenset({"power", "min_lr_ratio"})
_DECAY_KEYS = {"poly": _DECAY_ONLY_KEYS, "cosine": frozenset({"min_lr_ratio"}), "none": frozenset()}


@dataclass(frozen=True)
class ScheduleRecord:
    """A named schedule: the class, the fields its name fixes, and a description.

    Calling the record builds the schedule from keyword params (a config's
    `scheduler.params`), rejecting unknown keys and keys the name fixes.
    """

    name: str
    cls: type
    fixed: dict = field(default_factory=dict)
    description: str = ""

    def valid_keys(self) -> list[str]:
        """The dataclass fields, less those the name fixes and those its fixed decay ignores."""
        unused = _DECAY_ONLY_KEYS - _DECAY_KEYS.get(self.fixed.get("decay"), _DECAY_ONLY_KEYS)
        return [f.name for f in fields(self.cls) if f.name not in self.fixed and f.name not in unused]

    def required_keys(self) -> list[str]:
        return [f.name for f in fields(self.cls)
                if f.default is MISSING and f.default_factory is MISSING and f.name not in self.fixed]

    def __call__(self, **params: Any) -> WarmupDecay:
        valid = self.valid_keys()
        fixed = sorted(set(params) & set(self.fixed))
        if fixed:
            raise ScheduleError(
                f"scheduler.params.{fixed[0]} is fixed by scheduler.type {self.name} "
                f"({fixed[0]}={self.fixed[fixed[0]]!r}); remove it, or use scheduler.type WarmupDecay to choose it")
        unknown = sorted(set(params) - set(valid))
        if unknown:
            raise ScheduleError(f"scheduler.params for {self.name}: unknown key(s) {', '.join(unknown)}; "
                                f"valid keys: {', '.join(valid)}")
        missing = [k for k in self.required_keys() if k not in params]
        if missing:
            raise ScheduleError(f"scheduler.params.{missing[0]} is required for {self.name}; "
                                f"valid keys: {', '.join(valid)}")
        return self.cls(**{**self.fixed, **params})


SCHEDULES: dict[str, ScheduleRecord] = {
    r.name: r
    for r in (
        ScheduleRecord("WarmupDecay", WarmupDecay, {}, "warmup (linear|constant) then decay (poly|cosine|none)"),
        ScheduleRecord("WarmupPolyDecay", WarmupDecay, {"decay": "poly"},
                       "warmup then (1 - p)^power decay (You et al. 2020; NVIDIA BERT uses power 0.5)"),
        ScheduleRecord("WarmupCosineDecay", WarmupDecay, {"decay": "cosine"}, "warmup then cosine decay"),
        ScheduleRecord("WarmupConstant", WarmupDecay, {"decay": "none"},
                       "warmup then a constant LR (Smith et al. 2018: raise the batch instead of decaying)"),
    )
}

# Python-level constructors: `WarmupPolyDecay(total_num_steps=10, warmup_num_steps=4)` -> WarmupDecay.
WarmupPolyDecay = SCHEDULES["WarmupPolyDecay"]
WarmupCosineDecay = SCHEDULES["WarmupCosineDecay"]
WarmupConstant = SCHEDULES["WarmupConstant"]


def list_schedules() -> list[str]:
    return sorted(SCHEDULES)


def is_project_schedule(name: str) -> bool:
    return name in SCHEDULES


def make_schedule(name: str, params: dict, source: str | None = None) -> WarmupDecay:
    """The named schedule built from `params`; errors are prefixed with `source` when given."""
    try:
        if name not in SCHEDULES:
            raise ScheduleError(f"scheduler.type {name!r}: not a project schedule ({', '.join(list_schedules())})")
        if not isinstance(params, dict):
            raise ScheduleError(f"scheduler.params must be a JSON object, got {type(params).__name__}")
        return SCHEDULES[name](**params)
    except ScheduleError as exc:
        if source is None:
            raise
        raise ScheduleError(f"{source}: {exc}") from None


def build_scheduler(name: str, params: dict, source: str | None = None
                    ) -> Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LambdaLR]:
    """A factory `optimizer -> LambdaLR` for the named schedule.

    DeepSpeed calls the factory with the optimizer it finally uses (the ZeRO wrapper), so
    the LR lands in the param groups that are really stepped. LambdaLR's counter is the
    number of completed steps k, so the LR set for the next update is factor(k + 1).
    """
    schedule = make_schedule(name, params, source)

    def factory(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: schedule.factor(k + 1))

    factory.schedule = schedule  # type: ignore[attr-defined]
    return factory
