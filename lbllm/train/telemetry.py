"""Training telemetry: the noise scales that say whether the batch is a good one.

- `sgd_noise_scale`: Smith et al. 2018's g = lr * N / (B * (1 - m)), the SGD noise that
  a batch ramp keeps falling as an LR decay would.
- `GradientNoiseScale`: McCandlish et al. 2018 ("An Empirical Model of Large-Batch
  Training") B_simple = tr(Sigma) / |G|^2, estimated from squared norms of mean gradients
  at two batch sizes (appendix A.1). Data-parallel training has both for free: a
  per-rank micro-batch gradient (small) and the all-reduced global-batch gradient (big).
  B_simple is the critical-batch estimate: much larger batches waste samples, much
  smaller ones waste steps.
- `NoiseScaleMonitor`: what the trainer calls every K steps; its state goes into the
  checkpoint, so a resumed run continues the same moving averages.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist


def sgd_noise_scale(lr: float, dataset_size: int, batch: int, momentum: float = 0.0) -> float:
    """Smith et al. 2018: g = lr * N / (B * (1 - m)). Use m = 0 for Adam-type optimizers."""
    if not batch > 0 or not dataset_size > 0:
        raise ValueError(f"batch={batch}, dataset_size={dataset_size}: both must be > 0")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum={momentum}: must be in [0, 1)")
    return lr * dataset_size / (batch * (1.0 - momentum))


class GradientNoiseScale:
    """McCandlish et al. 2018's B_simple = tr(Sigma) / |G|^2 from two batch sizes (appendix A.1).

    For mean gradients over b examples, E|G_b|^2 = |G|^2 + tr(Sigma) / b. Two batch sizes
    b_small < b_big give unbiased estimates per measurement:
        |G|^2 ~ (b_big |G_big|^2 - b_small |G_small|^2) / (b_big - b_small)
        S     ~ (|G_small|^2 - |G_big|^2) / (1 / b_small - 1 / b_big)
    Each is noisy, so each is averaged with its own exponential moving average (bias
    corrected as in Adam), and B_simple = EMA(S) / EMA(|G|^2): the ratio of averages, not
    the average of ratios, which would be biased. `sqnorm_small` may be the mean of
    several small-batch squared norms (e.g. over ranks and accumulation micro-steps).
    B_simple is in the units of b (sequences, or tokens if the gradients are per-token means).
    """

    def __init__(self, ema_decay: float = 0.95) -> None:
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay={ema_decay}: must be in [0, 1)")
        self.ema_decay = ema_decay
        self.count = 0
        self._g2 = 0.0
        self._s = 0.0

    @staticmethod
    def estimates(b_small: float, sqnorm_small: float, b_big: float, sqnorm_big: float) -> tuple[float, float]:
        """One measurement's unbiased (|G|^2, tr(Sigma)) estimates."""
        if not 0 < b_small < b_big:
            raise ValueError(f"b_small={b_small}, b_big={b_big}: need 0 < b_small < b_big")
        sqnorm_small, sqnorm_big = float(sqnorm_small), float(sqnorm_big)  # also 0-d tensors
        for name, v in (("sqnorm_small", sqnorm_small), ("sqnorm_big", sqnorm_big)):
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name}={v!r}: must be a finite number >= 0")
        g2 = (b_big * sqnorm_big - b_small * sqnorm_small) / (b_big - b_small)
        s = (sqnorm_small - sqnorm_big) / (1.0 / b_small - 1.0 / b_big)
        return g2, s

    def update(self, b_small: float, sqnorm_small: float, b_big: float, sqnorm_big: float) -> float | None:
        """Add one measurement; returns the current `b_simple`."""
        g2, s = self.estimates(b_small, sqnorm_small, b_big, sqnorm_big)
        beta = self.ema_decay
        self._g2 = beta * self._g2 + (1.0 - beta) * g2
        self._s = beta * self._s + (1.0 - beta) * s
        self.count += 1
        return self.b_simple

    def _corrected(self, value: float) -> float | None:
        if self.count == 0:
            return None
        return value / (1.0 - self.ema_decay ** self.count)

    @property
    def grad_sqnorm(self) -> float | None:
        """Smoothed estimate of |G|^2 (None before the first measurement)."""
        return self._corrected(self._g2)

    @property
    def trace_cov(self) -> float | None:
        """Smoothed estimate of tr(Sigma), the per-example gradient variance (None before the first)."""
        return self._corrected(self._s)

    @property
    def b_simple(self) -> float | None:
        """tr(Sigma) / |G|^2, or None before the first measurement or while the |G|^2 estimate is <= 0."""
        if self.count == 0 or self._g2 <= 0:
            return None
        return self._s / self._g2  # the bias corrections cancel in the ratio

    def state_dict(self) -> dict:
        return {"ema_decay": self.ema_decay, "count": self.count, "g2": self._g2, "s": self._s}

    def load_state_dict(self, state: dict) -> None:
        self.ema_decay, self.count = float(state["ema_decay"]), int(state["count"])
        self._g2, self._s = float(state["g2"]), float(state["s"])


class NoiseScaleMonitor:
    """B_simple every `interval` optimizer steps (0: never; not under ZeRO 3, where no rank
    holds whole parameters). One extra forward/backward of one micro-batch per measurement."""

    def __init__(self, interval: int, zero_stage: int, micro_batch_size: int) -> None:
        self.interval = interval
        self.enabled = interval > 0 and zero_stage < 3
        self.micro_batch_size = micro_batch_size
        self.estimator = GradientNoiseScale()

    def due(self, step: int) -> bool:
        """Whether 1-based optimizer step `step` measures."""
        return self.enabled and step % self.interval == 0

    @staticmethod
    def small_batch_sq_norm(engine: Any, batch: dict[str, torch.Tensor]) -> float:
        """|G_small|^2: squared norm of one micro-batch's mean-loss gradient, averaged over
        ranks (McCandlish et al. 2018, App. A). autograd.grad leaves .grad and DeepSpeed's
        gradient hooks untouched."""
        params = [p for p in engine.module.parameters() if p.requires_grad]
        out = engine.module(**{k: v.to(engine.device) for k, v in batch.items()})
        grads = torch.autograd.grad(out.mean_loss(), params)
        sq = torch.stack([g.float().pow(2).sum() for g in grads]).sum().reshape(1).double().cpu()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sq)
            sq /= dist.get_world_size()
        return sq.item()

    def update(self, sq_small: float, global_batch: int, sq_big: float) -> dict[str, float]:
        """Add one measurement; the metrics.jsonl fields it gives."""
        b_simple = self.estimator.update(self.micro_batch_size, sq_small, global_batch, sq_big)
        fields = {"grad_sqnorm_small": sq_small, "grad_sqnorm_big": sq_big}
        if b_simple is not None:
            fields["grad_noise_scale"] = b_simple
        return fields

    def state_dict(self) -> dict:
        return self.estimator.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.estimator.load_state_dict(state)
