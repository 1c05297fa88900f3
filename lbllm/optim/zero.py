"""Exact per-parameter LAMB/LARS under DeepSpeed ZeRO stages 1, 2 and 3.

ZeRO 1/2 flattens each param group into one buffer (with alignment padding, possibly in
round-robin order) and gives every data-parallel rank one contiguous slice of it as a
single flat fp32 tensor. ``torch.optim`` code then sees one "parameter" per group per
rank, so a layer-wise optimizer would compute one trust ratio per *slice* (DeepSpeed
issues #88 and #490). ``attach_zero_layout(engine)`` fixes that for lbllm's
``LayerwiseOptimizer`` subclasses:

* From the ZeRO optimizer's own bookkeeping (``round_robin_bit16_groups``,
  ``round_robin_bit16_padding``, ``partition_size``, the data-parallel group of each param
  group) it builds, for every flat fp32 partition, the list of contiguous segments
  ``(original parameter index, length)`` that tile it: pieces of original parameters
  (a parameter may be split across rank boundaries) and padding (index ``n``, a dummy).
* It gives the optimizer a *layout* (lbllm/optim/layout.py) over those segments:
  ``sq_norms`` takes per-*original*-parameter partial squared norms (one
  ``torch._foreach_norm`` over views, no Python loop per parameter), ``reduce`` sums
  weight and update (LAMB) or weight and gradient (LARS) norms across the data-parallel
  group in **one** all-reduce of one stacked ``[2, n]`` tensor per param group (the call
  is in the optimizers' trust-ratio code), and ``broadcast`` spreads the per-parameter
  ratio back over the partition with ``repeat_interleave``. ``Zero12Layout`` and
  ``Zero3Layout`` differ only in how they read the segments from DeepSpeed.

DeepSpeed calls the base optimizer's ``step()`` once per param group (it swaps
``param_groups`` for a one-group list, see ``DeepSpeedZeroOptimizer._optimizer_step``), and
the gradient of group ``i`` only exists right before that call, so the reduction happens
per group: ``len(param_groups)`` small all-reduces per step (2 with the usual decay /
no-decay split, none for a group that is not adapted). Every rank makes the same calls,
because whether a group is adapted depends only on its hyper-parameters and every rank
holds a (possibly all-padding) partition of every group.

LAMB's ``max_grad_norm`` needs the norm over *all* groups, which under ZeRO is only
complete before the per-group steps start; it is taken from DeepSpeed's own global
gradient norm (``_global_grad_norm``, computed over every group and rank before the
steps, unscaled by the loss scale). That norm is taken *before* DeepSpeed's own
``gradient_clipping`` (whose default is 1.0!), so combine the two knowingly: with
``max_grad_norm`` set, use ``"gradient_clipping": 0``.

ZeRO 3 splits every parameter across all ranks (rank ``r`` owns elements
``[r*s, (r+1)*s)`` of each parameter, zero-padded) and concatenates a rank's pieces per
*sub-group* into one flat fp32 tensor; the segments come from ``ds_numel`` and
``partition_numel()`` of the sub-group's parameters (``zero3_segments``), and the rest is the
same. DeepSpeed steps once per sub-group, so each param group must be one sub-group
(``sub_group_size`` above the parameter count; the default 1e9 covers BERT-Large) - checked.

Not covered: DeepSpeed's ``BF16_Optimizer`` / ``FP16_Optimizer`` (mixed precision without
ZeRO, which also hand out flat slices; ``lbllm.train.engine.check_layerwise_support``
refuses it before training starts) and ZeRO 3 with optimizer offload (refused).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .param_groups import LayerwiseOptimizer

__all__ = ["PartitionLayout", "Zero12Layout", "Zero3Layout", "ZeroSegments", "attach_zero_layout", "flat_partitions",
           "relink_optimizer_state", "zero3_segments", "zero_layout", "zero_optimizer", "zero_segments"]


@dataclass
class ZeroSegments:
    """How one rank's flat partition of one param group tiles into original parameters.

    ``ids[k]`` is the index (in ``0..num_params-1``, DeepSpeed's flattening order, the same
    on every rank) of the original parameter that segment ``k`` belongs to, or
    ``num_params`` for alignment padding; ``lengths[k]`` is its number of elements. The
    segments are contiguous and cover the whole partition in order.
    """

    ids: list[int]
    lengths: list[int]
    num_params: int
    group: Any = None  # the data-parallel process group the partial norms are summed over

    def __post_init__(self) -> None:
        self.ids_t = torch.tensor(self.ids, dtype=torch.long)
        self.lengths_t = torch.tensor(self.lengths, dtype=torch.long)
        self.numel = int(sum(self.lengths))

    def to(self, device: torch.device) -> "ZeroSegments":
        if self.ids_t.device != device:
            self.ids_t = self.ids_t.to(device)
            self.lengths_t = self.lengths_t.to(device)
        return self


def _append_segment(ids: list[int], lengths: list[int], seg_id: int, length: int) -> None:
    """Append ``length`` elements of ``seg_id``, merged into the last segment if it is the same."""
    if length <= 0:
        return
    if ids and ids[-1] == seg_id:
        lengths[-1] += length
    else:
        ids.append(seg_id)
        lengths.append(length)


def zero_segments(param_numels: Sequence[int], paddings: Sequence[int], partition_size: int,
                  partition_id: int) -> tuple[list[int], list[int]]:
    """Segments ``(ids, lengths)`` of partition ``partition_id`` of a flat buffer laid out as
    ``param 0, padding 0, param 1, padding 1, ...`` then zero fill up to the partition
    boundaries (pure bookkeeping, mirrors ``DeepSpeedZeroOptimizer.get_partition_info``)."""
    n = len(param_numels)
    start, end = partition_size * partition_id, partition_size * (partition_id + 1)
    ids: list[int] = []
    lengths: list[int] = []

    def add(seg_id: int, lo: int, hi: int) -> None:
        _append_segment(ids, lengths, seg_id, min(hi, end) - max(lo, start))

    cur = 0
    for idx, (numel, pad) in enumerate(zip(param_numels, paddings)):
        add(idx, cur, cur + numel)
        add(n, cur + numel, cur + numel + pad)
        cur += numel + pad
    add(n, cur, max(cur, end))  # alignment fill at the end of the buffer
    assert sum(lengths) == partition_size, (sum(lengths), partition_size)
    return ids, lengths


class PartitionLayout:
    """A layout over flat ZeRO partitions (see the module doc): each tensor the optimizer
    steps is one rank's partition of a param group, tiled by ``segments[id(tensor)]``.

    ``sq_norms`` returns this rank's *partial* squared norms, one entry per original
    parameter of the group (padding dropped); ``reduce`` sums them over ``group``, the
    data-parallel process group. Tensors that are not registered partitions are rejected
    rather than silently treated per slice.
    """

    kernel_norms = False  # a kernel's per-tensor norms are per *slice* here
    #: Per param group, original parameter index -> its position in this layout's order
    #: (ZeRO 1/2 with round_robin_gradients reorder); empty where the order is the group's.
    param_positions: list[dict[int, int]] = []

    def __init__(self, segments: dict[int, ZeroSegments], group: Any, zero_opt: Any) -> None:
        self.segments, self.group, self.zero_opt = segments, group, zero_opt

    def _segments_of(self, params: Sequence[Tensor]) -> list[ZeroSegments]:
        out = []
        for p in params:
            seg = self.segments.get(id(p))
            if seg is None:
                raise RuntimeError(
                    f"{type(self).__name__}: tensor of shape {tuple(p.shape)} is not a ZeRO partition "
                    "registered by attach_zero_layout")
            out.append(seg.to(p.device))
        return out

    def sq_norms(self, tensors: Sequence[Tensor], params: Sequence[Tensor]) -> Tensor:
        if not tensors:
            return torch.zeros(0)
        segs = self._segments_of(params)
        pieces, ids, dummies = [], [], []
        offset = 0
        for t, seg in zip(tensors, segs):
            pieces.extend(t.reshape(-1).split(seg.lengths))
            ids.append(seg.ids_t + offset)
            offset += seg.num_params
            dummies.append(offset)  # each partition's padding slot
            offset += 1
        # One multi-tensor kernel over all segments, then one scatter-add into the
        # per-parameter slots (padding lands in each partition's dummy slot).
        seg_sq = torch.stack(torch._foreach_norm(pieces)).square()
        out = torch.zeros(offset, dtype=seg_sq.dtype, device=seg_sq.device)
        out.index_add_(0, torch.cat(ids), seg_sq)
        keep = torch.ones(offset, dtype=torch.bool, device=out.device)
        keep[torch.tensor(dummies, dtype=torch.long, device=out.device)] = False
        return out[keep]

    def reduce(self, *sq_norms: Tensor) -> tuple[Tensor, ...]:
        stacked = torch.stack(sq_norms)
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM, group=self.group)
        return tuple(stacked.unbind(0))

    def broadcast(self, values: Tensor, params: Sequence[Tensor]) -> list[Tensor]:
        out, offset = [], 0
        for p, seg in zip(params, self._segments_of(params)):
            vals = values[offset:offset + seg.num_params]
            offset += seg.num_params
            # Padding gets 0: its weights and updates are 0 anyway, and it stays 0.
            vals = torch.cat([vals, vals.new_zeros(1)])
            out.append(torch.repeat_interleave(vals[seg.ids_t], seg.lengths_t, output_size=seg.numel)
                       .view_as(p))
        return out

    def global_sq_norm(self, tensors: Sequence[Tensor], params: Sequence[Tensor]) -> Tensor:
        # Only the ZeRO optimizer knows all groups' gradients at once (it computes the
        # global norm before calling step() group by group).
        norm = getattr(self.zero_opt, "_global_grad_norm", None)
        if norm is None:
            raise RuntimeError(
                "LAMB max_grad_norm under ZeRO needs DeepSpeed's global gradient norm "
                "(zero_optimization.compute_grad_norm must be true); or use DeepSpeed's gradient_clipping")
        ref = tensors[0] if tensors else None
        norm = torch.as_tensor(norm, dtype=torch.float32 if ref is None else ref.dtype,
                               device=None if ref is None else ref.device)
        return norm.square()

    @staticmethod
    def _one_group(groups: Sequence[Any]) -> Any:
        if len({id(g) for g in groups}) != 1:
            raise RuntimeError("ZeRO param groups with different data-parallel groups are not supported")
        return groups[0]


def zero_optimizer(engine: Any) -> Any:
    """DeepSpeed's ZeRO optimizer wrapper of `engine` (stage 1, 2 or 3), or None without ZeRO."""
    opt = getattr(engine, "optimizer", engine)
    while opt is not None and not hasattr(opt, "single_partition_of_fp32_groups") \
            and not hasattr(opt, "fp32_partitioned_groups_flat"):
        opt = getattr(opt, "optimizer", None)
    return opt


