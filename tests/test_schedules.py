"""Schedules, LR scaling and batch ramp: pure functions with exact expected values."""
import pytest
import torch

from lbllm.schedules import (
    BatchSchedule,
    LRScaling,
    ScheduleError,
    WarmupConstant,
    WarmupCosineDecay,
    WarmupDecay,
    WarmupPolyDecay,
    build_scheduler,
    list_schedules,
    make_schedule,
    parse_batch_schedule,
    parse_lr_scaling,
    scale_lr,
)


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


# --- warmup kinds and decays (WarmupDecay and its registered variants) -----------------------

def test_linear_warmup_from_a_start_factor():
    """Gradual warmup from warmup_factor (the value at step 0) to 1 at step W."""
    s = WarmupDecay(total_num_steps=10, warmup_num_steps=4, warmup_factor=0.2)
    assert [s.factor(t) for t in range(0, 6)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 5 / 6], abs=1e-15)


def test_constant_warmup_then_poly_decay_exact():
    """Goyal's constant warmup: warmup_factor for steps 1..W, then the full LR decaying from W + 1."""
    s = WarmupDecay(total_num_steps=10, warmup_num_steps=3, warmup_type="constant", warmup_factor=0.1)
    assert [s.factor(t) for t in range(1, 11)] == pytest.approx(
        [0.1, 0.1, 0.1, 6 / 7, 5 / 7, 4 / 7, 3 / 7, 2 / 7, 1 / 7, 0.0], abs=1e-15)


def test_nvidia_power_half_decay_exact():
    s = WarmupPolyDecay(total_num_steps=6, warmup_num_steps=2, power=0.5)
    assert [s.factor(t) for t in range(1, 7)] == pytest.approx(
        [0.5, 1.0, 0.8660254037844386, 0.7071067811865476, 0.5, 0.0], abs=1e-15)


def test_cosine_decay_exact():
    s = WarmupCosineDecay(total_num_steps=10, warmup_num_steps=2, min_lr_ratio=0.1)
    assert s.factor(1) == 0.5 and s.factor(2) == 1.0
    assert s.factor(3) == pytest.approx(0.9657457896300791, abs=1e-15)  # 0.1 + 0.9 (1 + cos(pi/8)) / 2
    assert s.factor(6) == pytest.approx(0.55, abs=1e-15)  # half way: 0.1 + 0.9 / 2
    assert s.factor(10) == pytest.approx(0.1, abs=1e-15) and s.factor(50) == pytest.approx(0.1, abs=1e-15)


def test_warmup_then_constant():
    s = WarmupConstant(total_num_steps=10, warmup_num_steps=4)
    assert [s.factor(t) for t in (1, 2, 3, 4, 5, 10, 1000)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0]
    assert WarmupConstant(total_num_steps=5).factor(1) == 1.0


def test_variants_are_records_of_one_class():
    assert {"WarmupDecay", "WarmupPolyDecay", "WarmupCosineDecay", "WarmupConstant"} <= set(list_schedules())
    assert WarmupPolyDecay(total_num_steps=8) == WarmupDecay(total_num_steps=8, decay="poly")
    assert WarmupCosineDecay(total_num_steps=8) == WarmupDecay(total_num_steps=8, decay="cosine")
    assert WarmupConstant(total_num_steps=8) == WarmupDecay(total_num_steps=8, decay="none")


@pytest.mark.parametrize("name", list_schedules())
@pytest.mark.parametrize("total,warmup", [(10, 4), (100, 7), (7038, 2000)])
def test_linear_warmup_is_continuous_at_the_switch(name, total, warmup):
    """No jump at the end of a linear warmup: factor(W) = 1 and the first decay step moves <= 1/(T - W)."""
    s = build_scheduler(name, {"total_num_steps": total, "warmup_num_steps": warmup}).schedule
    assert s.factor(warmup) == 1.0
    assert s.factor(warmup - 1) == pytest.approx(1 - 1 / warmup, abs=1e-15)
    assert 0.0 <= 1.0 - s.factor(warmup + 1) <= 1 / (total - warmup) + 1e-15


def test_warmup_covering_the_whole_horizon():
    s = WarmupPolyDecay(total_num_steps=3, warmup_num_steps=3, min_lr_ratio=0.25)
    assert [s.factor(t) for t in (1, 3, 4, 9)] == pytest.approx([1 / 3, 1.0, 0.25, 0.25])


