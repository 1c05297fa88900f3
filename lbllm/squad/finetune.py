"""SQuAD v1.1 fine-tuning: the recipe the BERT and LAMB papers report F1 with.

AdamW with linear warmup then linear decay to zero, no weight decay on biases and
LayerNorm weights (every tensor with ndim <= 1), gradient clipping at 1.0, loss = mean
over the batch of the mean of start and end cross-entropy (what
BertForQuestionAnswering computes, except that padding is kept out of the softmax:
see qa_loss_sum). No ZeRO: fine-tuning is a small fraction of
pretraining cost, and a plain loop keeps the numbers easy to trust.

Under a launcher the loop is data parallel (lbllm.train.data_parallel): every rank draws the
same global batch, computes the loss of its contiguous slice as a sum over its windows
divided by the global batch size, and the gradients are summed over ranks, so every
rank clips and steps on exactly the gradient one process would compute (up to the
order of floating-point sums). Prediction splits the windows the same way and gathers
the logits on rank 0, which decodes, scores and reports.

The whole loop is in `train` and fits on a screen. Batches are cut to the longest
window in the batch (features are stored padded, with their real lengths), so short
contexts do not pay for max_seq_length worth of padding.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lbllm.optim import build_param_groups
from lbllm.schedules import build_scheduler
from lbllm.squad.config import SquadConfig
from lbllm.train.data_parallel import DataParallel
from lbllm.squad.features import (
    EvalFeatures,
    SquadExample,
    TrainFeatures,
    examples_from_json,
    prepare_eval_features,
    prepare_train_features,
    read_squad_json,
)
from lbllm.squad.metrics import evaluate
from lbllm.squad.postprocess import postprocess_predictions
from lbllm.utils import seed_everything

__all__ = [
    "SquadConfig",
    "SquadData",
    "FinetuneResult",
    "load_qa_model",
    "qa_loss_sum",
    "prepare_data",
    "train",
    "predict_logits",
    "predict",
    "finetune",
]


def load_qa_model(model_dir: str | os.PathLike, dropout: float | None = None) -> tuple[Any, Any, dict]:
    """Load a question-answering model and its fast tokenizer from a local directory.

    Pretraining checkpoints have no qa_outputs head, so transformers would print a
    table of missing/unexpected keys; that is expected here, so it is silenced and
    summarized in the returned info ({"fresh": [...], "unused": [...]}). `dropout`
    overrides the checkpoint's hidden and attention dropout (0 for exactness tests).
    """
    import transformers
    from transformers.utils import logging as hf_logging

    overrides = {} if dropout is None else {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
        model, info = transformers.AutoModelForQuestionAnswering.from_pretrained(
            str(model_dir), output_loading_info=True, **overrides
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


def qa_loss_sum(start_logits: torch.Tensor, end_logits: torch.Tensor, start: torch.Tensor, end: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Sum over windows of (CE(start) + CE(end)) / 2; divided by the global batch size
    it is one rank's share of BertForQuestionAnswering's batch-mean loss.

    Padding positions are left out of the softmax (BertForQuestionAnswering keeps
    them): batches are cut to their longest window, so otherwise a window's loss would
    depend on which other windows share its batch, and a rank's slice would not add
    up to the global batch's loss. Without padding the two losses are the same.
    """
    pad = attention_mask == 0
    floor = torch.finfo(torch.float32).min
    s = start_logits.float().masked_fill(pad, floor)
    e = end_logits.float().masked_fill(pad, floor)
    return (F.cross_entropy(s, start, reduction="sum") + F.cross_entropy(e, end, reduction="sum")) / 2


# ------------------------------------------------------------------------------ data


@dataclass
class SquadData:
    """Examples and windows of both files, prepared once and shared by all seeds."""

    train_examples: list[SquadExample]
    eval_examples: list[SquadExample]
    train_feats: TrainFeatures
    eval_feats: EvalFeatures
    predict_data: dict
    """The prediction file's (usable) questions, what EM/F1 are scored against."""
    preprocess_seconds: float = 0.0

    def counts(self) -> dict[str, int]:
        return {
            "num_train_examples": len(self.train_examples),
            "num_train_features": len(self.train_feats),
            "num_train_skipped": self.train_feats.num_skipped,
            "num_train_features_without_answer": int((self.train_feats.start_positions == 0).sum()),
            "num_eval_examples": len(self.eval_examples),
            "num_eval_features": len(self.eval_feats),
        }


def _as_json(source: str | os.PathLike | dict) -> dict:
    return source if isinstance(source, dict) else read_squad_json(source)