def flat_partitions(engine: Any) -> list[Tensor]:
    """This rank's flat fp32 partitions, the tensors the base optimizer steps (empty without ZeRO)."""
    zopt = zero_optimizer(engine)
    if zopt is None:
        return []
    return list(getattr(zopt, "single_partition_of_fp32_groups", None) or zopt.fp32_partitioned_groups_flat)


def relink_optimizer_state(engine: Any) -> None:
    """ZeRO 1/2 map each parameter to its optimizer-state fragments once, lazily, which can
    happen before the state exists; redo it so DeepSpeed's safe_*_full_optimizer_state see
    the state (after loading moments into the partitions)."""
    zopt = zero_optimizer(engine)
    if zopt is not None and hasattr(zopt, "_lazy_init_hp_params_optimizer_state"):
        zopt._hp_optimizer_states_linked = False
        zopt._lazy_init_hp_params_optimizer_state()


def zero3_segments(param_numels: Sequence[int], partition_numels: Sequence[int],
                   partition_id: int) -> tuple[list[int], list[int]]:
    """Segments ``(ids, lengths)`` of one rank's ZeRO-3 flat fp32 sub-group partition.

    Stage 3 splits *every* parameter across the ranks: rank ``r`` holds elements
    ``[r * s, (r + 1) * s)`` of parameter ``i`` (``s = partition_numels[i]``, the same on every
    rank), zero-padded past its end, and a sub-group's flat buffer is these pieces
    concatenated in parameter order (``DeepSpeedZeroOptimizer_Stage3._create_fp32_partitions``).
    """
    n = len(param_numels)
    ids: list[int] = []
    lengths: list[int] = []
    for idx, (numel, size) in enumerate(zip(param_numels, partition_numels)):
        valid = max(0, min(size, numel - partition_id * size))
        _append_segment(ids, lengths, idx, valid)
        _append_segment(ids, lengths, n, size - valid)
    return ids, lengths


