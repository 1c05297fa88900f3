#!/usr/bin/env python
"""BERT pretraining with DeepSpeed: args -> RunConfig -> Trainer.

    deepspeed [--num_gpus K | --hostfile H] pretrain_bert.py --deepspeed_config ds_configs/lamb_64k.json \
        --data_dir DATA/shards_128 --output_dir OUT [--model_config large] [--phase 1|2] ...
    python pretrain_bert.py ...   # one process, no launcher

Bad input (missing data or tokenizer, unknown optimizer, inconsistent batch sizes, ...)
is reported as one line on stderr with exit code 2 before training starts.
"""
from __future__ import annotations

import argparse
import os
import sys

from lbllm.model import MODEL_SIZES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--deepspeed_config", required=True, help="DeepSpeed JSON (batch, optimizer, schedule, ZeRO, precision)")
    p.add_argument("--data_dir", required=True, help="shards made by data_prep/create_shards.py")
    p.add_argument("--output_dir", required=True, help="metrics.jsonl, checkpoints/, final/ (HF format)")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir (default: DATA_DIR/../tokenizer)")
    p.add_argument("--model_config", default="tiny", help=f"size name ({'|'.join(MODEL_SIZES)}) or BertConfig JSON path")
    p.add_argument("--max_steps", type=int, default=None, help="optimizer steps to run (default: the schedule's total_num_steps)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--dropout", type=float, default=None, help="hidden+attention dropout; 0 disables all dropout")
    p.add_argument("--phase", type=int, default=1, choices=(1, 2))
    p.add_argument("--init_checkpoint", default=None, help="phase-1 output dir: weights + moments, schedule restarts")
    p.add_argument("--resume", default=None, choices=("auto",), help="continue from the newest checkpoint in output_dir")
    p.add_argument("--save_interval", type=int, default=0, help="steps between checkpoints (0: only at the end)")
    p.add_argument("--max_seq_length", type=int, default=None, help="fail unless the shards have this length")
    p.add_argument("--loss_normalization", default="global", choices=("global", "micro"),
                   help="global: token-weighted over the whole global batch; micro: mean of micro-batch means")
    p.add_argument("--noise_scale_interval", type=int, default=0, help="gradient noise scale every K steps (0: off)")
    p.add_argument("--eval_data", default=None,
                   help="held-out shards (create_shards.py --heldout_fraction writes DATA_DIR/heldout): logs eval_mlm_loss/acc")
    p.add_argument("--eval_interval_samples", type=int, default=0,
                   help="evaluate every N consumed samples (0: only after the last step)")
    p.add_argument("--eval_batch_size", type=int, default=None, help="sequences per evaluation forward (default: micro-batch)")
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)), help="set by the launcher")
    p.add_argument("--deepspeed", action="store_true", help="accepted for launcher compatibility")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from lbllm.train.config import RunConfig
    from lbllm.train.trainer import Trainer, prepare
    from lbllm.train.engine import ensure_distributed_env
    from lbllm.utils import UserError

    try:
        run = RunConfig(
            deepspeed_config=args.deepspeed_config, data_dir=args.data_dir, output_dir=args.output_dir,
            tokenizer=args.tokenizer, model_config=args.model_config, max_steps=args.max_steps, seed=args.seed,
            dropout=args.dropout, phase=args.phase, init_checkpoint=args.init_checkpoint, resume=args.resume,
            save_interval=args.save_interval, max_seq_length=args.max_seq_length,
            loss_normalization=args.loss_normalization, noise_scale_interval=args.noise_scale_interval,
            eval_data=args.eval_data, eval_interval_samples=args.eval_interval_samples,
            eval_batch_size=args.eval_batch_size,
        )
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
