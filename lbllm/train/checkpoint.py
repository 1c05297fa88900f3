"""Checkpoints: DeepSpeed's (partitioned, for resume and phase 2) and the final HF export.

Phase 2 of the mixed-batch recipe (You et al. 2020; NVIDIA's BERT recipe) starts from the
phase-1 weights *and* Adam moments but restarts the step count and the LR schedule with
its own warmup. DeepSpeed's load restores the phase-1 param-group hyperparameters and LR
along with the moments, so they are put back to the phase-2 values afterwards, and each
group's step counter (LAMB's bias-correction step) is reset to 0, as NVIDIA does.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lbllm.train.config import ConfigError
from lbllm.train.engine import base_optimizer

CHECKPOINT_SUBDIR = "checkpoints"


def step_tag(step: int) -> str:
    return f"step{step:08d}"


def save_checkpoint(engine: Any, output_dir: Path, step: int, client_state: dict) -> str:
    """Save DeepSpeed state; `latest` is written last by DeepSpeed, so a crash mid-save
    leaves `latest` pointing at the previous complete checkpoint."""
    tag = step_tag(step)
    engine.save_checkpoint(str(Path(output_dir) / CHECKPOINT_SUBDIR), tag=tag, client_state=client_state)
    return tag


def has_checkpoint(output_dir: Path) -> bool:
    return (Path(output_dir) / CHECKPOINT_SUBDIR / "latest").is_file()


def _load(engine: Any, ckpt_root: Path, load_lr_scheduler_states: bool) -> dict:
    try:
        path, client_state = engine.load_checkpoint(
            str(ckpt_root), load_optimizer_states=True, load_lr_scheduler_states=load_lr_scheduler_states
        )
    except (AssertionError, ValueError, RuntimeError) as exc:
        raise ConfigError(
            f"{ckpt_root}: cannot load this DeepSpeed checkpoint ({str(exc).splitlines()[0][:300]}); "
            "ZeRO checkpoints load on the same world size and ZeRO stage they were saved with"
        ) from None
    if path is None:
        raise ConfigError(f"{ckpt_root}: DeepSpeed found no checkpoint to load")
    return client_state or {}


def resume(engine: Any, output_dir: Path) -> dict:
    """Continue an interrupted run: everything restored, including the schedule position."""
    return _load(engine, Path(output_dir) / CHECKPOINT_SUBDIR, load_lr_scheduler_states=True)


def init_from_previous_phase(engine: Any, init_dir: Path) -> dict:
    """Weights + optimizer moments from `init_dir`; steps, samples and schedule start anew."""
    opt = base_optimizer(engine)
    fresh = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    client_state = _load(engine, Path(init_dir) / CHECKPOINT_SUBDIR, load_lr_scheduler_states=False)
    for group, values in zip(opt.param_groups, fresh):
        group.update(values)  # phase-2 lr, warmup position, betas, weight decay
        if "step" in group:
            group["step"] = 0
    for state in opt.state.values():  # optimizers that count steps per parameter
        if "step" in state:
            state["step"] = torch.zeros_like(state["step"]) if torch.is_tensor(state["step"]) else 0
    engine.global_steps = 0
    engine.global_samples = 0
    engine.micro_steps = 0
    engine.skipped_steps = 0
    return client_state


def fp32_module_state_dict(engine: Any, output_dir: Path, tag: str, zero_stage: int) -> dict[str, torch.Tensor] | None:
    """Full fp32 weights of the trained module, on rank 0 (None elsewhere).

    Under ZeRO the fp32 master weights are partitioned across ranks, so they are
    reassembled from the checkpoint just written; without ZeRO every rank holds them.
    """
    if dist.is_initialized():
        dist.barrier()
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    if zero_stage == 0:
        return {k: v.detach().float().cpu().clone() for k, v in engine.module.state_dict().items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(Path(output_dir) / CHECKPOINT_SUBDIR), tag=tag)


def export_hf(state_dict: dict[str, torch.Tensor], hf_model: torch.nn.Module, tokenizer: Any, final_dir: Path,
              prefix: str = "model.") -> None:
    """Write an HF-format model + tokenizer to `final_dir` atomically (temp dir, then rename)."""
    weights = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    missing, unexpected = hf_model.load_state_dict(weights, strict=False)
    # The MLM decoder weight is tied to the word embeddings and may be stored once.
    missing = [k for k in missing if not k.endswith("predictions.decoder.weight") and not k.endswith("predictions.decoder.bias")]
    if missing or unexpected:
        raise RuntimeError(f"export: weights do not match the model (missing {missing[:5]}, unexpected {unexpected[:5]})")
    final_dir = Path(final_dir)
    tmp = final_dir.with_name(final_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    hf_model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if final_dir.exists():
        old = final_dir.with_name(final_dir.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final_dir, old)
        os.replace(tmp, final_dir)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final_dir)