class Zero12Layout(PartitionLayout):
    """ZeRO 1/2: one flat fp32 partition per param group and rank."""

    @classmethod
    def from_zero_optimizer(cls, zero_opt: Any) -> "Zero12Layout":
        segments: dict[int, ZeroSegments] = {}
        groups = []
        for i, flat in enumerate(zero_opt.single_partition_of_fp32_groups):
            pg = zero_opt.real_dp_process_group[i]
            groups.append(pg)
            ids, lengths = zero_segments(
                # Shapes from DeepSpeed's meta copies when it keeps them (param.data may be
                # swapped out by state offload), else from the parameters themselves.
                [t.numel() for t in getattr(zero_opt, "round_robin_bit16_meta", zero_opt.round_robin_bit16_groups)[i]],
                zero_opt.round_robin_bit16_padding[i],
                int(zero_opt.partition_size[i]),
                dist.get_rank(group=pg),
            )
            if sum(lengths) != flat.numel():
                raise RuntimeError(f"ZeRO bookkeeping mismatch in group {i}: {sum(lengths)} != {flat.numel()}")
            segments[id(flat)] = ZeroSegments(ids, lengths, len(zero_opt.round_robin_bit16_groups[i]), pg)
        layout = cls(segments, cls._one_group(groups), zero_opt)
        # round_robin_gradients reorders each group's parameters: position of every original one.
        # (DeepSpeed keeps a dict original -> position when it reorders, else range(n)).
        indices = getattr(zero_opt, "round_robin_bit16_indices", None) or [[] for _ in groups]
        layout.param_positions = [dict(ix) if isinstance(ix, dict) else {j: k for k, j in enumerate(ix)}
                                  for ix in indices]
        return layout


