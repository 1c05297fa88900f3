"""SquadConfig: the fine-tuning and decoding knobs, in a module without torch.

`scripts/run_squad.py` takes its flag defaults from here, and validates its inputs
before it imports torch, so both must be readable without the slow import; torch is
only imported to check an explicit `device`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from lbllm.squad.features import check_lengths

__all__ = ["SquadConfig"]


@dataclass
class SquadConfig:
    """Defaults are the published BERT base/large SQuAD v1.1 recipe (NVIDIA
    DeepLearningExamples, as Google's run_squad.py but 2 epochs at lr 3e-5): AdamW,
    10% linear warmup then linear decay, windows of 384 tokens overlapping by 128,
    questions cut at 64 tokens, n-best 20, answers of at most 30 tokens."""

    epochs: float = 2.0
    """Passes over the training windows; ignored when max_steps is set."""
    max_steps: int | None = None
    """Optimizer steps to take; overrides epochs. 0 evaluates the model as loaded."""
    lr: float = 3e-5
    """Peak learning rate, reached at the end of warmup."""
    batch_size: int = 32
    """Training windows per optimizer step over all ranks (the global batch)."""
    eval_batch_size: int = 64
    """Prediction windows per forward pass, per rank."""
    seed: int = 42
    """Seeds the fresh QA head, dropout and the order of the training windows."""
    max_seq_length: int = 384
    """Window length in tokens (question, context and special tokens)."""
    doc_stride: int = 128
    """Token overlap between consecutive windows of one context (tokenizers' `stride`)."""
    max_query_length: int = 64
    """Questions are cut to this many tokens."""
    warmup_proportion: float = 0.1
    """Fraction of the steps spent warming up linearly from 0."""
    weight_decay: float = 0.01
    """Decoupled (AdamW) weight decay of matrices; biases and LayerNorm are not decayed."""
    max_grad_norm: float = 1.0
    """Global gradient-norm clip; 0 disables."""
    n_best_size: int = 20
    """Top start and end logits per window combined into candidates, and the number of
    distinct answers kept per question in nbest_predictions.json."""
    max_answer_length: int = 30
    """Longest answer, in tokens, that decoding may return."""
    dropout: float | None = None
    """Hidden and attention dropout of the loaded model; None keeps the checkpoint's
    (0 makes runs comparable across world sizes)."""
    threads: int | None = None
    """torch intra-op threads (None: torch's default, split among local ranks)."""
    device: str = "auto"
    """"auto" picks CUDA when present (one device per local rank), else CPU."""
    progress: bool = True
    """tqdm bars on stderr (rank 0 only)."""

    def __post_init__(self) -> None:
        if self.max_steps is None and not (self.epochs > 0 and math.isfinite(self.epochs)):
            raise ValueError(f"epochs must be a positive number, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 0:
            raise ValueError(f"max_steps must be >= 0, got {self.max_steps}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        for name in ("batch_size", "eval_batch_size", "n_best_size", "max_answer_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.warmup_proportion < 1.0:
            raise ValueError(f"warmup_proportion must be in [0, 1), got {self.warmup_proportion}")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ValueError("weight_decay and max_grad_norm must be >= 0")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        check_lengths(self.max_seq_length, self.doc_stride, self.max_query_length)
        if self.device != "auto":
            _check_device(self.device)

    def steps_per_epoch(self, num_features: int) -> int:
        return math.ceil(num_features / self.batch_size)

    def total_steps(self, num_features: int) -> int:
        """Optimizer steps for a training set of `num_features` windows."""
        if self.max_steps is not None:
            return self.max_steps
        return math.ceil(self.epochs * self.steps_per_epoch(num_features))

    def warmup_steps(self, total_steps: int) -> int:
        return int(self.warmup_proportion * total_steps)

    def resolved_device(self, local_rank: int = 0) -> Any:
        """The torch.device of this rank: one GPU per local rank under a launcher."""
        import torch

        if self.device == "auto":
            return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda" and device.index is None:
            return torch.device(f"cuda:{local_rank}")
        return device


def _check_device(device: str) -> None:
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        raise ValueError(f'device {device!r} is not a torch device; use "auto", "cpu" or "cuda[:N]"') from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use --device cpu")
