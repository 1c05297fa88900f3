"""deepspeed.initialize with the project's optimizers and schedules resolved by name.

`optimizer.type` and `scheduler.type` of a DeepSpeed config may name a project optimizer
(lbllm.optim registry: LAMB, LARS and variants) or schedule (lbllm.schedules); those are
built here and handed to DeepSpeed as client objects. Any other type must be one of
DeepSpeed's own and is left in the config for DeepSpeed to build. Project optimizers are
checked before DeepSpeed's names, so `LAMB` means lbllm's LAMB (DeepSpeed's FusedLamb
needs CUDA and computes trust ratios per ZeRO slice).
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch

from lbllm.optim import build_param_groups, create_optimizer, get_optimizer_record, list_optimizers
from lbllm.schedules import (
    BatchSchedule,
    LRScaling,
    build_scheduler,
    is_project_schedule,
    list_schedules,
    parse_batch_schedule,
    parse_lr_scaling,
)
from lbllm.train.config import BatchLayout, ConfigError, resolve_batch_layout
from lbllm.utils import UserError, free_port

# DeepSpeed's own optimizer and schedule names (kept here so they are validated before
# DeepSpeed starts; importing deepspeed.runtime.config is cheap once deepspeed is loaded).
try:
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS as _DS_OPTIMIZERS
    from deepspeed.runtime.lr_schedules import VALID_LR_SCHEDULES as _DS_SCHEDULES
except ImportError:  # pragma: no cover - deepspeed is a core dependency
    _DS_OPTIMIZERS, _DS_SCHEDULES = [], []


def ensure_distributed_env() -> None:
    """Let `python pretrain_bert.py` run as a world of one without a launcher.

    DeepSpeed falls back to MPI discovery when RANK/WORLD_SIZE are unset; a single plain
    process has neither, so we describe it explicitly (on a free local port).
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))


def configure_cpu_threads() -> None:
    """On CPU, split the cores among the ranks of this node.

    Each process would otherwise start one compute thread per core, and K ranks on one
    machine would oversubscribe it K times over (slower than one rank). An explicit
    OMP_NUM_THREADS (or the launcher's --bind_cores_to_rank) wins.
    """
    if torch.cuda.is_available() or "OMP_NUM_THREADS" in os.environ:
        return
    local_ranks = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1")))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_ranks)))


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank_from_env() -> int:
    return int(os.environ.get("RANK", "0"))


@dataclass
class ResolvedConfig:
    """A DeepSpeed config split into what DeepSpeed builds and what the project builds."""

    ds_config: dict  # handed to deepspeed.initialize
    layout: BatchLayout
    optimizer_name: str
    optimizer_params: dict
    project_optimizer: bool
    scheduler_factory: Callable | None  # project schedule factory, or None
    total_num_steps: int | None  # schedule horizon, when the schedule states one
    lr_scaling: LRScaling | None = None  # how optimizer.params.lr was derived, if it was
    batch_schedule: BatchSchedule | None = None  # batch ramp (Smith et al. 2018), if any

    @property
    def zero_stage(self) -> int:
        return int(self.ds_config.get("zero_optimization", {}).get("stage", 0))

    @property
    def peak_lr(self) -> float | None:
        return self.optimizer_params.get("lr")


def check_layerwise_support(ds: dict, source: str, name: str) -> None:
    """Refuse the DeepSpeed modes in which LAMB/LARS would silently see flattened tensors.

    Without ZeRO, DeepSpeed's fp16/bf16 wrappers flatten each param group into one tensor
    whose slices lbllm/optim/zero.py does not map back to parameters, so trust ratios would
    be computed per slice instead of per layer (DeepSpeed issues #88, #490).
    """
    stage = int(ds.get("zero_optimization", {}).get("stage", 0))
    mixed = any(ds.get(k, {}).get("enabled", False) for k in ("bf16", "fp16"))
    if stage == 0 and mixed:
        raise ConfigError(f"{source}: {name} with bf16/fp16 needs zero_optimization.stage 1, 2 or 3 (without ZeRO, "
                          "DeepSpeed flattens each param group and per-layer trust ratios would be lost)")