class Zero3Layout(PartitionLayout):
    """ZeRO 3: every parameter split across all ranks, one flat fp32 tensor per sub-group."""

    @classmethod
    def from_zero_optimizer(cls, zero_opt: Any) -> "Zero3Layout":
        cls._check_supported(zero_opt)
        segments: dict[int, ZeroSegments] = {}
        groups = []
        for i, (flat, params) in enumerate(zip(zero_opt.fp32_partitioned_groups_flat, zero_opt.fp16_groups)):
            pg = zero_opt._get_sub_group_process_group(i)
            groups.append(pg)
            ids, lengths = zero3_segments([p.ds_numel for p in params], [p.partition_numel() for p in params],
                                          dist.get_rank(group=pg))
            if sum(lengths) != flat.numel():
                raise RuntimeError(f"ZeRO 3 bookkeeping mismatch in sub-group {i}: {sum(lengths)} != {flat.numel()}")
            segments[id(flat)] = ZeroSegments(ids, lengths, len(params), pg)
        return cls(segments, cls._one_group(groups), zero_opt)

    @staticmethod
    def _check_supported(zero_opt: Any) -> None:
        # DeepSpeed steps the base optimizer once per *sub-group*; LAMB's step counter (bias
        # correction) is kept per param group, so a param group must be exactly one sub-group.
        group_ids = [zero_opt.sub_group_to_group_id[i] for i in range(len(zero_opt.fp16_groups))]
        if len(set(group_ids)) != len(group_ids):
            raise ValueError(
                "ZeRO 3 split a param group into several sub-groups (zero_optimization.sub_group_size is smaller "
                "than the group); LAMB/LARS need one sub-group per param group: raise sub_group_size above the "
                f"parameter count ({sum(p.ds_numel for g in zero_opt.fp16_groups for p in g):,})")
        if getattr(zero_opt, "swap_optimizer", False) or getattr(zero_opt, "offload_optimizer", False):
            raise ValueError("LAMB/LARS under ZeRO 3 do not support optimizer offload; remove "
                             "zero_optimization.offload_optimizer")


def zero_layout(engine: Any) -> PartitionLayout | None:
    """The layout of the engine's flat ZeRO partitions (None without ZeRO)."""
    zero_opt = zero_optimizer(engine)
    if zero_opt is None:
        return None
    if hasattr(zero_opt, "single_partition_of_fp32_groups"):
        return Zero12Layout.from_zero_optimizer(zero_opt)
    return Zero3Layout.from_zero_optimizer(zero_opt)


def attach_zero_layout(engine: Any) -> LayerwiseOptimizer | None:
    """Make the engine's lbllm LAMB/LARS exact under ZeRO 1/2/3; returns it (None if nothing to do).

    Call once, after ``deepspeed.initialize``. A no-op when ZeRO is off or the base
    optimizer is not a ``LayerwiseOptimizer``.
    """
    zero_opt = zero_optimizer(engine)
    if zero_opt is None or not isinstance(zero_opt.optimizer, LayerwiseOptimizer):
        return None
    base = zero_opt.optimizer
    base.set_layout(zero_layout(engine))
    return base