def prepare_data(tokenizer: Any, train_source: str | os.PathLike | dict, predict_source: str | os.PathLike | dict,
                 cfg: SquadConfig) -> SquadData:  # fmt: skip
    """Read (or take the already-checked dicts of) both files and cut them into windows."""
    train_data, predict_data = _as_json(train_source), _as_json(predict_source)
    t0 = time.perf_counter()
    train_examples, eval_examples = examples_from_json(train_data), examples_from_json(predict_data)
    lengths = (cfg.max_seq_length, cfg.doc_stride, cfg.max_query_length)
    train_feats = prepare_train_features(tokenizer, train_examples, *lengths)
    eval_feats = prepare_eval_features(tokenizer, eval_examples, *lengths)
    return SquadData(train_examples, eval_examples, train_feats, eval_feats, predict_data, time.perf_counter() - t0)


def _batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless stream of global index batches, one fresh permutation per epoch (the
    same on every rank: each generator gets the same seed)."""
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
    return {k: t[k][idx, :width].to(device).long() for k in ("input_ids", "token_type_ids", "attention_mask")}


def _local_loss(model: torch.nn.Module, t: dict[str, torch.Tensor], idx: torch.Tensor, global_size: int,
                device: torch.device) -> torch.Tensor:  # fmt: skip
    """This rank's share of the batch-mean loss; zero (no graph) for an empty slice,
    which the last, short batch of an epoch can leave a rank with."""
    if len(idx) == 0:
        return torch.zeros((), device=device)
    inputs = _model_inputs(t, idx, device)
    out = model(**inputs)
    start, end = t["start_positions"][idx].to(device), t["end_positions"][idx].to(device)
    return qa_loss_sum(out.start_logits, out.end_logits, start, end, inputs["attention_mask"]) / global_size


# ----------------------------------------------------------------------- train/predict


def _configure_threads(cfg: SquadConfig, dp: DataParallel) -> None:
    """An explicit --threads wins; otherwise K CPU ranks on one node share its cores
    (each would start one thread per core, K-fold oversubscribing the machine)."""
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    elif dp.local_size > 1 and "OMP_NUM_THREADS" not in os.environ and cfg.resolved_device(dp.local_rank).type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dp.local_size))


def train(model: torch.nn.Module, feats: TrainFeatures, cfg: SquadConfig, dp: DataParallel = DataParallel()) -> dict[str, Any]:
    """Fine-tune in place; returns {"train_steps", "train_seconds", "train_loss" (mean
    of the last 100 steps, None without steps), "train_losses" (every step's global
    batch loss), "train_examples" (windows consumed), "train_examples_per_s"}."""
    device = cfg.resolved_device(dp.local_rank)
    model.to(device).train()
    total = cfg.total_steps(len(feats))
    if total == 0 or len(feats) == 0:
        return {"train_steps": 0, "train_seconds": 0.0, "train_loss": None, "train_losses": [],
                "train_examples": 0, "train_examples_per_s": None}  # fmt: skip
    warmup = cfg.warmup_steps(total)
    optimizer = torch.optim.AdamW(build_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-6)
    # Linear warmup then linear decay to 0: the pretraining schedules' WarmupPolyDecay, power 1.
    schedule = build_scheduler("WarmupPolyDecay", {"total_num_steps": total, "warmup_num_steps": warmup})(optimizer)
    params = [p for p in model.parameters() if p.requires_grad]
    tensors = _to_tensors(feats)
    batches = _batches(len(feats), cfg.batch_size, torch.Generator().manual_seed(cfg.seed))
    losses: list[torch.Tensor] = []  # detached, on device: read back rarely to avoid syncs
    seen = 0
    start = time.perf_counter()
    bar = tqdm(total=total, desc="squad train", unit="step", disable=not (cfg.progress and dp.is_main), file=sys.stderr)
    for step in range(total):
        idx = next(batches)
        lo, hi = dp.shard(len(idx))
        loss = _local_loss(model, tensors, idx[lo:hi], len(idx), device)
        if loss.requires_grad:
            loss.backward()
        loss = dp.sum_gradients(params, loss.detach())  # one all-reduce: gradients + loss
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss)
        seen += len(idx)
        if step % 20 == 0 or step == total - 1:  # a host sync point
            bar.set_postfix(loss=f"{torch.stack(losses[-100:]).mean().item():.4f}", lr=f"{schedule.get_last_lr()[0]:.2e}")
        bar.update(1)
    curve = torch.stack(losses).tolist()  # waits for the device, so the clock below is honest
    seconds = time.perf_counter() - start
    bar.close()
    return {
        "train_steps": total,
        "train_seconds": seconds,
        "train_loss": float(np.mean(curve[-100:])),
        "train_losses": curve,
        "train_examples": seen,
        "train_examples_per_s": seen / seconds if seconds > 0 else None,
    }


@torch.no_grad()
def _predict_rows(model: torch.nn.Module, t: dict[str, torch.Tensor], rows: torch.Tensor, length: int,
                  batch_size: int, device: torch.device, progress: bool) -> np.ndarray:  # fmt: skip
    """(len(rows), 2, length) start/end logits, -inf beyond each window; batched
    longest-first so each batch pads to similar lengths."""
    out = np.full((len(rows), 2, length), -np.inf, dtype=np.float32)
    order = torch.argsort(t["lengths"][rows], descending=True)
    for pos in tqdm(order.split(batch_size), desc="squad eval", unit="batch", disable=not progress, file=sys.stderr):
        logits = model(**_model_inputs(t, rows[pos], device))
        width = logits.start_logits.shape[1]
        both = torch.stack([logits.start_logits, logits.end_logits], dim=1).float().cpu().numpy()
        out[pos.numpy(), :, :width] = both
    return out


def predict_logits(
    model: torch.nn.Module, feats: EvalFeatures, cfg: SquadConfig, dp: DataParallel = DataParallel()
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(start, end) logits of shape (N, max_seq_length), -inf beyond each window, on
    rank 0; (None, None) on other ranks. Each rank predicts its contiguous share of
    the windows."""
    device = cfg.resolved_device(dp.local_rank)
    model.to(device).eval()
    n, length = feats.input_ids.shape
    lo, hi = dp.shard(n)
    rows = _predict_rows(model, _to_tensors(feats), torch.arange(lo, hi), length, cfg.eval_batch_size, device,
                         cfg.progress and dp.is_main)  # fmt: skip
    gathered = dp.gather_rows(rows, n, device)
    if gathered is None:
        return None, None
    return gathered[:, 0], gathered[:, 1]


