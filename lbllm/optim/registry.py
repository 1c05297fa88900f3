"""Registry of named optimizers: a variant is a record (class + defaults), not a copy.

``create_optimizer("LAMB", model, lr=6e-3)`` looks the name up case-insensitively,
merges the record's defaults under the caller's keyword arguments, builds decay /
no-decay parameter groups when handed a model, and constructs the optimizer. Unknown
names and unknown keyword arguments are errors that list what is valid, never silently
ignored.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lbllm.utils import UserError

from .lamb import Lamb
from .lars import Lars
from .param_groups import build_param_groups

__all__ = [
    "OptimizerRecord",
    "UnknownOptimizerError",
    "register_optimizer",
    "get_optimizer_record",
    "list_optimizers",
    "create_optimizer",
]


class UnknownOptimizerError(UserError):
    """An optimizer name that is not registered."""


@dataclass(frozen=True)
class OptimizerRecord:
    """A named optimizer: its class, the defaults that make the variant, and one line on it."""

    name: str
    cls: type[torch.optim.Optimizer]
    defaults: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"optimizer record needs a non-empty name, got {self.name!r}")
        if not (isinstance(self.cls, type) and issubclass(self.cls, torch.optim.Optimizer)):
            raise ValueError(f"optimizer record {self.name!r}: cls must be a torch.optim.Optimizer subclass")
        valid = self.valid_kwargs()
        if valid is not None:
            bad = sorted(set(self.defaults) - valid)
            if bad:
                raise ValueError(f"optimizer record {self.name!r}: defaults {bad} are not arguments of "
                                 f"{self.cls.__name__} (valid: {sorted(valid)})")

    def valid_kwargs(self) -> set[str] | None:
        """Keyword arguments the class accepts (besides params); None if it takes **kwargs."""
        sig = inspect.signature(self.cls.__init__)
        names = set()
        for i, (pname, p) in enumerate(sig.parameters.items()):
            if p.kind is inspect.Parameter.VAR_KEYWORD:
                return None
            if i < 2 or p.kind is inspect.Parameter.VAR_POSITIONAL:  # self, params
                continue
            names.add(pname)
        return names

    def default_of(self, key: str) -> Any:
        """The record's default for ``key``, else the class signature's, else None."""
        if key in self.defaults:
            return self.defaults[key]
        p = inspect.signature(self.cls.__init__).parameters.get(key)
        return None if p is None or p.default is inspect.Parameter.empty else p.default


_REGISTRY: dict[str, OptimizerRecord] = {}


def register_optimizer(record: OptimizerRecord, *, overwrite: bool = False) -> OptimizerRecord:
    """Add ``record``; names are unique case-insensitively unless ``overwrite``."""
    key = record.name.lower()
    if key in _REGISTRY and not overwrite:
        raise ValueError(f"optimizer {record.name!r} is already registered "
                         f"(as {_REGISTRY[key].name!r}); pass overwrite=True to replace it")
    _REGISTRY[key] = record
    return record


def list_optimizers() -> list[str]:
    """Registered optimizer names, sorted."""
    return sorted((r.name for r in _REGISTRY.values()), key=str.lower)


def get_optimizer_record(name: str) -> OptimizerRecord:
    """The record registered under ``name`` (case-insensitive)."""
    record = _REGISTRY.get(str(name).lower())
    if record is None:
        raise UnknownOptimizerError(
            f"unknown optimizer {name!r}; registered optimizers: {', '.join(list_optimizers())}")
    return record


def create_optimizer(name: str, params_or_model: nn.Module | Iterable[Any], **kwargs: Any
                     ) -> torch.optim.Optimizer:
    """Build the optimizer registered as ``name``.

    ``params_or_model``: an ``nn.Module`` (split into decay / no-decay groups by
    ``build_param_groups`` with the effective ``weight_decay``), or parameters /
    param-group dicts (passed through unchanged). ``kwargs`` override the record's
    defaults; a key the optimizer does not take raises ``ValueError``.
    """
    record = get_optimizer_record(name)
    valid = record.valid_kwargs()
    if valid is not None:
        for key in kwargs:
            if key not in valid:
                raise ValueError(f"optimizer {record.name!r} got unknown argument {key!r}; "
                                 f"valid arguments: {', '.join(sorted(valid))}")
    options = {**record.defaults, **kwargs}
    if isinstance(params_or_model, nn.Module):
        weight_decay = options.get("weight_decay", record.default_of("weight_decay")) or 0.0
        params = build_param_groups(params_or_model, weight_decay)
        if not params:
            raise ValueError(f"optimizer {record.name!r}: the model has no trainable parameters")
    else:
        params = params_or_model
    opt = record.cls(params, **options)
    if isinstance(params_or_model, nn.Module) and hasattr(opt, "param_names"):
        names = {id(p): n for n, p in params_or_model.named_parameters()}
        opt.param_names = [[names.get(id(p), "?") for p in g["params"]] for g in opt.param_groups]
    return opt


# ---- built-in records ------------------------------------------------------------------
# Defaults below are what distinguishes a variant; everything else is the class default.

_LAMB_PAPER = dict(betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, bias_correction=True)

for _record in (
    OptimizerRecord(
        "LAMB", Lamb, dict(_LAMB_PAPER),
        "LAMB, You et al. 2020 Algorithm 2: Adam moments with bias correction, per-tensor "
        "trust ratio ||w||/||u|| on decayed tensors; no-decay tensors take plain Adam steps.",
    ),
    OptimizerRecord(
        "LAMBClamped", Lamb,
        dict(_LAMB_PAPER, eps=1e-8, bias_correction=False, min_trust=0.01, max_trust=0.3,
             adapt_no_decay=True),
        "DeepSpeed bing_bert LAMB: no bias correction, trust ratio clamped to [0.01, 0.3], "
        "every tensor adapted and eps 1e-8, as DeepSpeed's FusedLamb does.",
    ),
    OptimizerRecord(
        "NVLAMB", Lamb, dict(_LAMB_PAPER, adapt_no_decay=True, max_grad_norm=1.0),
        "NVIDIA's BERT LAMB: gradients pre-normalised to global norm <= 1.0, trust ratio "
        "applied to every tensor including biases and LayerNorm.",
    ),
    OptimizerRecord(
        "LARS", Lars, dict(momentum=0.9, trust_coefficient=0.001),
        "LARS, You et al. 2017: momentum SGD with per-tensor local lr "
        "eta*||w||/(||g|| + wd*||w||) on decayed tensors.",
    ),
    OptimizerRecord(
        "LARC", Lars, dict(momentum=0.9, trust_coefficient=0.001, clip=True),
        "LARS with clipping (NVIDIA apex LARC): local lr = min(eta*||w||/(||g|| + wd*||w||), lr).",
    ),
):
    register_optimizer(_record)
del _record
