"""Non-finite steps: a step whose loss or gradients are not finite is skipped on every
rank (weights, optimizer moments and LR schedule untouched), counted, and a run that
keeps producing them is stopped with its last checkpoint intact.

Who skips: under ZeRO 1/2/3 (and DeepSpeed's fp16/bf16 wrappers) DeepSpeed itself
discards a step whose gradient norm is not finite: it clears the gradients, leaves the
optimizer and the scheduler alone and counts ``engine.skipped_steps``. Without ZeRO, in
fp32, DeepSpeed hands the step to the client optimizer and would apply it; there, for
that one ``engine.step()``, the gradients are zeroed (so DeepSpeed's clipping sees finite
numbers), the optimizer instance's ``step`` is a no-op and it is marked ``overflow``,
DeepSpeed's signal to leave the scheduler alone and count the skip. Either way the ranks agree first: a flag
(any non-finite loss on this rank; without ZeRO also any non-finite gradient) is
max-reduced over the ranks before ``engine.step()``. A step the trainer flagged that
DeepSpeed applied anyway stops the run instead of going on with suspect weights.

fp16 keeps DeepSpeed's dynamic loss scaling: its overflow skips (finite loss, scaled
gradients out of range) are counted in ``skipped_steps`` but are part of how the scale
is found, so only non-finite losses count towards ``--max_consecutive_skips`` there.
"""
from __future__ import annotations

import sys
from typing import Any

import torch
import torch.distributed as dist


def _no_step(closure: Any = None) -> None:
    return None


class NonFiniteStop(RuntimeError):
    """Too many non-finite steps in a row (pretrain_bert.py exits 3)."""


class NonFiniteSteps:
    def __init__(self, max_consecutive: int, fp16: bool = False, is_main: bool = True):
        self.max_consecutive, self.fp16, self.is_main = max_consecutive, fp16, is_main
        self.total = 0  # steps skipped in this process (also DeepSpeed's fp16 overflow skips)
        self.consecutive = 0
        self.last_skipped = False
        self._own_skip = False

    @staticmethod
    def _deepspeed_skips(engine: Any) -> bool:
        """Whether DeepSpeed discards a non-finite step by itself (its ZeRO and mixed-precision
        optimizers carry an ``overflow`` flag; a plain client optimizer does not)."""
        return engine.zero_optimization_stage() > 0 or hasattr(engine.optimizer, "overflow")

    def before_step(self, engine: Any, non_finite_losses: torch.Tensor) -> bool:
        """Call after the last backward of the step, before ``engine.step()``, on every rank
        (a collective). True when the step must be skipped."""
        flag = (non_finite_losses > 0).float().reshape(1)
        own = not self._deepspeed_skips(engine)
        if own:
            grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
            if grads and not bool(torch.stack([g.isfinite().all() for g in grads]).all()):
                flag.fill_(1.0)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        skip = bool(flag.item())
        self._own_skip = skip and own
        if self._own_skip:  # for this one engine.step(): clip finite zeros, step nothing, leave the schedule
            for p in engine.module.parameters():
                if p.grad is not None:
                    p.grad.zero_()
            engine.optimizer.step = _no_step
            engine.optimizer.overflow = True
        return skip

    def after_step(self, engine: Any, flagged: bool, deepspeed_skipped: bool, step: int) -> None:
        if self._own_skip:
            del engine.optimizer.overflow, engine.optimizer.step  # the instance attributes set above
        applied = not (deepspeed_skipped or self._own_skip)
        if flagged and applied:
            raise NonFiniteStop(f"step {step}: the loss was not finite and DeepSpeed applied the step anyway; "
                                "the weights are suspect: --resume auto from the last checkpoint")
        self.last_skipped = not applied
        if not self.last_skipped:
            self.consecutive = 0
            return
        self.total += 1
        if flagged or not self.fp16:
            self.consecutive += 1
            if self.is_main:
                print(f"[lbllm] step {step}: non-finite loss or gradients: skipped on every rank (weights, moments "
                      f"and LR schedule unchanged; {self.consecutive} in a row, {self.total} in this run)",
                      file=sys.stderr, flush=True)

    def raise_if_stuck(self, step: int) -> None:
        if self.consecutive and self.consecutive >= self.max_consecutive:
            raise NonFiniteStop(
                f"step {step}: {self.consecutive} non-finite steps in a row (--max_consecutive_skips "
                f"{self.max_consecutive}); stopped, the last checkpoint is kept. Lower the LR or check the data, "
                "then continue with --resume auto")
