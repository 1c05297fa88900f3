"""BERT pretraining samples from raw text: sentence split, NSP pairs, static MLM masking.

This follows the semantics of Google's ``create_pretraining_data.py`` for BERT
(Devlin et al. 2019, "BERT: Pre-training of Deep Bidirectional Transformers for
Language Understanding", section 3.1 and appendix A.1):

* The corpus is a sequence of documents separated by blank lines; each document is a
  sequence of sentences. A pair ``[CLS] A [SEP] B [SEP]`` is built by accumulating
  whole sentences up to a target length and cutting the chunk at a random sentence
  boundary. With probability 0.5 B is the actual continuation (NSP label 0, the
  Hugging Face convention) and otherwise a run of sentences from a different document
  (label 1); the sentences that were not used are put back for the next pair.
* 15% of the tokens (``max(1, round(len * 0.15))``, capped at
  ``max_predictions_per_seq``) are selected for prediction; of those 80% become
  ``[MASK]``, 10% a random token, 10% stay unchanged. Masking is static: it is drawn
  once here and stored, and ``dupe_factor`` passes over the corpus give each document
  several different maskings, as in the original recipe.

Where the reference script has known defects we do it right and say so:

* the short-sequence target length is drawn for every pair, not once per document;
* the random document is drawn uniformly from the *other* documents (the reference
  can return the same document after 10 unlucky draws);
* the reference forces "random next" for every chunk of a single sentence, which
  skews the NSP labels towards 1 wherever documents are short relative to the
  sequence. Here a chunk that closed on one sentence borrows the following sentence
  so it has a boundary to cut at, and a lone last sentence of a document gets, with
  probability 1/2, the sentences before it as its actual-next context (re-using them
  once). Only one-sentence documents are still forced to "random next" (there is no
  actual next); the manifest reports the resulting ``nsp_random_fraction``;
* random replacement tokens come from the non-special vocabulary (the reference can
  insert ``[CLS]``/``[SEP]``/``[PAD]``);
* text that spells a special token ("[SEP]") is tokenized as ordinary text;
* a sentence longer than the pair budget is cut into budget-sized pieces instead of
  being mostly truncated away later.

Everything random is derived from ``(seed, unit index, purpose, pass)`` so the output of
a unit does not depend on which process computed it or how many there were.
"""
from __future__ import annotations

import glob
import os
import random
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

# Devlin et al. 2019, section 3.1: of the selected positions 80% -> [MASK],
# 10% -> a random token, 10% -> unchanged.
MASK_TOKEN_PROB = 0.8
RANDOM_TOKEN_PROB = 0.1

# Purposes mixed into the seeds so that the streams are independent.
_STREAM_PAIRS = 0
_STREAM_MASK = 1

# ---------------------------------------------------------------------------------------
# Sentence splitting
# ---------------------------------------------------------------------------------------

# A sentence ends at . ! or ? (optionally followed by a closing quote or bracket), then
# whitespace, then something that can start a sentence: an uppercase letter (ASCII or
# Latin-1), a digit, an opening quote or bracket. Python's ``re`` needs fixed-width
# look-behinds, hence the two alternatives. Fast (one regex pass per line) and good
# enough for pretraining: NSP only needs plausible boundaries, not perfect ones.
_SENTENCE_BOUNDARY = re.compile(
    r"""(?:(?<=[.!?])|(?<=[.!?]["'\u201d\u2019)\]]))  # end punctuation [+ closing quote]
        \s+                                          # the whitespace we split on
        (?=["'\u201c\u2018(\[]?[A-Z0-9\u00c0-\u00d6\u00d8-\u00de])  # a sentence start
    """,
    re.VERBOSE,
)
# Pieces ending in a common abbreviation or a single capital initial ("Mr.", "U.S.",
# "J. R. R.") are glued to the next piece: the regex alone would split "Mr. Smith".
_NO_BREAK_AFTER = re.compile(
    r"\b(?:Mr|Mrs|Ms|Dr|Prof|St|Jr|Sr|Mt|Ft|Gen|Col|Lt|Sgt|Capt|Rev|Gov|Sen|Rep"
    r"|Inc|Ltd|Co|Corp|vs|etc|No|Vol|Fig|[A-Z])\.$"
)


