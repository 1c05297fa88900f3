"""LAMB: layer-wise adaptive moments for large-batch training.

Paper: Yang You, Jing Li, Sashank Reddi, Jonathan Hseu, Sanjiv Kumar, Srinadh
Bhojanapalli, Xiaodan Song, James Demmel, Kurt Keutzer, Cho-Jui Hsieh. "Large Batch
Optimization for Deep Learning: Training BERT in 76 minutes", ICLR 2020,
https://arxiv.org/abs/1904.00962 (Algorithm 2).

For every parameter tensor w with gradient g, at step t (counted per param group from 1):

    m = b1 m + (1 - b1) g                 v = b2 v + (1 - b2) g^2
    m_hat = m / (1 - b1^t)                v_hat = v / (1 - b2^t)     (if bias_correction)
    u = m_hat / (sqrt(v_hat) + eps) + weight_decay * w
    r = ||w|| / ||u||                     (r = 1 if either norm is 0; then clamped)
    w = w - lr * r * u

The trust ratio r is computed separately for every parameter tensor ("layer"), which
is what lets one learning rate serve layers whose weights and updates differ by orders
of magnitude.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .param_groups import LayerwiseOptimizer, as_compute_dtype

__all__ = ["Lamb"]


class Lamb(LayerwiseOptimizer):
    """LAMB (You et al. 2020, Algorithm 2), multi-tensor implementation.

    Args:
        params: parameters or param-group dicts. A group with ``weight_decay == 0`` is
            treated as a no-decay group (biases, LayerNorm): see ``adapt_no_decay``.
        lr: learning rate (the step is ``lr * r * u``).
        betas: Adam coefficients (b1, b2) for the first and second moments.
        eps: added to ``sqrt(v_hat)``, outside the square root (as in the paper and in
            NVIDIA's and DeepSpeed's LAMB).
        weight_decay: decoupled weight decay, added to the Adam direction *before* the
            trust ratio, so it is part of ``||u||`` (Algorithm 2).
        bias_correction: divide the moments by ``1 - b^t``. ``False`` reproduces
            DeepSpeed's bing_bert recipe. The step count ``t`` is kept per param group in
            ``group["step"]`` (an int); setting it to 0 restarts bias correction while
            keeping the moments, as NVIDIA's phase 2 does.
        min_trust, max_trust: clamp the trust ratio to ``[min_trust, max_trust]``
            (either may be None for no bound), DeepSpeed's ``min_coeff``/``max_coeff``.
            Applied after the zero-norm rule, so a zero-initialised tensor gets
            ``clamp(1)``. Not applied to parameters that are not adapted.
        max_grad_norm: NVIDIA's global gradient pre-normalisation. The L2 norm of all
            gradients of all groups is computed first; if it exceeds ``max_grad_norm``,
            every gradient is scaled by ``max_grad_norm / norm`` before the moments are
            updated. ``p.grad`` itself is not modified. ``None`` or 0 turns it off. It
            is a global setting: all groups must agree. (DeepSpeed ZeRO 1/2 calls
            ``step()`` with one param group at a time, so there it covers one group;
            use DeepSpeed's ``gradient_clipping`` for a true global clip.)
        adapt_no_decay: whether parameters of groups with ``weight_decay == 0`` get a
            trust ratio. ``False`` (default, NVIDIA FusedLAMB) updates them with r = 1,
            i.e. plain Adam; ``True`` adapts every parameter (NVLAMB, and DeepSpeed's
            FusedLamb). Note that with ``weight_decay=0`` everywhere and the default,
            nothing is adapted.

    Per step the work is a fixed number of ``torch._foreach_*`` calls per group: no
    Python loop over parameters launches kernels and nothing waits on the device.
    16-bit parameters keep fp32 state and are updated in fp32 (see LayerwiseOptimizer).
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        bias_correction: bool = True,
        min_trust: float | None = None,
        max_trust: float | None = None,
        max_grad_norm: float | None = None,
        adapt_no_decay: bool = False,
    ) -> None:
        betas = tuple(float(b) for b in betas)
        if lr < 0.0:
            raise ValueError(f"Lamb: lr must be >= 0, got {lr}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Lamb: betas must be two numbers in [0, 1), got {betas}")
        if eps < 0.0:
            raise ValueError(f"Lamb: eps must be >= 0, got {eps}")
        if weight_decay < 0.0:
            raise ValueError(f"Lamb: weight_decay must be >= 0, got {weight_decay}")
        for key, bound in (("min_trust", min_trust), ("max_trust", max_trust)):
            if bound is not None and bound < 0.0:
                raise ValueError(f"Lamb: {key} must be >= 0 or None, got {bound}")
        if min_trust is not None and max_trust is not None and min_trust > max_trust:
            raise ValueError(f"Lamb: min_trust ({min_trust}) > max_trust ({max_trust})")
        if max_grad_norm is not None and max_grad_norm < 0.0:
            raise ValueError(f"Lamb: max_grad_norm must be >= 0 or None, got {max_grad_norm}")
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
            bias_correction=bool(bias_correction), min_trust=min_trust, max_trust=max_trust,
            max_grad_norm=max_grad_norm, adapt_no_decay=bool(adapt_no_decay),
        )
        super().__init__(params, defaults)

    def _prepare_step(self, gathered):
        # max_grad_norm is global by nature (one norm over every group), so a per-group
        # value that differs would be silently meaningless: refuse it instead.
        limits = {float(g.get("max_grad_norm") or 0.0) for g in self.param_groups}
        if len(limits) > 1:
            raise ValueError(f"Lamb: max_grad_norm must be the same in all param groups, got {sorted(limits)}")
        max_norm = limits.pop() if limits else 0.0
        grads = [g for _, gs in gathered for g in gs]
        if max_norm <= 0.0 or not grads:
            return {"grad_scale": None}
        params = [p for ps, _ in gathered for p in ps]
        total = self._global_sq_norm(grads, params).sqrt()
        # max_norm / max(total, max_norm): 1 when under the limit, and never a division
        # by zero. Stays a device tensor: no host sync.
        return {"grad_scale": max_norm / total.clamp(min=max_norm)}

    def _step_group(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                    grad_scale: Tensor | None = None) -> None:
        beta1, beta2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        group["step"] = step = int(group.get("step", 0)) + 1

        exp_avg, exp_avg_sq = self._state_tensors(params, ("exp_avg", "exp_avg_sq"))
        weights = as_compute_dtype(params)
        # Every temporary of the step lives in this one buffer per parameter; all other
        # ops are in place (see LayerwiseOptimizer._workspace for why that matters).
        work = self._workspace(params)
        if grad_scale is not None:
            torch._foreach_copy_(work, grads)  # clip a copy: p.grad stays untouched
            torch._foreach_mul_(work, grad_scale)
            grads = work

        # Moments. lerp_ is one pass for b1*m + (1-b1)*g.
        torch._foreach_lerp_(exp_avg, grads, 1.0 - beta1)
        torch._foreach_mul_(exp_avg_sq, beta2)
        torch._foreach_addcmul_(exp_avg_sq, grads, grads, value=1.0 - beta2)
        del grads

        if group["bias_correction"]:
            bc1, bc2 = 1.0 - beta1 ** step, 1.0 - beta2 ** step
        else:
            bc1 = bc2 = 1.0
        # (m/bc1) / (sqrt(v/bc2) + eps) + wd*w == k * u' with k = sqrt(bc2)/bc1 and
        #     u' = m / (sqrt(v) + eps*sqrt(bc2)) + (wd/k) * w,
        # so bias correction costs no pass of its own: k is folded into the per-parameter
        # scalars below (||u|| = k ||u'||).
        sqrt_bc2 = math.sqrt(bc2)
        k = sqrt_bc2 / bc1
        update = work
        torch._foreach_copy_(update, exp_avg_sq)
        torch._foreach_sqrt_(update)
        torch._foreach_add_(update, eps * sqrt_bc2)
        torch._foreach_reciprocal_(update)
        torch._foreach_mul_(update, exp_avg)
        if wd != 0.0:
            torch._foreach_add_(update, weights, alpha=wd / k)

        if wd != 0.0 or group["adapt_no_decay"]:
            ratio = self._trust_ratio(
                self._per_param_sq_norms(weights, params),
                self._per_param_sq_norms(update, params) * (k * k),
                group,
            )
            # w += (-lr * r * k) * u' in one pass, the scalar broadcast per parameter.
            torch._foreach_addcmul_(weights, update, self._per_param_broadcast(ratio * (-lr * k), params))
        else:
            torch._foreach_add_(weights, update, alpha=-lr * k)
        self._write_back(params, weights)

    @staticmethod
    def _trust_ratio(w_sq: Tensor, u_sq: Tensor, group: dict[str, Any]) -> Tensor:
        """||w|| / ||u|| per parameter, 1 where either is zero, then clamped."""
        w_norm, u_norm = w_sq.sqrt(), u_sq.sqrt()
        # A zero-initialised tensor (||w|| = 0) would never move with r = 0, and ||u|| = 0
        # means there is nothing to scale: both fall back to the plain step.
        ratio = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
        lo, hi = group["min_trust"], group["max_trust"]
        if lo is not None or hi is not None:
            ratio = ratio.clamp(min=lo, max=hi)
        return ratio
