"""lbllm.train.telemetry: the noise scales, with exact expected values and a known truth."""
import pytest
import torch

from lbllm.train.telemetry import GradientNoiseScale, NoiseScaleMonitor, sgd_noise_scale


def test_sgd_noise_scale():
    assert sgd_noise_scale(0.1, 1_000_000, 256) == pytest.approx(390.625)
    assert sgd_noise_scale(0.1, 1_000_000, 256, momentum=0.9) == pytest.approx(3906.25)
    # Smith et al.: doubling the batch lowers the noise exactly as halving the LR does
    assert sgd_noise_scale(0.1, 10_000, 512) == pytest.approx(sgd_noise_scale(0.05, 10_000, 256))
    with pytest.raises(ValueError, match="momentum"):
        sgd_noise_scale(0.1, 100, 4, momentum=1.0)


def test_gradient_noise_scale_formulas_and_ema_exact():
    # b=1: |G_s|^2 = 5, b=4: |G_b|^2 = 2 -> |G|^2 = (8 - 5)/3 = 1, S = (5 - 2)/(1 - 1/4) = 4
    assert GradientNoiseScale.estimates(1, 5.0, 4, 2.0) == pytest.approx((1.0, 4.0))
    gns = GradientNoiseScale(ema_decay=0.5)
    assert gns.b_simple is None and gns.grad_sqnorm is None
    assert gns.update(1, 5.0, 4, 2.0) == pytest.approx(4.0)
    # second measurement: |G|^2 = (12 - 10)/2 = 1, S = (5 - 3)/(1/2 - 1/4) = 8
    gns.update(2, 5.0, 4, torch.tensor(3.0))
    # EMAs 0.75 and 5.0 (raw), bias corrected by 1 - 0.5^2
    assert gns.grad_sqnorm == pytest.approx(1.0) and gns.trace_cov == pytest.approx(20 / 3)
    assert gns.b_simple == pytest.approx(20 / 3)
    clone = GradientNoiseScale()
    clone.load_state_dict(gns.state_dict())
    assert clone.b_simple == gns.b_simple and clone.count == 2


def test_gradient_noise_scale_undefined_and_errors():
    gns = GradientNoiseScale()
    gns.update(1, 1.0, 4, 0.1)  # |G|^2 estimate (0.4 - 1)/3 < 0: noise dominates, no estimate yet
    assert gns.b_simple is None
    with pytest.raises(ValueError, match="b_small"):
        gns.update(4, 1.0, 4, 1.0)
    with pytest.raises(ValueError, match="sqnorm_big"):
        gns.update(1, 1.0, 4, -1.0)


@pytest.mark.parametrize("trace", [32.0, 8.0])
def test_gradient_noise_scale_recovers_known_truth(trace):
    """Per-example gradients G + noise with |G|^2 = 1 and tr(Sigma) = trace: B_simple -> trace.

    Small batches are the first b_small examples of each big batch, as a rank's micro-batch
    is part of the global batch. Control: S / |G_big|^2, the naive ratio that ignores the
    noise inside the big-batch norm, is off by far more than the tolerance.
    """
    gen = torch.Generator().manual_seed(0)
    d, b_small, b_big, n = 64, 4, 64, 1000
    G = torch.randn(d, generator=gen, dtype=torch.float64)
    G = G / G.norm()
    std = torch.linspace(0.2, 1.0, d, dtype=torch.float64)  # anisotropic noise
    std = std * (trace / std.pow(2).sum()).sqrt()
    g = G + torch.randn(n, b_big, d, generator=gen, dtype=torch.float64) * std
    small = g[:, :b_small].mean(1).pow(2).sum(1)
    big = g.mean(1).pow(2).sum(1)
    gns = GradientNoiseScale(ema_decay=0.999)
    for i in range(n):
        gns.update(b_small, small[i].item(), b_big, big[i].item())
    assert gns.b_simple == pytest.approx(trace, rel=0.05)
    assert gns.grad_sqnorm == pytest.approx(1.0, rel=0.05)
    naive = gns.trace_cov / big.mean().item()
    assert abs(naive / trace - 1) > 0.1
