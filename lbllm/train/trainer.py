"""The pretraining loop: one screen, one optimizer step per iteration.

`prepare` validates everything (config, data, tokenizer, model size vs sequence length)
before DeepSpeed starts, so a bad run fails in seconds with one line. `Trainer.train` is
build (engine, start-up log, run.json) -> restore (resume, or the phase hand-over) -> for
each global step: `train_step` (every rank runs its gradient-accumulation micro-batches,
its slice of the global batch, see lbllm.data.sampler; DeepSpeed reduces gradients and
steps at the accumulation boundary) -> `record` (rank 0 writes one metrics.jsonl line)
-> checkpoint when due -> finish (checkpoint, phase state, HF export). The next step's
micro-batches are read while the current one computes (lbllm.train.prefetch).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from lbllm.data import GlobalBatchSampler, PretrainingDataset
from lbllm.data.packing import num_sequences, sample_lengths
from lbllm.model import PretrainingModel, StepStats, build_bert_config, build_pretraining_model
from lbllm.model.flops import peak_flops, training_flops
from lbllm.optim import describe_param_groups
from lbllm.train import checkpoint as ckpt
from lbllm.train import reshard
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
from lbllm.train.metrics import MetricsWriter, TensorBoardWriter
from lbllm.train.nonfinite import NonFiniteSteps
from lbllm.train.preemption import PreemptionGuard
from lbllm.train.prefetch import StepBatch, StepLoader
from lbllm.train.telemetry import NoiseScaleMonitor, sgd_noise_scale
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
    layout = resolved.layout
    if run.noise_scale_interval and layout.micro_batch_size >= layout.global_batch_size:
        raise ConfigError(
            f"--noise_scale_interval {run.noise_scale_interval}: the noise scale compares a micro-batch's gradient "
            f"with the global batch's, but both are {layout.global_batch_size} sequences here; lower "
            "train_micro_batch_size_per_gpu (more gradient accumulation), run on more ranks, or pass 0")
    if run.pack_sequences:
        from lbllm.data.packing import packing_supported

        if not packing_supported():
            import transformers

            raise ConfigError(f"--pack_sequences needs transformers >= 5 (4-D attention masks); this is "
                              f"{transformers.__version__}: upgrade it or run without --pack_sequences")
    if run.tensorboard is not None:
        try:  # on every rank, before DeepSpeed starts: a rank that fails later would hang the others
            import torch.utils.tensorboard  # noqa: F401
        except ImportError:
            raise ConfigError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    if run.compile is not None:
        import torch._dynamo

        backends = torch._dynamo.list_backends(exclude_tags=())
        if run.compile not in backends:
            raise ConfigError(f"--compile {run.compile}: not a torch.compile backend; choose from {', '.join(backends)}")
    check_output_dir(run)
    check_earlier_runs(run, dataset.manifest.tokenizer_fingerprint)
    eval_dataset = None
    if run.eval_data is not None:
        eval_dataset = PretrainingDataset(run.eval_data, tokenizer_dir=run.tokenizer)
        if eval_dataset.seq_length > bert_config.max_position_embeddings:
            raise ConfigError(f"--eval_data {run.eval_data}: seq length {eval_dataset.seq_length} exceeds the model's "
                              f"{bert_config.max_position_embeddings} positions")
    return Setup(run, resolved, dataset, tokenizer, bert_config, max_steps, eval_dataset)


def check_output_dir(run: RunConfig) -> None:
    """An output dir holding an earlier run is continued (--resume auto) or replaced
    (--overwrite), never silently mixed with a new one."""
    if run.resume and run.overwrite:
        raise ConfigError("--resume auto and --overwrite contradict each other: pass one of them")
    found = ckpt.existing_run(run.output_dir)
    if found and run.resume is None and not run.overwrite:
        raise ConfigError(
            f"--output_dir {run.output_dir}: holds an earlier run ({', '.join(found)}); pass --resume auto to "
            "continue it, --overwrite to start again from scratch, or another --output_dir")
    out = Path(run.output_dir)
    try:  # a directory that cannot be written fails now, not at the first checkpoint
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"--output_dir {run.output_dir}: cannot write there ({exc.strerror or exc}); "
                          "choose a writable directory") from None


def _run_info(run_dir: Path) -> dict:
    path = Path(run_dir) / "run.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def check_earlier_runs(run: RunConfig, fingerprint: str) -> None:
    """What this run continues (--resume auto) or starts from (--init_checkpoint) must be
    the same model on the same tokenizer; a resumed run keeps its phase. Checked from the
    earlier run's run.json before DeepSpeed starts."""
    checks = []
    if run.resume == "auto" and ckpt.has_checkpoint(run.output_dir):
        checks.append(("--resume auto", run.output_dir, True))
    if run.init_checkpoint is not None and not (run.resume == "auto" and ckpt.has_checkpoint(run.output_dir)):
        checks.append(("--init_checkpoint", run.init_checkpoint, False))
    for flag, directory, same_phase in checks:
        info = _run_info(directory)
        if not info:
            continue  # written before run.json existed: the load itself checks the parameters
        if info.get("model_config") != run.model_config:
            raise ConfigError(f"{flag} {directory}: that run trained --model_config {info.get('model_config')}, this "
                              f"one asks for {run.model_config}; use the same model config")
        if same_phase and info.get("phase") != run.phase:
            raise ConfigError(f"{flag} {directory}: holds a phase-{info.get('phase')} run and this is --phase "
                              f"{run.phase}; resume it with --phase {info.get('phase')}, or start phase {run.phase} in "
                              f"a new --output_dir with --init_checkpoint {directory}")
        if info.get("tokenizer_fingerprint") not in (None, fingerprint):
            raise ConfigError(f"{flag} {directory}: that run's shards were made with another tokenizer than "
                              f"--data_dir {run.data_dir}; prepare the shards with the same tokenizer")


