"""Training and saving a BERT WordPiece tokenizer: the work behind
``data_prep/build_tokenizer.py``, which documents the pipeline."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

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


def train_tokenizer(files: Sequence[Path], cfg: TokenizerConfig):
    """A trained ``tokenizers.Tokenizer`` with the full BERT pipeline attached."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]", continuing_subword_prefix="##"))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=cfg.lowercase, lowercase=cfg.lowercase
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        limit_alphabet=cfg.limit_alphabet,
        continuing_subword_prefix="##",
        show_progress=sys.stderr.isatty(),
    )
    tok.train_from_iterator(_lines(files), trainer=trainer)
    ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    if ids != list(range(len(SPECIAL_TOKENS))):
        raise RuntimeError(f"special tokens got ids {ids}, expected 0..{len(SPECIAL_TOKENS) - 1}")
    cls_id, sep_id = ids[2], ids[3]
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
