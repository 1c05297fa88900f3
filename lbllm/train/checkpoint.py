"""Checkpoints: DeepSpeed's (partitioned, for resume and phase 2) and the final HF export.

Phase 2 of the mixed-batch recipe (You et al. 2020; NVIDIA's BERT recipe) starts from the
phase-1 weights *and* Adam moments but restarts the step count and the LR schedule with
its own warmup. DeepSpeed's load restores the phase-1 param-group hyperparameters and LR
along with the moments, so they are put back to the phase-2 values afterwards, and each
group's step counter (LAMB's bias-correction step) is reset to 0, as NVIDIA does.

The hand-over between phases does not go through DeepSpeed's partitioned checkpoint
(which loads only on the world size and ZeRO stage it was saved with): every run ends by
writing ``OUT/phase_state.pt``, the full fp32 master weights and optimizer moments per
parameter name (gathered with DeepSpeed's ``safe_get_full_*`` API), and phase 2 scatters
them into its own partitioning. Phase 2 may therefore run on another number of nodes
or another ZeRO stage than phase 1.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from lbllm.train.config import ConfigError
from lbllm.train.engine import base_optimizer
from lbllm.optim.zero import flat_partitions, relink_optimizer_state
from lbllm.utils import make_temp_dir, publish_directory

CHECKPOINT_SUBDIR = "checkpoints"
PHASE_STATE = "phase_state.pt"
RNG_FILE = "rng_state_rank{rank}.pt"  # one per rank, inside the checkpoint's tag directory
# What a finished or interrupted run leaves in its output dir.
RUN_MARKERS = ("metrics.jsonl", CHECKPOINT_SUBDIR, "final", PHASE_STATE, "run.json")


class CheckpointWriteError(ConfigError):
    """A checkpoint could not be written (full disk, unwritable directory)."""


def step_tag(step: int) -> str:
    return f"step{step:08d}"


def rng_state() -> dict[str, Any]:
    """Every generator a step may draw from (dropout: torch's CPU or CUDA generator)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def save_checkpoint(engine: Any, output_dir: Path, step: int, client_state: dict) -> str:
    """Save DeepSpeed state plus this rank's RNG state. The RNG files go into the tag
    directory first and DeepSpeed writes `latest` last, so a crash mid-save leaves
    `latest` pointing at the previous complete checkpoint."""
    tag = step_tag(step)
    tag_dir = Path(output_dir) / CHECKPOINT_SUBDIR / tag
    rank, world = _rank_world()
    try:
        tag_dir.mkdir(parents=True, exist_ok=True)
        path = tag_dir / RNG_FILE.format(rank=rank)
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"world_size": world, **rng_state()}, tmp)
        os.replace(tmp, path)
        engine.save_checkpoint(str(Path(output_dir) / CHECKPOINT_SUBDIR), tag=tag, client_state=client_state)
    except (OSError, RuntimeError) as exc:  # a full disk reaches torch.save as a RuntimeError
        if not isinstance(exc, OSError) and "writ" not in str(exc).lower():
            raise
        previous = latest_tag(output_dir)
        raise CheckpointWriteError(
            f"{tag_dir}: writing the checkpoint failed ({str(exc).splitlines()[0][:200]}); "
            f"{'the previous checkpoint ' + previous + ' is intact' if previous else 'no earlier checkpoint exists'}"
            "; free space or fix the directory, then --resume auto") from None
    return tag


def latest_tag(output_dir: Path) -> str | None:
    path = Path(output_dir) / CHECKPOINT_SUBDIR / "latest"
    return path.read_text().strip() if path.is_file() else None


def checkpoint_tags(output_dir: Path) -> list[str]:
    """The run's checkpoint tags, oldest first."""
    root = Path(output_dir) / CHECKPOINT_SUBDIR
    return sorted(p.name for p in root.glob("step" + "[0-9]" * 8) if p.is_dir()) if root.is_dir() else []


def prune_checkpoints(output_dir: Path, keep: int) -> list[str]:
    """--keep_last: remove all but the newest ``keep`` checkpoints, never the one
    ``latest`` names (so a crash inside this leaves a loadable run); returns the removed."""
    tags, latest = checkpoint_tags(output_dir), latest_tag(output_dir)
    removed = [t for t in tags[:-keep] if t != latest] if keep > 0 else []
    for tag in removed:
        shutil.rmtree(Path(output_dir) / CHECKPOINT_SUBDIR / tag, ignore_errors=True)
    return removed


def restore_rng(output_dir: Path, step: int) -> bool:
    """Put this rank's generators back where they were at the checkpoint of `step`.
    False when that is not possible: a checkpoint without RNG files (an older version)
    or one saved by another number of ranks (then each rank keeps its own seeded stream)."""
    rank, world = _rank_world()
    path = Path(output_dir) / CHECKPOINT_SUBDIR / step_tag(step) / RNG_FILE.format(rank=rank)
    if not path.is_file():
        return False
    state = torch.load(path, map_location="cpu", weights_only=False)  # our own file: numpy state inside
    if state.get("world_size") != world:
        return False
    set_rng_state(state)
    return True


def existing_run(output_dir: Path) -> list[str]:
    """What in `output_dir` shows that a run already wrote there (empty: nothing)."""
    out = Path(output_dir)
    return [name for name in RUN_MARKERS if (out / name).exists()]


def clear_run(output_dir: Path) -> None:
    """--overwrite: remove what an earlier run wrote (only those entries) before starting."""
    out = Path(output_dir)
    for name in existing_run(out):
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink()


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