class Trainer:
    def __init__(self, setup: Setup):
        self.s = setup
        self.run = setup.run
        self.rank = rank_from_env()
        self.is_main = self.rank == 0
        self.step = 0  # optimizer steps done
        self.consumed = 0  # samples consumed

    def _log(self, msg: str) -> None:
        if self.is_main:
            print(f"[lbllm] {msg}", file=sys.stderr, flush=True)

    # ---- build and restore ---------------------------------------------------------------

    def build(self) -> None:
        """Model and DeepSpeed engine; the start-up log and OUT/run.json say what runs."""
        s, run, layout = self.s, self.run, self.s.resolved.layout
        if run.overwrite and self.is_main:
            ckpt.clear_run(run.output_dir)  # before anything of this run is written
        seed_everything(run.seed)
        configure_cpu_threads()
        self.engine, self.opt = initialize(self.make_model(), s.resolved)
        if run.compile is not None:
            import torch._dynamo

            torch._dynamo.config.suppress_errors = True  # what cannot be compiled runs eagerly
            self.engine.compile(backend=run.compile)
            self._log(f"torch.compile: backend {run.compile} (graphs are built during the first steps)")
        self.peak_flops = peak_flops(torch.cuda.get_device_name() if self.engine.device.type == "cuda" else None)
        self.momentum = float(self.opt.param_groups[0].get("momentum", 0.0))  # SGD-type (LARS); 0 for Adam-type
        self.noise = NoiseScaleMonitor(run.noise_scale_interval, s.resolved.zero_stage, layout.micro_batch_size)
        self.skips = NonFiniteSteps(run.max_consecutive_skips, fp16=self.engine.fp16_enabled(), is_main=self.is_main)
        n_params = sum(p.numel() for p in self.engine.module.parameters())
        self._log(
            f"phase {run.phase}: {s.resolved.optimizer_name} lr={s.resolved.peak_lr} | global batch "
            f"{layout.global_batch_size} = micro {layout.micro_batch_size} x accum "
            f"{layout.gradient_accumulation_steps} x world {layout.world_size} | ZeRO {s.resolved.zero_stage} | "
            f"grad clip {self.engine.gradient_clipping()} | loss normalization {run.loss_normalization} | "
            f"seq {s.dataset.seq_length} | {len(s.dataset)} samples | {s.max_steps} steps")
        self._log(self._describe_run())
        if s.resolved.lr_scaling is not None:
            self._log("LR scaling: " + s.resolved.lr_scaling.describe(layout.global_batch_size))
        if s.resolved.batch_schedule is not None:
            self._log("batch schedule: " + s.resolved.batch_schedule.describe())
        self._log(f"model {run.model_config}: {n_params:,} parameters; " + describe_param_groups(self.opt.param_groups))
        if run.noise_scale_interval > 0 and not self.noise.enabled:
            self._log("gradient noise scale: not measured under ZeRO 3 (parameters are partitioned)")
        if self.is_main:  # what compare_runs.py and a reader of the run directory need to know
            run.output_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(run.output_dir / "run.json", {
                "phase": run.phase, "optimizer": s.resolved.optimizer_name, "peak_lr": s.resolved.peak_lr,
                "global_batch_size": layout.global_batch_size, "micro_batch_size": layout.micro_batch_size,
                "gradient_accumulation_steps": layout.gradient_accumulation_steps, "world_size": layout.world_size,
                "zero_stage": s.resolved.zero_stage, "max_steps": s.max_steps, "seq_length": s.dataset.seq_length,
                "model_config": run.model_config, "parameters": n_params, "dropout": run.dropout,
                "tokenizer_fingerprint": s.dataset.manifest.tokenizer_fingerprint,
                "tokenizer": str(run.tokenizer),
                "data_dir": str(run.data_dir), "num_samples": len(s.dataset), "seed": run.seed,
                "eval_data": None if run.eval_data is None else str(run.eval_data),
                "deepspeed_config": str(run.deepspeed_config), "init_checkpoint":
                    None if run.init_checkpoint is None else str(run.init_checkpoint),
            })

    def _describe_run(self) -> str:
        """Precision, data, how many epochs the phase covers, and its LR schedule."""
        s, ds = self.s, self.s.resolved.ds_config
        precision = next((k for k in ("bf16", "fp16") if ds.get(k, {}).get("enabled")), "fp32")
        if precision != "fp32" and s.resolved.zero_stage >= 1:
            precision += " with fp32 master weights"
        ramp = s.resolved.batch_schedule
        samples = sum(self.batch_size_at(k) for k in range(1, s.max_steps + 1)) if ramp is not None \
            else s.max_steps * s.resolved.layout.global_batch_size
        sched = ds.get("scheduler") or {}
        params = sched.get("params", {})
        text = (f"precision {precision} | data {s.run.data_dir} ({len(s.dataset):,} samples) | {s.max_steps} steps x "
                f"batch = {samples:,} samples = {samples / max(1, len(s.dataset)):.2f} epochs")
        if sched:
            text += f" | schedule {sched.get('type')}"
            if "warmup_num_steps" in params:
                text += f": warmup {params['warmup_num_steps']} steps"
            if "total_num_steps" in params:
                text += f", horizon {params['total_num_steps']} steps"
        return text

    def make_model(self) -> torch.nn.Module:
        """The module DeepSpeed trains (scripts/bench_pretrain.py builds variants of it)."""
        return PretrainingModel(build_pretraining_model(self.s.bert_config))

    def restore(self) -> GlobalBatchSampler:
        """Resume (`--resume auto`), or take weights and moments from phase 1; the sampler
        continues at the next unseen sample."""
        run, layout = self.run, self.s.resolved.layout
        sampler_state = None
        if run.resume == "auto" and ckpt.has_checkpoint(run.output_dir):
            state = self._resume()
            self.step, self.consumed = int(state["step"]), int(state["consumed_samples"])
            sampler_state = state.get("sampler")
            if "noise_scale" in state:
                self.noise.load_state_dict(state["noise_scale"])
            self._log(f"resumed from step {self.step} ({self.consumed} samples consumed)")
        elif run.init_checkpoint is not None:
            ckpt.init_from_previous_phase(self.engine, run.init_checkpoint, self.s.resolved.zero_stage)
            self._log(f"initialized weights and optimizer moments from {run.init_checkpoint}; step count and schedule restart")
        sampler = GlobalBatchSampler(
            num_samples=len(self.s.dataset), global_batch_size=layout.global_batch_size,
            micro_batch_size=layout.micro_batch_size, world_size=layout.world_size,
            rank=self.rank, seed=run.seed, consumed_samples=0 if sampler_state else self.consumed)
        if sampler_state:  # exact position, also across batch-size changes and world sizes
            sampler.load_state_dict(sampler_state)
        if self.step > 0 and run.resume == "auto" and not ckpt.restore_rng(run.output_dir, self.step):
            # Dropout continues on fresh per-rank streams: the run is sound, not bit-identical.
            seed_everything(run.seed + 1_000_003 * self.step + self.rank)
            self._log(f"checkpoint of step {self.step} has no RNG state for {layout.world_size} rank(s); "
                      "dropout continues on new random streams")
        return sampler

    def _resume(self) -> dict:
        """DeepSpeed's exact load on the layout that saved the checkpoint; on another world
        size or ZeRO stage, the partitions joined by name and re-scattered (lbllm.train.reshard)."""
        out, layout, stage = self.run.output_dir, self.s.resolved.layout, self.s.resolved.zero_stage
        tag = ckpt.latest_tag(out)
        saved = reshard.saved_layout(out / ckpt.CHECKPOINT_SUBDIR / tag)
        if saved == (layout.world_size, stage):
            return ckpt.resume(self.engine, out)
        state = reshard.resume_resharded(self.engine, out, tag, stage)
        self._log(f"checkpoint {tag} was saved by {saved[0]} rank(s) with ZeRO {saved[1]}; re-partitioned for "
                  f"{layout.world_size} rank(s) with ZeRO {stage} (weights, moments, schedule, counters)")
        return state

    def batch_size_at(self, step: int) -> int:
        ramp = self.s.resolved.batch_schedule
        return ramp.batch_at(step) if ramp is not None else self.s.resolved.layout.global_batch_size

    # ---- one step ------------------------------------------------------------------------

    def _global_counts(self, micro: list[dict[str, torch.Tensor]]) -> tuple[float, float]:
        """Masked tokens and sequences in the whole global batch (all ranks, all micro-steps).

        Needed before the first backward of the step, so it costs one 2-number all-reduce
        per step (a host sync point) on top of the statistics' one.
        """
        counts = torch.tensor([sum(float(b["masked_lm_weights"].sum()) for b in micro),
                               float(sum(num_sequences(b) for b in micro))], dtype=torch.float64)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(counts)
        return max(counts[0].item(), 1.0), max(counts[1].item(), 1.0)

    def train_step(self, b: StepBatch, measure_noise: bool = False) -> tuple[StepStats, dict[str, float]]:
        """One optimizer step over this rank's micro-batches. Returns the global batch's
        summed statistics and the gradient norm (and, when measuring, the noise-scale
        fields) for metrics.jsonl."""
        engine, world, micro = self.engine, self.s.resolved.layout.world_size, b.micro
        sq_small = self.noise.small_batch_sq_norm(engine, micro[0]) if measure_noise else None
        if self.run.loss_normalization == "global":
            n_tokens, n_seqs = self._global_counts(micro)
            # DeepSpeed divides the loss by the accumulation steps and averages gradients
            # over ranks; undo both so the step's gradient is d(sum of losses / count).
            scale = float(len(micro) * world)
        totals, sq_big, non_finite = torch.zeros(6), None, torch.zeros((), device=engine.device)
        for i, batch in enumerate(micro):
            out = engine(**{k: v.to(engine.device, non_blocking=True) for k, v in batch.items()})
            if self.run.loss_normalization == "global":
                loss = (out.mlm_loss_sum / n_tokens + out.nsp_loss_sum / n_seqs) * scale
            else:
                loss = out.mean_loss()
            if b.step in self.run.nan_steps:
                loss = loss * float("nan")  # --inject_nan_at_steps (testing)
            non_finite += (~torch.isfinite(loss.detach())).float()
            engine.backward(loss)
            if i == len(micro) - 1:
                skip = self.skips.before_step(engine, non_finite)
            if sq_small is not None and i == len(micro) - 1 and self.s.resolved.zero_stage == 0:
                # Without ZeRO DeepSpeed does not keep the global gradient norm; the
                # gradients are all-reduced by now, so take it before the step.
                sq_big = float(sum(p.grad.float().pow(2).sum() for p in engine.module.parameters()
                                   if p.grad is not None))
            skipped_before = engine.skipped_steps
            engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
            totals += out.as_vector().cpu()
        self.skips.after_step(engine, skip, engine.skipped_steps > skipped_before, b.step)
        if dist.is_initialized() and world > 1:
            dist.all_reduce(totals)  # one small all-reduce per step; a host sync point
        grad_norm = engine.get_global_grad_norm()
        # The share of computed positions that are padding (what --pack_sequences removes).
        positions = sum(m["attention_mask"].numel() for m in micro)
        extra = {"skipped_steps": self.skips.total,
                 "pad_fraction": 1.0 - sum(float(m["attention_mask"].sum()) for m in micro) / max(1, positions)}
        if grad_norm is not None:
            extra["grad_norm"] = float(grad_norm)
        if not self.skips.last_skipped:
            extra.update(self._trust_ratio_stats(b.step))
        if sq_small is not None and not self.skips.last_skipped and (sq_big is not None or grad_norm is not None):
            sq_big = float(grad_norm) ** 2 if sq_big is None else sq_big
            # McCandlish et al. 2018: B_simple = tr(Sigma) / |G|^2 from the two batch sizes.
            extra.update(self.noise.update(sq_small, b.global_batch_size, sq_big))
        return StepStats.from_vector(totals), extra

    def _trust_ratio_stats(self, step: int) -> dict:
        """Min / median / max of the trust ratios the step applied (LAMB, LARS), and every
        `trust_ratio_interval` steps each parameter's; from the values the step computed."""
        got = self.opt.trust_ratios() if hasattr(self.opt, "trust_ratios") else None
        if got is None:
            return {}
        ratios, names = got
        lo, mid, hi = torch.stack([ratios.min(), ratios.median(), ratios.max()]).tolist()
        out = {"trust_ratio_min": lo, "trust_ratio_median": mid, "trust_ratio_max": hi}
        every = self.run.trust_ratio_interval
        if every and step % every == 0:
            out["trust_ratios"] = dict(zip(names or [str(i) for i in range(ratios.numel())], ratios.tolist()))
        return out

    def record(self, b: StepBatch, stats: StepStats, extra: dict, lr: float, seconds: float) -> dict:
        """One metrics.jsonl record (held-out evaluation included when due)."""
        run, s = self.run, self.s
        row = {"step": self.step, **stats.metrics(), "lr": lr, "global_batch_size": b.global_batch_size,
               "samples": self.consumed, "epoch": b.epoch, "seq_per_s": b.global_batch_size / seconds,
               "tokens_per_s": b.global_batch_size * s.dataset.seq_length / seconds,
               "step_time_s": seconds, "phase": run.phase,
               # Smith et al. 2018: the SGD noise scale g = lr N / (B (1 - m)).
               "sgd_noise_scale": sgd_noise_scale(lr, len(s.dataset), b.global_batch_size, self.momentum), **extra}
        if self.peak_flops:  # model FLOPs utilization of rank 0's device (lbllm/model/flops.py)
            lengths = torch.cat([sample_lengths(m) for m in b.micro]).tolist()
            flops = training_flops(s.bert_config, lengths, sum(float(m["masked_lm_weights"].sum()) for m in b.micro))
            row["mfu"] = flops / seconds / self.peak_flops
        if s.eval_dataset is not None and (self.step == s.max_steps or due(
                self.consumed - b.global_batch_size, self.consumed, run.eval_interval_samples)):
            row.update(self._evaluate())
        return row

    def _evaluate(self) -> dict:
        ev = evaluate_mlm(self.engine, self.s.eval_dataset, self.run.eval_batch_size or self.s.resolved.layout.micro_batch_size,
                          self.rank, self.s.resolved.layout.world_size)
        self._log(f"held-out eval ({ev['eval_samples']} sequences): MLM loss {ev['eval_mlm_loss']:.4f} "
                  f"acc {ev['eval_mlm_acc']:.4f} | NSP acc {ev['eval_nsp_acc']:.4f}")
        return ev

    def _save(self, sampler_state: dict) -> str:
        tag = ckpt.save_checkpoint(self.engine, self.run.output_dir, self.step, {
            "step": self.step, "consumed_samples": self.consumed, "phase": self.run.phase,
            "sampler": sampler_state, "noise_scale": self.noise.state_dict()})
        if self.run.keep_last and self.is_main:  # every rank has written it: DeepSpeed's save ends in a barrier
            ckpt.prune_checkpoints(self.run.output_dir, self.run.keep_last)
        return tag

    # ---- the loop ------------------------------------------------------------------------

    def train(self) -> dict:
        run, s = self.run, self.s
        self.build()
        sampler = self.restore()
        resume_step = self.step if self.step > 0 else None
        metrics = MetricsWriter(run.output_dir / "metrics.jsonl", enabled=self.is_main, resume_step=resume_step)
        board = TensorBoardWriter(run.tensorboard, enabled=self.is_main, resume_step=resume_step)
        sampler_state = sampler.state_dict()  # before the loader starts moving the sampler ahead
        loader = StepLoader(s.dataset, sampler, self.batch_size_at, self.step + 1, s.max_steps,
                            pin_memory=self.engine.device.type == "cuda", pack=run.pack_sequences)
        tty = sys.stderr.isatty()
        progress = _progress_bar(s.max_steps, self.step, run.phase) if self.is_main and tty else None
        every = run.log_interval or max(1, s.max_steps // 50)
        last, t_start, preempted, last_save = {}, time.perf_counter(), None, time.monotonic()
        first_step, t_estimate = self.step + 1, t_start
        guard = PreemptionGuard().__enter__()
        try:
            while self.step < s.max_steps:
                t0 = time.perf_counter()
                b = loader.next_step()
                if b.global_batch_size != self.engine.train_batch_size():
                    self.engine.set_train_batch_size(b.global_batch_size)
                    self._log(f"step {b.step}: global batch {b.global_batch_size} (accumulation {len(b.micro)})")
                lr = self.opt.param_groups[0]["lr"]  # the LR this update uses (the scheduler moves it after)
                stats, extra = self.train_step(b, measure_noise=self.noise.due(b.step))
                self.step, self.consumed, sampler_state = b.step, self.consumed + b.global_batch_size, b.sampler_state
                last = self.record(b, stats, extra, lr, time.perf_counter() - t0)
                metrics.write(last)
                board.write(last)
                self.skips.raise_if_stuck(self.step)
                if self.step == first_step + ESTIMATE_AFTER_STEPS:
                    self._log(estimate_phase_time(s.max_steps - self.step, self.step - first_step,
                                                  time.perf_counter() - t_estimate, last))
                elif self.step == first_step:
                    t_estimate = time.perf_counter()  # the first step includes start-up costs
                if self.is_main and not tty and (self.step % every == 0 or self.step == s.max_steps):
                    self._log(progress_line(self.step, s.max_steps, last, time.perf_counter() - t_start,
                                            self.step - first_step + 1))
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{last['loss']:.3f}", lr=f"{lr:.2e}", batch=b.global_batch_size,
                                         seq_s=f"{last['seq_per_s']:.0f}", refresh=False)
                if run.stop_at_eval_loss is not None and last.get("eval_mlm_loss", math.inf) <= run.stop_at_eval_loss:
                    # The evaluation is all-reduced, so every rank stops at the same step.
                    self._log(f"step {self.step}: held-out MLM loss {last['eval_mlm_loss']:.4f} <= "
                              f"--stop_at_eval_loss {run.stop_at_eval_loss}: finishing")
                    break
                clock_due = run.save_interval_minutes > 0 and time.monotonic() - last_save >= 60 * run.save_interval_minutes
                stop, clock_due = guard.agreed(clock_due)
                more = self.step < s.max_steps  # the last step's checkpoint is finish()'s
                due = clock_due or bool(run.save_interval and self.step % run.save_interval == 0)
                if more and (due or stop):
                    self._save(sampler_state)
                    last_save = time.monotonic()
                if more and stop:
                    preempted = guard.name
                    break
        finally:
            guard.__exit__()
            loader.close()
            if progress is not None:
                progress.close()
            metrics.close()
            board.close()
        if preempted is not None:
            if dist.is_initialized():
                dist.barrier()
            self._log(f"stopped by {preempted} after step {self.step} of {s.max_steps}: checkpoint saved; "
                      "continue with --resume auto")
            return {**last, "preempted": True}
        self.finish(sampler_state)
        self._log(f"done: {self.step} steps in {time.perf_counter() - t_start:.1f}s; final loss "
                  f"{last.get('loss', float('nan')):.4f}; model in {run.output_dir / 'final'}")
        return last

    def finish(self, sampler_state: dict) -> None:
        """The last checkpoint, the phase state phase 2 starts from, and the HF export."""
        tag = self._save(sampler_state)
        zero_stage = self.s.resolved.zero_stage
        ckpt.save_phase_state(self.engine, self.run.output_dir, zero_stage)
        state = ckpt.fp32_module_state_dict(self.engine, self.run.output_dir, tag, zero_stage)
        if state is not None:
            ckpt.export_hf(state, build_pretraining_model(self.s.bert_config), self.s.tokenizer,
                           self.run.output_dir / "final")
        if dist.is_initialized():
            dist.barrier()


