"""Where documents come from: txt, jsonl and parquet files and ``datasets`` datasets,
cut into units of work.

A *unit* is the unit of parallel work and of randomness in data preparation: a worker
reads one unit, turns it into samples with generators seeded from ``(seed, unit
index)``, and "random next" segments are drawn from the other documents of the same
unit. The unit layout depends only on the inputs, ``unit_bytes`` and the read options,
never on the number of workers or machines, which is what makes the output
byte-identical for any ``--workers`` and lets several machines each take a disjoint
range of units (see ``data_prep/create_shards.py --num_parts``).

Documents, per format:

* ``txt``: blocks of lines separated by blank (whitespace-only) lines, as in BERT's
  ``create_pretraining_data``. Units are byte ranges cut just after a blank line.
* ``jsonl``: one JSON object per line, its ``text_field`` string is one document.
  Units are byte ranges cut at line ends.
* ``parquet``: one row per document (a string column ``text_field``). Units are row
  ranges of one row group, sized from the file's metadata (nothing is read to plan).
* ``hf``: any ``datasets`` dataset (``load_from_disk`` for a saved directory,
  ``load_dataset`` otherwise), one row per document. Units are row ranges cut by the
  cumulative UTF-8 size of the text column (computed from the Arrow offsets).

Inside a record (jsonl, parquet, hf) the text is split at ``\\n`` into lines and blank
lines are dropped: one record is one document, as in a Wikipedia dump with one article
per row. The same documents therefore give the same samples whichever format holds
them, as long as the unit boundaries coincide (e.g. one unit per file).

Wikitext-style headings (``" = Title = "``, ``" = = Section = = "``) can be kept as
text, dropped, or used as article boundaries (``headings="articles"``: a level-1 title
starts a document, section headings are dropped, blank lines do not split). Keeping
them makes every heading a one-sentence "document" that cannot have an actual next
sentence, which skews NSP towards "random next" (see docs/data.md).

Bad input is counted, not fatal, where the text is merely messy (invalid UTF-8 is read
with replacement characters and counted); a jsonl line that is not a JSON object with
a string field is a clear error naming ``file:line`` unless ``on_bad_record="skip"``
(then it is counted), since it usually means a wrong file or a wrong ``--text_field``.
"""
from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from lbllm.utils import UserError

INPUT_FORMATS = ("txt", "jsonl", "parquet")
HEADINGS = ("keep", "drop", "articles")
BAD_RECORD_POLICIES = ("error", "skip")
_EXTENSIONS = {".txt": "txt", ".text": "txt", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl",
               ".parquet": "parquet", ".pq": "parquet"}
# Inputs we refuse instead of reading as text (a compressed file read as txt is garbage).
_UNSUPPORTED = {".gz", ".bz2", ".xz", ".zst", ".lz4", ".zip", ".tar", ".arrow"}
# A document longer than this many units is cut at a line end (counted): it bounds a
# worker's memory when a file has no blank lines at all ("one huge document").
MAX_DOCUMENT_UNITS = 16

# Wikitext headings: " = Title = ", " = = Section = = ", also "== Section ==".
_HEADING = re.compile(r"^\s*=+ .* =+\s*$")
_TITLE = re.compile(r"^\s*= [^=].* =\s*$")  # level 1 only: an article title


class InputError(UserError):
    """Input that cannot be read as asked: one line naming the file (and line) and the fix."""


@dataclass(frozen=True)
class ReadOptions:
    """How text becomes documents (part of the output's identity: goes in the manifest)."""

    text_field: str = "text"  # jsonl key / parquet or datasets column
    headings: str = "keep"  # keep | drop | articles (see module docstring)
    on_bad_record: str = "error"  # error | skip: a jsonl line that is not {"text_field": str}

    def __post_init__(self) -> None:
        if self.headings not in HEADINGS:
            raise InputError(f"--headings {self.headings}: must be one of {', '.join(HEADINGS)}")
        if self.on_bad_record not in BAD_RECORD_POLICIES:
            raise InputError(f"--on_bad_record {self.on_bad_record}: must be one of {', '.join(BAD_RECORD_POLICIES)}")
        if not self.text_field:
            raise InputError("--text_field: must not be empty")