def split_sentences(text: str) -> list[str]:
    """Split one line of text into sentences (see ``_SENTENCE_BOUNDARY``)."""
    text = text.strip()
    if not text:
        return []
    sentences: list[str] = []
    for piece in _SENTENCE_BOUNDARY.split(text):
        if sentences and _NO_BREAK_AFTER.search(sentences[-1]):
            sentences[-1] = f"{sentences[-1]} {piece}"
        else:
            sentences.append(piece)
    return sentences


# ---------------------------------------------------------------------------------------
# Input files and units of work
# ---------------------------------------------------------------------------------------


def expand_inputs(patterns: Iterable[str]) -> list[Path]:
    """Files named by paths, globs (``**`` allowed) or directories (their files), sorted
    within each pattern, duplicates dropped, order of the patterns kept."""
    seen: set[Path] = set()
    files: list[Path] = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            matches = sorted(p for p in path.iterdir() if p.is_file())
        elif path.is_file():
            matches = [path]
        else:
            matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        for match in matches:
            key = match.resolve()
            if key not in seen:
                seen.add(key)
                files.append(match)
    return files


@dataclass(frozen=True)
class TextUnit:
    """A byte range ``[start, end)`` of one input file that begins and ends on document
    boundaries. Units are the unit of parallel work and of randomness; their layout
    depends only on the files and ``unit_bytes``, never on the number of workers."""

    path: str
    start: int
    end: int

    @property
    def num_bytes(self) -> int:
        return self.end - self.start


def plan_units(paths: Sequence[Path], unit_bytes: int) -> list[TextUnit]:
    """Cut every file into units of about ``unit_bytes``, each cut placed just after the
    first blank line at or past the nominal offset (so no document is split)."""
    if unit_bytes <= 0:
        raise ValueError(f"unit_bytes must be positive, got {unit_bytes}")
    units: list[TextUnit] = []
    for path in paths:
        size = os.path.getsize(path)
        cuts = [0]
        with open(path, "rb") as f:
            target = unit_bytes
            while target < size:
                f.seek(target)
                pos = target + len(f.readline())  # finish the line we landed in
                while pos < size:
                    line = f.readline()
                    pos += len(line)
                    if not line.strip():
                        break
                if pos >= size:
                    break
                cuts.append(pos)
                target = pos + unit_bytes
        cuts.append(size)
        units.extend(TextUnit(str(path), a, b) for a, b in zip(cuts, cuts[1:]) if b > a)
    return units


# ---------------------------------------------------------------------------------------
# Configuration and vocabulary
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleConfig:
    """How pairs are built and masked (defaults: the BERT recipe)."""

    max_seq_length: int = 128
    max_predictions_per_seq: int = 20  # NVIDIA's recipe: 20 at seq 128, 80 at seq 512
    masked_lm_prob: float = 0.15
    short_seq_prob: float = 0.1  # pairs with a random shorter target, to reduce train/test skew
    dupe_factor: int = 1  # passes over the corpus, each with its own pairs and masks
    random_next_prob: float = 0.5
    whole_word_mask: bool = False  # mask all word pieces of a word together

    def __post_init__(self) -> None:
        if not 8 <= self.max_seq_length <= 4096:
            raise ValueError(f"max_seq_length {self.max_seq_length}: must be in [8, 4096]")
        if not 1 <= self.max_predictions_per_seq <= self.max_seq_length:
            raise ValueError(
                f"max_predictions_per_seq {self.max_predictions_per_seq}: must be in [1, max_seq_length]"
            )
        if not 0.0 < self.masked_lm_prob < 1.0:
            raise ValueError(f"masked_lm_prob {self.masked_lm_prob}: must be in (0, 1)")
        if not 0.0 <= self.short_seq_prob <= 1.0:
            raise ValueError(f"short_seq_prob {self.short_seq_prob}: must be in [0, 1]")
        if self.dupe_factor < 1:
            raise ValueError(f"dupe_factor {self.dupe_factor}: must be >= 1")
        if not 0.0 <= self.random_next_prob <= 1.0:
            raise ValueError(f"random_next_prob {self.random_next_prob}: must be in [0, 1]")

    @property
    def max_num_tokens(self) -> int:
        """Token budget of A + B: the sequence minus [CLS] and two [SEP]."""
        return self.max_seq_length - 3


