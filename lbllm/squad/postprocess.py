"""Start/end logits over windows -> one answer string per question.

The rule is BERT's: per window take the n_best highest start and end logits, keep
pairs that are a real context span (both ends in the context, end >= start, at most
max_answer_length tokens), score a span by start_logit + end_logit, and let the best
span over all of the example's windows win. The text is cut from the original
context by character offsets, so casing, accents and spacing survive exactly.

One deliberate difference from the reference code: logits of non-context tokens are
masked *before* the top-n selection, so a window whose highest logits sit on question
tokens or CLS still yields its best valid span instead of nothing.

Vectorized over windows with numpy: no Python loop per window or per candidate pair.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from lbllm.squad.features import SquadExample

__all__ = ["best_spans", "postprocess_predictions"]

# Windows scored per numpy call: bounds the (chunk, n_best, n_best) score tensor.
_CHUNK = 4096


def best_spans(
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    offsets: np.ndarray,
    n_best: int = 20,
    max_answer_length: int = 30,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best valid span per window: (start_token, end_token, score), each of shape (N,).

    `offsets` is (N, L, 2) with -1 on non-context tokens. A window with no valid
    candidate gets score -inf (and tokens 0, 0).
    """
    if n_best < 1 or max_answer_length < 1:
        raise ValueError("n_best and max_answer_length must be >= 1")
    start_logits = np.asarray(start_logits, dtype=np.float32)
    end_logits = np.asarray(end_logits, dtype=np.float32)
    if start_logits.shape != end_logits.shape or start_logits.shape != offsets.shape[:2]:
        raise ValueError(
            f"logits {start_logits.shape}/{end_logits.shape} do not match offsets {offsets.shape[:2]}"
        )
    n, length = start_logits.shape
    k = min(n_best, length)
    out_s = np.zeros(n, dtype=np.int64)
    out_e = np.zeros(n, dtype=np.int64)
    out_score = np.full(n, -np.inf, dtype=np.float32)
    for lo in range(0, n, _CHUNK):
        sl = slice(lo, min(lo + _CHUNK, n))
        ctx = offsets[sl, :, 0] >= 0
        s = np.where(ctx, start_logits[sl], -np.inf)
        e = np.where(ctx, end_logits[sl], -np.inf)
        # Unordered top-k is enough: the max over all k*k pairs does not need ranks.
        si = np.argpartition(-s, k - 1, axis=1)[:, :k]
        ei = np.argpartition(-e, k - 1, axis=1)[:, :k]
        ss = np.take_along_axis(s, si, axis=1)
        es = np.take_along_axis(e, ei, axis=1)
        span = ei[:, None, :] - si[:, :, None]  # (c, k, k): end - start
        score = ss[:, :, None] + es[:, None, :]  # -inf wherever a side is not context
        valid = (span >= 0) & (span < max_answer_length) & np.isfinite(score)
        score = np.where(valid, score, -np.inf).reshape(score.shape[0], -1)
        best = np.argmax(score, axis=1)
        rows = np.arange(score.shape[0])
        out_score[sl] = score[rows, best]
        out_s[sl] = si[rows, best // k]
        out_e[sl] = ei[rows, best % k]
    invalid = ~np.isfinite(out_score)
    out_s[invalid] = 0
    out_e[invalid] = 0
    return out_s, out_e, out_score


def postprocess_predictions(
    examples: Sequence[SquadExample],
    example_index: np.ndarray,
    offsets: np.ndarray,
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    n_best: int = 20,
    max_answer_length: int = 30,
) -> dict[str, str]:
    """{question id: answer text} for every example (empty string when no window of
    the example has any valid span, so every id is always present)."""
    start_tok, end_tok, score = best_spans(start_logits, end_logits, offsets, n_best, max_answer_length)
    example_index = np.asarray(example_index, dtype=np.int64)
    predictions = {ex.qid: "" for ex in examples}
    if len(example_index) == 0:
        return predictions
    # Best window per example: sort by (example, -score) and keep each example's first.
    order = np.lexsort((-score, example_index))
    _, first = np.unique(example_index[order], return_index=True)
    for f in order[first]:
        if not np.isfinite(score[f]):
            continue
        ex = examples[int(example_index[f])]
        char_lo = int(offsets[f, start_tok[f], 0])
        char_hi = int(offsets[f, end_tok[f], 1])
        predictions[ex.qid] = ex.context[char_lo:char_hi]
    return predictions