@dataclass
class CorpusStats:
    """Counts reported in the manifest; ``+`` merges the counts of two units."""

    documents: int = 0  # documents that produced at least one token
    empty_documents: int = 0  # documents / records with no tokens (whitespace, control chars, null)
    sentences: int = 0
    decode_errors: int = 0  # lines that were not valid UTF-8 (read with replacement chars)
    bad_records: int = 0  # jsonl lines skipped with on_bad_record="skip"
    headings_dropped: int = 0  # heading lines removed by headings="drop"/"articles"
    long_sentences_split: int = 0  # sentences cut into max_num_tokens pieces
    pairs_skipped: int = 0  # one-sentence documents alone in their unit (no random partner)
    tokens: int = 0  # text tokens read (before pairing)
    heldout_documents: int = 0  # of `documents`, those set aside for held-out evaluation

    def __add__(self, other: "CorpusStats") -> "CorpusStats":
        return CorpusStats(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})


# ---------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """One input: a file of a given format, or a ``datasets`` dataset split."""

    kind: str  # txt | jsonl | parquet | hf
    path: str  # file path, or dataset name / saved directory for "hf"
    hf_config: str | None = None
    hf_split: str | None = None

    def describe(self) -> dict[str, Any]:
        """The manifest's record of this input."""
        if self.kind == "hf":
            ds = open_hf_dataset(self)
            return {"format": "hf", "dataset": self.path, "config": self.hf_config, "split": self.hf_split,
                    "rows": len(ds), "fingerprint": getattr(ds, "_fingerprint", None)}
        return {"format": self.kind, "path": self.path, "bytes": os.path.getsize(self.path)}

    def identity(self) -> list:
        """What must agree between machines that plan the same units (not the absolute
        path: machines may mount the corpus at different places)."""
        if self.kind == "hf":
            return ["hf", self.path, self.hf_config, self.hf_split, len(open_hf_dataset(self))]
        return [self.kind, Path(self.path).name, os.path.getsize(self.path)]


def expand_inputs(patterns: Iterable[str]) -> list[Path]:
    """Files named by paths, globs (``**`` allowed) or directories (their files), sorted
    within each pattern, duplicates dropped, order of the patterns kept."""
    seen: set[Path] = set()
    files: list[Path] = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            matches = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        elif path.is_file():
            matches = [path]
        else:
            matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        for match in matches:
            key = match.resolve()
            if key not in seen:
                seen.add(key)
                files.append(match)
    return files


def detect_format(path: Path, input_format: str = "auto") -> str:
    """``input_format`` unless "auto"; then by extension (.jsonl/.json/.ndjson, .parquet,
    anything else is text). Compressed files are refused with a hint."""
    suffix = path.suffix.lower()
    if suffix in _UNSUPPORTED:
        raise InputError(
            f"--input {path}: {suffix} files are not read directly; decompress it, or load it with "
            "--hf_dataset (e.g. a directory of .jsonl.gz files)"
        )
    if input_format != "auto":
        if input_format not in INPUT_FORMATS:
            raise InputError(f"--input_format {input_format}: must be auto or one of {', '.join(INPUT_FORMATS)}")
        return input_format
    return _EXTENSIONS.get(suffix, "txt")


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())


def file_sources(patterns: Iterable[str], input_format: str = "auto") -> list[Source]:
    """The files of ``--input`` with their formats."""
    patterns = list(patterns)
    for pattern in patterns:
        if _is_saved_dataset(Path(pattern)):
            raise InputError(f"--input {pattern}: a saved `datasets` dataset; pass it with --hf_dataset {pattern}")
    return [Source(detect_format(p, input_format), str(p)) for p in expand_inputs(patterns)]


# ``datasets`` objects, by source, per process. The parent opens them before forking
# the workers, which then inherit the memory-mapped tables instead of re-opening them.
_HF_OPEN: dict[Source, Any] = {}


def open_hf_dataset(source: Source):
    """The ``datasets.Dataset`` of an "hf" source (opened once per process)."""
    if source in _HF_OPEN:
        return _HF_OPEN[source]
    import datasets

    name = source.path
    path = Path(name)
    looks_local = name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name
    if looks_local and not path.exists():  # a Hub name is "name" or "org/name"; do not ask the Hub for a path
        raise InputError(f"--hf_dataset {name}: no such directory (a saved dataset, or a Hub name like org/name)")
    try:
        if _is_saved_dataset(path):
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if source.hf_split not in ds:
                    raise InputError(
                        f"--hf_split {source.hf_split}: {name} has splits {', '.join(ds)}; pass one of them"
                    )
                ds = ds[source.hf_split]
        else:
            ds = datasets.load_dataset(name, source.hf_config, split=source.hf_split)
    except InputError:
        raise
    except Exception as e:  # datasets raises many types (not found, offline, bad config)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise InputError(f"--hf_dataset {name}: cannot load it ({type(e).__name__}: {msg})") from e
    if not isinstance(ds, datasets.Dataset):
        raise InputError(f"--hf_dataset {name}: got a {type(ds).__name__}, need a Dataset (pass --hf_split)")
    _HF_OPEN[source] = ds.with_format(None)
    return _HF_OPEN[source]


