"""Making one shard set (or one part of a plan): the work behind
``data_prep/create_shards.py``, which documents the options and guarantees."""
from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from lbllm.prep.inputs import (
    CorpusStats,
    InputError,
    ReadOptions,
    Source,
    TextUnit,
    check_text_column,
    file_sources,
    open_hf_dataset,
    plan_sha256,
    plan_units,
)
from lbllm.prep.samples import (
    SampleConfig,
    Vocab,
    heldout_config,
    id_dtype,
    masking_config,
    num_to_predict,
    unit_to_samples,
)
from lbllm.data.format import HELDOUT_DIR, MANIFEST_NAME, Manifest, shard_fields, tokenizer_fingerprint
from lbllm.prep.shard_writer import ShardWriter
from lbllm.utils import UserError, make_temp_dir, publish_directory

# NSP "random next" fraction this far from the asked-for probability gets a warning:
# it means documents that cannot give an actual next (one-sentence documents, e.g.
# headings) or units with a single document (no random partner).
NSP_WARN_TOLERANCE = 0.05
NSP_WARN_MIN_SAMPLES = 1000  # below this the fraction's own noise (sd ~0.016 at 1000) is too large


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
    input_format: str = "auto"  # auto | txt | jsonl | parquet (for --input files)
    read: ReadOptions = ReadOptions()
    hf_dataset: str | None = None
    hf_config: str | None = None
    hf_split: str = "train"
    num_parts: int = 1  # machines sharing the work; this one writes part `part`
    part: int = 0
    heldout_fraction: float = 0.0  # documents set aside into OUT/heldout (static masks) for evaluation
    workers: int = field(default=1, compare=False)  # does not change the output

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise UserError(f"--seed {self.seed}: must be >= 0")
        if self.samples_per_shard < 1:
            raise UserError(f"--samples_per_shard {self.samples_per_shard}: must be >= 1")
        if self.unit_mb <= 0:
            raise UserError(f"--unit_mb {self.unit_mb}: must be > 0")
        if self.workers < 1:
            raise UserError(f"--workers {self.workers}: must be >= 1")
        if not self.inputs and not self.hf_dataset:
            raise UserError("--input or --hf_dataset: give at least one source of text")
        if not 0.0 <= self.heldout_fraction <= 0.5:
            raise UserError(f"--heldout_fraction {self.heldout_fraction}: must be in [0, 0.5]")
        if self.num_parts < 1 or not 0 <= self.part < self.num_parts:
            raise UserError(f"--part {self.part} of --num_parts {self.num_parts}: need 0 <= part < num_parts")

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
        raise UserError(f"--tokenizer {tokenizer_dir}: no tokenizer there (build one with data_prep/build_tokenizer.py)")
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
                raise UserError(f"--tokenizer {tokenizer_dir}: needs a fast (tokenizer.json) tokenizer")
            backend = hf.backend_tokenizer
            ids = {k: getattr(hf, f"{k}_token_id") for k in ("pad", "cls", "sep", "mask", "unk")}
            special = set(hf.all_special_ids)
    except UserError:
        raise
    except Exception as e:  # tokenizers/transformers raise many types for a broken directory
        raise UserError(f"--tokenizer {tokenizer_dir}: cannot load it ({type(e).__name__}: {e})") from e
    missing = [k for k in ("pad", "cls", "sep", "mask") if ids[k] is None]
    if missing:
        raise UserError(f"--tokenizer {tokenizer_dir}: has no {', '.join(missing)} token")
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


def _init_worker(tokenizer_json: str, vocab: Vocab, cfg: SampleConfig, seed: int, single_thread: bool,
                 read: ReadOptions = ReadOptions(), sources: tuple[Source, ...] = (),
                 heldout_fraction: float = 0.0) -> None:
    if single_thread:
        # One process per core already; the Rust thread pool would only oversubscribe.
        os.environ["RAYON_NUM_THREADS"] = "1"
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json)
    tok.no_truncation()
    tok.no_padding()
    tok.encode_special_tokens = True  # "[SEP]" in the text is text, not a separator
    _STATE.update(tokenizer=tok, vocab=vocab, cfg=cfg, seed=seed, read=read, sources=sources,
                  heldout_fraction=heldout_fraction)