def _resolve_batch(ds: dict, world_size: int, source: str, batch_schedule: BatchSchedule | None) -> BatchLayout:
    """The batch layout (all three of DeepSpeed's batch keys written back), and the ramp's start."""
    layout = resolve_batch_layout(ds, world_size, source)
    if batch_schedule is not None:
        batch_schedule.validate(layout.micro_batch_size, world_size, source)
        if batch_schedule.batch_at(1) != layout.global_batch_size:
            raise ConfigError(f"{source}: batch_schedule starts at {batch_schedule.batch_at(1)} but train_batch_size "
                              f"is {layout.global_batch_size}; make them equal")
    ds["train_batch_size"] = layout.global_batch_size
    ds["train_micro_batch_size_per_gpu"] = layout.micro_batch_size
    ds["gradient_accumulation_steps"] = layout.gradient_accumulation_steps
    return layout


def _resolve_lr(opt: dict, layout: BatchLayout, lr_scaling: LRScaling | None, source: str) -> dict:
    """optimizer.params with the LR the scaling rule gives, when there is one."""
    params = dict(opt.get("params", {}))
    if lr_scaling is not None:
        # The rule fixes the LR at the starting batch (a batch ramp then keeps it, as in
        # Smith et al.); a config that also states a different lr is contradictory.
        lr = lr_scaling.lr_for(layout.global_batch_size)
        if "lr" in params and abs(params["lr"] - lr) > 1e-12 * max(abs(lr), 1.0):
            raise ConfigError(f"{source}: optimizer.params.lr={params['lr']} contradicts lr_scaling, which gives "
                              f"{lr:.6g} at batch {layout.global_batch_size}; remove one of them")
        params["lr"] = lr
        opt["params"] = {**opt.get("params", {}), "lr": lr}
    return params


def _resolve_optimizer(ds: dict, params: dict, source: str) -> tuple[str, bool]:
    """(optimizer name, whether the project builds it). A project optimizer leaves the
    config (DeepSpeed gets the object); a DeepSpeed one stays in it."""
    name = ds["optimizer"]["type"]
    try:
        record = get_optimizer_record(name)
    except UserError:
        record = None
    if record is None:
        if name.lower() in _DS_OPTIMIZERS:
            return name, False
        raise ConfigError(
            f"{source}: optimizer.type {name!r} is unknown; project optimizers: {', '.join(list_optimizers())}; "
            f"DeepSpeed optimizers: {', '.join(_DS_OPTIMIZERS)}")
    valid = record.valid_kwargs()
    unknown = sorted(set(params) - valid) if valid is not None else []
    if unknown:
        raise ConfigError(f"{source}: optimizer.params has unknown key(s) {', '.join(unknown)} for {record.name}; "
                          f"valid keys: {', '.join(sorted(valid))}")
    del ds["optimizer"]
    check_layerwise_support(ds, source, record.name)
    # DeepSpeed only wraps optimizers it knows unless told the client one is fine;
    # lbllm/optim/zero.py makes LAMB/LARS exact under ZeRO 1, 2 and 3.
    ds["zero_allow_untested_optimizer"] = True
    return record.name, True


def _resolve_scheduler(ds: dict, source: str) -> tuple[Callable | None, int | None]:
    """(project schedule factory or None, the schedule's total_num_steps if it states one)."""
    sched = ds.get("scheduler")
    if sched is None:
        return None, None
    if not isinstance(sched, dict) or "type" not in sched:
        raise ConfigError(f"{source}: scheduler section needs a \"type\"")
    sparams = sched.get("params", {})
    total = sparams.get("total_num_steps")
    if is_project_schedule(sched["type"]):
        del ds["scheduler"]
        return build_scheduler(sched["type"], sparams, source=source), total
    if sched["type"] not in _DS_SCHEDULES:
        raise ConfigError(f"{source}: scheduler.type {sched['type']!r} is unknown; project schedules: "
                          f"{', '.join(list_schedules())}; DeepSpeed schedules: {', '.join(_DS_SCHEDULES)}")
    return None, total


