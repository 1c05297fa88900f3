"""How the optimizers see parameters: weight-decay groups and per-parameter reductions.

Two things live here because both are about "what is one parameter" to an optimizer:

* ``build_param_groups`` splits a model into a decay group and a no-decay group with the
  timm rule ``param.ndim <= 1 or name.endswith(".bias")`` (biases, LayerNorm weights and
  other vectors are not decayed), so nothing depends on parameter-name substrings.
* ``LayerwiseOptimizer`` is the base of LAMB and LARS, whose defining feature is one
  adaptive ratio per parameter tensor. What "per parameter" means is not its business:
  it asks its ``layout`` (lbllm/optim/layout.py) for per-parameter squared norms, their
  reduction across ranks and the broadcast of ratios back onto the tensors. By default a
  parameter is one tensor of the group; under DeepSpeed ZeRO ``attach_zero_layout``
  (lbllm/optim/zero.py) gives it a layout over flat partitions, and the step code does
  not change.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .layout import TENSOR_LAYOUT, Layout

__all__ = [
    "build_param_groups",
    "describe_param_groups",
    "is_no_decay",
    "compute_dtype",
    "as_compute_dtype",
    "LayerwiseOptimizer",
]

_HALF_DTYPES = (torch.float16, torch.bfloat16)


def is_no_decay(name: str, param: Tensor) -> bool:
    """True for parameters that should not be weight-decayed (biases, norms, other vectors)."""
    return param.ndim <= 1 or name.endswith(".bias")


def build_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Split ``model``'s trainable parameters into a decay and a no-decay group.

    Returns ``[{"params": [...], "weight_decay": weight_decay}, {"params": [...],
    "weight_decay": 0.0}]`` in that order, leaving out empty groups. Frozen parameters
    (``requires_grad=False``) are not handed to the optimizer at all. Parameters shared
    between modules appear once (``named_parameters`` de-duplicates them).
    """
    decay: list[Tensor] = []
    no_decay: list[Tensor] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if is_no_decay(name, param) else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": float(weight_decay)},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def _group_params(group: Any) -> list[Tensor]:
    if isinstance(group, dict):
        params = group["params"]
        return [params] if isinstance(params, Tensor) else list(params)
    return [group]


