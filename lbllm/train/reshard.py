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

Sources: ZeRO 1 and 2 checkpoints. A ZeRO-3 or no-ZeRO checkpoint is refused with one
line (same layout, or hand over through ``phase_state.pt``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lbllm.train.config import ConfigError

MODEL_STATES = "mp_rank_00_model_states.pt"


def saved_layout(tag_dir: Path) -> tuple[int, int]:
    """(world size, ZeRO stage) of the checkpoint in ``tag_dir``."""
    optim = sorted(tag_dir.glob("*zero_pp_rank_*_optim_states.pt"))
    if optim:
        osd = torch.load(optim[0], map_location="cpu", mmap=True, weights_only=False)["optimizer_state_dict"]
        count = osd.get("partition_count", len(optim))
        return (max(count) if isinstance(count, list) else int(count)), int(osd.get("zero_stage", 0))
    states = torch.load(tag_dir / MODEL_STATES, map_location="cpu", mmap=True, weights_only=False)
    return int(states.get("dp_world_size", 1)), 0


def _by_name(tag_dir: Path, names: list[str]) -> tuple[dict, dict, list[dict], dict, dict]:
    """(weights, moments {key: {name: tensor}}, saved param groups, per-state scalars, model states)."""
    from deepspeed.utils import zero_to_fp32 as z

    model_states = z.parse_model_states(z.get_model_state_files(str(tag_dir)))
    files = z.get_optim_files(str(tag_dir))
    osds = [torch.load(f, map_location="cpu", mmap=True, weights_only=False)["optimizer_state_dict"] for f in files]
    world, paddings = len(osds), osds[0].get("param_alignment_paddings")

    def merge(flat_groups: list[list[torch.Tensor]]) -> dict[str, torch.Tensor]:
        full = z._get_fp32_state_dict_from_zero2_checkpoint(world, flat_groups, model_states, False, paddings)
        return {n: full[n].float() for n in names}

    weights = merge([o["single_partition_of_fp32_groups"] for o in osds])
    base = [o["base_optimizer_state"] for o in osds]
    groups = sorted(base[0]["state"])
    first = base[0]["state"][groups[0]] if groups else {}
    keys = sorted(k for k, v in first.items() if torch.is_tensor(v) and v.dim() > 0)
    moments = {k: merge([[b["state"][g][k] for g in groups] for b in base]) for k in keys}
    scalars = {k: v for k, v in first.items() if k not in keys}  # e.g. torch AdamW's per-parameter step
    states = torch.load(tag_dir / MODEL_STATES, map_location="cpu", mmap=True, weights_only=False)
    return weights, moments, base[0]["param_groups"], scalars, states


def resume_resharded(engine: Any, output_dir: Path, tag: str, zero_stage: int) -> dict:
    """Load checkpoint ``tag`` of ``output_dir`` into ``engine`` whatever its layout;
    returns the trainer's client state (as DeepSpeed's load would)."""
    from lbllm.train import checkpoint as ckpt
    from lbllm.train.engine import base_optimizer

    tag_dir = Path(output_dir) / ckpt.CHECKPOINT_SUBDIR / tag
    world, stage = saved_layout(tag_dir)
    if stage not in (1, 2):
        raise ConfigError(
            f"{tag_dir}: a {'ZeRO 3' if stage == 3 else 'no-ZeRO'} checkpoint of {world} rank(s) resumes only on "
            f"{world} rank(s) with the same ZeRO stage; relaunch with that layout, or start a new run from it "
            "with --init_checkpoint after it finishes (phase_state.pt loads on any layout)")
    names = [n for n, _ in engine.module.named_parameters()]
    weights, moments, saved_groups, scalars, states = _by_name(tag_dir, names)
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
