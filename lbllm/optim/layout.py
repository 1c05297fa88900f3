"""What "one parameter" is to a layer-wise optimizer: the layout strategy.

LAMB and LARS compute one adaptive ratio per parameter from per-parameter norms. Which
elements form a parameter depends on who handed the optimizer its tensors, not on the
update rule, so the optimizer gets it from outside (torchtitan's way: components take
their parallel context as an argument) through a *layout* object with three operations:

* ``sq_norms(tensors, params)``: this rank's squared L2 norm of each parameter's part of
  ``tensors`` (``tensors[i]`` has the layout of ``params[i]``), one 1-D tensor;
* ``reduce(*sq_norms)``: the full norms from every rank's partial ones (an all-reduce
  where parameters are split across ranks, nothing otherwise);
* ``broadcast(values, params)``: one value per parameter back onto the tensors, one
  tensor per entry of ``params`` that broadcasts against it;

plus ``global_sq_norm`` (all gradients of all groups, for LAMB's ``max_grad_norm``) and
``kernel_norms`` (whether the per-tensor norms a fused kernel computes as a by-product
are this layout's norms, so the optimizer may skip computing them again).

``TensorLayout`` (here) is the default: every tensor of a param group is one parameter.
Under DeepSpeed ZeRO the optimizer steps flat per-rank partitions instead; the layouts of
``lbllm/optim/zero.py`` map those back to the original parameters and are attached with
``lbllm.optim.zero.attach_zero_layout(engine)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor

__all__ = ["Layout", "TensorLayout", "TENSOR_LAYOUT"]


class Layout(Protocol):
    """The interface ``LayerwiseOptimizer`` uses (see the module docstring)."""

    kernel_norms: bool

    def sq_norms(self, tensors: Sequence[Tensor], params: Sequence[Tensor]) -> Tensor: ...

    def reduce(self, *sq_norms: Tensor) -> tuple[Tensor, ...]: ...

    def broadcast(self, values: Tensor, params: Sequence[Tensor]) -> list[Tensor]: ...

    def global_sq_norm(self, tensors: Sequence[Tensor], params: Sequence[Tensor]) -> Tensor: ...


class TensorLayout:
    """Each tensor of a param group is one whole parameter (no ZeRO partitioning)."""

    kernel_norms = True

    def sq_norms(self, tensors: Sequence[Tensor], params: Sequence[Tensor]) -> Tensor:
        if not tensors:
            return torch.zeros(0)
        # One multi-tensor kernel for all norms; stacking keeps them on the device.
        return torch.stack(torch._foreach_norm(list(tensors))).square()

    def reduce(self, *sq_norms: Tensor) -> tuple[Tensor, ...]:
        return sq_norms  # every norm is already complete on this rank

    def broadcast(self, values: Tensor, params: Sequence[Tensor]) -> list[Tensor]:
        # 0-d views of one device tensor: no copy, no host sync.
        return list(values.unbind())

    def global_sq_norm(self, tensors: Sequence[Tensor], params: Sequence[Tensor]) -> Tensor:
        return self.sq_norms(tensors, params).sum()


TENSOR_LAYOUT = TensorLayout()
