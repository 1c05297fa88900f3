"""Turn text into memory-mapped BERT pretraining shards plus a manifest.

    python data_prep/create_shards.py --input corpus/*.txt --tokenizer TOK \\
        --max_seq_length 128 --max_predictions_per_seq 20 --out data/seq128
    python data_prep/create_shards.py --input 'wiki/*.jsonl' --text_field text ...
    python data_prep/create_shards.py --hf_dataset wikimedia/wikipedia --hf_config 20231101.en ...

Inputs: txt (blank-line separated documents), jsonl (``--text_field``), parquet (the
same column), globs and directories, and any ``datasets`` dataset by name or saved
directory (``--hf_dataset``); see ``lbllm/prep/inputs.py`` for how each becomes
documents and units. Samples follow Google's create_pretraining_data.py (Devlin et al.
2019): NSP pairs of sentence runs, 15% masking, ``dupe_factor`` passes; see
``lbllm/prep/samples.py``. ``--masking dynamic`` stores unmasked samples and the reader
masks them per epoch. The format is described in ``lbllm/data/format.py``; the
commands for large corpora and several machines in docs/data.md.

Parallelism and determinism: the inputs are cut into units of about ``--unit_mb`` at
document boundaries; each unit is read, tokenized and turned into samples by one worker
with generators seeded from ``(seed, unit index)``, and the units are written in order.
The output is therefore byte-identical for any ``--workers``. "Random next" segments
are drawn from the other documents of the same unit: the unit is the reference's "all
documents of this input file", and keeping the pool per unit keeps workers independent
and memory bounded.

Several machines: ``--num_parts K --part I`` plans the same units everywhere and takes
the I-th of K contiguous ranges (balanced by bytes); ``data_prep/merge_shards.py`` then
joins the parts into one set whose samples are exactly the single-machine output's.

Atomicity: everything is written into ``OUT.tmp-XXXX`` next to OUT, manifest last, and
the directory is renamed into place; an interrupted run leaves at most a stray temp
directory, never an OUT that looks complete. Re-running with the same arguments
rebuilds the identical set and replaces OUT.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from lbllm.data.format import HELDOUT_DIR
from lbllm.prep.create import NSP_WARN_MIN_SAMPLES, NSP_WARN_TOLERANCE, ShardJob, run
from lbllm.prep.inputs import INPUT_FORMATS, ReadOptions
from lbllm.prep.samples import MASKING_MODES, SampleConfig
from lbllm.utils import UserError


def parse_args(argv: Sequence[str] | None = None) -> ShardJob:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = p.add_argument_group("input")
    src.add_argument("--input", nargs="+", default=[], help="txt/jsonl/parquet files, globs or directories")
    src.add_argument("--input_format", default="auto", choices=("auto", *INPUT_FORMATS),
                     help="format of --input files (auto: by extension, .jsonl/.json/.ndjson, .parquet, else txt)")
    src.add_argument("--text_field", default="text", help="jsonl key / parquet and datasets column holding the text")
    src.add_argument("--hf_dataset", help="a `datasets` dataset: a name for load_dataset or a save_to_disk directory")
    src.add_argument("--hf_config", help="its configuration name (e.g. 20231101.en for wikimedia/wikipedia)")
    src.add_argument("--hf_split", default="train")
    src.add_argument("--headings", default="keep", choices=("keep", "drop", "articles"),
                     help="wikitext-style '= Heading =' lines: keep as text, drop, or articles (a '= Title =' line "
                          "starts a document, section headings are dropped, blank lines do not split)")
    src.add_argument("--on_bad_record", default="error", choices=("error", "skip"),
                     help="a jsonl line that is not an object with a string --text_field: stop, or count and skip it")
    p.add_argument("--tokenizer", required=True, help="directory written by data_prep/build_tokenizer.py")
    p.add_argument("--max_seq_length", type=int, required=True)
    p.add_argument("--out", required=True, help="output directory (replaced if it holds shards)")
    p.add_argument("--max_predictions_per_seq", type=int, default=20)
    p.add_argument("--dupe_factor", type=int, default=1)
    p.add_argument("--masked_lm_prob", type=float, default=0.15)
    p.add_argument("--short_seq_prob", type=float, default=0.1)
    p.add_argument("--whole_word_mask", action="store_true", help="mask all pieces of a word together")
    p.add_argument("--masking", default="static", choices=MASKING_MODES,
                   help="static: masks drawn now and stored; dynamic: stored unmasked, masked by the reader per epoch")
    p.add_argument("--samples_per_shard", type=int, default=100_000)
    p.add_argument("--unit_mb", type=float, default=1.0, help="work unit / random-next pool size (MiB)")
    p.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8))
    p.add_argument("--seed", type=int, default=12345)
    p.add_argument("--heldout_fraction", type=float, default=0.0,
                   help="fraction of documents set aside (never trained on) into OUT/heldout, static masks, "
                        "for pretrain_bert.py --eval_data OUT/heldout")
    p.add_argument("--num_parts", type=int, default=1,
                   help="machines preparing this set together (then data_prep/merge_shards.py)")
    p.add_argument("--part", type=int, default=0, help="which of the --num_parts this machine writes (0-based)")
    a = p.parse_args(argv)
    try:
        samples = SampleConfig(
            max_seq_length=a.max_seq_length,
            max_predictions_per_seq=a.max_predictions_per_seq,
            masked_lm_prob=a.masked_lm_prob,
            short_seq_prob=a.short_seq_prob,
            dupe_factor=a.dupe_factor,
            whole_word_mask=a.whole_word_mask,
            masking=a.masking,
        )
        read = ReadOptions(text_field=a.text_field, headings=a.headings, on_bad_record=a.on_bad_record)
    except ValueError as e:
        raise UserError(f"--{e}") from e
    return ShardJob(
        inputs=tuple(a.input), tokenizer=a.tokenizer, out=a.out, samples=samples, seed=a.seed,
        samples_per_shard=a.samples_per_shard, unit_mb=a.unit_mb, input_format=a.input_format, read=read,
        hf_dataset=a.hf_dataset, hf_config=a.hf_config, hf_split=a.hf_split, num_parts=a.num_parts, part=a.part,
        workers=a.workers, heldout_fraction=a.heldout_fraction,
    )


def main(argv: Sequence[str] | None = None) -> int:
    try:
        job = parse_args(argv)
        manifest = run(job)
    except UserError as e:
        print(f"create_shards: {e}", file=sys.stderr)
        return 2
    s = manifest.stats
    part = f" (part {job.part} of {job.num_parts})" if job.num_parts > 1 else ""
    print(
        f"create_shards: {manifest.num_samples} samples of length {manifest.seq_length} in "
        f"{len(manifest.shards)} shard(s) from {s['documents'] - s['heldout_documents']} documents{part} -> {job.out}",
        file=sys.stderr,
    )
    if manifest.heldout is not None:
        h = manifest.heldout
        print(f"create_shards: held out {h['num_samples']} samples (static masks) from {h['documents']} other "
              f"documents -> {Path(job.out) / HELDOUT_DIR}", file=sys.stderr)
    expected = job.samples.random_next_prob
    skewed = abs(s["nsp_random_fraction"] - expected) > NSP_WARN_TOLERANCE
    if manifest.num_samples >= NSP_WARN_MIN_SAMPLES and skewed:
        print(
            f"create_shards: warning: NSP random-next fraction {s['nsp_random_fraction']:.3f}, expected {expected}: "
            "many one-sentence documents (headings? try --headings drop/articles) or one-document units "
            "(no blank lines?); see docs/data.md",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    sys.exit(main())