def test_cosine_factory_drives_optimizer_lr():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    sched = build_scheduler("WarmupCosineDecay", {"total_num_steps": 4, "warmup_num_steps": 2,
                                                  "warmup_type": "constant", "warmup_factor": 0.25})(opt)
    seen = []
    for _ in range(5):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.5, 0.5, 1.0, 0.0, 0.0], abs=1e-15)  # cos(pi/2): half way after warmup


def test_describe():
    assert WarmupPolyDecay(total_num_steps=7038, warmup_num_steps=2000, power=0.5).describe() == (
        "linear warmup over 2000 steps, then poly(power 0.5) decay to 0 x lr at step 7038")
    cosine = WarmupCosineDecay(total_num_steps=50, warmup_num_steps=5, warmup_factor=0.1, min_lr_ratio=0.01)
    assert cosine.describe() == (
        "linear warmup from 0.1 x lr over 5 steps, then cosine decay to 0.01 x lr at step 50")
    assert WarmupConstant(total_num_steps=9, warmup_num_steps=3, warmup_type="constant",
                          warmup_factor=0.1).describe() == (
        "constant warmup at 0.1 x lr for 3 steps, then constant lr to step 9")


@pytest.mark.parametrize("kwargs,match", [
    (dict(total_num_steps=10.0), "scheduler.params.total_num_steps"),
    (dict(total_num_steps=10, warmup_type="exponential"), "scheduler.params.warmup_type.*linear, constant"),
    (dict(total_num_steps=10, decay="linear"), "scheduler.params.decay.*poly, cosine, none"),
    (dict(total_num_steps=10, warmup_num_steps=2, warmup_type="constant"), "warmup_factor is required"),
    (dict(total_num_steps=10, warmup_type="constant", warmup_factor=0), r"warmup_factor=0.*\(0, 1\]"),
    (dict(total_num_steps=10, warmup_factor=1.5), r"warmup_factor=1.5.*\[0, 1\]"),
    (dict(total_num_steps=10, decay="cosine", power=2.0), "power=2.0 applies to decay 'poly' only"),
    (dict(total_num_steps=10, decay="none", min_lr_ratio=0.1), "min_lr_ratio=0.1 has no effect"),
])
def test_invalid_warmup_decay_params_rejected(kwargs, match):
    with pytest.raises(ScheduleError, match=match):
        WarmupDecay(**kwargs)


def test_registry_key_errors():
    with pytest.raises(ScheduleError, match="decay is fixed by scheduler.type WarmupCosineDecay"):
        build_scheduler("WarmupCosineDecay", {"total_num_steps": 5, "decay": "poly"})
    with pytest.raises(ScheduleError, match="scheduler.params.total_num_steps is required for WarmupDecay"):
        build_scheduler("WarmupDecay", {"warmup_num_steps": 1})
    with pytest.raises(ScheduleError, match="^cfg.json: scheduler.params for WarmupConstant: unknown key"):
        build_scheduler("WarmupConstant", {"total_num_steps": 5, "power": 1}, source="cfg.json")
    with pytest.raises(ScheduleError, match="^cfg.json: scheduler.type 'Nope'"):
        make_schedule("Nope", {}, source="cfg.json")


# --- LR scaling rules ----------------------------------------------------------------------

def test_scaling_rules_exact():
    assert scale_lr(0.1, 256, 8192, "linear") == pytest.approx(3.2, abs=1e-15)  # Goyal et al.: 0.1 x 8k/256
    assert scale_lr(1e-4, 256, 65536, "sqrt") == pytest.approx(1.6e-3, abs=1e-18)  # 1e-4 x sqrt(256)
    assert scale_lr(1e-4, 256, 65536, "none") == 1e-4
    assert scale_lr(0.1, 256, 128, "linear") == pytest.approx(0.05, abs=1e-15)  # scaling down works too
    assert scale_lr(0.1, 256, 256, "sqrt") == 0.1


def test_lr_scaling_section_and_describe():
    scaling = parse_lr_scaling({"rule": "sqrt", "base_lr": 1e-4, "base_batch": 256}, "cfg.json")
    assert scaling == LRScaling(base_lr=1e-4, base_batch=256, rule="sqrt")
    assert scaling.lr_for(65536) == pytest.approx(1.6e-3, abs=1e-18)
    assert scaling.describe(65536) == "lr 0.0016 = 0.0001 x sqrt(65536/256) [sqrt rule]"
    assert LRScaling(0.1, 256).describe(8192) == "lr 3.2 = 0.1 x 8192/256 [linear rule]"
    assert LRScaling(0.1, 256, "none").describe(512) == "lr 0.1 = 0.1, not scaled from batch 256 to 512 [none rule]"
    assert parse_lr_scaling(None, "cfg.json") is None


