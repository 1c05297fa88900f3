"""Join shard sets into one: the parts written by several machines, or separately
prepared corpora.

    # on machine I of K (same inputs, same arguments, only --part differs):
    python data_prep/create_shards.py --input 'wiki/*.jsonl' ... --num_parts K --part I --out DIR/part-I
    # once all parts are on one file system:
    python data_prep/merge_shards.py --parts 'DIR/part-*' --out DIR/all

Parts of one plan (they carry ``part`` in their manifest) are ordered by part index
and must all be there; their samples, in that order, are exactly the samples a single
machine would have written, so the merged set reads identically (same sample at every
index, same static and dynamic masks). Sets without ``part`` are concatenated in the
order given (e.g. Wikipedia + books prepared separately).

Either way the sets must agree on everything that defines a sample (sequence length,
predictions, masking rule and mode, tokenizer fingerprint, ...); parts also on the unit
plan and every preparation setting. A mismatch is a one-line error naming the directory
and key, exit 2, nothing written.

No shard data is copied by default: files are hard-linked into OUT under continuous
shard numbers (``--mode move`` also removes the parts afterwards; ``--mode copy`` is
for parts on another file system). OUT is built in a temp directory and renamed into
place, manifest last, so an interrupted merge leaves no OUT that looks complete and
the parts untouched.
"""
from __future__ import annotations

import argparse
import glob
import sys
from pathlib import Path
from typing import Sequence

from lbllm.prep.merge import MODES, merge
from lbllm.utils import UserError


def _expand(patterns: Sequence[str]) -> list[Path]:
    dirs: list[Path] = []
    for pattern in patterns:
        matches = [Path(pattern)] if Path(pattern).is_dir() else sorted(Path(p) for p in glob.glob(pattern))
        matches = [m for m in matches if m.is_dir() and ".tmp-" not in m.name and ".old-" not in m.name]
        if not matches:
            raise UserError(f"--parts {pattern}: no shard directory matches")
        dirs.extend(m for m in matches if m.resolve() not in {d.resolve() for d in dirs})
    return dirs


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", nargs="+", required=True, help="shard directories or globs (e.g. 'DIR/part-*')")
    p.add_argument("--out", required=True, help="the merged set (replaced if it holds shards)")
    p.add_argument("--mode", default="link", choices=MODES,
                   help="link: hard links, parts kept (default); move: parts removed after; copy: other file system")
    p.add_argument("--verify", action="store_true", help="check every file's SHA-256 (reads everything)")
    a = p.parse_args(argv)
    try:
        merged = merge(_expand(a.parts), Path(a.out), a.mode, a.verify)
    except UserError as e:
        print(f"merge_shards: {e}", file=sys.stderr)
        return 2
    print(f"merge_shards: {merged.num_samples} samples in {len(merged.shards)} shard(s) from "
          f"{len(merged.merged_from)} set(s) -> {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
