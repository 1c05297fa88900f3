"""The batch-scaling readouts (lbllm/scaling.py) on synthetic data with known answers."""
from __future__ import annotations

import math
import random

import pytest

from lbllm.scaling import fit_critical_batch, steps_to_target


def test_fit_recovers_s_min_and_b_noise_exactly_from_the_model():
    batches = [8, 32, 128, 512, 2048]
    steps = [1000 * (1 + 64 / b) for b in batches]
    fit = fit_critical_batch(batches, steps)
    assert fit.s_min == pytest.approx(1000, rel=1e-6) and fit.b_noise == pytest.approx(64, rel=1e-6)
    assert fit.e_min == pytest.approx(64_000, rel=1e-6) and fit.rms_log_error < 1e-9
    assert fit.samples(64) == pytest.approx(2 * fit.e_min) and fit.steps(64) == pytest.approx(2 * fit.s_min)


def test_fit_with_measurement_noise_stays_close():
    rng = random.Random(0)
    batches = [8, 16, 32, 64, 128, 256, 512]
    steps = [500 * (1 + 100 / b) * math.exp(rng.gauss(0, 0.03)) for b in batches]
    fit = fit_critical_batch(batches, steps)
    assert fit.s_min == pytest.approx(500, rel=0.1) and fit.b_noise == pytest.approx(100, rel=0.2)
    assert 0.005 < fit.rms_log_error < 0.06
    wrong = fit_critical_batch(batches, [500 * (1 + 400 / b) for b in batches])  # the control
    assert wrong.b_noise == pytest.approx(400, rel=1e-4)


def test_fit_needs_two_batch_sizes_and_positive_steps():
    with pytest.raises(ValueError, match="two or more"):
        fit_critical_batch([32, 32], [10, 11])
    with pytest.raises(ValueError, match="positive"):
        fit_critical_batch([8, 32], [0, 10])


def test_steps_to_target_is_the_first_evaluation_at_or_below_it():
    rows = [{"step": 1, "samples": 32, "loss": 3.0}, {"step": 10, "samples": 320, "eval_mlm_loss": 5.6},
            {"step": 20, "samples": 640, "eval_mlm_loss": float("nan")},
            {"step": 30, "samples": 960, "eval_mlm_loss": 4.9}, {"step": 40, "samples": 1280, "eval_mlm_loss": 4.0}]
    assert steps_to_target(rows, 5.0) == (30, 960)
    assert steps_to_target(rows, 4.0) == (40, 1280)
    assert steps_to_target(rows, 3.5) is None  # the training-batch loss never counts
