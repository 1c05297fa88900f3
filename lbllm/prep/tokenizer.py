"""Training and saving a BERT WordPiece tokenizer: the work behind
``data_prep/build_tokenizer.py``, which documents the pipeline."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

if TYPE_CHECKING:
    import numpy as np

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0..4, in this order
MODEL_MAX_LENGTH = 512  # BERT's position embeddings


@dataclass(frozen=True)
class TokenizerConfig:
    vocab_size: int = 30522
    lowercase: bool = True
    min_frequency: int = 2  # a merge must be seen this often
    limit_alphabet: int = 1000  # rarest characters beyond this map to [UNK] (HF's BERT default)

    def __post_init__(self) -> None:
        if self.vocab_size < len(SPECIAL_TOKENS) + 1:
            raise ValueError(f"--vocab_size {self.vocab_size}: must be > {len(SPECIAL_TOKENS)}")
        if self.min_frequency < 1:
            raise ValueError(f"--min_frequency {self.min_frequency}: must be >= 1")


def _lines(files: Sequence[Path]) -> Iterator[str]:
    # errors="replace": one bad byte must not stop training on a large crawl.
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.strip():
                    yield line


def _chunks(files: Sequence[Path], chars: int = 1 << 20) -> Iterator[str]:
    """The training lines joined into ~1M-character strings (a newline never splits a word)."""
    buf: list[str] = []
    size = 0
    for line in _lines(files):
        buf.append(line)
        size += len(line)
        if size >= chars:
            yield "".join(buf)
            buf, size = [], 0
    if buf:
        yield "".join(buf)


NUM_CODEPOINTS = 0x110000


@dataclass
class CharStats:
    """What BPE training starts from, counted over the normalized text: how often each
    character occurs in a word, and whether it ever continues one (needs a ``##`` token)."""

    counts: "np.ndarray"  # int64 [NUM_CODEPOINTS]
    continues: "np.ndarray"  # bool [NUM_CODEPOINTS]

    def alphabet(self, limit: int) -> list[str]:
        """The ``limit`` most frequent characters; ties broken by code point, so the cut is
        the same in every run (the HF trainer cuts an unstable sort of a hash map)."""
        import numpy as np

        seen = np.flatnonzero(self.counts)
        order = np.lexsort((seen, -self.counts[seen]))  # count descending, then code point
        return sorted(chr(c) for c in seen[order[:limit]])


def bert_normalizer(lowercase: bool):
    from tokenizers import normalizers

    return normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=lowercase, lowercase=lowercase
    )


_CHAR_MAPS: dict[bool, tuple[object, set, dict]] = {}  # lowercase -> (normalizer, seen, changed), per process


def normalize_fast(text: str, lowercase: bool) -> str:
    """``bert_normalizer(lowercase).normalize_str(text)``, 3x faster: every step of the
    BERT normalizer maps one character at a time (clean-up, CJK spacing, NFD + dropping
    non-spacing marks, lowercasing), so each distinct character is normalized once by the
    Rust normalizer and the text is mapped with ``str.translate`` (the Rust call keeps
    alignment offsets and runs at ~5 MB/s). NFD's reordering of combining marks is the one
    step that is not per character; it only reorders marks after a base character, so
    character counts and word boundaries, all this is used for, are unchanged."""
    import numpy as np

    if lowercase not in _CHAR_MAPS:
        _CHAR_MAPS[lowercase] = (bert_normalizer(lowercase), set(), {})
    normalizer, seen, changed = _CHAR_MAPS[lowercase]
    for c in np.flatnonzero(np.bincount(np.frombuffer(text.encode("utf-32-le"), np.uint32))):
        c = int(c)
        if c not in seen:
            seen.add(c)
            out = normalizer.normalize_str(chr(c))
            if out != chr(c):
                changed[c] = out
    return text.translate(changed)


def _chunk_stats(text: str, lowercase: bool) -> tuple["np.ndarray", "np.ndarray", "np.ndarray"]:
    """(characters, their counts, the characters seen continuing a word) of one chunk."""
    import string
    import unicodedata

    import numpy as np

    cps = np.frombuffer(normalize_fast(text, lowercase).encode("utf-32-le"), np.uint32)
    counts = np.bincount(cps, minlength=NUM_CODEPOINTS)
    in_word = np.zeros(NUM_CODEPOINTS, bool)
    chars = [c for c in np.flatnonzero(counts) if not chr(c).isspace()]  # whitespace only separates
    for c in chars:
        ch = chr(c)
        in_word[c] = not (ch in string.punctuation or unicodedata.category(ch).startswith("P"))
    word = in_word[cps]
    chars = np.array(chars, np.int64)
    return chars, counts[chars], np.flatnonzero(np.bincount(cps[1:][word[1:] & word[:-1]]))


