"""Generate the embedded synthetic pretraining corpus and a SQuAD v1.1 task about it.

    python data_prep/make_corpus.py --out DIR [--num_docs N] [--seed S]

writes DIR/corpus/part-*.txt (one document per blank-line-separated block) and
DIR/squad/train.json, dev.json. What the world is and why it makes pretraining matter:
``lbllm/prep/corpus/__init__.py``. Same arguments give byte-identical files.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from lbllm.prep.corpus import DEFAULT_MAX_PART_MB, DEFAULT_NUM_DOCS, DEFAULT_SQUAD_DEV, DEFAULT_SQUAD_TRAIN, generate


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--num_docs", type=int, default=DEFAULT_NUM_DOCS,
                    help=f"documents to write (default {DEFAULT_NUM_DOCS}, ~3 MB)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--squad_train", type=int, default=DEFAULT_SQUAD_TRAIN,
                    help="number of training questions")
    ap.add_argument("--squad_dev", type=int, default=DEFAULT_SQUAD_DEV,
                    help="number of dev questions")
    ap.add_argument("--max_part_mb", type=float, default=DEFAULT_MAX_PART_MB,
                    help="largest corpus part file, in MiB")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                    help="processes rendering documents (output does not depend on it)")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        s = generate(args.out, num_docs=args.num_docs, seed=args.seed,
                     squad_train=args.squad_train, squad_dev=args.squad_dev,
                     max_part_mb=args.max_part_mb, workers=args.workers)
    except (ValueError, OSError) as e:
        print(f"make_corpus: error: {e}", file=sys.stderr)
        return 2
    print(f"make_corpus: {s['docs']} docs, {s['bytes']:,} bytes in {s['parts']} part(s), "
          f"{s['entities']} entities, squad {s['train_questions']} train / "
          f"{s['dev_questions']} dev questions -> {args.out} ({s['seconds']:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
