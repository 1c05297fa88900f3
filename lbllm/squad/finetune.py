"""SQuAD v1.1 fine-tuning: the recipe the BERT and LAMB papers report F1 with.

AdamW with linear warmup then linear decay to zero, no weight decay on biases and
LayerNorm weights (every tensor with ndim <= 1), gradient clipping at 1.0, loss = mean
of start and end cross-entropy (what BertForQuestionAnswering computes). One process,
one device: fine-tuning is a small fraction of pretraining cost and needs no ZeRO, and
a plain loop keeps the numbers easy to trust.

The whole loop is in `train` and fits on a screen. Batches are cut to the longest
window in the batch (features are stored padded, with their real lengths), so short
contexts do not pay for max_seq_length worth of padding.
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from lbllm.optim import build_param_groups
from lbllm.squad.features import (
    EvalFeatures,
    SquadExample,
    TrainFeatures,
    check_lengths,
    examples_from_json,
    prepare_eval_features,
    prepare_train_features,
    read_squad_json,
)
from lbllm.squad.metrics import evaluate
from lbllm.squad.postprocess import postprocess_predictions

__all__ = [
    "SquadConfig",
    "seed_everything",
    "load_qa_model",
    "linear_warmup_decay",
    "train",
    "predict_logits",
    "predict",
    "finetune",
]


@dataclass
class SquadConfig:
    """Fine-tuning and decoding knobs; defaults are Google BERT's run_squad.py."""

    epochs: float = 3.0
    """Passes over the training windows; ignored when max_steps is set."""
    max_steps: int | None = None
    """Optimizer steps to take; overrides epochs. 0 evaluates the model as loaded."""
    lr: float = 5e-5
    """Peak learning rate, reached at the end of warmup."""
    batch_size: int = 32
    """Training windows per optimizer step."""
    eval_batch_size: int = 64
    seed: int = 42
    max_seq_length: int = 384
    doc_stride: int = 128
    """Token overlap between consecutive windows of one context (tokenizers' `stride`)."""
    max_query_length: int = 64
    """Questions are cut to this many tokens."""
    warmup_proportion: float = 0.1
    """Fraction of the steps spent warming up linearly from 0."""
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    """Global gradient-norm clip; 0 disables."""
    n_best: int = 20
    """Top start/end logits per window considered when decoding."""
    max_answer_length: int = 30
    """Longest answer, in tokens, that decoding may return."""
    threads: int | None = None
    """torch intra-op threads (None keeps torch's default)."""
    device: str = "auto"
    """"auto" picks CUDA when present, else CPU."""
    progress: bool = True
    """tqdm bars on stderr."""

    def __post_init__(self) -> None:
        if self.max_steps is None and not (self.epochs > 0 and math.isfinite(self.epochs)):
            raise ValueError(f"epochs must be a positive number, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 0:
            raise ValueError(f"max_steps must be >= 0, got {self.max_steps}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        for name in ("batch_size", "eval_batch_size", "n_best", "max_answer_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.warmup_proportion < 1.0:
            raise ValueError(f"warmup_proportion must be in [0, 1), got {self.warmup_proportion}")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ValueError("weight_decay and max_grad_norm must be >= 0")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        check_lengths(self.max_seq_length, self.doc_stride, self.max_query_length)
        if self.device != "auto":
            try:
                kind = torch.device(self.device).type
            except (RuntimeError, ValueError):
                raise ValueError(f'device {self.device!r} is not a torch device; use "auto", "cpu" or "cuda[:N]"') from None
            if kind == "cuda" and not torch.cuda.is_available():
                raise ValueError(f"device {self.device!r} requested but CUDA is not available; use --device cpu")

    def steps_per_epoch(self, num_features: int) -> int:
        return math.ceil(num_features / self.batch_size)

    def total_steps(self, num_features: int) -> int:
        """Optimizer steps for a training set of `num_features` windows."""
        if self.max_steps is not None:
            return self.max_steps
        return math.ceil(self.epochs * self.steps_per_epoch(num_features))

    def warmup_steps(self, total_steps: int) -> int:
        return int(self.warmup_proportion * total_steps)

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


def seed_everything(seed: int) -> None:
    """Seed every RNG that touches fine-tuning: head init, dropout, shuffling."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds CUDA generators


def load_qa_model(model_dir: str | os.PathLike) -> tuple[Any, Any, dict]:
    """Load a question-answering model and its fast tokenizer from a local directory.

    Pretraining checkpoints have no qa_outputs head, so transformers would print a
    table of missing/unexpected keys; that is expected here, so it is silenced and
    summarized in the returned info ({"fresh": [...], "unused": [...]}).
    """
    import transformers
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
        model, info = transformers.AutoModelForQuestionAnswering.from_pretrained(
            str(model_dir), output_loading_info=True
        )
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{model_dir}: tokenizer is not a fast tokenizer; save one with tokenizer.json")
    summary = {
        "fresh": sorted(info.get("missing_keys", [])),
        "unused": sorted(info.get("unexpected_keys", [])),
    }
    return model, tokenizer, summary


def linear_warmup_decay(step: int, total_steps: int, warmup_steps: int) -> float:
    """LR multiplier: 0 -> 1 linearly over warmup, then 1 -> 0 linearly at total_steps."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def _batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless stream of index batches, one fresh permutation per epoch."""
    while True:
        perm = torch.randperm(n, generator=generator)
        yield from perm.split(batch_size)


def _to_tensors(feats: TrainFeatures | EvalFeatures) -> dict[str, torch.Tensor]:
    names = ["input_ids", "token_type_ids", "attention_mask", "lengths"]
    if isinstance(feats, TrainFeatures):
        names += ["start_positions", "end_positions"]
    return {k: torch.from_numpy(np.ascontiguousarray(getattr(feats, k))) for k in names}


def _model_inputs(t: dict[str, torch.Tensor], idx: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
    """Gather one batch and trim it to its longest window (padding is on the right)."""
    width = int(t["lengths"][idx].max())
    batch = {k: t[k][idx, :width].to(device).long() for k in ("input_ids", "token_type_ids", "attention_mask")}
    if "start_positions" in t:
        batch["start_positions"] = t["start_positions"][idx].to(device)
        batch["end_positions"] = t["end_positions"][idx].to(device)
    return batch


def train(model: torch.nn.Module, feats: TrainFeatures, cfg: SquadConfig) -> dict[str, Any]:
    """Fine-tune in place; returns {"train_steps", "train_seconds", "train_loss"}
    (train_loss: mean of the last 100 steps, None when no step was taken)."""
    device = cfg.resolved_device()
    model.to(device).train()
    total = cfg.total_steps(len(feats))
    if total == 0 or len(feats) == 0:
        return {"train_steps": 0, "train_seconds": 0.0, "train_loss": None}
    warmup = cfg.warmup_steps(total)
    optimizer = torch.optim.AdamW(build_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-6)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: linear_warmup_decay(s, total, warmup))
    tensors = _to_tensors(feats)
    batches = _batches(len(feats), cfg.batch_size, torch.Generator().manual_seed(cfg.seed))
    recent: list[torch.Tensor] = []  # detached losses; read back rarely to avoid device syncs
    start = time.perf_counter()
    bar = tqdm(total=total, desc="squad train", unit="step", disable=not cfg.progress, file=sys.stderr)
    for step in range(total):
        loss = model(**_model_inputs(tensors, next(batches), device)).loss
        loss.backward()
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        recent.append(loss.detach())
        recent = recent[-100:]
        if step % 20 == 0 or step == total - 1:
            bar.set_postfix(loss=f"{torch.stack(recent).mean().item():.4f}", lr=f"{schedule.get_last_lr()[0]:.2e}")
        bar.update(1)
    bar.close()
    return {
        "train_steps": total,
        "train_seconds": time.perf_counter() - start,
        "train_loss": float(torch.stack(recent).mean()),
    }


@torch.no_grad()
def predict_logits(model: torch.nn.Module, feats: EvalFeatures, cfg: SquadConfig) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) logits of shape (N, max_seq_length); -inf beyond each window.

    Windows are batched longest-first so each batch pads to similar lengths.
    """
    device = cfg.resolved_device()
    model.to(device).eval()
    n, length = feats.input_ids.shape
    start = np.full((n, length), -np.inf, dtype=np.float32)
    end = np.full((n, length), -np.inf, dtype=np.float32)
    tensors = _to_tensors(feats)
    order = torch.argsort(tensors["lengths"], descending=True)
    for idx in tqdm(order.split(cfg.eval_batch_size), desc="squad eval", unit="batch",
                    disable=not cfg.progress, file=sys.stderr):  # fmt: skip
        out = model(**_model_inputs(tensors, idx, device))
        width = out.start_logits.shape[1]
        rows = idx.numpy()
        start[rows, :width] = out.start_logits.float().cpu().numpy()
        end[rows, :width] = out.end_logits.float().cpu().numpy()
    return start, end


def predict(model: torch.nn.Module, tokenizer: Any, examples: Sequence[SquadExample], cfg: SquadConfig) -> dict[str, str]:
    """{question id: answer text} for `examples` with the model as it is now."""
    feats = prepare_eval_features(tokenizer, examples, cfg.max_seq_length, cfg.doc_stride, cfg.max_query_length)
    start, end = predict_logits(model, feats, cfg)
    return postprocess_predictions(
        examples, feats.example_index, feats.offsets, start, end, cfg.n_best, cfg.max_answer_length
    )


def _as_json(source: str | os.PathLike | dict) -> dict:
    return source if isinstance(source, dict) else read_squad_json(source)


def finetune(
    model: torch.nn.Module,
    tokenizer: Any,
    train_path: str | os.PathLike | dict,
    predict_path: str | os.PathLike | dict,
    cfg: SquadConfig | None = None,
) -> tuple[dict[str, str], dict[str, Any]]:
    """Fine-tune on `train_path`, predict and score `predict_path`.

    Either argument may also be the already-parsed SQuAD dict, so a caller that
    validated its inputs does not parse them twice. Returns (predictions, metrics);
    metrics holds exact_match and f1 in percent plus counts and timings.
    """
    cfg = cfg if cfg is not None else SquadConfig()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_pos is not None and cfg.max_seq_length > max_pos:
        raise ValueError(f"max_seq_length {cfg.max_seq_length} exceeds the model's {max_pos} positions")
    seed_everything(cfg.seed)
    train_data, predict_data = _as_json(train_path), _as_json(predict_path)
    train_examples, _ = examples_from_json(train_data)
    eval_examples, _ = examples_from_json(predict_data)

    t0 = time.perf_counter()
    train_feats = prepare_train_features(tokenizer, train_examples, cfg.max_seq_length, cfg.doc_stride, cfg.max_query_length)
    eval_feats = prepare_eval_features(tokenizer, eval_examples, cfg.max_seq_length, cfg.doc_stride, cfg.max_query_length)
    prep_seconds = time.perf_counter() - t0

    stats = train(model, train_feats, cfg)
    t0 = time.perf_counter()
    start, end = predict_logits(model, eval_feats, cfg)
    predictions = postprocess_predictions(
        eval_examples, eval_feats.example_index, eval_feats.offsets, start, end, cfg.n_best, cfg.max_answer_length
    )
    eval_seconds = time.perf_counter() - t0
    metrics: dict[str, Any] = dict(evaluate(predict_data, predictions, warn_unanswered=False))
    metrics.update(stats)
    metrics.update(
        eval_seconds=eval_seconds,
        preprocess_seconds=prep_seconds,
        epochs=stats["train_steps"] / max(1, cfg.steps_per_epoch(len(train_feats))),
        num_train_examples=len(train_examples),
        num_train_features=len(train_feats),
        num_train_skipped=train_feats.num_skipped,
        num_train_features_without_answer=int((train_feats.start_positions == 0).sum()),
        num_eval_examples=len(eval_examples),
        num_eval_features=len(eval_feats),
        device=str(cfg.resolved_device()),
        config=asdict(cfg),
    )
    return predictions, metrics
