"""BERT's masked-LM corruption as a pure, vectorized function of per-row keys.

Devlin et al. 2019, section 3.1: ``max(1, round(len * masked_lm_prob))`` positions per
sequence (capped at ``max_predictions``; ``len`` counts [CLS]/[SEP] as the reference
does) are selected among the non-special tokens; of those 80% become [MASK], 10% a
random token (drawn from the non-special vocabulary, unlike the reference) and 10% stay
unchanged. With ``whole_word_mask`` the selection is over words (a piece plus the
``##`` continuations after it) in random order, skipping a word that would overshoot
the budget, as in the reference.

All randomness comes from a counter-based generator: a row's 64-bit key, a stream
number and a position are hashed (SplitMix64) into a uniform draw. So a row's masking
depends on its key only, never on which other rows share the batch, the batch size,
the process, or the order of calls:

* static masking (at preparation) keys rows by ``(seed, unit index, row in unit)``;
* dynamic masking (at load time) keys them by ``(mask seed, epoch, global sample
  index)``, which makes it independent of world size, micro-batch, accumulation and
  loader workers, and different every epoch (RoBERTa, Liu et al. 2019).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

import numpy as np

# Devlin et al. 2019, section 3.1: of the selected positions 80% -> [MASK],
# 10% -> a random token, 10% -> unchanged.
MASK_TOKEN_PROB = 0.8
RANDOM_TOKEN_PROB = 0.1

# Streams of draws per row; a stream has room for 2^24 positions.
_SELECT, _ACTION, _TOKEN = 0, 1, 2
_STREAM_STRIDE = 1 << 24
# Mixed into the keys of dynamic masking so they never coincide with static ones.
DYNAMIC_STREAM = 0x44594E

_GAMMA = 0x9E3779B97F4A7C15  # 2^64 / golden ratio: SplitMix64's increment
_U64 = (1 << 64) - 1


def _mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64 finalizer (a 64-bit avalanche; uint64 array arithmetic wraps). The
    sampler has its own copy: the two must not change together by accident."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def derive_seed(*keys: int) -> int:
    """A 64-bit seed from a tuple of non-negative ints (NumPy's SeedSequence hashing)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0])


def row_keys(key: Sequence[int], index: np.ndarray) -> np.ndarray:
    """A 64-bit key per row: a hash of ``(*key, index[r])``. Rows with the same key and
    index get the same key whatever else is in the batch."""
    base = np.array([derive_seed(*key)], dtype=np.uint64)
    idx = np.asarray(index, dtype=np.int64).astype(np.uint64)
    return _mix64(_mix64((idx + np.uint64(1)) * np.uint64(_GAMMA)) ^ base)


def uniform(keys: np.ndarray, stream: int, width: int) -> np.ndarray:
    """``[rows, width]`` float64 draws in [0, 1): draw ``j`` of ``stream`` for each row."""
    counter = np.arange(stream * _STREAM_STRIDE, stream * _STREAM_STRIDE + width, dtype=np.uint64)
    z = _mix64(keys[:, None] + counter[None, :] * np.uint64(_GAMMA))
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def uniform_at(keys: np.ndarray, stream: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``uniform(keys, stream, width)[rows, cols]`` without drawing the whole matrix."""
    counter = np.asarray(cols, dtype=np.int64).astype(np.uint64) + np.uint64(stream * _STREAM_STRIDE)
    z = _mix64(keys[rows] + counter * np.uint64(_GAMMA))
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


@dataclass(frozen=True)
class MaskingConfig:
    """What masking needs to know: the rule's parameters and the vocabulary's special,
    mask and (for whole-word masking) continuation ids. Built from the sample config and
    tokenizer at preparation, and from the manifest at load time."""

    max_predictions: int
    masked_lm_prob: float
    mask_id: int
    special_ids: tuple[int, ...]
    vocab_size: int
    whole_word_mask: bool = False
    continuation_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.max_predictions < 1:
            raise ValueError(f"max_predictions {self.max_predictions}: must be >= 1")
        if not 0.0 < self.masked_lm_prob < 1.0:
            raise ValueError(f"masked_lm_prob {self.masked_lm_prob}: must be in (0, 1)")

    @cached_property
    def is_special(self) -> np.ndarray:
        table = np.zeros(self.vocab_size, dtype=bool)
        table[list(self.special_ids)] = True
        return table

    @cached_property
    def random_pool(self) -> np.ndarray:
        """Ids a random replacement may take: every non-special token."""
        return np.flatnonzero(~self.is_special)

    @cached_property
    def is_continuation(self) -> np.ndarray:
        table = np.zeros(self.vocab_size, dtype=bool)
        table[list(self.continuation_ids)] = True
        return table

    def num_to_predict(self, lengths: np.ndarray) -> np.ndarray:
        """``min(P, max(1, round(len * masked_lm_prob)))`` per row; ``rint`` rounds half
        to even like Python 3's ``round`` in the reference."""
        k = np.rint(np.asarray(lengths, dtype=np.float64) * self.masked_lm_prob).astype(np.int64)
        return np.minimum(self.max_predictions, np.maximum(1, k))


@dataclass
class Masked:
    """The result of masking ``n`` rows (int64 arrays)."""

    input_ids: np.ndarray  # [n, L] corrupted inputs
    positions: np.ndarray  # [n, P] selected positions, ascending, 0-padded
    ids: np.ndarray  # [n, P] original tokens there, 0-padded
    count: np.ndarray  # [n] real entries of the two above


def mask_tokens(input_ids: np.ndarray, lengths: np.ndarray, cfg: MaskingConfig, keys: np.ndarray) -> Masked:
    """Mask every row of ``input_ids`` (``[n, L]``, not modified) with its key's draws."""
    ids = np.asarray(input_ids, dtype=np.int64)
    n, length = ids.shape
    p = cfg.max_predictions
    lengths = np.asarray(lengths, dtype=np.int64)
    cand = (np.arange(length)[None, :] < lengths[:, None]) & ~cfg.is_special[ids]
    k = np.minimum(cfg.num_to_predict(lengths), cand.sum(axis=1))
    if cfg.whole_word_mask:
        chosen = _select_whole_words(ids, cand, k, cfg.is_continuation, keys, p)
    else:
        chosen = _select_positions(cand, k, keys, p)
    valid = chosen >= 0
    rows = np.broadcast_to(np.arange(n)[:, None], chosen.shape)
    r, c = rows[valid], chosen[valid]
    original = ids[r, c]
    positions = np.where(valid, chosen, 0)
    masked_ids = np.zeros((n, p), dtype=np.int64)
    masked_ids[valid] = original
    action = uniform(keys, _ACTION, p)[valid]
    pool = cfg.random_pool
    random_ids = pool[(uniform(keys, _TOKEN, p)[valid] * pool.shape[0]).astype(np.int64)]
    replaced = np.where(
        action < MASK_TOKEN_PROB,
        cfg.mask_id,
        np.where(action < MASK_TOKEN_PROB + RANDOM_TOKEN_PROB, random_ids, original),
    )
    out = ids.copy()
    out[r, c] = replaced
    return Masked(out, positions, masked_ids, valid.sum(axis=1))


def _select_positions(cand: np.ndarray, k: np.ndarray, keys: np.ndarray, p: int) -> np.ndarray:
    """``[n, P]`` positions (ascending, -1 padded): the ``k`` candidates with the
    smallest draws in each row, found with a partial sort of the ``P`` smallest."""
    n, length = cand.shape
    draws = uniform(keys, _SELECT, length)
    draws[~cand] = 2.0  # non-candidates sort last
    if p < length:
        part = np.argpartition(draws, p - 1, axis=1)[:, :p]
        first = np.take_along_axis(part, np.argsort(np.take_along_axis(draws, part, axis=1), axis=1), axis=1)
    else:
        first = np.argsort(draws, axis=1)
    chosen = np.where(np.arange(p)[None, :] < k[:, None], first, length)
    chosen.sort(axis=1)
    return np.where(chosen < length, chosen, -1)


def _select_whole_words(
    ids: np.ndarray, cand: np.ndarray, k: np.ndarray, is_continuation: np.ndarray, keys: np.ndarray, p: int
) -> np.ndarray:
    """Whole-word variant, vectorized over rows: words in random order are taken
    greedily, a word that would overshoot ``k`` is skipped (the reference rule).

    Works on the flat list of all words of the batch, grouped by row and shuffled
    within each row by their draws. The words before a row's first overshoot are a
    prefix (a cumulative sum); only the rows that then still have room continue word by
    word, all such rows at once."""
    n, length = cand.shape
    prev_cand = np.zeros_like(cand)
    prev_cand[:, 1:] = cand[:, :-1]
    starts = cand & ~(is_continuation[ids] & prev_cand)  # first piece of each word
    # A batch-wide id per (row, word): positions of one word share it.
    gid = np.arange(n)[:, None] * (length + 1) + np.cumsum(starts, axis=1, dtype=np.int64)
    word_len = np.bincount(gid[cand], minlength=n * (length + 1))
    draws = uniform(keys, _SELECT, length)
    draws[~starts] = 2.0
    num_words = starts.sum(axis=1)
    ranked = np.arange(length)[None, :] < num_words[:, None]
    spos = np.argsort(draws, axis=1)[ranked]  # word starts, by row, each row's in random order
    srow = np.repeat(np.arange(n), num_words)
    sgid = gid[srow, spos]
    size = word_len[sgid]
    row_start = np.concatenate([[0], np.cumsum(num_words)[:-1]])
    cum = np.cumsum(size)
    within = cum - (cum[row_start - 1] * (row_start > 0))[srow]  # cumulative size within the row
    take = within <= k[srow]  # the prefix that fits
    taken = np.bincount(srow[take], weights=size[take], minlength=n).astype(np.int64)
    first_miss = row_start + np.bincount(srow[take], minlength=n)
    row_end = row_start + num_words
    sub = np.flatnonzero((taken < k) & (first_miss + 1 < row_end))
    j, t = first_miss[sub] + 1, taken[sub]  # the overshooting word is skipped
    while sub.size:
        ok = t + size[j] <= k[sub]
        take[j[ok]] = True
        t = t + np.where(ok, size[j], 0)
        more = (j + 1 < row_end[sub]) & (t < k[sub])
        sub, j, t = sub[more], j[more] + 1, t[more]
    word_taken = np.zeros(n * (length + 1), dtype=bool)
    word_taken[sgid[take]] = True
    selected = cand & word_taken[gid]
    chosen = np.sort(np.where(selected, np.arange(length)[None, :], length), axis=1)[:, :p]
    return np.where(chosen < length, chosen, -1)