def progress_line(step: int, total: int, row: dict, elapsed: float, steps_done: int) -> str:
    """The progress bar's content as one plain line (for log files)."""
    left = elapsed / max(1, steps_done) * (total - step)
    return (f"step {step}/{total} | loss {row['loss']:.4f} | lr {row['lr']:.3e} | batch {row['global_batch_size']} | "
            f"{row['seq_per_s']:.1f} seq/s | elapsed {elapsed / 60:.1f} min | ETA {left / 60:.1f} min")


ESTIMATE_AFTER_STEPS = 5  # steps after the first one whose time estimates the phase


def estimate_phase_time(steps_left: int, steps_timed: int, seconds: float, row: dict) -> str:
    """The start-up estimate of the rest of the phase from the first steps' throughput."""
    per_step = seconds / max(1, steps_timed)
    left = per_step * steps_left
    hours, rem = divmod(int(left), 3600)
    seq_per_s = row["global_batch_size"] / per_step
    text = (f"throughput over steps 2-{steps_timed + 1}: {per_step * 1000:.0f} ms/step, {seq_per_s:.1f} seq/s "
            f"({seq_per_s * row['tokens_per_s'] / row['seq_per_s']:.0f} tokens/s")
    if "mfu" in row:
        text += f", MFU {row['mfu']:.1%}"
    return text + f"); the remaining {steps_left} steps take about {hours}h{rem // 60:02d}m (progress bar: ETA)"


def _progress_bar(total: int, initial: int, phase: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=f"phase {phase}", file=sys.stderr, dynamic_ncols=True,
                mininterval=2.0)