@dataclass(frozen=True)
class Vocab:
    """What sample creation needs to know about the tokenizer's vocabulary."""

    tokens: tuple[str, ...]  # in id order
    pad_id: int
    cls_id: int
    sep_id: int
    mask_id: int
    special_ids: tuple[int, ...]

    @property
    def size(self) -> int:
        return len(self.tokens)

    def random_pool(self) -> np.ndarray:
        """Ids a random replacement may take: every non-special token."""
        pool = np.ones(self.size, dtype=bool)
        pool[list(self.special_ids)] = False
        return np.flatnonzero(pool)

    def continuation_mask(self) -> np.ndarray:
        """``True`` for WordPiece continuation tokens (``##x``), for whole-word masking."""
        return np.array([t.startswith("##") for t in self.tokens], dtype=bool)


def id_dtype(vocab_size: int) -> np.dtype:
    """Smallest storage type for token ids: uint16 up to 65536 entries, else int32."""
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.int32)


# ---------------------------------------------------------------------------------------
# Reading and tokenizing a unit
# ---------------------------------------------------------------------------------------


@dataclass
class CorpusStats:
    """Counts reported in the manifest; ``+`` merges the counts of two units."""

    documents: int = 0  # documents that produced at least one token
    empty_documents: int = 0  # blank-line-separated blocks with no tokens (control chars etc.)
    sentences: int = 0
    decode_errors: int = 0  # lines that were not valid UTF-8 (read with replacement chars)
    long_sentences_split: int = 0  # sentences cut into max_num_tokens pieces
    pairs_skipped: int = 0  # one-sentence documents alone in their unit (no random partner)
    tokens: int = 0  # text tokens read (before pairing)

    def __add__(self, other: "CorpusStats") -> "CorpusStats":
        return CorpusStats(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})


def read_documents(unit: TextUnit, stats: CorpusStats) -> list[list[str]]:
    """The documents of a unit, each a list of sentences.

    Lines are decoded one by one so that invalid UTF-8 costs one counted line with
    U+FFFD replacement characters, not the file. Blank (whitespace-only) lines separate
    documents."""
    documents: list[list[str]] = []
    current: list[str] = []
    with open(unit.path, "rb") as f:
        f.seek(unit.start)
        remaining = unit.num_bytes
        while remaining > 0:
            raw = f.readline(remaining)
            if not raw:
                break
            remaining -= len(raw)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                line = raw.decode("utf-8", errors="replace")
                stats.decode_errors += 1
            sentences = split_sentences(line)
            if sentences:
                current.extend(sentences)
            elif current:
                documents.append(current)
                current = []
    if current:
        documents.append(current)
    return documents


def tokenize_documents(
    tokenizer, documents: list[list[str]], max_segment_tokens: int, stats: CorpusStats, batch_size: int = 2048
) -> list[list[list[int]]]:
    """Token ids of every sentence, batched through the Rust tokenizer.

    ``tokenizer`` is a ``tokenizers.Tokenizer``; special tokens are not added, and it
    should have ``encode_special_tokens = True`` so that text spelling "[SEP]" stays
    text. Sentences without tokens vanish; documents without tokens are counted as
    empty and dropped; sentences over ``max_segment_tokens`` are cut into pieces."""
    flat = [s for doc in documents for s in doc]
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    ids: list[list[int]] = []
    for i in range(0, len(flat), batch_size):
        ids.extend(e.ids for e in encode(flat[i : i + batch_size], add_special_tokens=False))
    out: list[list[list[int]]] = []
    k = 0
    for doc in documents:
        segments: list[list[int]] = []
        for seg in ids[k : k + len(doc)]:
            if len(seg) > max_segment_tokens:
                stats.long_sentences_split += 1
                segments.extend(seg[j : j + max_segment_tokens] for j in range(0, len(seg), max_segment_tokens))
            elif seg:
                segments.append(seg)
            stats.tokens += len(seg)
        k += len(doc)
        if segments:
            out.append(segments)
            stats.documents += 1
            stats.sentences += len(segments)
        else:
            stats.empty_documents += 1
    return out


# ---------------------------------------------------------------------------------------
# NSP pairs
# ---------------------------------------------------------------------------------------


@dataclass
class Pair:
    tokens_a: list[int]
    tokens_b: list[int]
    is_random_next: bool


