"""Train a BERT WordPiece tokenizer on text files and save it in Hugging Face format.

    python data_prep/build_tokenizer.py --input corpus/*.txt --vocab_size 30522 --out DIR

The pipeline is BERT's (Devlin et al. 2019): BertNormalizer (clean text, CJK spacing,
lowercase + strip accents for uncased; ``--no_lowercase`` keeps case and accents, as
cased BERT does), BertPreTokenizer (whitespace + punctuation), WordPiece with the
``##`` continuation prefix, special tokens [PAD] [UNK] [CLS] [SEP] [MASK] at ids 0..4,
and the ``[CLS] A [SEP] B [SEP]`` template with token types 0/1. The same input and
flags give the same vocabulary, id for id, in every run (the HF trainer alone does not:
see ``lbllm/prep/tokenizer.py``). The result is saved
through ``BertTokenizerFast.save_pretrained`` so both ``BertTokenizerFast`` and
``AutoTokenizer`` load DIR (vocab.txt, tokenizer.json, tokenizer_config.json).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from lbllm.prep.tokenizer import TokenizerConfig, save_tokenizer, train_tokenizer


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input", nargs="+", required=True, help="text files, globs or directories")
    p.add_argument("--vocab_size", type=int, required=True)
    p.add_argument("--out", type=Path, required=True, help="output directory (replaced if it holds a tokenizer)")
    p.add_argument("--no_lowercase", action="store_true", help="cased: keep case and accents")
    p.add_argument("--min_frequency", type=int, default=2)
    p.add_argument("--limit_alphabet", type=int, default=1000)
    p.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8),
                   help="processes counting characters in the first pass (as create_shards.py)")
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
    tok = train_tokenizer(files, cfg, max(1, args.workers))
    save_tokenizer(tok, cfg, out)
    print(f"build_tokenizer: {tok.get_vocab_size()} tokens from {len(files)} file(s) -> {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    sys.exit(main())
