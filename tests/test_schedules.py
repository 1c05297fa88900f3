"""LR schedules are pure functions of the step: exact expected values."""
import pytest
import torch

from lbllm.schedules import ScheduleError, WarmupPolyDecay, build_scheduler, list_schedules


def test_linear_warmup_then_linear_decay_exact():
    s = WarmupPolyDecay(total_num_steps=10, warmup_num_steps=4, power=1.0)
    assert [s.factor(t) for t in range(1, 11)] == pytest.approx(
        [0.25, 0.5, 0.75, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6, 0.0], abs=1e-15)
    assert s.factor(20) == 0.0  # past the horizon the LR stays at the floor


def test_power_half_and_floor():
    s = WarmupPolyDecay(total_num_steps=6, warmup_num_steps=2, power=0.5, min_lr_ratio=0.1)
    assert s.factor(4) == pytest.approx(0.1 + 0.9 * (0.5 ** 0.5))
    assert s.factor(6) == pytest.approx(0.1)


def test_no_warmup_starts_at_peak():
    s = WarmupPolyDecay(total_num_steps=4, warmup_num_steps=0)
    assert s.factor(1) == pytest.approx(0.75)


@pytest.mark.parametrize("kwargs", [dict(total_num_steps=0), dict(total_num_steps=5, warmup_num_steps=6),
                                    dict(total_num_steps=5, power=-1), dict(total_num_steps=5, min_lr_ratio=2)])
def test_invalid_params_rejected(kwargs):
    with pytest.raises(ScheduleError):
        WarmupPolyDecay(**kwargs)


def test_factory_drives_optimizer_lr_per_step():
    """The LR the optimizer holds before update t is peak * factor(t)."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    sched = build_scheduler("WarmupPolyDecay", {"total_num_steps": 5, "warmup_num_steps": 2})(opt)
    seen = []
    for _ in range(5):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([1.0, 2.0, 4 / 3, 2 / 3, 0.0])


def test_unknown_schedule_and_key_errors():
    assert "WarmupPolyDecay" in list_schedules()
    with pytest.raises(ScheduleError, match="WarmupPolyDecay"):
        build_scheduler("Nope", {})
    with pytest.raises(ScheduleError, match="valid keys"):
        build_scheduler("WarmupPolyDecay", {"total_num_steps": 3, "warmup_steps": 1})
