"""Start/end logits over windows -> the n best answers per question.

The rule is Google BERT's run_squad.py: per window take the n_best_size highest start
and end logits, keep pairs that are a real context span (both ends in the context,
end >= start, at most max_answer_length tokens), score a span by start_logit +
end_logit, rank the candidates of all of the example's windows together, and keep the
first n_best_size distinct answer texts; their probabilities are a softmax over those
scores, and the first is the prediction. The text is cut from the original context by
character offsets, so casing, accents and spacing survive exactly.

One deliberate difference from the reference code: logits of non-context tokens are
masked *before* the top-n selection, so a window whose highest logits sit on question
tokens or CLS still yields its best valid spans instead of nothing.

Vectorized over windows with numpy: no Python loop per window or per candidate pair;
only the final per-question pass that slices texts and drops repeats is Python.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from lbllm.squad.features import SquadExample

__all__ = ["best_spans", "span_candidates", "SpanCandidates", "nbest_predictions", "postprocess_predictions"]

# Windows scored per numpy call: bounds the (chunk, n_best, n_best) score tensor.
_CHUNK = 4096
# What a question with no valid span at all gets (JSON has no -inf); as in Google's
# "empty" entry, but with the empty string that predictions.json also holds then.
_NO_ANSWER = {"text": "", "probability": 1.0, "start_logit": 0.0, "end_logit": 0.0}


def _check(start_logits: np.ndarray, end_logits: np.ndarray, offsets: np.ndarray, n_best: int,
           max_answer_length: int) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Refuse shapes that would silently decode the wrong windows; logits as float32."""
    if n_best < 1 or max_answer_length < 1:
        raise ValueError("n_best_size and max_answer_length must be >= 1")
    start_logits = np.asarray(start_logits, dtype=np.float32)
    end_logits = np.asarray(end_logits, dtype=np.float32)
    if start_logits.shape != end_logits.shape or start_logits.shape != offsets.shape[:2]:
        raise ValueError(
            f"logits {start_logits.shape}/{end_logits.shape} do not match offsets {offsets.shape[:2]}"
        )
    return start_logits, end_logits


def _pair_scores(
    start_logits: np.ndarray, end_logits: np.ndarray, offsets: np.ndarray, k: int, max_answer_length: int
) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Per chunk of windows: (first window, start tokens (c, k), end tokens (c, k),
    start logits (c, k), end logits (c, k), pair scores (c, k, k) with -inf on every
    invalid pair). Unordered top-k is enough: callers rank pairs by their sums."""
    n = start_logits.shape[0]
    for lo in range(0, n, _CHUNK):
        sl = slice(lo, min(lo + _CHUNK, n))
        ctx = offsets[sl, :, 0] >= 0
        s = np.where(ctx, start_logits[sl], -np.inf)
        e = np.where(ctx, end_logits[sl], -np.inf)
        si = np.argpartition(-s, k - 1, axis=1)[:, :k]
        ei = np.argpartition(-e, k - 1, axis=1)[:, :k]
        ss = np.take_along_axis(s, si, axis=1)
        es = np.take_along_axis(e, ei, axis=1)
        span = ei[:, None, :] - si[:, :, None]  # (c, k, k): end - start
        score = ss[:, :, None] + es[:, None, :]  # -inf wherever a side is not context
        valid = (span >= 0) & (span < max_answer_length) & np.isfinite(score)
        yield lo, si, ei, ss, es, np.where(valid, score, -np.inf)


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
    start_logits, end_logits = _check(start_logits, end_logits, offsets, n_best, max_answer_length)
    n, length = start_logits.shape
    k = min(n_best, length)
    out_s = np.zeros(n, dtype=np.int64)
    out_e = np.zeros(n, dtype=np.int64)
    out_score = np.full(n, -np.inf, dtype=np.float32)
    for lo, si, ei, _, _, score in _pair_scores(start_logits, end_logits, offsets, k, max_answer_length):
        score = score.reshape(score.shape[0], -1)
        best = np.argmax(score, axis=1)
        rows = np.arange(score.shape[0])
        sl = slice(lo, lo + score.shape[0])
        out_score[sl] = score[rows, best]
        out_s[sl] = si[rows, best // k]
        out_e[sl] = ei[rows, best % k]
    invalid = ~np.isfinite(out_score)
    out_s[invalid] = 0
    out_e[invalid] = 0
    return out_s, out_e, out_score


@dataclass
class SpanCandidates:
    """Every valid (window, start, end) pair of the per-window top-n starts x ends."""

    feature: np.ndarray  # (M,) int64 window index
    start: np.ndarray  # (M,) int64 token
    end: np.ndarray  # (M,) int64 token
    start_logit: np.ndarray  # (M,) float32
    end_logit: np.ndarray  # (M,) float32

    def __len__(self) -> int:
        return int(self.feature.shape[0])


def span_candidates(
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    offsets: np.ndarray,
    n_best_size: int = 20,
    max_answer_length: int = 30,
) -> SpanCandidates:
    """All valid spans among each window's top-n starts x top-n ends (at most n*n per
    window), in window order; what the n best answers of a question are drawn from."""
    start_logits, end_logits = _check(start_logits, end_logits, offsets, n_best_size, max_answer_length)
    k = min(n_best_size, start_logits.shape[1])
    parts: list[tuple[np.ndarray, ...]] = []
    for lo, si, ei, ss, es, score in _pair_scores(start_logits, end_logits, offsets, k, max_answer_length):
        w, a, b = np.nonzero(np.isfinite(score))
        parts.append((w + lo, si[w, a], ei[w, b], ss[w, a], es[w, b]))
    if not parts:
        empty = np.zeros(0, dtype=np.int64)
        return SpanCandidates(empty, empty, empty, np.zeros(0, np.float32), np.zeros(0, np.float32))
    cols = [np.concatenate(c) for c in zip(*parts)]
    return SpanCandidates(cols[0].astype(np.int64), cols[1].astype(np.int64), cols[2].astype(np.int64), cols[3], cols[4])


def _softmax(scores: np.ndarray) -> np.ndarray:
    """Probabilities over the n-best scores (float64, shifted by the max for range)."""
    z = np.exp(scores - scores.max())
    return z / z.sum()


def _ranked(
    cands: SpanCandidates, example_index: np.ndarray, offsets: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Candidates as (example, char_lo, char_hi, start_logit, end_logit, score) ranked
    best first within each example, one per distinct character span.

    The same span seen in two overlapping windows keeps its best-scoring copy; ties
    in score go to the earlier, then the shorter span, so the order is deterministic.
    """
    ex = example_index[cands.feature]
    lo = offsets[cands.feature, cands.start, 0].astype(np.int64)
    hi = offsets[cands.feature, cands.end, 1].astype(np.int64)
    score = cands.start_logit.astype(np.float64) + cands.end_logit.astype(np.float64)
    by_span = np.lexsort((-score, hi, lo, ex))
    keys = np.stack([ex[by_span], lo[by_span], hi[by_span]], axis=1)
    first = np.ones(len(by_span), dtype=bool)
    first[1:] = np.any(keys[1:] != keys[:-1], axis=1)
    keep = by_span[first]
    order = keep[np.lexsort((hi[keep], lo[keep], -score[keep], ex[keep]))]
    return ex[order], lo[order], hi[order], cands.start_logit[order], cands.end_logit[order], score[order]


