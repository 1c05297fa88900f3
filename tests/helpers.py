"""What the tests share besides fixtures: running the project's CLIs as a user would,
DeepSpeed launches and configs, and loading the scripts (scripts/ and data_prep/ are not
packages) as modules to test their pure functions."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

from lbllm.utils import free_port

ROOT = Path(__file__).resolve().parent.parent
DIST_VARS = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT", "CROSS_RANK", "CROSS_SIZE"}


def run_cli(*args, check: bool = True, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a project command the way a user would, from the repository root."""
    # An in-process DeepSpeed test may have set the rendezvous variables of its own world
    # of one; a child process must not join that world.
    child_env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    proc = subprocess.run([str(a) for a in args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**child_env, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def deepspeed_cmd(num_procs: int) -> list[str]:
    return [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(num_procs), "--master_port", str(free_port())]


def write_ds_config(path: Path, **overrides) -> Path:
    """A tiny DeepSpeed config (LAMB, warmup + poly decay); keyword args override sections."""
    config = {
        "train_batch_size": 8,
        "train_micro_batch_size_per_gpu": 4,
        "optimizer": {"type": "LAMB", "params": {"lr": 1e-3, "weight_decay": 0.01}},
        "scheduler": {"type": "WarmupPolyDecay", "params": {"warmup_num_steps": 2, "total_num_steps": 6}},
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 0},
    }
    config.update(overrides)
    path.write_text(json.dumps(config))
    return path


def load_script(relpath: str) -> ModuleType:
    """Import ROOT/relpath (e.g. "scripts/demo.py") as the module of its file name, once.
    Its folder goes on sys.path, since scripts import their siblings."""
    path = ROOT / relpath
    name = path.stem
    if name in sys.modules and getattr(sys.modules[name], "__file__", None) == str(path):
        return sys.modules[name]
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module
