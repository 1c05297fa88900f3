"""The pretraining loop: one screen, one optimizer step per iteration.

Set-up validates everything (config, data, tokenizer, model size vs sequence length)
before DeepSpeed starts, so a bad run fails in seconds with one line. The loop itself:
for each global step, every rank runs its gradient-accumulation micro-batches (its slice
of the global batch, see lbllm.data.sampler), DeepSpeed reduces gradients and steps at
the accumulation boundary, and rank 0 writes one metrics.jsonl record.
"""
from __future__ import annotations

import logging
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from lbllm.data import GlobalBatchSampler, PretrainingDataset
from lbllm.model import PretrainingModel, build_bert_config, build_pretraining_model
from lbllm.optim import describe_param_groups
from lbllm.train import checkpoint as ckpt
from lbllm.train.config import ConfigError, RunConfig, load_json_config
from lbllm.train.engine import (
    ResolvedConfig,
    configure_cpu_threads,
    initialize,
    rank_from_env,
    resolve_config,
    world_size_from_env,
)
from lbllm.train.metrics import MetricsWriter

log = logging.getLogger("lbllm")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Setup:
    """Everything validated and built before the first step."""

    run: RunConfig
    resolved: ResolvedConfig
    dataset: PretrainingDataset
    tokenizer: Any
    bert_config: Any
    max_steps: int


def prepare(run: RunConfig) -> Setup:
    """All checks that need no process group: raises ConfigError / DataError / ValueError."""
    from transformers import BertTokenizerFast

    world = world_size_from_env()
    raw = load_json_config(run.deepspeed_config)
    resolved = resolve_config(raw, world, str(run.deepspeed_config))
    tokenizer = BertTokenizerFast.from_pretrained(str(run.tokenizer))
    dataset = PretrainingDataset(run.data_dir, tokenizer_dir=run.tokenizer, max_seq_length=run.max_seq_length)
    bert_config = build_bert_config(run.model_config, vocab_size=len(tokenizer), dropout=run.dropout)
    if dataset.seq_length > bert_config.max_position_embeddings:
        raise ConfigError(
            f"{run.data_dir}: shards have seq length {dataset.seq_length} but the model's "
            f"max_position_embeddings is {bert_config.max_position_embeddings}; use shorter shards or a larger model config"
        )
    max_steps = run.max_steps if run.max_steps is not None else resolved.total_num_steps
    if max_steps is None:
        raise ConfigError(f"{run.deepspeed_config}: pass --max_steps or set scheduler.params.total_num_steps")
    if len(dataset) < resolved.layout.global_batch_size:
        raise ConfigError(
            f"{run.data_dir}: {len(dataset)} samples is fewer than one global batch "
            f"(train_batch_size={resolved.layout.global_batch_size}); prepare more data or lower the batch"
        )
    return Setup(run, resolved, dataset, tokenizer, bert_config, max_steps)