def check_text_column(source: Source, options: ReadOptions) -> None:
    """Fail fast, before any work, when the text field is missing or not text."""
    field = options.text_field
    if source.kind == "hf":
        ds = open_hf_dataset(source)
        if field not in ds.column_names:
            raise InputError(f"--text_field {field}: {source.path} has columns {', '.join(ds.column_names)}; "
                             "pass --text_field with one of them")
        _check_string_type(ds.data.schema.field(field).type, f"{source.path} column {field!r}")
    elif source.kind == "parquet":
        schema = _parquet_file(source.path).schema_arrow
        if field not in schema.names:
            raise InputError(f"--text_field {field}: {source.path} has columns {', '.join(schema.names)}; "
                             "pass --text_field with one of them")
        _check_string_type(schema.field(field).type, f"{source.path} column {field!r}")
    elif source.kind == "jsonl":
        # Only the first record: a wrong --text_field is the common mistake, and it is
        # better reported now with the keys that exist than after hours of work.
        with open(source.path, "rb") as f:
            for number, raw in enumerate(f, 1):
                if raw.strip():
                    try:
                        record = json.loads(raw.decode("utf-8", "replace"))
                    except ValueError:
                        break  # reported with its line number by the reader
                    if isinstance(record, dict) and field not in record:
                        keys = ", ".join(map(str, record)) or "(none)"
                        raise InputError(f"--text_field {field}: {source.path}:{number} has keys {keys}; "
                                         "pass --text_field with one of them")
                    break


def _check_string_type(arrow_type, what: str) -> None:
    import pyarrow as pa

    if not (pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type) or pa.types.is_null(arrow_type)):
        raise InputError(f"{what} is {arrow_type}, not text; pass --text_field naming a string column")


# ---------------------------------------------------------------------------------------
# Units
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextUnit:
    """A piece of one input that begins and ends on document boundaries: a byte range
    ``[start, end)`` of a txt/jsonl file, or a row range of a parquet row group
    (``group``) or of a dataset. ``forced_cut``: the unit starts inside a document
    that was longer than ``MAX_DOCUMENT_UNITS`` units."""

    path: str
    start: int
    end: int
    kind: str = "txt"
    group: int = 0  # parquet row group
    text_bytes: int = -1  # estimated text size for row ranges (progress and balancing)
    source: int = 0  # index into the job's source list
    forced_cut: bool = False

    @property
    def num_bytes(self) -> int:
        return self.end - self.start if self.text_bytes < 0 else self.text_bytes

    def location(self) -> list:
        return [self.source, self.start, self.end, self.group, self.forced_cut]


def plan_units(
    sources: Sequence[Source | Path | str], unit_bytes: int, options: ReadOptions = ReadOptions()
) -> list[TextUnit]:
    """Every source cut into units of about ``unit_bytes`` (plain paths are txt files)."""
    if unit_bytes <= 0:
        raise ValueError(f"unit_bytes must be positive, got {unit_bytes}")
    units: list[TextUnit] = []
    for i, source in enumerate(sources):
        if not isinstance(source, Source):
            source = Source("txt", str(source))
        planner = {"txt": _plan_text, "jsonl": _plan_jsonl, "parquet": _plan_parquet, "hf": _plan_hf}[source.kind]
        units.extend(planner(source, i, unit_bytes, options))
    return units