def resolve_config(raw: dict, world_size: int, source: str) -> ResolvedConfig:
    """Validate a DeepSpeed config and pull out the project-built optimizer and schedule:
    one parser per section (project sections, batch, optimizer LR, optimizer, scheduler)."""
    ds = copy.deepcopy(raw)
    # Project sections, not DeepSpeed's: taken out before DeepSpeed sees the config.
    lr_scaling = parse_lr_scaling(ds.pop("lr_scaling", None), source)
    batch_schedule = parse_batch_schedule(ds.pop("batch_schedule", None), source)
    layout = _resolve_batch(ds, world_size, source, batch_schedule)
    opt = ds.get("optimizer")
    if not isinstance(opt, dict) or "type" not in opt:
        raise ConfigError(f"{source}: needs an \"optimizer\": {{\"type\": ..., \"params\": {{...}}}} section")
    params = _resolve_lr(opt, layout, lr_scaling, source)
    name, project_optimizer = _resolve_optimizer(ds, params, source)
    factory, total = _resolve_scheduler(ds, source)
    return ResolvedConfig(ds_config=ds, layout=layout, optimizer_name=name, optimizer_params=params,
                          project_optimizer=project_optimizer, scheduler_factory=factory, total_num_steps=total,
                          lr_scaling=lr_scaling, batch_schedule=batch_schedule)


def build_optimizer(model: torch.nn.Module, resolved: ResolvedConfig) -> torch.optim.Optimizer | None:
    """The project optimizer, or None when DeepSpeed builds its own from the config."""
    if not resolved.project_optimizer:
        return None
    return create_optimizer(resolved.optimizer_name, model, **resolved.optimizer_params)


SHM_COMM_ENV = "LBLLM_DS_SHM_COMM"


def use_gloo_collectives_on_cpu() -> bool:
    """Keep DeepSpeed's CPU collectives on gloo; returns whether that was done.

    On a CPU accelerator DeepSpeed JIT-compiles a shared-memory all-reduce op on its first
    ``init_distributed``: a C++20 build against the torch headers that takes ~30 s and
    ~1.5 GB per compiler process, and on a machine short of memory the compiler is killed and
    the run dies with it. CPU runs here are tests and demos, so lbllm turns the op off in
    DeepSpeed's table of compatible ops and the collectives go through torch.distributed
    (gloo), unless ``LBLLM_DS_SHM_COMM=1``. On GPUs the op does not apply and nothing changes.
    Call before the first ``deepspeed.initialize`` / ``init_distributed`` of the process.
    """
    if os.environ.get(SHM_COMM_ENV) == "1":
        return False
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    if accel.device_name() != "cpu":
        return False
    builder = accel.create_op_builder("ShareMemCommBuilder")
    if builder is None:
        return False
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[builder.NAME] = False
    return True


def initialize(model: torch.nn.Module, resolved: ResolvedConfig) -> tuple[Any, torch.optim.Optimizer]:
    """deepspeed.initialize with the resolved pieces; returns (engine, base optimizer)."""
    import deepspeed

    use_gloo_collectives_on_cpu()
    optimizer = build_optimizer(model, resolved)
    if optimizer is None:
        # DeepSpeed's optimizer gets the same decay / no-decay groups as ours.
        wd = resolved.optimizer_params.get("weight_decay", 0.0)
        model_parameters: Any = build_param_groups(model, wd)
    else:
        model_parameters = None
    engine, ds_optimizer, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        model_parameters=model_parameters,
        lr_scheduler=resolved.scheduler_factory,
        config=resolved.ds_config,
    )
    if optimizer is not None and resolved.zero_stage >= 1:
        # ZeRO hands LAMB/LARS flat per-rank slices: restore true per-parameter trust
        # ratios (lbllm/optim/zero.py). A no-op for optimizers that are not layer-wise.
        from lbllm.optim.zero import attach_zero_layout

        attach_zero_layout(engine)
    return engine, base_optimizer(engine)


def base_optimizer(engine: Any) -> torch.optim.Optimizer:
    """The optimizer that owns the moments (under ZeRO / bf16 wrappers, their `.optimizer`)."""
    opt = engine.optimizer
    while hasattr(opt, "optimizer") and isinstance(getattr(opt, "optimizer"), torch.optim.Optimizer):
        opt = opt.optimizer
    return opt