class Trainer:
    def __init__(self, setup: Setup):
        self.s = setup
        self.run = setup.run
        self.rank = rank_from_env()
        self.is_main = self.rank == 0

    def _log(self, msg: str) -> None:
        if self.is_main:
            print(f"[lbllm] {msg}", file=sys.stderr, flush=True)

    def train(self) -> dict:
        s, run, layout = self.s, self.run, self.s.resolved.layout
        seed_everything(run.seed)
        configure_cpu_threads()
        hf_model = build_pretraining_model(s.bert_config)
        model = PretrainingModel(hf_model)
        engine, opt = initialize(model, s.resolved)
        self._log(
            f"phase {run.phase}: {s.resolved.optimizer_name} lr={s.resolved.peak_lr} | global batch "
            f"{layout.global_batch_size} = micro {layout.micro_batch_size} x accum "
            f"{layout.gradient_accumulation_steps} x world {layout.world_size} | ZeRO {s.resolved.zero_stage} | "
            f"grad clip {engine.gradient_clipping()} | "
            f"seq {s.dataset.seq_length} | {len(s.dataset)} samples | {s.max_steps} steps"
        )
        self._log(f"model {run.model_config}: {sum(p.numel() for p in hf_model.parameters()):,} parameters; "
                  + describe_param_groups(opt.param_groups))

        start_step, consumed = 0, 0
        if run.resume == "auto" and ckpt.has_checkpoint(run.output_dir):
            state = ckpt.resume(engine, run.output_dir)
            start_step, consumed = int(state["step"]), int(state["consumed_samples"])
            self._log(f"resumed from step {start_step} ({consumed} samples consumed)")
        elif run.init_checkpoint is not None:
            ckpt.init_from_previous_phase(engine, run.init_checkpoint)
            self._log(f"initialized weights and optimizer moments from {run.init_checkpoint}; step count and schedule restart")

        sampler = GlobalBatchSampler(
            num_samples=len(s.dataset), global_batch_size=layout.global_batch_size,
            micro_batch_size=layout.micro_batch_size, world_size=layout.world_size,
            rank=self.rank, seed=run.seed, consumed_samples=consumed,
        )
        batches = iter(sampler)
        metrics = MetricsWriter(run.output_dir / "metrics.jsonl", enabled=self.is_main,
                                resume_step=start_step if start_step > 0 else None)
        progress = None
        if self.is_main:
            from tqdm import tqdm
            progress = tqdm(total=s.max_steps, initial=start_step, desc=f"phase {run.phase}", file=sys.stderr,
                            dynamic_ncols=True, mininterval=2.0)

        step, last = start_step, {}
        t_start = time.perf_counter()
        while step < s.max_steps:
            t0 = time.perf_counter()
            lr = opt.param_groups[0]["lr"]  # the LR this update uses (the scheduler moves it after)
            stats = torch.zeros(6)
            for _ in range(layout.gradient_accumulation_steps):
                batch = s.dataset.get_batch(next(batches))
                out = engine(**{k: v.to(engine.device) for k, v in batch.items()})
                engine.backward(out.mean_loss())
                engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
                stats += out.as_vector().cpu()
            if dist.is_initialized() and layout.world_size > 1:
                dist.all_reduce(stats)  # one small all-reduce per step; a host sync point
            step += 1
            consumed += layout.global_batch_size
            dt = time.perf_counter() - t0
            mlm_loss = stats[0].item() / max(stats[1].item(), 1)
            nsp_loss = stats[3].item() / max(stats[4].item(), 1)
            last = {
                "step": step,
                "loss": mlm_loss + nsp_loss,
                "mlm_loss": mlm_loss,
                "mlm_acc": stats[2].item() / max(stats[1].item(), 1),
                "nsp_loss": nsp_loss,
                "nsp_acc": stats[5].item() / max(stats[4].item(), 1),
                "lr": lr,
                "global_batch_size": layout.global_batch_size,
                "samples": consumed,
                "seq_per_s": layout.global_batch_size / dt,
                "step_time_s": dt,
                "phase": run.phase,
            }
            grad_norm = engine.get_global_grad_norm()
            if grad_norm is not None:
                last["grad_norm"] = float(grad_norm)
            metrics.write(last)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{last['loss']:.3f}", lr=f"{lr:.2e}", refresh=False)
            if run.save_interval and step % run.save_interval == 0 and step < s.max_steps:
                ckpt.save_checkpoint(engine, run.output_dir, step, {"step": step, "consumed_samples": consumed, "phase": run.phase})
        if progress is not None:
            progress.close()
        metrics.close()

        tag = ckpt.save_checkpoint(engine, run.output_dir, step, {"step": step, "consumed_samples": consumed, "phase": run.phase})
        state = ckpt.fp32_module_state_dict(engine, run.output_dir, tag, s.resolved.zero_stage)
        if state is not None:
            ckpt.export_hf(state, build_pretraining_model(s.bert_config), s.tokenizer, run.output_dir / "final")
        if dist.is_initialized():
            dist.barrier()
        wall = time.perf_counter() - t_start
        self._log(f"done: {step} steps in {wall:.1f}s; final loss {last.get('loss', float('nan')):.4f}; "
                  f"model in {run.output_dir / 'final'}")
        return last

