"""Learning-rate schedules as pure functions of the step, registered by name."""
from lbllm.schedules.lr import (
    SCHEDULES,
    ScheduleError,
    WarmupPolyDecay,
    build_scheduler,
    is_project_schedule,
    list_schedules,
)

__all__ = ["SCHEDULES", "ScheduleError", "WarmupPolyDecay", "build_scheduler", "is_project_schedule", "list_schedules"]
