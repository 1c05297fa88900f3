#!/usr/bin/env python
"""BERT pretraining with DeepSpeed: args -> RunConfig -> Trainer.

    deepspeed [--num_gpus K | --hostfile H] pretrain_bert.py --deepspeed_config ds_configs/lamb_64k.json \
        --data_dir DATA/shards_128 --output_dir OUT [--model_config large] [--phase 1|2] ...
    python pretrain_bert.py ...   # one process, no launcher

Bad input (missing data or tokenizer, unknown optimizer, inconsistent batch sizes, ...)
is reported as one line on stderr with exit code 2 before training starts. A run that
keeps producing non-finite steps (--max_consecutive_skips) stops with exit code 3.
"""
from __future__ import annotations

import argparse
import os
import sys

from lbllm.cli import add_dataclass_arguments, dataclass_from_args
from lbllm.train.config import RunConfig
from lbllm.utils import UserError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_dataclass_arguments(p, RunConfig)  # every run flag: its name, default and help live on RunConfig
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)), help="set by the launcher")
    p.add_argument("--deepspeed", action="store_true", help="accepted for launcher compatibility")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from lbllm.train.engine import ensure_distributed_env
    from lbllm.train.nonfinite import NonFiniteStop
    from lbllm.train.trainer import Trainer, prepare

    try:
        run = dataclass_from_args(RunConfig, args)
        ensure_distributed_env()
        setup = prepare(run)
    except (UserError, OSError) as exc:  # everything a user can fix is a UserError
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"pretrain_bert.py: error: {exc}", file=sys.stderr)
        return 2
    try:
        Trainer(setup).train()
    except UserError as exc:  # e.g. a checkpoint that does not fit this run
        print(f"pretrain_bert.py: error: {exc}", file=sys.stderr)
        return 2
    except NonFiniteStop as exc:  # every rank stops at the same step
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"pretrain_bert.py: error: {exc}", file=sys.stderr)
        return 3
    finally:
        shutdown_process_group()
    return 0


def shutdown_process_group() -> None:
    """Tear the process group down before the interpreter exits: left to interpreter
    teardown, gloo's threads can abort the process ("terminate called without an active
    exception") and turn a finished run's exit code into a crash."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
