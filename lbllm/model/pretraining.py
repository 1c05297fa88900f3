"""MLM + NSP loss pieces of a BERT pretraining step.

The decoder runs only at the masked positions (like NVIDIA's recipe): with 20 of 128
tokens masked it skips ~85% of the vocabulary projection, the largest matmul of a small
BERT. The module returns *sums and counts* rather than means, so the trainer decides how
to normalize (per micro-batch or over the whole global batch) without touching the model.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertForPreTraining


@dataclass
class PretrainingLosses:
    mlm_loss_sum: torch.Tensor  # sum of token cross-entropies over real masked positions
    mlm_count: torch.Tensor  # number of real masked positions
    mlm_correct: torch.Tensor  # masked positions predicted exactly
    nsp_loss_sum: torch.Tensor
    nsp_count: torch.Tensor
    nsp_correct: torch.Tensor

    def mean_loss(self) -> torch.Tensor:
        """Mean MLM token loss + mean NSP loss of this (micro-)batch."""
        return self.mlm_loss_sum / self.mlm_count.clamp(min=1) + self.nsp_loss_sum / self.nsp_count.clamp(min=1)

    def as_vector(self) -> torch.Tensor:
        """All six statistics as one fp32 vector (in StepStats' field order): one
        all-reduce sums them over ranks."""
        return torch.stack([getattr(self, name).detach().float() for name in STAT_FIELDS])


STAT_FIELDS = ("mlm_loss_sum", "mlm_count", "mlm_correct", "nsp_loss_sum", "nsp_count", "nsp_correct")


@dataclass(frozen=True)
class StepStats:
    """PretrainingLosses summed over many batches (a global batch, or a held-out set):
    plain numbers, read by name."""

    mlm_loss_sum: float
    mlm_count: float
    mlm_correct: float
    nsp_loss_sum: float
    nsp_count: float
    nsp_correct: float

    @classmethod
    def from_vector(cls, vector: torch.Tensor) -> "StepStats":
        """From the sum of `PretrainingLosses.as_vector()`s."""
        return cls(*(float(x) for x in vector.tolist()))

    @property
    def mlm_loss(self) -> float:
        return self.mlm_loss_sum / max(self.mlm_count, 1.0)

    @property
    def mlm_acc(self) -> float:
        return self.mlm_correct / max(self.mlm_count, 1.0)

    @property
    def nsp_loss(self) -> float:
        return self.nsp_loss_sum / max(self.nsp_count, 1.0)

    @property
    def nsp_acc(self) -> float:
        return self.nsp_correct / max(self.nsp_count, 1.0)

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """The metrics.jsonl fields: per-token MLM, per-sequence NSP, and their sum as `loss`."""
        out = {"mlm_loss": self.mlm_loss, "mlm_acc": self.mlm_acc, "nsp_loss": self.nsp_loss, "nsp_acc": self.nsp_acc}
        if not prefix:
            out = {"loss": self.mlm_loss + self.nsp_loss, **out}
        return {prefix + k: v for k, v in out.items()}


class PretrainingModel(nn.Module):
    """Wraps `BertForPreTraining` so the training engine sees one module with one forward."""

    def __init__(self, model: BertForPreTraining, sparse_mlm_head: bool = True):
        super().__init__()
        self.model = model
        # False: the vocabulary projection over every position, then the masked ones picked
        # (HF's dense head): the same losses, for the benchmark's what-it-buys table.
        self.sparse_mlm_head = sparse_mlm_head

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        masked_lm_positions: torch.Tensor,
        masked_lm_ids: torch.Tensor,
        masked_lm_weights: torch.Tensor,
        next_sentence_labels: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        packed_segments: torch.Tensor | None = None,
        cls_positions: torch.Tensor | None = None,
        nsp_weights: torch.Tensor | None = None,
    ) -> PretrainingLosses:
        if packed_segments is None:
            out = self.model.bert(input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask)
            sequence_output, pooled_output = out[0], out[1]
            nsp_labels = next_sentence_labels
        else:
            # Packed rows (lbllm/data/packing.py): attention only within a sample, positions
            # restarting per sample, each sample's CLS pooled for NSP.
            # Padding (segment 0) attends to padding only, so no query row is fully masked
            # (that would be NaN-prone in fp16); real tokens never see another segment.
            same = packed_segments[:, :, None] == packed_segments[:, None, :]
            dtype = self.model.bert.embeddings.word_embeddings.weight.dtype
            blocks = torch.zeros(same.shape, dtype=dtype, device=same.device).masked_fill_(
                ~same, torch.finfo(dtype).min)[:, None]
            out = self.model.bert(input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=blocks,
                                  position_ids=position_ids)
            sequence_output = out[0]
            real_cls = nsp_weights > 0
            rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(cls_positions)
            pooler = self.model.bert.pooler
            pooled_output = pooler.activation(pooler.dense(sequence_output[rows[real_cls], cls_positions[real_cls]]))
            nsp_labels = next_sentence_labels[real_cls]
        real = masked_lm_weights > 0  # [B, P]; padding slots of the prediction list are 0
        batch_index = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(masked_lm_positions)
        if self.sparse_mlm_head:
            hidden = sequence_output[batch_index[real], masked_lm_positions[real]]  # [M, H]
            mlm_logits = self.model.cls.predictions(hidden).float()
        else:
            dense = self.model.cls.predictions(sequence_output)  # [B, S, V]
            mlm_logits = dense[batch_index[real], masked_lm_positions[real]].float()
        targets = masked_lm_ids[real]
        mlm_loss_sum = F.cross_entropy(mlm_logits, targets, reduction="sum")
        nsp_logits = self.model.cls.seq_relationship(pooled_output).float()
        nsp_loss_sum = F.cross_entropy(nsp_logits, nsp_labels, reduction="sum")
        with torch.no_grad():
            mlm_correct = (mlm_logits.argmax(-1) == targets).sum()
            nsp_correct = (nsp_logits.argmax(-1) == nsp_labels).sum()
        return PretrainingLosses(
            mlm_loss_sum=mlm_loss_sum,
            mlm_count=real.sum(),
            mlm_correct=mlm_correct,
            nsp_loss_sum=nsp_loss_sum,
            nsp_count=torch.tensor(nsp_labels.numel(), device=input_ids.device),
            nsp_correct=nsp_correct,
        )
