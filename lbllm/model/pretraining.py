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
        """All six statistics as one fp32 vector: one all-reduce sums them over ranks."""
        return torch.stack([
            self.mlm_loss_sum.detach().float(), self.mlm_count.float(), self.mlm_correct.float(),
            self.nsp_loss_sum.detach().float(), self.nsp_count.float(), self.nsp_correct.float(),
        ])


class PretrainingModel(nn.Module):
    """Wraps `BertForPreTraining` so the training engine sees one module with one forward."""

    def __init__(self, model: BertForPreTraining):
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        masked_lm_positions: torch.Tensor,
        masked_lm_ids: torch.Tensor,
        masked_lm_weights: torch.Tensor,
        next_sentence_labels: torch.Tensor,
    ) -> PretrainingLosses:
        out = self.model.bert(input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask)
        sequence_output, pooled_output = out[0], out[1]
        real = masked_lm_weights > 0  # [B, P]; padding slots of the prediction list are 0
        batch_index = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(masked_lm_positions)
        hidden = sequence_output[batch_index[real], masked_lm_positions[real]]  # [M, H]
        mlm_logits = self.model.cls.predictions(hidden).float()
        targets = masked_lm_ids[real]
        mlm_loss_sum = F.cross_entropy(mlm_logits, targets, reduction="sum")
        nsp_logits = self.model.cls.seq_relationship(pooled_output).float()
        nsp_loss_sum = F.cross_entropy(nsp_logits, next_sentence_labels, reduction="sum")
        with torch.no_grad():
            mlm_correct = (mlm_logits.argmax(-1) == targets).sum()
            nsp_correct = (nsp_logits.argmax(-1) == next_sentence_labels).sum()
        return PretrainingLosses(
            mlm_loss_sum=mlm_loss_sum,
            mlm_count=real.sum(),
            mlm_correct=mlm_correct,
            nsp_loss_sum=nsp_loss_sum,
            nsp_count=torch.tensor(next_sentence_labels.numel(), device=input_ids.device),
            nsp_correct=nsp_correct,
        )