def _process_unit(job: tuple[int, TextUnit]) -> tuple[int, dict[str, np.ndarray], dict[str, np.ndarray] | None,
                                                      CorpusStats]:
    index, unit = job
    s = _STATE
    batch, heldout, stats = unit_to_samples(unit, index, s["tokenizer"], s["vocab"], s["cfg"], s["seed"], s["read"],
                                            s["sources"], s["heldout_fraction"])
    return unit.num_bytes, batch.arrays(), None if heldout is None else heldout.arrays(), stats


# ---------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------


@dataclass
class Plan:
    """What this run will do, validated before anything is written."""

    sources: tuple[Source, ...]
    info: TokenizerInfo
    units: list[TextUnit]  # the whole plan (every machine's)
    first: int  # this part's units: units[first:end]
    end: int
    sha256: str


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST_NAME).is_file())):
        raise UserError(f"--out {out}: exists and is not a shard directory (no {MANIFEST_NAME}); choose another path")


def part_range(units: Sequence[TextUnit], num_parts: int, part: int) -> tuple[int, int]:
    """Units ``[first, end)`` of ``part``: contiguous, balanced by bytes (unit ``u``
    belongs to the part its first byte falls into when the plan's bytes are cut into
    ``num_parts`` equal ranges). Every machine computes the same split."""
    sizes = np.array([u.num_bytes for u in units], dtype=np.int64)
    starts = np.cumsum(sizes) - sizes
    total = max(1, int(sizes.sum()))
    owner = np.minimum(num_parts - 1, starts * num_parts // total)
    return int(np.searchsorted(owner, part, side="left")), int(np.searchsorted(owner, part, side="right"))


def prepare(job: ShardJob) -> Plan:
    """Validate everything that can be validated before writing anything."""
    try:
        sources = file_sources(job.inputs, job.input_format) if job.inputs else []
        if job.inputs and not sources:
            raise UserError(f"--input {' '.join(job.inputs)}: no files match")
        if job.hf_dataset:
            sources.append(Source("hf", job.hf_dataset, job.hf_config, job.hf_split))
        tok_dir = Path(job.tokenizer)
        if not tok_dir.is_dir():
            raise UserError(
                f"--tokenizer {tok_dir}: directory not found (build one with data_prep/build_tokenizer.py)"
            )
        _check_out(Path(job.out))
        info = load_tokenizer(tok_dir)
        for source in sources:
            check_text_column(source, job.read)
        units = plan_units(sources, job.unit_bytes, job.read)
        if not units:
            where = " ".join(job.inputs) or job.hf_dataset
            raise UserError(f"--input {where}: the input is empty (no bytes or rows of text)")
        sha = plan_sha256(sources, units, job.unit_bytes, job.read)
    except InputError as e:
        raise UserError(str(e)) from e
    first, end = part_range(units, job.num_parts, job.part)
    return Plan(tuple(sources), info, units, first, end, sha)


def _samples_config(job: ShardJob, info: TokenizerInfo) -> dict[str, Any]:
    """The manifest keys that describe the samples (and, for dynamic sets, the rule the
    reader applies). merge_shards.py requires these to agree between parts."""
    cfg = job.samples
    mask = masking_config(cfg, info.vocab)
    out = {
        "seq_length": cfg.max_seq_length,
        "max_predictions_per_seq": cfg.max_predictions_per_seq,
        "masked_lm_prob": cfg.masked_lm_prob,
        "short_seq_prob": cfg.short_seq_prob,
        "random_next_prob": cfg.random_next_prob,
        "whole_word_mask": cfg.whole_word_mask,
        "dupe_factor": cfg.dupe_factor,
        "masking": cfg.masking,
        "seed": job.seed,
        "mask_seed": job.seed,
        "tokenizer_fingerprint": info.fingerprint,
        "vocab_size": info.vocab.size,
        "special_ids": {"pad": info.vocab.pad_id, "cls": info.vocab.cls_id, "sep": info.vocab.sep_id,
                        "mask": info.vocab.mask_id},
        "special_token_ids": list(mask.special_ids),
    }
    if cfg.whole_word_mask and cfg.masking == "dynamic":
        out["continuation_ids"] = list(mask.continuation_ids)
    return out


class Progress:
    """A tqdm bar on a terminal; in a log file (a cluster job) one plain line a minute,
    so that logs stay readable and an error is the last line, on its own."""

    def __init__(self, total: int, interval_s: float = 60.0):
        import time

        self._clock, self.total, self.interval_s = time.monotonic, total, interval_s
        self.done, self._last = 0, self._clock()
        self._bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="B", unit_scale=True, file=sys.stderr, desc="create_shards",
                             dynamic_ncols=True, mininterval=1.0)

    def update(self, num_bytes: int, samples: int) -> None:
        self.done += num_bytes
        if self._bar is not None:
            self._bar.update(num_bytes)
            self._bar.set_postfix(samples=samples, refresh=False)
        elif self._clock() - self._last >= self.interval_s:
            self._last = self._clock()
            print(f"create_shards: {100 * self.done / max(1, self.total):.1f}% of {self.total:,} bytes, "
                  f"{samples:,} samples", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


@dataclass
class SetTally:
    """One output set being written (the training set, or the held-out set): its shard
    writer and the counts its manifest reports."""

    writer: ShardWriter
    cfg: SampleConfig
    samples: int = 0
    nsp_random: int = 0
    masked: int = 0
    tokens: int = 0

    def add(self, arrays: dict[str, np.ndarray]) -> None:
        self.writer.add(arrays)
        self.samples += int(arrays["lengths"].shape[0])
        self.nsp_random += int(arrays["nsp"].sum())
        if self.cfg.masking == "static":
            self.masked += int(arrays["masked_count"].sum())
        else:  # what the reader will draw: the rule's count (every non-special token is a candidate)
            self.masked += int(num_to_predict(arrays["lengths"], self.cfg).sum())
        self.tokens += int(arrays["lengths"].sum())

    def counts(self) -> dict[str, Any]:
        return {
            "sample_tokens": self.tokens,
            "nsp_random_samples": self.nsp_random,
            "masked_tokens": self.masked,
            "nsp_random_fraction": self.nsp_random / max(1, self.samples),
            "mean_masked_count": self.masked / max(1, self.samples),
        }


def write_shards(job: ShardJob, plan: Plan, tmp: Path) -> Manifest:
    """Produce every shard of this part and finally the manifest inside ``tmp`` (and,
    with a held-out fraction, the held-out set with its own manifest in ``tmp/heldout``)."""
    cfg, info = job.samples, plan.info
    units = plan.units[plan.first : plan.end]
    dtype = id_dtype(info.vocab.size)
    train = SetTally(ShardWriter(tmp, job.samples_per_shard, dtype, shard_fields(cfg.masking)), cfg)
    held = None
    if job.heldout_fraction > 0:
        (tmp / HELDOUT_DIR).mkdir()
        held_cfg = heldout_config(cfg)
        held = SetTally(ShardWriter(tmp / HELDOUT_DIR, job.samples_per_shard, dtype, shard_fields("static")), held_cfg)
    stats = CorpusStats()
    pool, results = _unit_results(job, plan, units)
    progress = Progress(sum(u.num_bytes for u in units))
    try:
        for num_bytes, arrays, heldout_arrays, unit_stats in results:
            train.add(arrays)
            if held is not None:
                held.add(heldout_arrays)
            stats = stats + unit_stats
            progress.update(num_bytes, train.samples)
        shards = train.writer.close()
        heldout_shards = held.writer.close() if held is not None else None
    except InputError as e:
        raise UserError(str(e)) from e
    finally:
        progress.close()
        if pool is not None:
            pool.terminate()
    return _write_manifests(job, plan, tmp, stats, train, shards, held, heldout_shards)


def _unit_results(job: ShardJob, plan: Plan, units: Sequence[TextUnit]) -> tuple[Any, Iterator]:
    """(pool or None, the processed units in order): in forked workers when there are
    several units and workers, else in this process."""
    info, cfg = plan.info, job.samples
    init_args = (info.json, info.vocab, cfg, job.seed, job.workers > 1, job.read, plan.sources, job.heldout_fraction)
    jobs = [(plan.first + i, u) for i, u in enumerate(units)]  # global unit index: the seed
    if job.workers > 1 and len(units) > 1:
        for source in plan.sources:
            if source.kind == "hf":
                open_hf_dataset(source)  # forked workers inherit the open (memory-mapped) dataset
        # Fork before tqdm starts its monitor thread (forking a threaded process is unsafe).
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        pool = ctx.Pool(min(job.workers, len(units)), initializer=_init_worker, initargs=init_args)
        return pool, pool.imap(_process_unit, jobs)  # ordered: unit i is written i-th
    _init_worker(*init_args[:4], single_thread=False, read=job.read, sources=plan.sources,
                 heldout_fraction=job.heldout_fraction)
    return None, map(_process_unit, jobs)


def _write_manifests(job: ShardJob, plan: Plan, tmp: Path, stats: CorpusStats, train: SetTally, shards: list,
                     held: SetTally | None, heldout_shards: list | None) -> Manifest:
    """The manifest of the training set (and of the held-out set), written last."""
    info, units = plan.info, plan.units[plan.first : plan.end]
    samples = train.samples
    if samples == 0 and job.num_parts == 1:
        where = " ".join(job.inputs) or job.hf_dataset
        raise UserError(f"--input {where}: no samples (the text has no tokens)")
    manifest = Manifest(
        num_samples=samples,
        **_samples_config(job, info),
        samples_per_shard=job.samples_per_shard,
        unit_mb=job.unit_mb,
        nsp_label="1 = B is a random segment, 0 = B is the actual next (Hugging Face convention)",
        read_options={"text_field": job.read.text_field, "headings": job.read.headings,
                      "on_bad_record": job.read.on_bad_record},
        inputs=[source.describe() for source in plan.sources],
        plan={"units": len(plan.units), "sha256": plan.sha256},
        shards=shards,
        stats={
            "units": len(units),
            "units_cut_inside_document": sum(u.forced_cut for u in units),
            "documents": stats.documents,
            "empty_documents_skipped": stats.empty_documents,
            "sentences": stats.sentences,
            "long_sentences_split": stats.long_sentences_split,
            "decode_errors": stats.decode_errors,
            "bad_records_skipped": stats.bad_records,
            "headings_dropped": stats.headings_dropped,
            "pairs_skipped": stats.pairs_skipped,
            "text_tokens": stats.tokens,
            "heldout_documents": stats.heldout_documents,
            **train.counts(),
        },
        heldout_fraction=job.heldout_fraction,
    )
    if job.num_parts > 1:
        manifest.part = {"index": job.part, "num_parts": job.num_parts, "units": [plan.first, plan.end]}
    if held is not None:
        if held.samples == 0 and job.num_parts == 1:
            raise UserError(f"--heldout_fraction {job.heldout_fraction}: no document was held out of "
                             f"{stats.documents}; raise the fraction or give more documents")
        dataclasses.replace(
            manifest,
            num_samples=held.samples,
            **_samples_config(dataclasses.replace(job, samples=held.cfg), info),
            shards=heldout_shards,
            stats={"documents": stats.heldout_documents, **held.counts()},
            heldout_of="..",
            heldout_fraction=None,
        ).write(tmp / HELDOUT_DIR)
        manifest.heldout = {"dir": HELDOUT_DIR, "num_samples": held.samples, "documents": stats.heldout_documents}
    manifest.write(tmp)  # last: its presence marks completeness
    return manifest


def _make_parents(path: Path) -> list[Path]:
    """``mkdir -p`` of ``path``'s parent; returns the directories it created."""
    created = []
    parent = path.parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    path.parent.mkdir(parents=True, exist_ok=True)
    return created


def run(job: ShardJob) -> Manifest:
    """Validate, write into a temp directory, publish. Returns the manifest."""
    plan = prepare(job)
    out = Path(job.out)
    created = _make_parents(out)
    tmp = make_temp_dir(out)
    try:
        manifest = write_shards(job, plan, tmp)
        publish_directory(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for directory in created:  # innermost first; only if still empty
            try:
                directory.rmdir()
            except OSError:
                break
        raise
    return manifest