def _target_length(cfg: SampleConfig, rng: random.Random) -> int:
    if rng.random() < cfg.short_seq_prob:
        return rng.randint(2, cfg.max_num_tokens)
    return cfg.max_num_tokens


def truncate_pair(a: list[int], b: list[int], max_num_tokens: int, rng: random.Random) -> tuple[list[int], list[int]]:
    """Trim the pair to ``max_num_tokens``, always from the longer side (B on ties) and
    from its front or back with probability 1/2 each token, as the reference does.

    The reference pops one token per loop iteration (O(excess) list deletions from the
    front); here the per-side counts are computed in closed form and each side is
    sliced once, with the front/back split drawn as the same Binomial(n, 1/2)."""
    excess = len(a) + len(b) - max_num_tokens
    if excess <= 0:
        return a, b
    cut_a = cut_b = 0
    gap = len(a) - len(b)
    if gap > 0:
        cut_a = min(excess, gap)
    elif gap < 0:
        cut_b = min(excess, -gap)
    rest = excess - cut_a - cut_b
    cut_b += (rest + 1) // 2  # equal lengths: B first, then alternate
    cut_a += rest // 2

    def trim(tokens: list[int], n: int) -> list[int]:
        if n == 0:
            return tokens
        front = sum(rng.random() < 0.5 for _ in range(n))  # Binomial(n, 1/2); n < max_seq_length
        return tokens[front : len(tokens) - (n - front)]

    return trim(a, cut_a), trim(b, cut_b)


def _random_segments(documents: list[list[list[int]]], doc_index: int, target: int, rng: random.Random) -> list[int]:
    """Sentences of a uniformly drawn *other* document, from a random start, until
    ``target`` tokens (at least one sentence)."""
    other = rng.randrange(len(documents) - 1)
    other += other >= doc_index
    random_doc = documents[other]
    tokens: list[int] = []
    for seg in random_doc[rng.randrange(len(random_doc)) :]:
        tokens.extend(seg)
        if len(tokens) >= target:
            break
    return tokens


def document_pairs(
    documents: list[list[list[int]]], doc_index: int, cfg: SampleConfig, rng: random.Random, stats: CorpusStats
) -> list[Pair]:
    """All pairs of one document in one pass (``create_instances_from_document``)."""
    document = documents[doc_index]
    n = len(document)
    has_other = len(documents) > 1
    pairs: list[Pair] = []
    target = _target_length(cfg, rng)
    chunk: list[list[int]] = []
    chunk_len = 0
    i = 0
    while i < n:
        chunk.append(document[i])
        chunk_len += len(document[i])
        if i == n - 1 or chunk_len >= target:
            if len(chunk) == 1 and i + 1 < n:
                # Borrow the next sentence so there is a boundary to cut at (see module
                # docstring); it is put back below if B turns out to be random.
                i += 1
                chunk.append(document[i])
            if len(chunk) > 1:
                a_end = rng.randint(1, len(chunk) - 1)
                is_random = has_other and rng.random() < cfg.random_next_prob
            else:  # the document's last sentence, alone (or a one-sentence document)
                a_end = 1
                is_random = n == 1 or (has_other and rng.random() < cfg.random_next_prob)
            if is_random and not has_other:  # a one-sentence document alone in its unit
                stats.pairs_skipped += 1
                tokens_a = tokens_b = []
            elif is_random:
                tokens_a = [t for seg in chunk[:a_end] for t in seg]
                tokens_b = _random_segments(documents, doc_index, target - len(tokens_a), rng)
                i -= len(chunk) - a_end  # put the unused sentences back
            elif len(chunk) > 1:
                tokens_a = [t for seg in chunk[:a_end] for t in seg]
                tokens_b = [t for seg in chunk[a_end:] for t in seg]
            else:
                # A lone last sentence gets its actual context as A: the sentences before
                # it (already used once) up to the target. The reference forces "random"
                # here, which on corpora of short documents skews NSP labels towards 1.
                tokens_b = chunk[0]
                tokens_a = []
                j = i - 1
                while j >= 0 and (not tokens_a or len(tokens_a) + len(tokens_b) < target):
                    tokens_a = document[j] + tokens_a
                    j -= 1
            if tokens_a:
                tokens_a, tokens_b = truncate_pair(tokens_a, tokens_b, cfg.max_num_tokens, rng)
                pairs.append(Pair(tokens_a, tokens_b, is_random))
            chunk, chunk_len = [], 0
            target = _target_length(cfg, rng)  # per pair, not per document
        i += 1
    return pairs