def describe_param_groups(groups: Iterable[dict[str, Any]] | Iterable[Tensor]) -> str:
    """One log line: tensors and elements with and without weight decay.

    Accepts param-group dicts (as from ``build_param_groups`` or ``optimizer.param_groups``)
    or a plain iterable of tensors (counted as decay with the optimizer's default, shown
    as ``wd=default``).
    """
    stats = {True: [0, 0, set()], False: [0, 0, set()]}  # decayed? -> [tensors, elements, wds]
    for group in groups:
        wd = group.get("weight_decay", "default") if isinstance(group, dict) else "default"
        decayed = wd == "default" or float(wd) != 0.0
        entry = stats[decayed]
        for p in _group_params(group):
            entry[0] += 1
            entry[1] += p.numel()
        entry[2].add(wd if wd == "default" else float(wd))

    def fmt(decayed: bool) -> str:
        n_tensors, n_elems, wds = stats[decayed]
        head = "weight decay" if decayed else "no weight decay"
        text = f"{head}: {n_tensors} tensors, {n_elems:,} elements"
        if decayed and wds:
            text += " (wd=" + ", ".join(str(w) for w in sorted(wds, key=str)) + ")"
        return text

    total = stats[True][1] + stats[False][1]
    return f"param groups: {fmt(True)}; {fmt(False)}; total {total:,} elements"


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype the optimizers do their math and keep their state in: fp32 for 16-bit params."""
    return torch.float32 if dtype in _HALF_DTYPES else dtype


def as_compute_dtype(tensors: Sequence[Tensor]) -> list[Tensor]:
    # fp32/fp64 tensors pass through untouched (no copy); 16-bit ones get an fp32 copy.
    return [t if t.dtype not in _HALF_DTYPES else t.float() for t in tensors]


class LayerwiseOptimizer(torch.optim.Optimizer):
    """Base for optimizers with one adaptive ratio per parameter (LAMB, LARS).

    Subclasses implement ``_step_group(group, params, grads, **extra)`` with
    ``torch._foreach_*`` ops over the whole group: there is no Python loop over parameters
    that launches kernels, and no host synchronisation (ratios stay on the device as one
    1-D tensor). Per-parameter norms, their reduction and the broadcast of ratios go
    through ``self.layout``, so ZeRO redefines "per parameter" without touching the
    update rule.

    Optimizer state of 16-bit parameters is kept in fp32, and the update is computed in
    fp32 and written back, because bf16 moments lose most of Adam's second-moment
    resolution. ``load_state_dict`` preserves that (torch would cast state to the
    parameter dtype).
    """

    #: How parameters are laid out in the tensors this optimizer steps (see layout.py).
    #: Replaced per instance by ``set_layout``; the class default is one tensor per parameter.
    layout: Layout = TENSOR_LAYOUT

    #: Parameter names per group (set by ``create_optimizer`` from a model), for the
    #: per-layer trust-ratio log; None when built from bare parameters.
    param_names: list[list[str]] | None = None

    def set_layout(self, layout: Layout) -> None:
        """Use ``layout`` for every per-parameter norm, reduction and broadcast from now on."""
        self.layout = layout

    # ---- what the last step did: its trust ratios ---------------------------------------
    def _record_ratios(self, group: dict[str, Any], ratio: Tensor) -> None:
        """Keep the ratios the step applied (a device tensor, no copy, no host sync). Kept per
        group, not reset per ``step()``: ZeRO 1/2 call ``step()`` once per group."""
        self.__dict__.setdefault("_ratios", {})[id(group)] = ratio.detach()

    def trust_ratios(self) -> tuple[Tensor, list[str] | None] | None:
        """The last step's per-parameter ratios over all adapted groups (one 1-D tensor, in
        param-group order) and their parameter names where known; None before a step or
        when the step adapted nothing. Under ZeRO every rank holds the whole vector (the
        norms were all-reduced to compute them)."""
        ratios = self.__dict__.get("_ratios") or {}
        picked = [(i, ratios[id(g)]) for i, g in enumerate(self.param_groups) if id(g) in ratios]
        if not picked:
            return None
        vector = torch.cat([r.reshape(-1).float() for _, r in picked])
        names = None
        if self.param_names is not None:
            positions = getattr(self.layout, "param_positions", [])
            names = []
            for i, _ in picked:
                group = list(self.param_names[i])
                where = positions[i] if i < len(positions) else {}
                if where and len(where) == len(group):  # e.g. ZeRO's round-robin order
                    ordered = [""] * len(group)
                    for j, name in enumerate(group):
                        ordered[where[j]] = name
                    group = ordered
                names += group
            if len(names) != vector.numel():
                names = None  # some parameters had no gradient: positions are not names
        return vector, names

    # ---- shared plumbing ------------------------------------------------------------
    def _params_with_grads(self, group: dict[str, Any]) -> tuple[list[Tensor], list[Tensor]]:
        """The group's parameters that have a gradient, and those gradients."""
        params, grads = [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(
                    f"{type(self).__name__} does not support sparse gradients; "
                    "use a dense embedding (nn.Embedding(sparse=False))"
                )
            params.append(p)
            grads.append(p.grad)
        return params, grads

    def _state_tensors(self, params: Sequence[Tensor], keys: Sequence[str]) -> list[list[Tensor]]:
        """Per-parameter state tensors, created as zeros (in the compute dtype) on first use."""
        out: list[list[Tensor]] = [[] for _ in keys]
        for p in params:
            state = self.state[p]
            if not state:
                for key in keys:
                    state[key] = torch.zeros_like(p, dtype=compute_dtype(p.dtype),
                                                  memory_format=torch.preserve_format)
            for lst, key in zip(out, keys):
                lst.append(state[key])
        return out

    def _workspace(self, params: Sequence[Tensor], slot: str = "work") -> list[Tensor]:
        """One scratch tensor per parameter (its shape, compute dtype), contents undefined.

        ``slot`` names independent sets of buffers, for a step that needs two at once.

        On CPU the buffers persist across steps: there is no caching allocator, and
        fresh multi-MB allocations page-fault on every step, which costs several times
        the arithmetic itself. On accelerators they are allocated per step, because the
        caching allocator makes that free and the memory is better left to activations
        between steps. Never part of ``state_dict``.
        """
        cache: dict[Tensor, Tensor] = self.__dict__.setdefault("_scratch", {}).setdefault(slot, {})
        out = []
        for p in params:
            dtype = compute_dtype(p.dtype)
            if p.device.type != "cpu":
                out.append(torch.empty_like(p, dtype=dtype))
                continue
            buf = cache.get(p)
            if buf is None or buf.shape != p.shape or buf.dtype != dtype:
                buf = cache[p] = torch.empty_like(p, dtype=dtype)
            out.append(buf)
        return out

    @staticmethod
    def _write_back(params: Sequence[Tensor], work: Sequence[Tensor]) -> None:
        """Copy fp32 working copies back into 16-bit parameters (no-op for fp32 params)."""
        dst = [p for p, w in zip(params, work) if p is not w]
        if dst:
            src = [w for p, w in zip(params, work) if p is not w]
            torch._foreach_copy_(dst, src)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        # torch.optim casts floating state to the parameter's dtype; for 16-bit params our
        # state is fp32 by design, so restore it from the saved tensors at full precision.
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for idx, p in zip(saved_ids, params):
            saved = state_dict["state"].get(idx)
            if saved is None or p.dtype not in _HALF_DTYPES:
                continue
            for key, value in saved.items():
                if isinstance(value, Tensor) and value.is_floating_point():
                    self.state[p][key] = value.to(device=p.device, dtype=compute_dtype(p.dtype),
                                                  copy=True)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - documented on subclasses
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        gathered = []
        for group in self.param_groups:
            params, grads = self._params_with_grads(group)
            # 16-bit gradients are read in fp32 (one copy per step), so norms and moments
            # are computed at full precision.
            gathered.append((params, as_compute_dtype(grads)))
        extra = self._prepare_step(gathered)
        for group, (params, grads) in zip(self.param_groups, gathered):
            if params:
                self._step_group(group, params, grads, **extra)
        return loss

    def _prepare_step(self, gathered: list[tuple[list[Tensor], list[Tensor]]]) -> dict[str, Any]:
        """Work that spans all groups before any update (e.g. a global grad norm)."""
        return {}

    def _step_group(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                    **extra: Any) -> None:
        raise NotImplementedError