def predict(model: torch.nn.Module, tokenizer: Any, examples: Sequence[SquadExample], cfg: SquadConfig) -> dict[str, str]:
    """{question id: answer text} for `examples` with the model as it is now (one process)."""
    feats = prepare_eval_features(tokenizer, examples, cfg.max_seq_length, cfg.doc_stride, cfg.max_query_length)
    start, end = predict_logits(model, feats, cfg)
    return postprocess_predictions(
        examples, feats.example_index, feats.offsets, start, end, cfg.n_best_size, cfg.max_answer_length
    )[0]


# ---------------------------------------------------------------------------- finetune


@dataclass
class FinetuneResult:
    """One seed's run. predictions/nbest are None on ranks other than 0, and metrics
    there lack exact_match/f1 (only rank 0 decodes and scores)."""

    metrics: dict[str, Any]
    predictions: dict[str, str] | None = None
    nbest: dict[str, list[dict]] | None = None
    config: dict[str, Any] = field(default_factory=dict)


def _rank_seed(seed: int, rank: int) -> int:
    """Rank 0 keeps `seed` (a single process is rank 0 of any world); the others get
    distinct streams so their dropout masks are not copies of rank 0's."""
    return seed if rank == 0 else int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def finetune(model: torch.nn.Module, data: SquadData, cfg: SquadConfig | None = None,
             dp: DataParallel = DataParallel()) -> FinetuneResult:  # fmt: skip
    """Fine-tune on data's training windows, then predict, decode and score its
    prediction windows. metrics: exact_match and f1 in percent (rank 0), seed, steps,
    losses, timings and examples/s (windows per second) of training and prediction."""
    cfg = cfg if cfg is not None else SquadConfig()
    _configure_threads(cfg, dp)
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_pos is not None and cfg.max_seq_length > max_pos:
        raise ValueError(f"max_seq_length {cfg.max_seq_length} exceeds the model's {max_pos} positions")
    model.to(cfg.resolved_device(dp.local_rank))
    dp.broadcast_parameters(model)
    seed_everything(_rank_seed(cfg.seed, dp.rank))  # dropout; the batch order has its own generator

    stats = train(model, data.train_feats, cfg, dp)
    t0 = time.perf_counter()
    start, end = predict_logits(model, data.eval_feats, cfg, dp)
    predict_seconds = time.perf_counter() - t0
    metrics: dict[str, Any] = {"seed": cfg.seed, **stats, "predict_seconds": predict_seconds,
                               "predict_examples_per_s": len(data.eval_feats) / predict_seconds if predict_seconds > 0 else None}  # fmt: skip
    metrics["epochs"] = stats["train_steps"] / max(1, cfg.steps_per_epoch(len(data.train_feats)))
    if start is None:
        return FinetuneResult(metrics, config=asdict(cfg))
    t0 = time.perf_counter()
    feats = data.eval_feats
    predictions, nbest = postprocess_predictions(
        data.eval_examples, feats.example_index, feats.offsets, start, end, cfg.n_best_size, cfg.max_answer_length
    )
    metrics["postprocess_seconds"] = time.perf_counter() - t0
    metrics["eval_seconds"] = predict_seconds + metrics["postprocess_seconds"]
    metrics = {**evaluate(data.predict_data, predictions, warn_unanswered=False), **metrics}
    return FinetuneResult(metrics, predictions, nbest, asdict(cfg))
