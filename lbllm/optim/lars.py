"""LARS: layer-wise adaptive rate scaling for SGD with momentum (and LARC, its clipped form).

Paper: Yang You, Igor Gitman, Boris Ginsburg. "Large Batch Training of Convolutional
Networks", 2017, https://arxiv.org/abs/1708.03888 (Algorithm 1). Momentum correction:
Priya Goyal et al. "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour", 2017,
https://arxiv.org/abs/1706.02677 (section 2.1, remark 2). LARC (clipping) follows the
semantics of NVIDIA apex's ``LARC`` wrapper.

For every parameter tensor w with gradient g:

    local = eta * ||w|| / (||g|| + weight_decay * ||w|| + eps)
    LARC:   local = min(local / lr, 1)        (the effective lr never exceeds lr)
    local = 1 if ||w|| or ||g|| is 0          (nothing to adapt to)
    g_eff = local * (g + weight_decay * w)

then SGD with momentum on g_eff, in one of two equivalent forms (Goyal et al. eq. 9/10):

    "u":  u = m u + g_eff;           w = w - lr u
    "v":  v = m (lr / lr_prev) v + lr g_eff;   w = w - v

The "v" form stores lr inside the buffer, so when the learning rate changes the buffer
must be rescaled by lr / lr_prev (momentum correction) or the two forms diverge.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .param_groups import LayerwiseOptimizer, as_compute_dtype

__all__ = ["Lars"]

_FORMS = ("u", "v")


class Lars(LayerwiseOptimizer):
    """LARS / LARC (You et al. 2017), multi-tensor implementation.

    Args:
        params: parameters or param-group dicts. A group with ``weight_decay == 0`` is
            treated as a no-decay group (biases, LayerNorm): see ``adapt_no_decay``.
        lr: global learning rate. With LARS the step of a layer is
            ``lr * eta * ||w|| / ||g||``, so ``lr = 1`` moves each layer by about
            ``eta`` of its norm.
        momentum: momentum coefficient ``m`` (0 disables the buffer).
        weight_decay: L2 coefficient; ``weight_decay * w`` is added to the gradient
            before the local ratio scales it, and ``weight_decay * ||w||`` appears in
            the ratio's denominator (the paper's rule). Default 5e-4, the usual ImageNet
            value; not 0, because a group with zero decay is not adapted by default.
        trust_coefficient: ``eta``, the fraction of ``||w||`` one unit-lr step moves.
        eps: guards the ratio's division. Tensors with ``||w|| = 0`` or ``||g|| = 0``
            are not adapted (ratio 1, with or without ``clip``).
        clip: LARC. The local lr ``lr * local`` is clipped to ``lr``:
            ``local = min(local / lr, 1)``.
        adapt_no_decay: whether parameters of groups with ``weight_decay == 0`` get a
            local ratio. ``False`` (default) gives them ratio 1 (plain momentum SGD at
            ``lr``), as the usual LARS recipes exclude biases and norms from adaptation;
            with ``weight_decay=0`` everywhere set it to ``True`` or nothing is adapted.
        nesterov: Nesterov momentum (``w -= lr (g_eff + m u)``, same in both forms).
        momentum_form: ``"u"`` (buffer holds gradients; no correction needed) or ``"v"``
            (buffer holds ``lr``-scaled steps, as in Goyal et al.).
        momentum_correction: in the ``"v"`` form, scale the buffer by
            ``lr / lr_prev`` when the learning rate changed since the group's previous
            step (``group["prev_lr"]``). Without it the "v" form lags an LR change.

    Per step the work is a fixed number of ``torch._foreach_*`` calls per group, with no
    host sync; 16-bit parameters keep fp32 state (see LayerwiseOptimizer).
    """

    def __init__(
        self,
        params,
        lr: float = 1.0,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        trust_coefficient: float = 0.001,
        eps: float = 1e-8,
        clip: bool = False,
        adapt_no_decay: bool = False,
        nesterov: bool = False,
        momentum_form: str = "u",
        momentum_correction: bool = True,
    ) -> None:
        if lr < 0.0:
            raise ValueError(f"Lars: lr must be >= 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Lars: momentum must be in [0, 1), got {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Lars: weight_decay must be >= 0, got {weight_decay}")
        if trust_coefficient <= 0.0:
            raise ValueError(f"Lars: trust_coefficient must be > 0, got {trust_coefficient}")
        if eps < 0.0:
            raise ValueError(f"Lars: eps must be >= 0, got {eps}")
        if momentum_form not in _FORMS:
            raise ValueError(f"Lars: momentum_form must be one of {_FORMS}, got {momentum_form!r}")
        if nesterov and momentum == 0.0:
            raise ValueError("Lars: nesterov needs momentum > 0")
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay,
            trust_coefficient=trust_coefficient, eps=eps, clip=bool(clip),
            adapt_no_decay=bool(adapt_no_decay), nesterov=bool(nesterov),
            momentum_form=momentum_form, momentum_correction=bool(momentum_correction),
        )
        super().__init__(params, defaults)

    def _step_group(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        lr, momentum = group["lr"], group["momentum"]
        # Not used by the rule; kept (like LAMB's) so trainers and logs can read it.
        group["step"] = int(group.get("step", 0)) + 1
        weights = as_compute_dtype(params)

        local = None  # not adapted: a no-decay group (wd == 0), so g_eff = g
        layout = self.layout
        if group["weight_decay"] != 0.0 or group["adapt_no_decay"]:
            # Under ZeRO a rank holds slices of the parameters: both partial norms are
            # summed over the data-parallel group here, in one all-reduce (per tensor,
            # without ZeRO, there is nothing to reduce).
            w_sq, g_sq = layout.reduce(layout.sq_norms(weights, params), layout.sq_norms(grads, params))
            local = local_ratio(w_sq, g_sq, group)
            self._record_ratios(group, local)

        def add_g_eff_(target: list[Tensor], alpha: float) -> None:
            # target += alpha * local * (g + wd * w), without materialising g_eff (p.grad is
            # never written). The decay term goes first so that when target is the weights
            # themselves it still reads the old w.
            if local is None:
                torch._foreach_add_(target, grads, alpha=alpha)
                return
            coef = local * alpha
            if group["weight_decay"] != 0.0:
                torch._foreach_addcmul_(target, weights,
                                        layout.broadcast(coef * group["weight_decay"], params))
            torch._foreach_addcmul_(target, grads, layout.broadcast(coef, params))

        if momentum == 0.0:
            add_g_eff_(weights, -lr)  # both forms are plain SGD without a buffer
        elif group["momentum_form"] == "u":
            (buf,) = self._state_tensors(params, ("momentum_buffer",))
            torch._foreach_mul_(buf, momentum)
            add_g_eff_(buf, 1.0)
            if group["nesterov"]:  # w -= lr * (g_eff + m * u)
                add_g_eff_(weights, -lr)
                torch._foreach_add_(weights, buf, alpha=-lr * momentum)
            else:
                torch._foreach_add_(weights, buf, alpha=-lr)
        else:
            (buf,) = self._state_tensors(params, ("momentum_buffer",))
            decay = momentum
            prev_lr = group.get("prev_lr")
            # Goyal et al. remark 2: v carries the previous lr; rescale it to the new one.
            if group["momentum_correction"] and prev_lr and prev_lr != lr:
                decay *= lr / prev_lr
            torch._foreach_mul_(buf, decay)
            add_g_eff_(buf, lr)
            if group["nesterov"]:  # w -= lr * g_eff + m * v
                add_g_eff_(weights, -lr)
                torch._foreach_add_(weights, buf, alpha=-momentum)
            else:
                torch._foreach_sub_(weights, buf)
        group["prev_lr"] = lr
        self._write_back(params, weights)


def local_ratio(w_sq: Tensor, g_sq: Tensor, group: dict[str, Any]) -> Tensor:
    """eta ||w|| / (||g|| + wd ||w|| + eps) per parameter; 1 where a norm is 0; LARC clip."""
    w_norm, g_norm = w_sq.sqrt(), g_sq.sqrt()
    ratio = group["trust_coefficient"] * w_norm / (g_norm + group["weight_decay"] * w_norm + group["eps"])
    if group["clip"] and group["lr"] > 0:
        ratio = (ratio / group["lr"]).clamp(max=1.0)
    # ||w|| = 0 (zero-initialised) would freeze the tensor, and ||g|| = 0 leaves nothing
    # to scale: such tensors are not adapted at all (ratio 1, also under LARC).
    return torch.where((w_norm > 0) & (g_norm > 0), ratio, torch.ones_like(ratio))
