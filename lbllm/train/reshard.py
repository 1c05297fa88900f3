"""Resume a ZeRO checkpoint on another number of ranks or another ZeRO stage.

DeepSpeed's partitioned checkpoint loads only on the world size and stage it was saved
with. For another layout the saved partitions are joined here, per parameter name: the
fp32 master weights and every optimizer moment, with DeepSpeed's own zero_to_fp32 merge
(its padding and alignment rules; a moment partition has the same layout as the master
partition it belongs to). The result is the by-name state the phase hand-over already
scatters into any partitioning (``checkpoint.load_state_by_name``). What else a step
depends on is restored as DeepSpeed would: the optimizer's param-group values (LAMB's
bias-correction step, the current LR), a per-parameter step counter where the optimizer
keeps one, the LR scheduler, DeepSpeed's step and sample counters. The trainer's own
state (step, samples, the sampler's position, the noise-scale estimator) comes from the
same file. Dropout continues on fresh per-rank RNG streams (a stream per rank cannot be
carried to another number of ranks), so with dropout the continued run is sound but not
bit-identical; with dropout 0 it equals a run on the new layout up to summation order.

Sources: checkpoints of ZeRO 1, 2 and 3 (DeepSpeed's flat partitions, merged by
zero_to_fp32) and without ZeRO (whole tensors; the optimizer state is indexed in the
order the param groups list the parameters, rebuilt here from the same model).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lbllm.train.config import ConfigError

MODEL_STATES = "mp_rank_00_model_states.pt"


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", mmap=True, weights_only=False)


def model_states_file(tag_dir: Path) -> Path:
    """The rank-0 model-states file (``mp_rank_00_...``, or ``zero_pp_rank_0_...`` under ZeRO 3)."""
    for name in (MODEL_STATES, "zero_pp_rank_0_" + MODEL_STATES):
        if (tag_dir / name).is_file():
            return tag_dir / name
    raise ConfigError(f"{tag_dir}: no {MODEL_STATES}; not a complete DeepSpeed checkpoint")


def saved_layout(tag_dir: Path) -> tuple[int, int]:
    """(world size, ZeRO stage) of the checkpoint in ``tag_dir``."""
    optim = sorted(tag_dir.glob("*zero_pp_rank_*_optim_states.pt"))
    if optim:
        osd = _load(optim[0])["optimizer_state_dict"]
        count = osd.get("partition_count", len(optim))
        return (max(count) if isinstance(count, list) else int(count)), int(osd.get("zero_stage", 0))
    return int(_load(model_states_file(tag_dir)).get("dp_world_size", 1)), 0


def _moment_keys(first: dict) -> list[str]:
    return sorted(k for k, v in first.items() if torch.is_tensor(v) and v.dim() > 0)


def _zero_by_name(tag_dir: Path, names: list[str], stage: int) -> tuple[dict, dict, list[dict], dict]:
    """ZeRO 1/2/3: each rank's flat partitions of masters and moments, merged by zero_to_fp32."""
    from deepspeed.utils import zero_to_fp32 as z

    model_states = z.parse_model_states(z.get_model_state_files(str(tag_dir)))
    osds = [_load(Path(f))["optimizer_state_dict"] for f in z.get_optim_files(str(tag_dir))]
    world = len(osds)
    if stage == 3:
        flats = [o["fp32_flat_groups"] for o in osds]
        base = [o["optimizer_state_dict"] for o in osds]
    else:
        flats = [o["single_partition_of_fp32_groups"] for o in osds]
        base = [o["base_optimizer_state"] for o in osds]
    paddings = osds[0].get("param_alignment_paddings")

    def merge(flat_groups: list[list[torch.Tensor]]) -> dict[str, torch.Tensor]:
        if stage == 3:
            full = z._get_fp32_state_dict_from_zero3_checkpoint(world, flat_groups, model_states, False)
        else:
            full = z._get_fp32_state_dict_from_zero2_checkpoint(world, flat_groups, model_states, False, paddings)
        full = z.to_torch_tensor({n: full[n] for n in names})  # ZeRO 3 merges lazily
        return {n: full[n].float() for n in names}

    groups = sorted(base[0]["state"])
    first = base[0]["state"][groups[0]] if groups else {}
    keys = _moment_keys(first)
    moments = {k: merge([[b["state"][g][k] for g in groups] for b in base]) for k in keys}
    scalars = {k: v for k, v in first.items() if k not in keys}  # e.g. torch AdamW's per-parameter step
    return merge(flats), moments, base[0]["param_groups"], scalars


def _plain_by_name(states: dict, engine: Any) -> tuple[dict, dict, list[dict], dict]:
    """No ZeRO: whole tensors; the optimizer's state is indexed in param-group order."""
    from lbllm.optim.param_groups import is_no_decay

    # build_param_groups' order (decay group, then no-decay), from the saved tensors' shapes:
    # under ZeRO 3 this engine's own parameters are partitioned and look 1-D.
    saved = states["module"]
    names = [n for n, p in engine.module.named_parameters() if p.requires_grad]
    decay = [n for n in names if not is_no_decay(n, saved[n])]
    order = decay + [n for n in names if is_no_decay(n, saved[n])]
    opt_state = states["optimizer"]
    by_index = opt_state["state"]
    first = next(iter(by_index.values()), {})
    keys = _moment_keys(first)
    weights = {n: states["module"][n].float() for n in order}
    moments = {k: {order[i]: st[k].float() for i, st in by_index.items()} for k in keys}
    scalars = {k: v for k, v in first.items() if k not in keys}
    return weights, moments, opt_state["param_groups"], scalars


def resume_resharded(engine: Any, output_dir: Path, tag: str, zero_stage: int) -> dict:
    """Load checkpoint ``tag`` of ``output_dir`` into ``engine`` whatever its layout;
    returns the trainer's client state (as DeepSpeed's load would)."""
    from lbllm.train import checkpoint as ckpt
    from lbllm.train.engine import base_optimizer

    tag_dir = Path(output_dir) / ckpt.CHECKPOINT_SUBDIR / tag
    world, stage = saved_layout(tag_dir)
    states = _load(model_states_file(tag_dir))
    names = [n for n, _ in engine.module.named_parameters()]
    if stage > 0:
        weights, moments, saved_groups, scalars = _zero_by_name(tag_dir, names, stage)
    else:
        weights, moments, saved_groups, scalars = _plain_by_name(states, engine)
    opt = base_optimizer(engine)
    ckpt.load_state_by_name(engine, opt, weights, moments, "step" in scalars, zero_stage, str(tag_dir))
    if len(saved_groups) != len(opt.param_groups):
        raise ConfigError(f"{tag_dir}: {len(saved_groups)} optimizer param groups, this run has "
                          f"{len(opt.param_groups)}; use the same optimizer and model")
    for group, saved in zip(opt.param_groups, saved_groups):
        group.update({k: v for k, v in saved.items() if k != "params"})
    targets = ckpt.optimizer_targets(engine, zero_stage)
    for t in targets:
        for k, v in scalars.items():
            opt.state[t][k] = v.clone() if torch.is_tensor(v) else v
    if engine.lr_scheduler is not None and states.get("lr_scheduler") is not None:
        engine.lr_scheduler.load_state_dict(states["lr_scheduler"])
    for k in ("global_steps", "global_samples", "skipped_steps"):
        if k in states:
            setattr(engine, k, states[k])
    return states