def nbest_predictions(
    examples: Sequence[SquadExample],
    example_index: np.ndarray,
    offsets: np.ndarray,
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    n_best_size: int = 20,
    max_answer_length: int = 30,
) -> dict[str, list[dict]]:
    """{question id: [{"text", "probability", "start_logit", "end_logit"}, ...]}, the
    n_best_size best distinct answer texts over all of the question's windows, best
    first. A question without any valid span gets one empty-text entry, so every id
    is present and predictions.json can take the first entry of each."""
    cands = span_candidates(start_logits, end_logits, offsets, n_best_size, max_answer_length)
    example_index = np.asarray(example_index, dtype=np.int64)
    ex, lo, hi, sl, el, score = _ranked(cands, example_index, offsets)
    bounds = np.searchsorted(ex, np.arange(len(examples) + 1))
    nbest: dict[str, list[dict]] = {}
    for i, example in enumerate(examples):
        a, b = int(bounds[i]), int(bounds[i + 1])
        picked, texts = [], set()
        for j in range(a, b):  # usually ends after n_best_size steps: spans are already distinct
            text = example.context[lo[j] : hi[j]]
            if text in texts:
                continue
            texts.add(text)
            picked.append(j)
            if len(picked) == n_best_size:
                break
        if not picked:
            nbest[example.qid] = [dict(_NO_ANSWER)]
            continue
        rows = np.asarray(picked)
        probs = _softmax(score[rows])
        nbest[example.qid] = [
            {"text": example.context[lo[j] : hi[j]], "probability": float(p),
             "start_logit": float(sl[j]), "end_logit": float(el[j])}
            for j, p in zip(picked, probs)
        ]  # fmt: skip
    return nbest


def postprocess_predictions(
    examples: Sequence[SquadExample],
    example_index: np.ndarray,
    offsets: np.ndarray,
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    n_best_size: int = 20,
    max_answer_length: int = 30,
) -> tuple[dict[str, str], dict[str, list[dict]]]:
    """(predictions, nbest): {question id: best answer text} (empty string when no
    window of the question has a valid span) and the n-best lists it came from."""
    nbest = nbest_predictions(examples, example_index, offsets, start_logits, end_logits, n_best_size, max_answer_length)
    return {qid: entries[0]["text"] for qid, entries in nbest.items()}, nbest