# ---------------------------------------------------------------------------------------
# Packing and masking
# ---------------------------------------------------------------------------------------


@dataclass
class SampleBatch:
    """Samples as arrays, in the shard layout (see ``lbllm.data.shards``)."""

    input_ids: np.ndarray  # [N, L] masked inputs, 0-padded
    lengths: np.ndarray  # [N] int16: real tokens incl. [CLS]/[SEP]
    segment_b_start: np.ndarray  # [N] int16: first position with token type 1
    masked_positions: np.ndarray  # [N, P] int16, ascending, 0-padded
    masked_ids: np.ndarray  # [N, P] original tokens at those positions, 0-padded
    masked_count: np.ndarray  # [N] int16: real entries of masked_positions
    nsp: np.ndarray  # [N] int8: 1 = B is random, 0 = B is the actual next (HF convention)

    @property
    def num_samples(self) -> int:
        return int(self.lengths.shape[0])

    def arrays(self) -> dict[str, np.ndarray]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def pack_pairs(pairs: list[Pair], cfg: SampleConfig, vocab: Vocab) -> SampleBatch:
    """``[CLS] A [SEP] B [SEP]`` rows, 0-padded, with empty masking fields."""
    n, length, p = len(pairs), cfg.max_seq_length, cfg.max_predictions_per_seq
    dtype = id_dtype(vocab.size)
    input_ids = np.zeros((n, length), dtype=dtype)
    lengths = np.empty(n, dtype=np.int16)
    b_start = np.empty(n, dtype=np.int16)
    nsp = np.empty(n, dtype=np.int8)
    cls, sep = [vocab.cls_id], [vocab.sep_id]
    for k, pair in enumerate(pairs):
        row = cls + pair.tokens_a + sep + pair.tokens_b + sep
        input_ids[k, : len(row)] = row
        lengths[k] = len(row)
        b_start[k] = len(pair.tokens_a) + 2
        nsp[k] = pair.is_random_next
    return SampleBatch(
        input_ids=input_ids,
        lengths=lengths,
        segment_b_start=b_start,
        masked_positions=np.zeros((n, p), dtype=np.int16),
        masked_ids=np.zeros((n, p), dtype=dtype),
        masked_count=np.zeros(n, dtype=np.int16),
        nsp=nsp,
    )


def num_to_predict(lengths: np.ndarray, cfg: SampleConfig) -> np.ndarray:
    """``min(P, max(1, round(len * masked_lm_prob)))`` per row; ``len`` counts the
    special tokens, as in the reference; ``rint`` rounds half to even like Python 3."""
    k = np.rint(lengths.astype(np.float64) * cfg.masked_lm_prob).astype(np.int64)
    return np.minimum(cfg.max_predictions_per_seq, np.maximum(1, k))


