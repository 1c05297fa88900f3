"""Data parallelism for SQuAD fine-tuning: the few collectives it needs, nothing else (it lives in
lbllm.train with the rest of the distributed code; the squad package stays single-process).

Fine-tuning keeps a full model and optimizer on every rank (no ZeRO: the model is
small next to pretraining's batches), so all it needs is torch.distributed itself,
set up from the variables the DeepSpeed launcher (or torchrun) exports: every rank
reads the same global batch indices and takes a contiguous slice, gradients are summed
in one flat buffer per step, and prediction logits are gathered on rank 0. A plain
`python scripts/run_squad.py` is a world of one and makes no collective call at all.

torch is imported inside the methods that use it, so `from_env` can tell the CLI
which rank prints errors before the slow import.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = ["DataParallel", "from_env"]


@dataclass(frozen=True)
class DataParallel:
    """This process's place in the world; methods are no-ops in a world of one."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def shard(self, n: int, rank: int | None = None) -> tuple[int, int]:
        """[lo, hi) of this rank's contiguous share of n items (sizes differ by <= 1)."""
        r = self.rank if rank is None else rank
        return r * n // self.world_size, (r + 1) * n // self.world_size

    def init(self, device: torch.device) -> None:
        """Join the launcher's process group: gloo for CPU tensors, nccl for CUDA."""
        import torch

        if not self.active or torch.distributed.is_initialized():
            return
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                             rank=self.rank, world_size=self.world_size)  # fmt: skip

    def close(self) -> None:
        import torch

        if self.active and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def broadcast_parameters(self, model: torch.nn.Module) -> None:
        """Start every rank from rank 0's weights: the seed makes them equal already,
        this makes it true whatever initialization did (one flat buffer)."""
        import torch

        if not self.active:
            return
        tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
        flat = torch.cat([t.detach().reshape(-1) for t in tensors])
        torch.distributed.broadcast(flat, src=0)
        _unflatten_into(flat, tensors)

    def sum_gradients(self, params: Sequence[torch.Tensor], extra: torch.Tensor) -> torch.Tensor:
        """Sum every parameter's gradient (missing ones count as zero) and `extra` (the
        step's loss) over ranks in one all-reduce; returns the summed `extra`."""
        import torch

        if not self.active:
            return extra
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads] + [extra.reshape(1).to(grads[0].dtype)])
        torch.distributed.all_reduce(flat)
        for p, g in zip(params, flat[:-1].split([q.numel() for q in params])):
            p.grad = g.view_as(p)
        return flat[-1]

    def gather_rows(self, rows: np.ndarray, total: int, device: torch.device) -> np.ndarray | None:
        """Concatenate each rank's `shard(total)` rows on rank 0 (None on the others).

        Shards differ in size by at most one row, so each is padded to the largest
        for the collective and trimmed again."""
        import torch

        if not self.active:
            return rows
        sizes = [self.shard(total, r) for r in range(self.world_size)]
        width = max(hi - lo for lo, hi in sizes)
        padded = torch.zeros((width, *rows.shape[1:]), dtype=torch.float32, device=device)
        padded[: len(rows)] = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32)).to(device)
        bucket = [torch.empty_like(padded) for _ in range(self.world_size)] if self.is_main else None
        torch.distributed.gather(padded, bucket, dst=0)
        if not self.is_main:
            return None
        return np.concatenate([b[: hi - lo].cpu().numpy() for b, (lo, hi) in zip(bucket, sizes)])


def _unflatten_into(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    import torch

    with torch.no_grad():
        for t, chunk in zip(tensors, flat.split([t.numel() for t in tensors])):
            t.copy_(chunk.view_as(t))


def from_env() -> DataParallel:
    """Read RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_SIZE as the DeepSpeed launcher and
    torchrun export them; a bare process is rank 0 of 1."""
    env = os.environ
    world = int(env.get("WORLD_SIZE", "1"))
    local_size = int(env.get("LOCAL_SIZE", env.get("LOCAL_WORLD_SIZE", str(world))))
    return DataParallel(rank=int(env.get("RANK", "0")), world_size=world,
                        local_rank=int(env.get("LOCAL_RANK", "0")), local_size=local_size)  # fmt: skip
