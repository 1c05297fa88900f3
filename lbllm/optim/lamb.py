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

from . import cpu_kernel
from .param_groups import LayerwiseOptimizer, as_compute_dtype

__all__ = ["Lamb", "KERNELS"]

KERNELS = ("auto", "native", "fused", "foreach")


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
        kernel: how the step is computed, never what it computes (all agree with the
            float64 reference to fp32 rounding, tests/test_optim.py; not bit for bit with
            each other). ``"native"``: lbllm's one-pass CPU kernel
            (lbllm/optim/cpu_kernel.py; contiguous fp32 CPU tensors, needs a C compiler on
            first use); ``"fused"``: torch's fused Adam kernel (CPU and CUDA; contiguous
            fp32/fp64) for the moments and the direction; ``"foreach"``: separate
            ``torch._foreach_*`` ops (any device, dtype and layout). ``"auto"`` (default)
            takes the first of these that the tensors and the machine allow. Memory passes
            per step over parameter-sized fp32 data: about 10, 14 and 27.

    Per step the work is a fixed number of multi-tensor calls per group (the fused kernel
    and ``torch._foreach_*`` ops): no Python loop over parameters launches kernels and
    nothing waits on the device. Speed: scripts/bench_optim.py, docs/bench_optim.md.
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
        kernel: str = "auto",
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
        if kernel not in KERNELS:
            raise ValueError(f"Lamb: kernel must be one of {KERNELS}, got {kernel!r}")
        if max_grad_norm is not None and max_grad_norm < 0.0:
            raise ValueError(f"Lamb: max_grad_norm must be >= 0 or None, got {max_grad_norm}")
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
            bias_correction=bool(bias_correction), min_trust=min_trust, max_trust=max_trust,
            max_grad_norm=max_grad_norm, adapt_no_decay=bool(adapt_no_decay),
            kernel=kernel,
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
            return {"grad_divisor": None}
        params = [p for ps, _ in gathered for p in ps]
        total = self.layout.global_sq_norm(grads, params).sqrt()
        # Gradients are divided by max(total, max_norm) / max_norm (NVIDIA's form): 1 when
        # under the limit, never a division by zero. Stays a device tensor: no host sync.
        return {"grad_divisor": total.clamp(min=max_norm) / max_norm}

    def _step_group(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                    grad_divisor: Tensor | None = None) -> None:
        group["step"] = int(group.get("step", 0)) + 1
        exp_avg, exp_avg_sq = self._state_tensors(params, ("exp_avg", "exp_avg_sq"))
        weights = as_compute_dtype(params)
        kernel = self._pick_kernel(group.get("kernel", "auto"), weights, grads, exp_avg, exp_avg_sq)
        step = {"native": self._native_step, "fused": self._fused_step, "foreach": self._foreach_step}[kernel]
        step(group, params, weights, grads, exp_avg, exp_avg_sq, grad_divisor)
        self._write_back(params, weights)

    @staticmethod
    def _pick_kernel(wanted: str, *lists: list[Tensor]) -> str:
        if wanted in ("auto", "native") and cpu_kernel.usable(*lists) and cpu_kernel.available():
            return "native"
        if wanted in ("auto", "fused") and _fusable(*lists) and _fused_adam_supported(lists[0][0].device):
            return "fused"
        if wanted in ("auto", "foreach"):
            return "foreach"
        need = {"native": "contiguous fp32 CPU tensors and a C compiler (cc)",
                "fused": "torch's fused Adam kernel on this device, and contiguous fp32/fp64 tensors of "
                         "one dtype per parameter"}[wanted]
        raise RuntimeError(f"Lamb(kernel={wanted!r}) needs {need}; use kernel='auto' to fall back")

    # ---- native: lbllm's one-pass CPU kernel ---------------------------------------------
    def _native_step(self, group, params, weights, grads, exp_avg, exp_avg_sq, grad_divisor) -> None:
        """Moments, u and both norms in one pass (lbllm/optim/cpu_kernel.py), then the update.

        Memory passes: the kernel reads w, g, m, v and writes m, v, u (7); the update reads
        w, u and writes w (3). The norms come from the layout instead (two more reads)
        when its parameters are not the tensors (ZeRO partitions).
        """
        beta1, beta2 = group["betas"]
        lr, wd = group["lr"], group["weight_decay"]
        bc = group["bias_correction"]
        update = self._workspace(params)
        w_sq, u_sq = cpu_kernel.lamb_moments_update(
            weights, grads, exp_avg, exp_avg_sq, update, beta1=beta1, beta2=beta2,
            bias_correction1=1.0 - beta1 ** group["step"] if bc else 1.0,
            bias_correction2=1.0 - beta2 ** group["step"] if bc else 1.0,
            eps=group["eps"], weight_decay=wd,
            # A CPU tensor: reading it is not a device sync.
            grad_divisor=1.0 if grad_divisor is None else float(grad_divisor),
        )
        if not (wd != 0.0 or group["adapt_no_decay"]):
            torch._foreach_add_(weights, update, alpha=-lr)
            return
        kernel_norms = (w_sq.to(weights[0].dtype), u_sq.to(weights[0].dtype))
        self._adapted_update(group, params, weights, update, kernel_norms=kernel_norms)

    # ---- fused: torch's one-pass Adam kernel computes the LAMB direction -----------------
    def _fused_step(self, group, params, weights, grads, exp_avg, exp_avg_sq, grad_divisor) -> None:
        """Moments and the update u in one pass of torch's fused AdamW kernel, then the ratio.

        The kernel does ``x = x * (1 - a * d) - a * m_hat / (sqrt(v_hat) + eps)`` after
        updating m and v in the same pass. On a copy of the weights with ``a = -1`` and
        ``d = wd - 1`` that is ``x = wd * w + m_hat / (sqrt(v_hat) + eps) = u``: the LAMB
        update, bias-corrected exactly as Algorithm 2 writes it (the kernel takes
        ``1 - b^t`` from a step tensor; ``t = inf`` makes it exactly 1, i.e. no bias
        correction). Memory traffic per element: copy w (2), kernel (read g, m, v, u; write
        m, v, u: 7), two norms (2), the update (3) = 14 passes of 4 bytes, against 27 for
        separate foreach ops (see ``_foreach_step``).
        """
        beta1, beta2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        steps = [torch.full((), float(group["step"]) if group["bias_correction"] else math.inf,
                            dtype=torch.float32, device=weights[0].device)] * len(weights)
        divisor = None
        if grad_divisor is not None:
            # The kernel divides the gradients by grad_scale *and stores them back*: give it a
            # scratch copy so p.grad stays untouched.
            scratch = self._workspace(params, slot="grad")
            torch._foreach_copy_(scratch, grads)
            grads = scratch
            divisor = grad_divisor.to(device=weights[0].device, dtype=torch.float32)
        kernel = dict(beta1=beta1, beta2=beta2, eps=eps, amsgrad=False, maximize=False, grad_scale=divisor)

        if not (wd != 0.0 or group["adapt_no_decay"]):
            # Not adapted (and wd == 0): a plain Adam step, done in place on the weights.
            torch._fused_adamw_(weights, grads, exp_avg, exp_avg_sq, [], steps, lr=lr, weight_decay=0.0, **kernel)
            return
        update = self._workspace(params)
        torch._foreach_copy_(update, weights)
        torch._fused_adamw_(update, grads, exp_avg, exp_avg_sq, [], steps, lr=-1.0, weight_decay=wd - 1.0, **kernel)
        self._adapted_update(group, params, weights, update)

    # ---- foreach: separate multi-tensor ops (any device and dtype) ----------------------
    def _foreach_step(self, group, params, weights, grads, exp_avg, exp_avg_sq, grad_divisor) -> None:
        beta1, beta2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        step = group["step"]
        # Every temporary of the step lives in this one buffer per parameter; all other
        # ops are in place (see LayerwiseOptimizer._workspace for why that matters).
        work = self._workspace(params)
        if grad_divisor is not None:
            torch._foreach_copy_(work, grads)  # clip a copy: p.grad stays untouched
            torch._foreach_div_(work, grad_divisor)
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
            self._adapted_update(group, params, weights, update, scale=k)  # u = k * u'
        else:
            torch._foreach_add_(weights, update, alpha=-lr * k)

    def _adapted_update(self, group: dict[str, Any], params: list[Tensor], weights: list[Tensor],
                        update: list[Tensor], scale: float = 1.0,
                        kernel_norms: tuple[Tensor, Tensor] | None = None) -> None:
        """``w += -lr * r * (scale * update)`` in one pass, with the per-parameter trust ratio
        ``r = ||w|| / ||scale * update||``.

        ``kernel_norms``: the per-tensor squared norms of ``weights`` and ``update`` that a
        kernel computed as a by-product; used when the layout says they are its norms.
        """
        layout = self.layout
        if kernel_norms is not None and layout.kernel_norms:
            w_sq, u_sq = kernel_norms
        else:
            w_sq, u_sq = layout.sq_norms(weights, params), layout.sq_norms(update, params)
        if scale != 1.0:
            u_sq = u_sq * (scale * scale)
        # Under ZeRO a rank holds slices of the parameters: here both partial norms are
        # summed over the data-parallel group, one all-reduce of a [2, n] tensor (per
        # tensor, without ZeRO, there is nothing to reduce).
        w_sq, u_sq = layout.reduce(w_sq, u_sq)
        ratio = trust_ratio(w_sq, u_sq, group)
        self._record_ratios(group, ratio)
        # The scalar -lr * r * scale broadcast per parameter.
        torch._foreach_addcmul_(weights, update, layout.broadcast(ratio * (-group["lr"] * scale), params))