def _state_keys(opt: torch.optim.Optimizer) -> list[str]:
    for state in opt.state.values():
        return sorted(k for k, v in state.items() if torch.is_tensor(v) and k != "step" and v.dim() > 0)
    return []


def save_phase_state(engine: Any, output_dir: Path, zero_stage: int) -> None:
    """Write OUT/phase_state.pt (rank 0, atomically): fp32 weights + moments by parameter name.

    A collective under ZeRO (every rank must call it): each parameter is gathered in turn.
    """
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    opt = base_optimizer(engine)
    keys = _state_keys(opt)
    if zero_stage > 0:
        relink_optimizer_state(engine)
    weights, moments = {}, {k: {} for k in keys}
    for name, p in engine.module.named_parameters():
        if zero_stage == 0:
            w, st = p.detach().float(), opt.state.get(p, {})
            values = {k: st[k] for k in keys if k in st}
        else:
            w = safe_get_full_fp32_param(p)
            values = {k: safe_get_full_optimizer_state(p, k) for k in keys}
        weights[name] = w.detach().cpu().clone()
        for k, v in values.items():
            if v is not None:
                moments[k][name] = v.detach().float().cpu().clone()
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    path = Path(output_dir) / PHASE_STATE
    tmp = path.with_name(path.name + ".tmp")
    # torch's Adam/AdamW keep a per-parameter "step" (reset by phase 2, but it must exist).
    step_in_state = any("step" in st for st in opt.state.values())
    torch.save({"format": 1, "weights": weights, "moments": moments, "step_in_state": step_in_state}, tmp)
    os.replace(tmp, path)


def init_from_previous_phase(engine: Any, init_dir: Path, zero_stage: int) -> dict:
    """Weights + optimizer moments from `init_dir`; steps, samples and schedule start anew."""
    path = Path(init_dir) / PHASE_STATE
    opt = base_optimizer(engine)
    if path.is_file():
        _load_phase_state(engine, opt, path, zero_stage)
        client_state: dict = {}
    else:  # an output written before phase_state.pt existed: same world size and stage only
        fresh = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
        client_state = _load(engine, Path(init_dir) / CHECKPOINT_SUBDIR, load_lr_scheduler_states=False)
        for group, values in zip(opt.param_groups, fresh):
            group.update(values)  # phase-2 lr, warmup position, betas, weight decay
    for group in opt.param_groups:
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


def _load_phase_state(engine: Any, opt: torch.optim.Optimizer, path: Path, zero_stage: int) -> None:
    # mmap: ranks on one node share the page cache instead of holding a copy each.
    saved = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    load_state_by_name(engine, opt, saved["weights"], saved["moments"], bool(saved.get("step_in_state")),
                       zero_stage, str(path))


def optimizer_targets(engine: Any, zero_stage: int) -> list[torch.Tensor]:
    """The tensors the base optimizer keeps state for: ZeRO's flat partitions, or the parameters."""
    return flat_partitions(engine) if zero_stage > 0 else [p for _, p in engine.module.named_parameters()]


def load_state_by_name(engine: Any, opt: torch.optim.Optimizer, weights: dict, moments: dict, step_in_state: bool,
                       zero_stage: int, source: str) -> None:
    """Scatter full fp32 weights and moments, by parameter name, into this engine's layout
    (any world size, any ZeRO stage). A collective under ZeRO."""
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    names = [n for n, _ in engine.module.named_parameters()]
    if sorted(names) != sorted(weights):
        missing, extra = sorted(set(names) - set(weights)), sorted(set(weights) - set(names))
        raise ConfigError(f"{source}: parameters do not match this model (missing {missing[:3]}, unexpected "
                          f"{extra[:3]}); use the same --model_config as the run that wrote it")
    # The optimizer creates its state lazily at the first step; make it now to fill it.
    for t in optimizer_targets(engine, zero_stage):
        state = opt.state[t]
        for k in moments:
            state.setdefault(k, torch.zeros_like(t, dtype=torch.float32))
        if step_in_state:
            state.setdefault("step", torch.tensor(0.0))
    if zero_stage > 0:
        relink_optimizer_state(engine)
    for name, p in engine.module.named_parameters():
        w = weights[name]
        if zero_stage == 0:
            with torch.no_grad():
                p.copy_(w.to(p.dtype))
            for k in moments:
                opt.state[p][k].copy_(moments[k][name])
            continue
        # The module's (possibly bf16) copy, then the fp32 master and the moments.
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0, enabled=zero_stage == 3):
            if zero_stage < 3 or not dist.is_initialized() or dist.get_rank() == 0:
                with torch.no_grad():
                    p.copy_(w.to(device=p.device, dtype=p.dtype))
        safe_set_full_fp32_param(p, w.to(engine.device))
        for k in moments:
            safe_set_full_optimizer_state(p, moments[k][name].to(engine.device), k)


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
    return checkpoint_module_state_dict(output_dir, tag)


def checkpoint_module_state_dict(output_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """Full fp32 weights of the module from a saved checkpoint, in one process, whatever
    the world size and ZeRO stage that wrote it (read from the files): DeepSpeed's
    zero_to_fp32 joins the ZeRO partitions of the fp32 masters; without ZeRO each rank
    saved the whole module."""
    from lbllm.train.reshard import model_states_file, saved_layout

    tag_dir = Path(output_dir) / CHECKPOINT_SUBDIR / tag
    if saved_layout(tag_dir)[1] == 0:
        state = torch.load(model_states_file(tag_dir), map_location="cpu", weights_only=False)
        return {k: v.detach().float() for k, v in state["module"].items()}
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
    tmp = make_temp_dir(final_dir)
    try:
        hf_model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        publish_directory(tmp, final_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
