"""Packing: several short samples in one row, so no compute is spent on padding.

BERT's samples fill a row to the maximum length except the short ones (short_seq_prob,
document ends); a batch of them spends the padded positions' compute for nothing.
`pack_batch` places the samples of a micro-batch into rows first-fit, in order: a sample
goes into the first row with room for its real tokens. Each sample keeps its own
positions (they restart at 0), token types and CLS token; the model attends only within a
sample (a block-diagonal mask built from `packed_segments`), pools each sample's CLS for
NSP, and predicts each sample's masked positions (shifted by the sample's offset). The
losses are the unpacked batch's, up to rounding (tests/test_bench_pretrain.py).
"""
from __future__ import annotations

import torch
from torch import Tensor

def packing_supported() -> bool:
    """Packed rows pass a 4-D additive attention mask, which HF BERT takes as given from
    transformers 5 on (4.x builds its own mask from a 2-D one)."""
    import transformers

    return int(transformers.__version__.split(".")[0]) >= 5


def pack_batch(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    mask = batch["attention_mask"]
    n_rows, seq = mask.shape
    lengths = [int(x) for x in mask.sum(1).tolist()]
    for i, n in enumerate(lengths):
        if not bool(mask[i, :n].all()):
            raise ValueError("pack_batch: a sample's real tokens must come first (padding at the end)")
    rows: list[list[int]] = []
    room: list[int] = []
    for i, n in enumerate(lengths):
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(seq - n)
    packed_rows, per_row = len(rows), max(len(r) for r in rows)
    preds = batch["masked_lm_positions"].shape[1]
    like = batch["input_ids"]
    out = {
        "input_ids": torch.zeros(packed_rows, seq, dtype=like.dtype),
        "token_type_ids": torch.zeros(packed_rows, seq, dtype=batch["token_type_ids"].dtype),
        "attention_mask": torch.zeros(packed_rows, seq, dtype=mask.dtype),
        "position_ids": torch.zeros(packed_rows, seq, dtype=torch.long),
        "packed_segments": torch.zeros(packed_rows, seq, dtype=torch.long),  # 0: padding, k + 1: sample k
        "masked_lm_positions": torch.zeros(packed_rows, per_row * preds, dtype=batch["masked_lm_positions"].dtype),
        "masked_lm_ids": torch.zeros(packed_rows, per_row * preds, dtype=batch["masked_lm_ids"].dtype),
        "masked_lm_weights": torch.zeros(packed_rows, per_row * preds, dtype=batch["masked_lm_weights"].dtype),
        "cls_positions": torch.zeros(packed_rows, per_row, dtype=torch.long),
        "next_sentence_labels": torch.zeros(packed_rows, per_row, dtype=batch["next_sentence_labels"].dtype),
        "nsp_weights": torch.zeros(packed_rows, per_row, dtype=torch.float32),
    }
    for r, members in enumerate(rows):
        offset = 0
        for k, i in enumerate(members):
            n = lengths[i]
            span = slice(offset, offset + n)
            out["input_ids"][r, span] = batch["input_ids"][i, :n]
            out["token_type_ids"][r, span] = batch["token_type_ids"][i, :n]
            out["attention_mask"][r, span] = 1
            out["position_ids"][r, span] = torch.arange(n)
            out["packed_segments"][r, span] = k + 1
            p = slice(k * preds, (k + 1) * preds)
            out["masked_lm_positions"][r, p] = batch["masked_lm_positions"][i] + offset
            out["masked_lm_ids"][r, p] = batch["masked_lm_ids"][i]
            out["masked_lm_weights"][r, p] = batch["masked_lm_weights"][i]
            out["cls_positions"][r, k] = offset
            out["next_sentence_labels"][r, k] = batch["next_sentence_labels"][i]
            out["nsp_weights"][r, k] = 1.0
            offset += n
    return out


def sample_lengths(batch: dict[str, Tensor]) -> Tensor:
    """The real (non-padding) length of every sample in a batch, packed or not."""
    if "packed_segments" not in batch:
        return batch["attention_mask"].sum(1)
    seg = batch["packed_segments"]
    per_row = int(batch["nsp_weights"].shape[1])
    counts = torch.stack([(seg == k + 1).sum(1) for k in range(per_row)], 1)  # [rows, samples per row]
    return counts[batch["nsp_weights"] > 0]


def num_sequences(batch: dict[str, Tensor]) -> int:
    """Samples in a batch, packed or not."""
    if "nsp_weights" in batch:
        return int(batch["nsp_weights"].sum())
    return int(batch["input_ids"].shape[0])