def plan_sha256(sources: Sequence[Source], units: Sequence[TextUnit], unit_bytes: int, options: ReadOptions) -> str:
    """Identity of a unit plan: machines that each take a part of the same plan must
    agree on it (checked when the parts are merged)."""
    spec = {"sources": [s.identity() for s in sources], "unit_bytes": unit_bytes,
            "options": [options.text_field, options.headings, options.on_bad_record],
            "units": [u.location() for u in units]}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _plan_text(source: Source, index: int, unit_bytes: int, options: ReadOptions) -> list[TextUnit]:
    """Cuts just after the first blank line at or past each nominal offset (just before
    the next article title with headings="articles"); a document that runs on for
    ``MAX_DOCUMENT_UNITS`` units is cut at a line end instead."""
    path, size = source.path, os.path.getsize(source.path)
    articles = options.headings == "articles"
    cuts, forced = [0], [False]
    with open(path, "rb") as f:
        target = unit_bytes
        while target < size:
            f.seek(target)
            pos = target + len(f.readline())  # finish the line we landed in
            limit = target + MAX_DOCUMENT_UNITS * unit_bytes
            forced_here = False
            while pos < size:
                line = f.readline()
                if articles and _TITLE.match(line.decode("utf-8", "replace")):
                    break  # cut before the title
                pos += len(line)
                if not articles and not line.strip():
                    break  # cut after the blank line
                if pos >= limit:
                    forced_here = True
                    break
            if pos >= size:
                break
            cuts.append(pos)
            forced.append(forced_here)
            target = pos + unit_bytes
    cuts.append(size)
    return [TextUnit(path, a, b, "txt", source=index, forced_cut=fc)
            for a, b, fc in zip(cuts, cuts[1:], forced) if b > a]


def _plan_jsonl(source: Source, index: int, unit_bytes: int, options: ReadOptions) -> list[TextUnit]:
    path, size = source.path, os.path.getsize(source.path)
    cuts = [0]
    with open(path, "rb") as f:
        target = unit_bytes
        while target < size:
            f.seek(target - 1)  # a line ending exactly at target-1 makes target a cut
            pos = target - 1 + len(f.readline())
            if pos >= size:
                break
            cuts.append(pos)
            target = pos + unit_bytes
    cuts.append(size)
    return [TextUnit(path, a, b, "jsonl", source=index) for a, b in zip(cuts, cuts[1:]) if b > a]


def _parquet_file(path: str):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a broken file
        raise InputError(f"--input {path}: not a readable parquet file ({type(e).__name__}: {e})") from e


