"""Train a BERT WordPiece tokenizer on text files and save it in Hugging Face format.

    python data_prep/build_tokenizer.py --input corpus/*.txt --vocab_size 30522 --out DIR

The pipeline is BERT's (Devlin et al. 2019): BertNormalizer (clean text, CJK spacing,
lowercase + strip accents for uncased; ``--no_lowercase`` keeps case and accents, as
cased BERT does), BertPreTokenizer (whitespace + punctuation), WordPiece with the
``##`` continuation prefix, special tokens [PAD] [UNK] [CLS] [SEP] [MASK] at ids 0..4,
and the ``[CLS] A [SEP] B [SEP]`` template with token types 0/1. The result is saved
through ``BertTokenizerFast.save_pretrained`` so both ``BertTokenizerFast`` and
``AutoTokenizer`` load DIR (vocab.txt, tokenizer.json, tokenizer_config.json).
"""
from __future__ import annotations

import argparse
import os
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


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input", nargs="+", required=True, help="text files, globs or directories")
    p.add_argument("--vocab_size", type=int, required=True)
    p.add_argument("--out", type=Path, required=True, help="output directory (replaced if it holds a tokenizer)")
    p.add_argument("--no_lowercase", action="store_true", help="cased: keep case and accents")
    p.add_argument("--min_frequency", type=int, default=2)
    p.add_argument("--limit_alphabet", type=int, default=1000)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from lbllm.prep.inputs import expand_inputs

    try:
        cfg = TokenizerConfig(args.vocab_size, not args.no_lowercase, args.min_frequency, args.limit_alphabet)
    except ValueError as e:
        print(f"build_tokenizer: {e}", file=sys.stderr)
        return 2
    files = expand_inputs(args.input)
    if not files:
        print(f"build_tokenizer: no input files match {' '.join(args.input)}", file=sys.stderr)
        return 2
    out: Path = args.out
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "tokenizer_config.json").is_file())):
        print(f"build_tokenizer: --out {out} exists and is not a tokenizer directory; choose another path",
              file=sys.stderr)
        return 2
    tok = train_tokenizer(files, cfg)
    save_tokenizer(tok, cfg, out)
    print(f"build_tokenizer: {tok.get_vocab_size()} tokens from {len(files)} file(s) -> {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    sys.exit(main())