def trust_ratio(w_sq: Tensor, u_sq: Tensor, group: dict[str, Any]) -> Tensor:
    """||w|| / ||u|| per parameter, 1 where either is zero, then clamped."""
    w_norm, u_norm = w_sq.sqrt(), u_sq.sqrt()
    # A zero-initialised tensor (||w|| = 0) would never move with r = 0, and ||u|| = 0
    # means there is nothing to scale: both fall back to the plain step.
    ratio = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
    lo, hi = group["min_trust"], group["max_trust"]
    if lo is not None or hi is not None:
        ratio = ratio.clamp(min=lo, max=hi)
    return ratio


_FUSED_SUPPORT: dict[str, bool] = {}


def _fused_adam_supported(device: torch.device) -> bool:
    """Whether torch's fused Adam kernel runs on this device type (CPU since torch 2.4, CUDA)."""
    kind = device.type
    if kind not in _FUSED_SUPPORT:
        ok = hasattr(torch, "_fused_adamw_") and kind in ("cpu", "cuda")
        if ok:
            try:  # probe once: one element, the same call the step makes
                t = [torch.ones(1, device=device)]
                torch._fused_adamw_(t, [torch.ones(1, device=device)], [torch.zeros(1, device=device)],
                                    [torch.zeros(1, device=device)], [], [torch.ones((), device=device)],
                                    lr=-1.0, beta1=0.9, beta2=0.999, weight_decay=-0.99, eps=1e-6,
                                    amsgrad=False, maximize=False)
            except (RuntimeError, NotImplementedError):
                ok = False
        _FUSED_SUPPORT[kind] = ok
    return _FUSED_SUPPORT[kind]


def _fusable(*lists: list[Tensor]) -> bool:
    """Whether the fused kernel can take these tensors: it walks raw memory on CPU (so every
    tensor must be contiguous), wants one float32/float64 dtype per parameter (16-bit
    params arrive here as fp32 copies) and one device per call (the step tensor's)."""
    device = lists[0][0].device
    for ts in zip(*lists):
        dtype = ts[0].dtype
        if dtype not in (torch.float32, torch.float64):
            return False
        for t in ts:
            if t.dtype != dtype or t.device != device or not t.is_contiguous():
                return False
    return True

