"""Large-batch optimizers (LAMB, LARS and variants) and their registry.

    from lbllm.optim import create_optimizer, list_optimizers
    opt = create_optimizer("LAMB", model, lr=6e-3)   # decay / no-decay groups built for you
"""

from .lamb import Lamb
from .lars import Lars
from .layout import TensorLayout
from .param_groups import LayerwiseOptimizer, build_param_groups, describe_param_groups
from .registry import (
    OptimizerRecord,
    UnknownOptimizerError,
    create_optimizer,
    get_optimizer_record,
    list_optimizers,
    register_optimizer,
)
from .zero import attach_zero_layout

__all__ = [
    "Lamb",
    "Lars",
    "LayerwiseOptimizer",
    "OptimizerRecord",
    "UnknownOptimizerError",
    "attach_zero_layout",
    "build_param_groups",
    "create_optimizer",
    "describe_param_groups",
    "get_optimizer_record",
    "list_optimizers",
    "register_optimizer",
    "TensorLayout",
]
