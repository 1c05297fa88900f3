"""Turn text into memory-mapped BERT pretraining shards plus a manifest.

    python data_prep/create_shards.py --input corpus/*.txt --tokenizer TOK \\
        --max_seq_length 128 --max_predictions_per_seq 20 --out data/seq128

Samples follow Google's create_pretraining_data.py (Devlin et al. 2019): NSP pairs of
sentence runs, static 15% masking, ``dupe_factor`` differently-masked passes; see
``lbllm/data/samples.py`` for the details and the defects of the reference we fix.
The format is described in ``lbllm/data/shards.py``.

Parallelism and determinism: the input files are cut into units of about
``--unit_mb`` at blank lines (documents are never split); each unit is read,
tokenized and turned into samples by one worker with generators seeded from
``(seed, unit index)``, and the units are written in order. The output is therefore
byte-identical for any ``--workers``. "Random next" segments are drawn from the other
documents of the same unit: the unit is the reference's "all documents of this input
file", and keeping the pool per unit keeps workers independent and memory bounded.

Atomicity: everything is written into ``OUT.tmp-XXXX`` next to OUT, manifest last, and
the directory is renamed into place; an interrupted run leaves at most a stray temp
directory, never an OUT that looks complete. Re-running with the same arguments
rebuilds the identical set and replaces OUT.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lbllm.data.samples import (
    CorpusStats,
    SampleConfig,
    TextUnit,
    Vocab,
    expand_inputs,
    id_dtype,
    plan_units,
    unit_to_samples,
)
from lbllm.data.shards import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    ShardWriter,
    make_temp_dir,
    publish_directory,
    tokenizer_fingerprint,
    write_json_atomic,
)


class UsageError(ValueError):
    """Bad command-line input: reported as one line, exit status 2, nothing written."""


@dataclass(frozen=True)
class ShardJob:
    """Everything that determines the output (and so goes into the manifest)."""

    inputs: tuple[str, ...]
    tokenizer: str
    out: str
    samples: SampleConfig
    seed: int = 12345
    samples_per_shard: int = 100_000
    unit_mb: float = 1.0  # size of a unit of work and of its random-next document pool
    workers: int = field(default=1, compare=False)  # does not change the output

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise UsageError(f"--seed {self.seed}: must be >= 0")
        if self.samples_per_shard < 1:
            raise UsageError(f"--samples_per_shard {self.samples_per_shard}: must be >= 1")
        if self.unit_mb <= 0:
            raise UsageError(f"--unit_mb {self.unit_mb}: must be > 0")
        if self.workers < 1:
            raise UsageError(f"--workers {self.workers}: must be >= 1")

    @property
    def unit_bytes(self) -> int:
        return max(1, int(self.unit_mb * (1 << 20)))


# ---------------------------------------------------------------------------------------
# Tokenizer (loaded once in the parent, rebuilt from its JSON in each worker)
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenizerInfo:
    json: str  # the Rust tokenizer, serialized
    vocab: Vocab
    fingerprint: str


def _token_name(config: dict, key: str, default: str) -> str:
    value = config.get(key) or default
    return value.get("content", default) if isinstance(value, dict) else str(value)


def load_tokenizer(tokenizer_dir: Path) -> TokenizerInfo:
    """The Rust tokenizer and its special tokens.

    A directory with ``tokenizer.json`` (what build_tokenizer.py writes) is read with
    the ``tokenizers`` library directly: importing transformers (and torch with it)
    would triple the start-up time. Anything else goes through AutoTokenizer."""
    tok_json = tokenizer_dir / "tokenizer.json"
    config_path = tokenizer_dir / "tokenizer_config.json"
    if not tok_json.is_file() and not config_path.is_file():
        raise UsageError(f"--tokenizer {tokenizer_dir}: no tokenizer there (build one with data_prep/build_tokenizer.py)")
    try:
        if tok_json.is_file():
            from tokenizers import Tokenizer

            backend = Tokenizer.from_file(str(tok_json))
            config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
            names = {k: _token_name(config, f"{k}_token", f"[{k.upper()}]") for k in ("pad", "cls", "sep", "mask", "unk")}
            ids = {k: backend.token_to_id(v) for k, v in names.items()}
            special = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        else:
            from transformers import AutoTokenizer

            hf = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
            if not getattr(hf, "is_fast", False):
                raise UsageError(f"--tokenizer {tokenizer_dir}: needs a fast (tokenizer.json) tokenizer")
            backend = hf.backend_tokenizer
            ids = {k: getattr(hf, f"{k}_token_id") for k in ("pad", "cls", "sep", "mask", "unk")}
            special = set(hf.all_special_ids)
    except UsageError:
        raise
    except Exception as e:  # tokenizers/transformers raise many types for a broken directory
        raise UsageError(f"--tokenizer {tokenizer_dir}: cannot load it ({type(e).__name__}: {e})") from e
    missing = [k for k in ("pad", "cls", "sep", "mask") if ids[k] is None]
    if missing:
        raise UsageError(f"--tokenizer {tokenizer_dir}: has no {', '.join(missing)} token")
    vocab_map = backend.get_vocab(with_added_tokens=True)
    tokens = [""] * (max(vocab_map.values()) + 1)
    for token, i in vocab_map.items():
        tokens[i] = token
    vocab = Vocab(
        tokens=tuple(tokens),
        pad_id=ids["pad"], cls_id=ids["cls"], sep_id=ids["sep"], mask_id=ids["mask"],
        special_ids=tuple(sorted(special | {i for i in ids.values() if i is not None})),
    )
    return TokenizerInfo(backend.to_str(), vocab, tokenizer_fingerprint(tokenizer_dir))


# ---------------------------------------------------------------------------------------
# Workers
# ---------------------------------------------------------------------------------------

_STATE: dict[str, Any] = {}


def _init_worker(tokenizer_json: str, vocab: Vocab, cfg: SampleConfig, seed: int, single_thread: bool) -> None:
    if single_thread:
        # One process per core already; the Rust thread pool would only oversubscribe.
        os.environ["RAYON_NUM_THREADS"] = "1"
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json)
    tok.no_truncation()
    tok.no_padding()
    tok.encode_special_tokens = True  # "[SEP]" in the text is text, not a separator
    _STATE.update(tokenizer=tok, vocab=vocab, cfg=cfg, seed=seed)


def _process_unit(job: tuple[int, TextUnit]) -> tuple[int, dict[str, np.ndarray], CorpusStats]:
    index, unit = job
    s = _STATE
    batch, stats = unit_to_samples(unit, index, s["tokenizer"], s["vocab"], s["cfg"], s["seed"])
    return unit.num_bytes, batch.arrays(), stats


# ---------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST_NAME).is_file())):
        raise UsageError(f"--out {out}: exists and is not a shard directory (no {MANIFEST_NAME}); choose another path")


def prepare(job: ShardJob) -> tuple[list[Path], TokenizerInfo, list[TextUnit]]:
    """Validate everything that can be validated before writing anything."""
    files = expand_inputs(job.inputs)
    if not files:
        raise UsageError(f"--input {' '.join(job.inputs)}: no files match")
    tok_dir = Path(job.tokenizer)
    if not tok_dir.is_dir():
        raise UsageError(f"--tokenizer {tok_dir}: directory not found (build one with data_prep/build_tokenizer.py)")
    _check_out(Path(job.out))
    info = load_tokenizer(tok_dir)
    return files, info, plan_units(files, job.unit_bytes)


def write_shards(job: ShardJob, files: list[Path], info: TokenizerInfo, units: list[TextUnit], tmp: Path) -> dict:
    """Produce every shard and finally the manifest inside ``tmp``; returns the manifest."""
    from tqdm import tqdm

    cfg = job.samples
    writer = ShardWriter(tmp, job.samples_per_shard, id_dtype(info.vocab.size))
    stats = CorpusStats()
    nsp_random = masked = samples = tokens_in_samples = 0
    init_args = (info.json, info.vocab, cfg, job.seed, job.workers > 1)
    jobs = list(enumerate(units))
    pool = None
    if job.workers > 1 and len(units) > 1:
        # Fork before tqdm starts its monitor thread (forking a threaded process is unsafe).
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        pool = ctx.Pool(min(job.workers, len(units)), initializer=_init_worker, initargs=init_args)
        results = pool.imap(_process_unit, jobs)  # ordered: unit i is written i-th
    else:
        _init_worker(*init_args[:-1], single_thread=False)
        results = map(_process_unit, jobs)
    progress = tqdm(total=sum(u.num_bytes for u in units), unit="B", unit_scale=True, file=sys.stderr,
                    desc="create_shards", dynamic_ncols=True, mininterval=1.0)
    try:
        for num_bytes, arrays, unit_stats in results:
            writer.add(arrays)
            stats = stats + unit_stats
            samples += int(arrays["lengths"].shape[0])
            nsp_random += int(arrays["nsp"].sum())
            masked += int(arrays["masked_count"].sum())
            tokens_in_samples += int(arrays["lengths"].sum())
            progress.update(num_bytes)
            progress.set_postfix(samples=samples, refresh=False)
        shards = writer.close()
    finally:
        progress.close()
        if pool is not None:
            pool.terminate()
    if samples == 0:
        raise UsageError(f"--input {' '.join(job.inputs)}: no samples (the text has no tokens)")
    manifest = {
        "format_version": FORMAT_VERSION,
        "num_samples": samples,
        "seq_length": cfg.max_seq_length,
        "max_predictions_per_seq": cfg.max_predictions_per_seq,
        "masked_lm_prob": cfg.masked_lm_prob,
        "short_seq_prob": cfg.short_seq_prob,
        "random_next_prob": cfg.random_next_prob,
        "whole_word_mask": cfg.whole_word_mask,
        "dupe_factor": cfg.dupe_factor,
        "seed": job.seed,
        "samples_per_shard": job.samples_per_shard,
        "unit_mb": job.unit_mb,
        "tokenizer_fingerprint": info.fingerprint,
        "vocab_size": info.vocab.size,
        "special_ids": {"pad": info.vocab.pad_id, "cls": info.vocab.cls_id, "sep": info.vocab.sep_id,
                        "mask": info.vocab.mask_id},
        "nsp_label": "1 = B is a random segment, 0 = B is the actual next (Hugging Face convention)",
        "inputs": [{"path": str(p), "bytes": p.stat().st_size} for p in files],
        "shards": shards,
        "stats": {
            "units": len(units),
            "documents": stats.documents,
            "empty_documents_skipped": stats.empty_documents,
            "sentences": stats.sentences,
            "long_sentences_split": stats.long_sentences_split,
            "decode_errors": stats.decode_errors,
            "pairs_skipped": stats.pairs_skipped,
            "text_tokens": stats.tokens,
            "sample_tokens": tokens_in_samples,
            "nsp_random_fraction": nsp_random / samples,
            "mean_masked_count": masked / samples,
        },
    }
    write_json_atomic(tmp / MANIFEST_NAME, manifest)  # last: its presence marks completeness
    return manifest


def run(job: ShardJob) -> dict:
    """Validate, write into a temp directory, publish. Returns the manifest."""
    files, info, units = prepare(job)
    out = Path(job.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out)
    try:
        manifest = write_shards(job, files, info, units, tmp)
        publish_directory(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def parse_args(argv: Sequence[str] | None = None) -> ShardJob:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input", nargs="+", required=True, help="text files, globs or directories")
    p.add_argument("--tokenizer", required=True, help="directory written by data_prep/build_tokenizer.py")
    p.add_argument("--max_seq_length", type=int, required=True)
    p.add_argument("--out", required=True, help="output directory (replaced if it holds shards)")
    p.add_argument("--max_predictions_per_seq", type=int, default=20)
    p.add_argument("--dupe_factor", type=int, default=1)
    p.add_argument("--masked_lm_prob", type=float, default=0.15)
    p.add_argument("--short_seq_prob", type=float, default=0.1)
    p.add_argument("--whole_word_mask", action="store_true", help="mask all pieces of a word together")
    p.add_argument("--samples_per_shard", type=int, default=100_000)
    p.add_argument("--unit_mb", type=float, default=1.0, help="work unit / random-next pool size (MiB)")
    p.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8))
    p.add_argument("--seed", type=int, default=12345)
    a = p.parse_args(argv)
    try:
        samples = SampleConfig(
            max_seq_length=a.max_seq_length,
            max_predictions_per_seq=a.max_predictions_per_seq,
            masked_lm_prob=a.masked_lm_prob,
            short_seq_prob=a.short_seq_prob,
            dupe_factor=a.dupe_factor,
            whole_word_mask=a.whole_word_mask,
        )
    except ValueError as e:
        raise UsageError(f"--{e}") from e
    return ShardJob(
        inputs=tuple(a.input), tokenizer=a.tokenizer, out=a.out, samples=samples, seed=a.seed,
        samples_per_shard=a.samples_per_shard, unit_mb=a.unit_mb, workers=a.workers,
    )


def main(argv: Sequence[str] | None = None) -> int:
    try:
        job = parse_args(argv)
        manifest = run(job)
    except UsageError as e:
        print(f"create_shards: {e}", file=sys.stderr)
        return 2
    s = manifest["stats"]
    print(
        f"create_shards: {manifest['num_samples']} samples of length {manifest['seq_length']} in "
        f"{len(manifest['shards'])} shard(s) from {s['documents']} documents -> {job.out}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    sys.exit(main())
