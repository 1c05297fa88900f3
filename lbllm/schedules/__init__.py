"""LR schedules, LR scaling rules and batch-size schedules: pure functions of the step."""
from lbllm.schedules.batch import BatchSchedule, parse_batch_schedule
from lbllm.schedules.lr import (
    SCHEDULES,
    ScheduleError,
    ScheduleRecord,
    WarmupConstant,
    WarmupCosineDecay,
    WarmupDecay,
    WarmupPolyDecay,
    build_scheduler,
    is_project_schedule,
    list_schedules,
    make_schedule,
)
from lbllm.schedules.scaling import LRScaling, parse_lr_scaling, scale_lr

__all__ = [
    "SCHEDULES", "ScheduleError", "ScheduleRecord", "WarmupConstant", "WarmupCosineDecay", "WarmupDecay",
    "WarmupPolyDecay", "build_scheduler", "is_project_schedule", "list_schedules", "make_schedule",
    "LRScaling", "parse_lr_scaling", "scale_lr",
    "BatchSchedule", "parse_batch_schedule",
]
