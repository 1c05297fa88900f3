"""Preemption: SIGTERM or SIGUSR1 (what schedulers send before they kill a job) stops the
run at the next optimizer-step boundary, on every rank at the same step, with a checkpoint.

The handler only sets a flag. After each step the ranks take the maximum of their flags
in one 1-element all-reduce, so a signal that reaches one rank (DeepSpeed's launcher
forwards SIGTERM to its ranks one at a time) stops them all after the same step.
"""
from __future__ import annotations

import signal
from typing import Any

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionGuard:
    """`with PreemptionGuard() as guard:` ... `stop, _ = guard.agreed()`; if stop: save and stop."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum

    def __enter__(self) -> "PreemptionGuard":
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agreed(self, local_flag: bool = False) -> tuple[bool, bool]:
        """(any rank has received a signal, any rank raised ``local_flag``), the same on
        every rank: a collective, to call on every rank after every step. The second flag
        carries a rank-local decision that all ranks must share (a checkpoint due by the
        clock)."""
        flags = torch.tensor([0.0 if self.received is None else 1.0, float(local_flag)])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return bool(flags[0].item()), bool(flags[1].item())

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "a signal on another rank"