def _plan_parquet(source: Source, index: int, unit_bytes: int, options: ReadOptions) -> list[TextUnit]:
    """Row ranges of each row group, sized from the column chunk's uncompressed size in
    the file's metadata: planning reads no data."""
    pf = _parquet_file(source.path)
    column = pf.schema_arrow.get_field_index(options.text_field)
    if column < 0:
        raise InputError(f"--text_field {options.text_field}: {source.path} has no such column")
    units = []
    for g in range(pf.metadata.num_row_groups):
        group = pf.metadata.row_group(g)
        rows, size = group.num_rows, group.column(column).total_uncompressed_size
        pieces = max(1, min(rows, math.ceil(size / unit_bytes)))
        bounds = [rows * k // pieces for k in range(pieces + 1)]
        units.extend(TextUnit(source.path, a, b, "parquet", group=g, text_bytes=size // pieces, source=index)
                     for a, b in zip(bounds, bounds[1:]) if b > a)
    return units


def _plan_hf(source: Source, index: int, unit_bytes: int, options: ReadOptions) -> list[TextUnit]:
    """Row ranges cut where the cumulative text size crosses a multiple of ``unit_bytes``
    (string lengths come from the Arrow offsets: no text is decoded)."""
    import pyarrow.compute as pc

    ds = open_hf_dataset(source)
    n = len(ds)
    if n == 0:
        return []
    lengths = pc.fill_null(pc.binary_length(ds.data.column(options.text_field)), 0)
    lengths = np.asarray(lengths.to_numpy(), dtype=np.int64)
    indices = getattr(ds, "_indices", None)  # a select()/shuffle() view: rows are re-ordered
    if indices is not None:
        lengths = lengths[np.asarray(indices.column(0).to_numpy(), dtype=np.int64)]
    cum = np.cumsum(lengths + 1)
    targets = np.arange(unit_bytes, int(cum[-1]), unit_bytes)
    ends = np.unique(np.minimum(np.searchsorted(cum, targets, side="left") + 1, n))
    bounds = [0, *[int(e) for e in ends if 0 < e < n], n]
    start_bytes = np.concatenate([[0], cum])
    return [TextUnit(source.path, a, b, "hf", text_bytes=int(start_bytes[b] - start_bytes[a]), source=index)
            for a, b in zip(bounds, bounds[1:]) if b > a]


# ---------------------------------------------------------------------------------------
# Reading a unit
# ---------------------------------------------------------------------------------------


def _decode(raw: bytes, stats: CorpusStats) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        stats.decode_errors += 1
        return raw.decode("utf-8", errors="replace")


def _keep_line(line: str, options: ReadOptions, stats: CorpusStats) -> bool:
    if options.headings != "keep" and _HEADING.match(line):
        stats.headings_dropped += 1
        return False
    return True


def read_documents(
    unit: TextUnit, stats: CorpusStats, options: ReadOptions = ReadOptions(), sources: Sequence[Source] = ()
) -> list[list[str]]:
    """The documents of a unit, each a list of non-blank lines (not yet sentences).

    A record-based document may come back empty (a whitespace or null text); it is
    counted as an empty document when it yields no tokens."""
    if unit.kind == "txt":
        return _read_text(unit, stats, options)
    if unit.kind == "jsonl":
        return [_record_lines(t, options, stats) for t in _read_jsonl(unit, stats, options)]
    if unit.kind == "parquet":
        texts = _read_parquet(unit, options)
    elif unit.kind == "hf":
        source = sources[unit.source] if sources else Source("hf", unit.path)
        texts = open_hf_dataset(source)[unit.start : unit.end][options.text_field]
    else:
        raise ValueError(f"unknown unit kind {unit.kind!r}")
    return [_record_lines(t, options, stats) for t in texts]


def _read_text(unit: TextUnit, stats: CorpusStats, options: ReadOptions) -> list[list[str]]:
    """Lines are decoded one by one so that invalid UTF-8 costs one counted line, not
    the file. Blank lines separate documents (article titles do with "articles")."""
    articles = options.headings == "articles"
    documents: list[list[str]] = []
    current: list[str] = []
    with open(unit.path, "rb") as f:
        f.seek(unit.start)
        remaining = unit.num_bytes
        while remaining > 0:
            raw = f.readline(remaining)
            if not raw:
                break
            remaining -= len(raw)
            line = _decode(raw, stats)
            if articles and _TITLE.match(line):
                stats.headings_dropped += 1
                if current:
                    documents.append(current)
                current = []
            elif line.strip():
                if _keep_line(line, options, stats):
                    current.append(line)
            elif current and not articles:
                documents.append(current)
                current = []
    if current:
        documents.append(current)
    return documents


def _record_lines(text: str | None, options: ReadOptions, stats: CorpusStats) -> list[str]:
    if not text:
        return []
    return [line for line in text.split("\n") if line.strip() and _keep_line(line, options, stats)]


def _line_number(path: str, offset: int) -> int:
    """1-based number of the line starting at byte ``offset`` (only on the error path)."""
    count = 1
    with open(path, "rb") as f:
        remaining = offset
        while remaining > 0:
            block = f.read(min(remaining, 1 << 24))
            if not block:
                break
            count += block.count(b"\n")
            remaining -= len(block)
    return count


def _parse_record(raw: bytes, field: str, stats: CorpusStats) -> tuple[str | None, str | None]:
    """``(text, None)`` for a good jsonl line (text may be None: a null field), else
    ``(None, what is wrong)``."""
    try:
        record = json.loads(_decode(raw, stats))
    except ValueError as e:
        return None, f"not JSON ({e})"
    if not isinstance(record, dict):
        return None, f"a JSON {type(record).__name__}, not an object"
    if field not in record:
        return None, f"no {field!r} field"
    text = record[field]
    if not isinstance(text, (str, type(None))):
        return None, f"{field!r} is a {type(text).__name__}, not a string"
    return text, None


def _read_jsonl(unit: TextUnit, stats: CorpusStats, options: ReadOptions) -> list[str | None]:
    with open(unit.path, "rb") as f:
        f.seek(unit.start)
        data = f.read(unit.num_bytes)
    texts: list[str | None] = []
    offset = 0
    for raw in data.split(b"\n"):
        if raw.strip():
            text, problem = _parse_record(raw, options.text_field, stats)
            if problem is None:
                texts.append(text)
            elif options.on_bad_record == "skip":
                stats.bad_records += 1
            else:
                line = _line_number(unit.path, unit.start + offset)
                raise InputError(f"{unit.path}:{line}: {problem}; fix the line, pass the right --text_field, "
                                 "or --on_bad_record skip")
        offset += len(raw) + 1
    return texts


# One parquet row group per worker is kept decoded: a row group is usually split into
# several units, and consecutive units tend to go to the same worker.
_PARQUET_CACHE: dict[str, Any] = {}


def _read_parquet(unit: TextUnit, options: ReadOptions) -> list[str | None]:
    key = (unit.path, unit.group, options.text_field)
    if _PARQUET_CACHE.get("key") != key:
        table = _parquet_file(unit.path).read_row_group(unit.group, columns=[options.text_field])
        _PARQUET_CACHE.update(key=key, column=table.column(0))
    return _PARQUET_CACHE["column"].slice(unit.start, unit.end - unit.start).to_pylist()