@pytest.mark.parametrize("section,match", [
    ({"rule": "sqrt", "base_lr": 1e-4, "base_batch": 256, "batch": 4},
     "^cfg.json: lr_scaling has unknown key.*batch; valid keys: base_lr, base_batch, rule"),
    ({"rule": "sqrt", "base_lr": 1e-4}, "lr_scaling.base_batch is required"),
    ({"rule": "log", "base_lr": 1e-4, "base_batch": 256}, "lr_scaling.rule='log'.*linear, sqrt, none"),
    ({"base_lr": 0, "base_batch": 256}, "lr_scaling.base_lr=0"),
    ({"base_lr": 1e-4, "base_batch": 256.5}, "lr_scaling.base_batch=256.5"),
    ([1e-4, 256], "lr_scaling must be a JSON object"),
])
def test_lr_scaling_section_errors(section, match):
    with pytest.raises(ScheduleError, match=match):
        parse_lr_scaling(section, "cfg.json")


# --- batch-size ramp -------------------------------------------------------------------------

RAMP = {"milestones": [[0, 256], [100, 512], [200, 1024]]}


def test_batch_at_milestones():
    bs = parse_batch_schedule(RAMP, "cfg.json")
    assert [bs.batch_at(t) for t in (1, 100, 101, 200, 201, 10**6)] == [256, 256, 512, 512, 1024, 1024]
    assert bs.max_batch == 1024
    assert bs.describe() == "batch 256 from step 1, batch 512 from step 101, batch 1024 from step 201"
    assert parse_batch_schedule(None, "cfg.json") is None


def test_samples_before_and_inverse():
    bs = BatchSchedule(RAMP["milestones"])
    assert [bs.samples_before(t) for t in (1, 2, 101, 102, 201, 203)] == [
        0, 256, 25600, 25600 + 512, 25600 + 51200, 76800 + 2 * 1024]
    for t in range(1, 320):  # exact resume: samples <-> step round trip, and consistent with batch_at
        assert bs.step_for_samples(bs.samples_before(t)) == t
        assert bs.samples_before(t + 1) - bs.samples_before(t) == bs.batch_at(t)
    with pytest.raises(ScheduleError, match="consumed samples 300: not at a step boundary.*256 and 512"):
        bs.step_for_samples(300)
    with pytest.raises(ScheduleError, match="nearest boundaries 25600 and 26112"):
        bs.step_for_samples(25601)


def test_constant_batch_schedule():
    bs = BatchSchedule.constant(512)
    assert bs.batch_at(7) == 512 and bs.samples_before(4) == 1536 and bs.step_for_samples(1536) == 4


def test_validate_against_micro_batch_and_world():
    bs = BatchSchedule(RAMP["milestones"])
    bs.validate(micro_batch_size=64, world_size=2, source="cfg.json")  # unit 128 divides all
    with pytest.raises(ScheduleError, match=r"^cfg.json: batch_schedule.milestones\[0\]=\[0, 256\]: global batch 256 "
                                            r"is not a multiple of .* = 32 x 6 = 192; use 192 or 384"):
        bs.validate(micro_batch_size=32, world_size=6, source="cfg.json")
    with pytest.raises(ScheduleError, match=r"milestones\[0\]=\[0, 100\].*use 128$"):
        BatchSchedule(((0, 100),)).validate(64, 2, "cfg.json")


@pytest.mark.parametrize("section,match", [
    ({"milestones": [[5, 256]]}, r"milestones\[0\]=\[5, 256\]: the first milestone must be at step 0"),
    ({"milestones": [[0, 256], [100, 512], [100, 1024]]}, r"milestones\[2\].*steps must increase"),
    ({"milestones": [[0, 256], [100.0, 512]]}, r"milestones\[1\].*pair of integers"),
    ({"milestones": [[0, 0]]}, "global batch must be > 0"),
    ({"milestones": []}, "non-empty list"),
    ({"milestone": [[0, 256]]}, "unknown key.*milestone; valid keys: milestones"),
    ({}, "batch_schedule.milestones is required"),
])
def test_batch_schedule_errors(section, match):
    with pytest.raises(ScheduleError, match=match):
        parse_batch_schedule(section, "cfg.json")