def _select_positions(batch: SampleBatch, cand: np.ndarray, k: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """[N, P] selected positions (ascending, -1 padded): k random candidates per row,
    drawn for the whole batch at once by sorting random keys."""
    n, length = cand.shape
    p = batch.masked_positions.shape[1]
    keys = rng.random((n, length))
    keys[~cand] = 2.0  # non-candidates sort last
    order = np.argsort(keys, axis=1, kind="stable")[:, :p]
    valid = np.arange(p)[None, :] < k[:, None]
    chosen = np.where(valid, order, length)
    chosen.sort(axis=1)
    return np.where(chosen < length, chosen, -1)


def _select_whole_words(
    batch: SampleBatch, cand: np.ndarray, k: np.ndarray, is_continuation: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Whole-word variant: words (a piece plus the ``##`` continuations right after it)
    in random order, taken greedily, skipping a word that would overshoot ``k`` (the
    reference rule). Word boundaries, lengths and the shuffle are computed for the
    whole batch; only the short greedy walk runs per row."""
    n, length = cand.shape
    p = batch.masked_positions.shape[1]
    prev_cand = np.zeros_like(cand)
    prev_cand[:, 1:] = cand[:, :-1]
    starts = cand & ~(is_continuation[batch.input_ids] & prev_cand)  # first piece of each word
    word = np.cumsum(starts, axis=1) - 1  # word index of every position (valid where cand)
    rows = np.broadcast_to(np.arange(n)[:, None], cand.shape)
    word_len = np.bincount((rows * length + word)[cand], minlength=n * length).reshape(n, length)
    len_at_start = np.where(starts, word_len[rows, np.maximum(word, 0)], 0)
    keys = rng.random((n, length))
    keys[~starts] = 2.0
    order = np.argsort(keys, axis=1, kind="stable")  # word starts in random order first
    num_words = starts.sum(axis=1)
    chosen = np.full((n, p), -1, dtype=np.int64)
    for r in range(n):
        starts_r = order[r, : num_words[r]]
        picked: list[int] = []
        budget = int(k[r])
        for pos, size in zip(starts_r.tolist(), len_at_start[r, starts_r].tolist()):
            if len(picked) >= budget:
                break
            if len(picked) + size <= budget:
                picked.extend(range(pos, pos + size))
        picked.sort()
        chosen[r, : len(picked)] = picked
    return chosen


def mask_batch(batch: SampleBatch, cfg: SampleConfig, vocab: Vocab, rng: np.random.Generator) -> None:
    """Draw the static MLM masking of every row in place (Devlin et al. 2019, 3.1)."""
    n, length = batch.input_ids.shape
    if n == 0:
        return
    positions = np.arange(length)[None, :]
    specials = np.isin(batch.input_ids, np.asarray(vocab.special_ids))
    cand = (positions < batch.lengths[:, None]) & ~specials
    k = np.minimum(num_to_predict(batch.lengths, cfg), cand.sum(axis=1))
    if cfg.whole_word_mask:
        chosen = _select_whole_words(batch, cand, k, vocab.continuation_mask(), rng)
    else:
        chosen = _select_positions(batch, cand, k, rng)
    valid = chosen >= 0
    rows = np.broadcast_to(np.arange(n)[:, None], chosen.shape)
    r, c = rows[valid], chosen[valid]
    original = batch.input_ids[r, c]
    batch.masked_positions[valid] = c
    batch.masked_ids[valid] = original
    batch.masked_count[:] = valid.sum(axis=1)
    u = rng.random(r.shape[0])
    pool = vocab.random_pool()
    random_ids = pool[rng.integers(0, pool.shape[0], size=r.shape[0])]
    keep_or_random = np.where(u < MASK_TOKEN_PROB + RANDOM_TOKEN_PROB, random_ids, original)
    replaced = np.where(u < MASK_TOKEN_PROB, vocab.mask_id, keep_or_random)
    batch.input_ids[r, c] = replaced


# ---------------------------------------------------------------------------------------
# One unit, end to end
# ---------------------------------------------------------------------------------------


def derive_seed(*keys: int) -> int:
    """A 64-bit seed from a tuple of non-negative ints (NumPy's SeedSequence hashing)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0])


def documents_to_samples(
    documents: list[list[list[int]]], cfg: SampleConfig, vocab: Vocab, seed: int, unit_index: int, stats: CorpusStats
) -> SampleBatch:
    """Pairs for ``dupe_factor`` passes (each with its own generator), packed, masked,
    and shuffled within the unit. Random-next segments come from this unit's documents."""
    pairs: list[Pair] = []
    for dupe in range(cfg.dupe_factor):
        rng = random.Random(derive_seed(seed, unit_index, _STREAM_PAIRS, dupe))
        for d in range(len(documents)):
            pairs.extend(document_pairs(documents, d, cfg, rng, stats))
    batch = pack_pairs(pairs, cfg, vocab)
    mask_rng = np.random.default_rng(derive_seed(seed, unit_index, _STREAM_MASK))
    mask_batch(batch, cfg, vocab, mask_rng)
    order = mask_rng.permutation(batch.num_samples)
    return SampleBatch(**{name: a[order] for name, a in batch.arrays().items()})


def unit_to_samples(
    unit: TextUnit, unit_index: int, tokenizer, vocab: Vocab, cfg: SampleConfig, seed: int
) -> tuple[SampleBatch, CorpusStats]:
    """Read, split, tokenize and turn one unit into samples."""
    stats = CorpusStats()
    documents = read_documents(unit, stats)
    tokens = tokenize_documents(tokenizer, documents, cfg.max_num_tokens, stats)
    return documents_to_samples(tokens, cfg, vocab, seed, unit_index, stats), stats
