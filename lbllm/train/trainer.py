"""The pretraining loop: one screen, one optimizer step per iteration.

Set-up validates everything (config, data, tokenizer, model size vs sequence length)
before DeepSpeed starts, so a bad run fails in seconds with one line. The loop itself:
for each global step, every rank runs its gradient-accumulation micro-batches (its slice
of the global batch, see lbllm.data.sampler), DeepSpeed reduces gradients and steps at
the accumulation boundary, and rank 0 writes one metrics.jsonl record.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lbllm.data import GlobalBatchSampler, PretrainingDataset
from lbllm.model import PretrainingModel, build_bert_config, build_pretraining_model
from lbllm.optim import describe_param_groups
from lbllm.train.telemetry import GradientNoiseScale, sgd_noise_scale
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
from lbllm.train.eval import due, evaluate_mlm
from lbllm.train.metrics import MetricsWriter
from lbllm.utils import seed_everything, write_json_atomic

@dataclass
class Setup:
    """Everything validated and built before the first step."""

    run: RunConfig
    resolved: ResolvedConfig
    dataset: PretrainingDataset
    tokenizer: Any
    bert_config: Any
    max_steps: int
    eval_dataset: PretrainingDataset | None = None


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
    eval_dataset = None
    if run.eval_data is not None:
        eval_dataset = PretrainingDataset(run.eval_data, tokenizer_dir=run.tokenizer)
        if eval_dataset.seq_length > bert_config.max_position_embeddings:
            raise ConfigError(f"--eval_data {run.eval_data}: seq length {eval_dataset.seq_length} exceeds the model's "
                              f"{bert_config.max_position_embeddings} positions")
    return Setup(run, resolved, dataset, tokenizer, bert_config, max_steps, eval_dataset)


class Trainer:
    def __init__(self, setup: Setup):
        self.s = setup
        self.run = setup.run
        self.rank = rank_from_env()
        self.is_main = self.rank == 0

    def _log(self, msg: str) -> None:
        if self.is_main:
            print(f"[lbllm] {msg}", file=sys.stderr, flush=True)

    def _client_state(self, step: int, consumed: int, sampler: GlobalBatchSampler) -> dict:
        return {"step": step, "consumed_samples": consumed, "phase": self.run.phase, "sampler": sampler.state_dict()}

    def _fetch_step(self, sampler: GlobalBatchSampler, batches) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches of the next global step (their masks depend on the epoch)."""
        micro = []
        for _ in range(sampler.gradient_accumulation_steps):
            indices = next(batches)
            micro.append(self.s.dataset.get_batch(indices, epoch=sampler.epoch))
        return micro

    def _global_counts(self, micro: list[dict[str, torch.Tensor]]) -> tuple[float, float]:
        """Masked tokens and sequences in the whole global batch (all ranks, all micro-steps).

        Needed before the first backward of the step, so it costs one 2-number all-reduce
        per step (a host sync point) on top of the statistics' one.
        """
        counts = torch.tensor([sum(float(b["masked_lm_weights"].sum()) for b in micro),
                               float(sum(b["input_ids"].shape[0] for b in micro))], dtype=torch.float64)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(counts)
        return max(counts[0].item(), 1.0), max(counts[1].item(), 1.0)

    def _small_batch_sq_norm(self, engine: Any, batch: dict[str, torch.Tensor]) -> float:
        """|G_small|^2: squared norm of one micro-batch's mean-loss gradient, averaged over
        ranks (McCandlish et al. 2018, App. A). autograd.grad leaves .grad and DeepSpeed's
        gradient hooks untouched; one extra forward/backward every noise_scale_interval steps."""
        params = [p for p in engine.module.parameters() if p.requires_grad]
        out = engine.module(**{k: v.to(engine.device) for k, v in batch.items()})
        grads = torch.autograd.grad(out.mean_loss(), params)
        sq = torch.stack([g.float().pow(2).sum() for g in grads]).sum().reshape(1).double().cpu()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sq)
            sq /= dist.get_world_size()
        return sq.item()

    def _evaluate(self, engine: Any) -> dict:
        ev = evaluate_mlm(engine, self.s.eval_dataset, self.run.eval_batch_size or self.s.resolved.layout.micro_batch_size,
                          self.rank, self.s.resolved.layout.world_size)
        self._log(f"held-out eval ({ev['eval_samples']} sequences): MLM loss {ev['eval_mlm_loss']:.4f} "
                  f"acc {ev['eval_mlm_acc']:.4f} | NSP acc {ev['eval_nsp_acc']:.4f}")
        return ev

    def train(self) -> dict:
        s, run, layout = self.s, self.run, self.s.resolved.layout
        seed_everything(run.seed)
        configure_cpu_threads()
        hf_model = build_pretraining_model(s.bert_config)
        model = PretrainingModel(hf_model)
        engine, opt = initialize(model, s.resolved)
        ramp = s.resolved.batch_schedule
        self._log(
            f"phase {run.phase}: {s.resolved.optimizer_name} lr={s.resolved.peak_lr} | global batch "
            f"{layout.global_batch_size} = micro {layout.micro_batch_size} x accum "
            f"{layout.gradient_accumulation_steps} x world {layout.world_size} | ZeRO {s.resolved.zero_stage} | "
            f"grad clip {engine.gradient_clipping()} | loss normalization {run.loss_normalization} | "
            f"seq {s.dataset.seq_length} | {len(s.dataset)} samples | {s.max_steps} steps"
        )
        if s.resolved.lr_scaling is not None:
            self._log("LR scaling: " + s.resolved.lr_scaling.describe(layout.global_batch_size))
        if ramp is not None:
            self._log("batch schedule: " + ramp.describe())
        n_params = sum(p.numel() for p in hf_model.parameters())
        self._log(f"model {run.model_config}: {n_params:,} parameters; "
                  + describe_param_groups(opt.param_groups))

        if self.is_main:  # what compare_runs.py and a reader of the run directory need to know
            run.output_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(run.output_dir / "run.json", {
                "phase": run.phase, "optimizer": s.resolved.optimizer_name, "peak_lr": s.resolved.peak_lr,
                "global_batch_size": layout.global_batch_size, "micro_batch_size": layout.micro_batch_size,
                "gradient_accumulation_steps": layout.gradient_accumulation_steps, "world_size": layout.world_size,
                "zero_stage": s.resolved.zero_stage, "max_steps": s.max_steps, "seq_length": s.dataset.seq_length,
                "model_config": run.model_config, "parameters": n_params,
                "data_dir": str(run.data_dir), "num_samples": len(s.dataset), "seed": run.seed,
                "eval_data": None if run.eval_data is None else str(run.eval_data),
                "deepspeed_config": str(run.deepspeed_config), "init_checkpoint":
                    None if run.init_checkpoint is None else str(run.init_checkpoint),
            })

        start_step, consumed, sampler_state = 0, 0, None
        if run.resume == "auto" and ckpt.has_checkpoint(run.output_dir):
            state = ckpt.resume(engine, run.output_dir)
            start_step, consumed = int(state["step"]), int(state["consumed_samples"])
            sampler_state = state.get("sampler")
            self._log(f"resumed from step {start_step} ({consumed} samples consumed)")
        elif run.init_checkpoint is not None:
            ckpt.init_from_previous_phase(engine, run.init_checkpoint, s.resolved.zero_stage)
            self._log(f"initialized weights and optimizer moments from {run.init_checkpoint}; step count and schedule restart")

        sampler = GlobalBatchSampler(
            num_samples=len(s.dataset), global_batch_size=layout.global_batch_size,
            micro_batch_size=layout.micro_batch_size, world_size=layout.world_size,
            rank=self.rank, seed=run.seed, consumed_samples=0 if sampler_state else consumed,
        )
        if sampler_state:  # exact position, also across batch-size changes and world sizes
            sampler.load_state_dict(sampler_state)
        batches = iter(sampler)
        noise = GradientNoiseScale()
        measure_noise = run.noise_scale_interval > 0 and s.resolved.zero_stage < 3
        if run.noise_scale_interval > 0 and not measure_noise:
            self._log("gradient noise scale: not measured under ZeRO 3 (parameters are partitioned)")
        momentum = float(opt.param_groups[0].get("momentum", 0.0))  # SGD-type momentum (LARS); 0 for Adam-type
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
            batch_size = ramp.batch_at(step + 1) if ramp is not None else layout.global_batch_size
            if batch_size != sampler.global_batch_size or batch_size != engine.train_batch_size():
                # Smith et al. 2018: a larger batch through more accumulation steps; the
                # sampler continues the same epoch permutation with the new step size.
                engine.set_train_batch_size(batch_size)
                sampler.set_global_batch_size(batch_size)
                self._log(f"step {step + 1}: global batch {batch_size} (accumulation {sampler.gradient_accumulation_steps})")
            lr = opt.param_groups[0]["lr"]  # the LR this update uses (the scheduler moves it after)
            micro = self._fetch_step(sampler, batches)
            sq_small = None
            if measure_noise and (step + 1) % run.noise_scale_interval == 0:
                sq_small = self._small_batch_sq_norm(engine, micro[0])
            if run.loss_normalization == "global":
                n_tokens, n_seqs = self._global_counts(micro)
                # DeepSpeed divides the loss by the accumulation steps and averages gradients
                # over ranks; undo both so the step's gradient is d(sum of losses / count).
                scale = float(sampler.gradient_accumulation_steps * layout.world_size)
            stats = torch.zeros(6)
            sq_big = None
            for i, batch in enumerate(micro):
                out = engine(**{k: v.to(engine.device) for k, v in batch.items()})
                if run.loss_normalization == "global":
                    loss = (out.mlm_loss_sum / n_tokens + out.nsp_loss_sum / n_seqs) * scale
                else:
                    loss = out.mean_loss()
                engine.backward(loss)
                if sq_small is not None and i == len(micro) - 1 and s.resolved.zero_stage == 0:
                    # Without ZeRO DeepSpeed does not keep the global gradient norm; the
                    # gradients are all-reduced by now, so take it before the step.
                    sq_big = float(sum(p.grad.float().pow(2).sum() for p in engine.module.parameters()
                                       if p.grad is not None))
                engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
                stats += out.as_vector().cpu()
            if dist.is_initialized() and layout.world_size > 1:
                dist.all_reduce(stats)  # one small all-reduce per step; a host sync point
            step += 1
            consumed += batch_size
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
                "global_batch_size": batch_size,
                "samples": consumed,
                "epoch": sampler.epoch,
                "seq_per_s": batch_size / dt,
                "step_time_s": dt,
                "phase": run.phase,
                # Smith et al. 2018: the SGD noise scale g = lr N / (B (1 - m)).
                "sgd_noise_scale": sgd_noise_scale(lr, len(s.dataset), batch_size, momentum),
            }
            grad_norm = engine.get_global_grad_norm()
            if grad_norm is not None:
                last["grad_norm"] = float(grad_norm)
                sq_big = float(grad_norm) ** 2 if sq_big is None else sq_big
            if sq_small is not None and sq_big is not None:
                # McCandlish et al. 2018: B_simple = tr(Sigma) / |G|^2 from the two batch sizes.
                b_simple = noise.update(layout.micro_batch_size, sq_small, batch_size, sq_big)
                last["grad_sqnorm_small"], last["grad_sqnorm_big"] = sq_small, sq_big
                if b_simple is not None:
                    last["grad_noise_scale"] = b_simple
            if s.eval_dataset is not None and (step == s.max_steps or due(consumed - batch_size, consumed,
                                                                          run.eval_interval_samples)):
                last.update(self._evaluate(engine))
            metrics.write(last)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{last['loss']:.3f}", lr=f"{lr:.2e}", refresh=False)
            if run.save_interval and step % run.save_interval == 0 and step < s.max_steps:
                ckpt.save_checkpoint(engine, run.output_dir, step, self._client_state(step, consumed, sampler))
        if progress is not None:
            progress.close()
        metrics.close()

        tag = ckpt.save_checkpoint(engine, run.output_dir, step, self._client_state(step, consumed, sampler))
        ckpt.save_phase_state(engine, run.output_dir, s.resolved.zero_stage)  # what phase 2 starts from
        state = ckpt.fp32_module_state_dict(engine, run.output_dir, tag, s.resolved.zero_stage)
        if state is not None:
            ckpt.export_hf(state, build_pretraining_model(s.bert_config), s.tokenizer, run.output_dir / "final")
        if dist.is_initialized():
            dist.barrier()
        wall = time.perf_counter() - t_start
        self._log(f"done: {step} steps in {wall:.1f}s; final loss {last.get('loss', float('nan')):.4f}; "
                  f"model in {run.output_dir / 'final'}")
        return last

