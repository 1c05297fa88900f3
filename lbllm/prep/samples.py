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
  ``[MASK]``, 10% a random token, 10% stay unchanged (``lbllm.data.masking``). Static
  masking draws this once here and stores it, and ``dupe_factor`` passes over the
  corpus give each document several different maskings, as in the original recipe.
  Dynamic masking stores the unmasked samples and the reader masks them anew every
  epoch, as a pure function of (seed, epoch, global sample index).

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
a unit does not depend on which process or machine computed it or how many there were.
Where the text comes from and how it is cut into units is ``lbllm.prep.inputs``.
"""
from __future__ import annotations

import dataclasses
import random
import re
from dataclasses import dataclass, fields
from typing import Sequence

import numpy as np

from lbllm.prep.inputs import CorpusStats, ReadOptions, Source, TextUnit, read_documents
from lbllm.data.masking import MaskingConfig, derive_seed, mask_tokens, row_keys, uniform

MASKING_MODES = ("static", "dynamic")

# Purposes mixed into the seeds so that the streams are independent.
_STREAM_PAIRS = 0
_STREAM_MASK = 1
_STREAM_ORDER = 2
_STREAM_HELDOUT = 3  # which documents are held out, and (mixed into the seed) their samples

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
    masking: str = "static"  # static: drawn here and stored; dynamic: drawn by the reader per epoch

    def __post_init__(self) -> None:
        if self.masking not in MASKING_MODES:
            raise ValueError(f"masking {self.masking}: must be one of {', '.join(MASKING_MODES)}")
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

    def continuation_mask(self) -> np.ndarray:
        """``True`` for WordPiece continuation tokens (``##x``), for whole-word masking."""
        return np.array([t.startswith("##") for t in self.tokens], dtype=bool)


def masking_config(cfg: SampleConfig, vocab: Vocab) -> MaskingConfig:
    """The masking rule of ``cfg`` over ``vocab`` (its fields also go into the manifest,
    so the reader can apply the same rule)."""
    return MaskingConfig(
        max_predictions=cfg.max_predictions_per_seq,
        masked_lm_prob=cfg.masked_lm_prob,
        mask_id=vocab.mask_id,
        special_ids=tuple(vocab.special_ids),
        vocab_size=vocab.size,
        whole_word_mask=cfg.whole_word_mask,
        continuation_ids=(
            tuple(int(i) for i in np.flatnonzero(vocab.continuation_mask())) if cfg.whole_word_mask else ()
        ),
    )


def id_dtype(vocab_size: int) -> np.dtype:
    """Smallest storage type for token ids: uint16 up to 65536 entries, else int32."""
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.int32)


# ---------------------------------------------------------------------------------------
# Tokenizing a unit
# ---------------------------------------------------------------------------------------


def split_documents(documents: list[list[str]]) -> list[list[str]]:
    """Documents of lines -> documents of sentences."""
    return [[s for line in doc for s in split_sentences(line)] for doc in documents]


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
    """Samples as arrays, in the shard layout (see ``lbllm.data.format``)."""

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
    """Positions to mask per row (``lbllm.data.masking.MaskingConfig.num_to_predict``)."""
    k = np.rint(np.asarray(lengths, dtype=np.float64) * cfg.masked_lm_prob).astype(np.int64)
    return np.minimum(cfg.max_predictions_per_seq, np.maximum(1, k))


def mask_batch(batch: SampleBatch, mask_cfg: MaskingConfig, keys: np.ndarray) -> None:
    """Apply the static MLM masking of every row in place (row ``r`` uses ``keys[r]``)."""
    if batch.num_samples == 0:
        return
    m = mask_tokens(batch.input_ids, batch.lengths, mask_cfg, keys)
    batch.input_ids[:] = m.input_ids
    batch.masked_positions[:] = m.positions
    batch.masked_ids[:] = m.ids
    batch.masked_count[:] = m.count


# ---------------------------------------------------------------------------------------
# One unit, end to end
# ---------------------------------------------------------------------------------------


def documents_to_samples(
    documents: list[list[list[int]]], cfg: SampleConfig, vocab: Vocab, seed: int, unit_index: int, stats: CorpusStats
) -> SampleBatch:
    """Pairs for ``dupe_factor`` passes (each with its own generator), packed, masked
    (static) or left unmasked (dynamic), and shuffled within the unit. Random-next
    segments come from this unit's documents. The pairs and their order do not depend
    on the masking mode: a dynamic set holds the same samples as a static one."""
    pairs: list[Pair] = []
    for dupe in range(cfg.dupe_factor):
        rng = random.Random(derive_seed(seed, unit_index, _STREAM_PAIRS, dupe))
        for d in range(len(documents)):
            pairs.extend(document_pairs(documents, d, cfg, rng, stats))
    batch = pack_pairs(pairs, cfg, vocab)
    if cfg.masking == "static":
        keys = row_keys((seed, unit_index, _STREAM_MASK), np.arange(batch.num_samples))
        mask_batch(batch, masking_config(cfg, vocab), keys)
    order = np.random.default_rng(derive_seed(seed, unit_index, _STREAM_ORDER)).permutation(batch.num_samples)
    return SampleBatch(**{name: a[order] for name, a in batch.arrays().items()})


def heldout_documents(num_docs: int, fraction: float, seed: int, unit_index: int) -> np.ndarray:
    """Which of a unit's documents are held out (bool per document): a hash of (seed,
    unit, document index) below ``fraction``, so the choice is the same for any number
    of workers or machines and no held-out document's text reaches a training sample
    (not even as an NSP "random next" segment: each set draws from its own documents)."""
    if fraction <= 0.0 or num_docs == 0:
        return np.zeros(num_docs, dtype=bool)
    keys = row_keys((seed, unit_index, _STREAM_HELDOUT), np.arange(num_docs))
    return uniform(keys, 0, 1)[:, 0] < fraction


def heldout_config(cfg: SampleConfig) -> SampleConfig:
    """Held-out samples: one pass, masks drawn once and stored, so every evaluation of
    every run scores the same sequences at the same positions."""
    return dataclasses.replace(cfg, masking="static", dupe_factor=1)


def unit_to_samples(
    unit: TextUnit,
    unit_index: int,
    tokenizer,
    vocab: Vocab,
    cfg: SampleConfig,
    seed: int,
    options: ReadOptions = ReadOptions(),
    sources: Sequence[Source] = (),
    heldout_fraction: float = 0.0,
) -> tuple[SampleBatch, SampleBatch | None, CorpusStats]:
    """Read, split, tokenize and turn one unit into (training samples, held-out samples
    or None when ``heldout_fraction`` is 0, stats). ``stats.heldout_documents`` counts
    the documents set aside."""
    stats = CorpusStats()
    documents = split_documents(read_documents(unit, stats, options, sources))
    tokens = tokenize_documents(tokenizer, documents, cfg.max_num_tokens, stats)
    if heldout_fraction <= 0.0:
        return documents_to_samples(tokens, cfg, vocab, seed, unit_index, stats), None, stats
    held = heldout_documents(len(tokens), heldout_fraction, seed, unit_index)
    stats.heldout_documents += int(held.sum())
    train = documents_to_samples([d for d, h in zip(tokens, held) if not h], cfg, vocab, seed, unit_index, stats)
    heldout = documents_to_samples([d for d, h in zip(tokens, held) if h], heldout_config(cfg), vocab,
                                   derive_seed(seed, _STREAM_HELDOUT), unit_index, CorpusStats())
    return train, heldout, stats