def char_stats(files: Sequence[Path], lowercase: bool, workers: int = 1) -> CharStats:
    """Count characters as ``BertPreTokenizer`` splits words: whitespace separates words
    and every punctuation character is a word of its own (CJK characters are already
    spaced out by ``BertNormalizer``). Chunks of ~1M characters are counted in ``workers``
    processes."""
    import functools

    import numpy as np

    counts = np.zeros(NUM_CODEPOINTS, np.int64)
    continues = np.zeros(NUM_CODEPOINTS, bool)
    count = functools.partial(_chunk_stats, lowercase=lowercase)
    pool = None
    if workers > 1:
        import multiprocessing

        methods = multiprocessing.get_all_start_methods()
        pool = multiprocessing.get_context("fork" if "fork" in methods else "spawn").Pool(workers)
    try:
        for cps, n, cont in (pool.imap(count, _chunks(files)) if pool else map(count, _chunks(files))):
            counts[cps] += n
            continues[cont] = True
    finally:
        if pool:
            pool.terminate()
    return CharStats(counts, continues)


def train_tokenizer(files: Sequence[Path], cfg: TokenizerConfig, workers: int = 1):
    """A trained ``tokenizers.Tokenizer`` with the full BERT pipeline attached; the same
    files and settings give the same vocabulary, id for id, in every run.

    The HF trainer alone does not: it numbers the ``##`` continuation characters in
    hash-map order and breaks ties between equally frequent merges by those numbers
    (tokenizers#1794), and it cuts the alphabet at ``limit_alphabet`` by an unstable sort.
    So a first pass counts characters here (numpy over the normalized text, no per-word
    Python), fixes the alphabet with a code-point tie-break and hands the trainer the
    ``##`` characters as reserved tokens, numbered in sorted order; every later id and
    merge then follows deterministically. The vocabulary is laid out as the HF trainer
    lays it out: special tokens, alphabet, ``##`` characters, merged tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    normalizer = bert_normalizer(cfg.lowercase)
    stats = char_stats(files, cfg.lowercase, workers)
    alphabet = stats.alphabet(cfg.limit_alphabet)
    continuing = ["##" + c for c in alphabet if stats.continues[ord(c)]]
    trained = Tokenizer(models.WordPiece(unk_token="[UNK]", continuing_subword_prefix="##"))
    trained.normalizer = normalizer
    trained.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=[*SPECIAL_TOKENS, *continuing],
        initial_alphabet=alphabet,
        limit_alphabet=len(alphabet),
        continuing_subword_prefix="##",
        show_progress=sys.stderr.isatty(),
    )
    trained.train_from_iterator(_lines(files), trainer=trainer)
    vocab = trained.get_vocab(with_added_tokens=False)
    by_id = sorted(vocab, key=vocab.__getitem__)
    reserved = len(SPECIAL_TOKENS) + len(continuing)
    if by_id[:reserved] != [*SPECIAL_TOKENS, *continuing]:
        raise RuntimeError(f"the trainer did not keep the reserved tokens first: {by_id[:reserved][:12]}")
    trained_alphabet, merged = by_id[reserved:reserved + len(alphabet)], by_id[reserved + len(alphabet):]
    if trained_alphabet != alphabet:
        raise RuntimeError("the trainer's alphabet is not the one counted: " + repr(trained_alphabet[:12]))
    order = [*SPECIAL_TOKENS, *alphabet, *continuing, *merged]

    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(order)}, unk_token="[UNK]",
                                     continuing_subword_prefix="##"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    cls_id, sep_id = SPECIAL_TOKENS.index("[CLS]"), SPECIAL_TOKENS.index("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


def save_tokenizer(tok, cfg: TokenizerConfig, out: Path) -> None:
    """Save via transformers into a temporary sibling, then move it into place."""
    from transformers import BertTokenizerFast

    from lbllm.utils import make_temp_dir, publish_directory

    hf = BertTokenizerFast(
        tokenizer_object=tok,
        do_lower_case=cfg.lowercase,
        strip_accents=cfg.lowercase,
        model_max_length=MODEL_MAX_LENGTH,
        unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]",
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out)
    try:
        hf.save_pretrained(str(tmp))
        # transformers 5 no longer writes vocab.txt for fast tokenizers; BERT tooling (and
        # the shard fingerprint) expect it: one token per line, in id order.
        vocab = tok.get_vocab()
        tokens = sorted(vocab, key=vocab.__getitem__)
        assert [vocab[t] for t in tokens] == list(range(len(tokens))), "vocabulary ids are not contiguous"
        (tmp / "vocab.txt").write_text("".join(t + "\n" for t in tokens), encoding="utf-8")
        publish_directory(tmp, out)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
