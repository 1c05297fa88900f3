"""Shard format, manifest, and the memory-mapped reader of pretraining samples.

Layout of a data directory written by ``data_prep/create_shards.py``::

    manifest.json                       written last: its presence means "complete"
    shard-00000.input_ids.npy           [N, L] uint16 (int32 if vocab > 65536), masked, 0-padded
    shard-00000.lengths.npy             [N] int16   real tokens incl. [CLS]/[SEP]
    shard-00000.segment_b_start.npy     [N] int16   first position of segment B (token type 1)
    shard-00000.masked_positions.npy    [N, P] int16 ascending, 0-padded
    shard-00000.masked_ids.npy          [N, P] uint16/int32 original tokens, 0-padded
    shard-00000.masked_count.npy        [N] int16   real entries of the two above
    shard-00000.nsp.npy                 [N] int8    1 = B is random, 0 = actual next
    shard-00001.* ...

Plain ``.npy`` files so that ``np.load(mmap_mode="r")`` gives O(1) random access with
nothing scanned at start; token types, attention mask and MLM weights are derived from
the small per-row integers, which keeps a seq-128 sample at about 330 bytes. All shards
hold ``samples_per_shard`` samples except the last.

The manifest records, per file, its size, dtype, shape and SHA-256: sizes are checked
on every open (cheap, catches truncation), checksums on request.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

# torch is imported where tensors are made, not here: data_prep scripts import this
# module for the writer and should not pay torch's start-up time.

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
# Field name -> (rank, fixed dtype or None for the token-id dtype). Order = file order.
FIELDS: dict[str, tuple[int, str | None]] = {
    "input_ids": (2, None),
    "lengths": (1, "int16"),
    "segment_b_start": (1, "int16"),
    "masked_positions": (2, "int16"),
    "masked_ids": (2, None),
    "masked_count": (1, "int16"),
    "nsp": (1, "int8"),
}
_PREPARE_HINT = "prepare it with data_prep/create_shards.py"


class DataError(ValueError):
    """Pretraining data that cannot be used as it is (missing, corrupt, mismatched)."""


# ---------------------------------------------------------------------------------------
# Tokenizer fingerprint
# ---------------------------------------------------------------------------------------


def _vocab_tokens(tokenizer_dir: Path) -> list[str]:
    vocab_txt = tokenizer_dir / "vocab.txt"
    if vocab_txt.is_file():
        return vocab_txt.read_text(encoding="utf-8").splitlines()
    tokenizer_json = tokenizer_dir / "tokenizer.json"
    if tokenizer_json.is_file():
        spec = json.loads(tokenizer_json.read_text(encoding="utf-8"))
        vocab = dict(spec["model"]["vocab"])
        for added in spec.get("added_tokens", []):
            vocab.setdefault(added["content"], added["id"])
        return [token for token, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    raise DataError(
        f"tokenizer {tokenizer_dir}: no vocab.txt or tokenizer.json (build one with data_prep/build_tokenizer.py)"
    )


def tokenizer_fingerprint(tokenizer_dir: str | os.PathLike) -> str:
    """SHA-256 of the vocabulary in id order (one token per line): two tokenizers with
    the same fingerprint map text to the same ids, so shards stay valid with either."""
    tokens = _vocab_tokens(Path(tokenizer_dir))
    return hashlib.sha256(("\n".join(tokens) + "\n").encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------


def sha256_file(path: Path, block: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def shard_file_name(shard: int, field: str) -> str:
    return f"shard-{shard:05d}.{field}.npy"


class ShardWriter:
    """Buffers sample arrays and writes fixed-size shards into ``directory``.

    ``add`` takes arrays keyed like ``FIELDS`` with any number of rows; every shard but
    the last gets exactly ``samples_per_shard`` rows. ``close`` flushes the rest and
    returns the manifest's shard records."""

    def __init__(self, directory: Path, samples_per_shard: int, id_dtype: np.dtype):
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard {samples_per_shard}: must be >= 1")
        self.directory = Path(directory)
        self.samples_per_shard = samples_per_shard
        self.id_dtype = np.dtype(id_dtype)
        self.records: list[dict[str, Any]] = []
        self._pending: list[Mapping[str, np.ndarray]] = []
        self._pending_rows = 0

    def add(self, arrays: Mapping[str, np.ndarray]) -> None:
        rows = int(arrays["lengths"].shape[0])
        if rows == 0:
            return
        self._pending.append(arrays)
        self._pending_rows += rows
        while self._pending_rows >= self.samples_per_shard:
            self._flush(self.samples_per_shard)

    def close(self) -> list[dict[str, Any]]:
        if self._pending_rows:
            self._flush(self._pending_rows)
        return self.records

    def _flush(self, rows: int) -> None:
        merged = {name: np.concatenate([p[name] for p in self._pending]) for name in FIELDS}
        head = {name: a[:rows] for name, a in merged.items()}
        rest = {name: a[rows:] for name, a in merged.items()}
        self._pending = [rest] if rest["lengths"].shape[0] else []
        self._pending_rows -= rows
        self._write(head)

    def _write(self, arrays: Mapping[str, np.ndarray]) -> None:
        shard = len(self.records)
        files: dict[str, dict[str, Any]] = {}
        for name, (rank, dtype) in FIELDS.items():
            a = np.ascontiguousarray(arrays[name], dtype=dtype or self.id_dtype)
            assert a.ndim == rank, (name, a.shape)
            path = self.directory / shard_file_name(shard, name)
            np.save(path, a, allow_pickle=False)
            files[name] = {
                "file": path.name,
                "dtype": a.dtype.name,
                "shape": list(a.shape),
                "bytes": path.stat().st_size,
                "sha256": sha256_file(path),
            }
        self.records.append({"num_samples": int(arrays["lengths"].shape[0]), "files": files})


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON next to ``path`` and rename it into place (never a half file)."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def make_temp_dir(out_dir: Path) -> Path:
    """An empty ``OUT.tmp-XXXX`` next to ``out_dir`` (same file system, so the final
    rename is atomic), with the permissions a plain ``mkdir`` would give."""
    out_dir = Path(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out_dir.name}.tmp-", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    return tmp


def publish_directory(tmp_dir: Path, out_dir: Path) -> None:
    """Move a fully written ``tmp_dir`` to ``out_dir``, replacing what was there.

    A directory cannot be renamed over a non-empty one, so the old output is first
    renamed aside, then the new one into place, then the old one deleted: at every
    instant ``out_dir`` is either the old complete set, absent, or the new complete set."""
    tmp_dir, out_dir = Path(tmp_dir), Path(out_dir)
    if out_dir.exists():
        old = out_dir.with_name(f"{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(out_dir, old)
        os.replace(tmp_dir, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp_dir, out_dir)


# ---------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------


def read_manifest(data_dir: str | os.PathLike) -> dict[str, Any]:
    data_dir = Path(data_dir)
    path = data_dir / MANIFEST_NAME
    if not data_dir.is_dir():
        raise DataError(f"data dir {data_dir}: not found ({_PREPARE_HINT})")
    if not path.is_file():
        raise DataError(f"{path}: no manifest, so no complete shard set there ({_PREPARE_HINT})")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable manifest ({e}); {_PREPARE_HINT} again") from e
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION:
        raise DataError(f"{path}: format_version {version!r}, this reader needs {FORMAT_VERSION}; {_PREPARE_HINT} again")
    for key in ("num_samples", "seq_length", "max_predictions_per_seq", "tokenizer_fingerprint", "shards"):
        if key not in manifest:
            raise DataError(f"{path}: manifest has no {key!r}; {_PREPARE_HINT} again")
    return manifest


@dataclass
class _Shard:
    start: int  # global index of its first sample
    num_samples: int
    files: dict[str, dict[str, Any]]


class PretrainingDataset:
    """Random access to the samples of a shard directory, in batches.

    Nothing is scanned or loaded at construction beyond the manifest and a ``stat`` of
    every file; shards are memory-mapped on first use. ``get_batch`` gathers a batch
    with one fancy index per shard touched and derives the masks vectorized, so a batch
    costs O(batch) work regardless of the dataset size. Works as a map-style dataset
    (no torch base class needed): ``dataset[i]`` is one sample, ``dataset[list_of_indices]`` a batch (use
    ``DataLoader(dataset, sampler=GlobalBatchSampler(...), batch_size=None)``)."""

    def __init__(
        self,
        data_dir: str | os.PathLike,
        tokenizer_dir: str | os.PathLike | None = None,
        max_seq_length: int | None = None,
        verify_checksums: bool = False,
    ):
        self.data_dir = Path(data_dir)
        self.manifest = read_manifest(self.data_dir)
        m = self.manifest
        self.seq_length = int(m["seq_length"])
        self.max_predictions = int(m["max_predictions_per_seq"])
        self.num_samples = int(m["num_samples"])
        if tokenizer_dir is not None:
            found = tokenizer_fingerprint(tokenizer_dir)
            if found != m["tokenizer_fingerprint"]:
                raise DataError(
                    f"tokenizer {tokenizer_dir} (fingerprint {found[:12]}) is not the one {self.data_dir} was made "
                    f"with (fingerprint {m['tokenizer_fingerprint'][:12]}); pass the matching tokenizer or "
                    "re-create the shards"
                )
        if max_seq_length is not None and int(max_seq_length) != self.seq_length:
            raise DataError(
                f"{self.data_dir} holds sequences of length {self.seq_length}, but {max_seq_length} was asked for; "
                f"{_PREPARE_HINT} with --max_seq_length {max_seq_length}"
            )
        self._shards: list[_Shard] = []
        start = 0
        for record in m["shards"]:
            self._shards.append(_Shard(start, int(record["num_samples"]), record["files"]))
            start += int(record["num_samples"])
        if start != self.num_samples:
            raise DataError(
                f"{self.data_dir / MANIFEST_NAME}: shards hold {start} samples, manifest says {self.num_samples}"
            )
        self._starts = np.array([s.start for s in self._shards], dtype=np.int64)
        self._check_files(verify_checksums)
        self._open: list[dict[str, np.ndarray] | None] = [None] * len(self._shards)

    def _check_files(self, verify_checksums: bool) -> None:
        for shard in self._shards:
            for name in FIELDS:
                info = shard.files.get(name)
                if info is None:
                    raise DataError(f"{self.data_dir / MANIFEST_NAME}: a shard lists no {name!r} file")
                path = self.data_dir / info["file"]
                if not path.is_file():
                    raise DataError(f"{path}: missing shard file; {_PREPARE_HINT} again")
                size = path.stat().st_size
                if size != info["bytes"]:
                    raise DataError(
                        f"{path}: {size} bytes, manifest says {info['bytes']} (truncated or modified); "
                        f"{_PREPARE_HINT} again"
                    )
                self._check_header(path, info)
                if verify_checksums and sha256_file(path) != info["sha256"]:
                    raise DataError(f"{path}: SHA-256 does not match the manifest (corrupt); {_PREPARE_HINT} again")

    @staticmethod
    def _check_header(path: Path, info: dict[str, Any]) -> None:
        """The .npy header must describe the manifest's dtype and shape (a few hundred
        bytes read per file; catches a file swapped for another of the same size)."""
        try:
            with open(path, "rb") as f:
                version = np.lib.format.read_magic(f)
                fmt = np.lib.format
                read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
                shape, fortran, dtype = read_header(f)
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: not a valid .npy file ({e}); {_PREPARE_HINT} again") from e
        if list(shape) != info["shape"] or dtype.name != info["dtype"] or fortran:
            raise DataError(
                f"{path}: {dtype.name}{list(shape)}, manifest says {info['dtype']}{info['shape']}; {_PREPARE_HINT} again"
            )

    # Memory maps are per process: drop them when pickled (DataLoader workers).
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_open"] = [None] * len(self._shards)
        return state

    def _arrays(self, k: int) -> dict[str, np.ndarray]:
        arrays = self._open[k]
        if arrays is None:
            arrays = {}
            for name, info in self._shards[k].files.items():
                path = self.data_dir / info["file"]
                try:
                    a = np.load(path, mmap_mode="r", allow_pickle=False)
                except (OSError, ValueError) as e:
                    raise DataError(f"{path}: unreadable shard file ({e}); {_PREPARE_HINT} again") from e
                if list(a.shape) != info["shape"] or a.dtype.name != info["dtype"]:
                    raise DataError(
                        f"{path}: {a.dtype.name}{list(a.shape)}, manifest says {info['dtype']}{info['shape']}; "
                        f"{_PREPARE_HINT} again"
                    )
                arrays[name] = a
            self._open[k] = arrays
        return arrays

    def __len__(self) -> int:
        return self.num_samples

    def get_batch(self, indices: Sequence[int] | np.ndarray | "torch.Tensor") -> dict[str, "torch.Tensor"]:
        """Samples ``indices`` as model inputs (BERT names, Hugging Face conventions)."""
        import torch

        if isinstance(indices, torch.Tensor):
            indices = indices.cpu().numpy()
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = self.num_samples
        if idx.size and (idx.min() < -n or idx.max() >= n):
            bad = idx[(idx < -n) | (idx >= n)][0]
            raise IndexError(f"sample index {bad} out of range for {n} samples")
        idx = np.where(idx < 0, idx + n, idx)
        b, length, p = idx.size, self.seq_length, self.max_predictions
        input_ids = np.zeros((b, length), dtype=np.int64)
        lengths = np.zeros(b, dtype=np.int64)
        b_start = np.zeros(b, dtype=np.int64)
        positions = np.zeros((b, p), dtype=np.int64)
        ids = np.zeros((b, p), dtype=np.int64)
        count = np.zeros(b, dtype=np.int64)
        nsp = np.zeros(b, dtype=np.int64)
        shard_of = np.searchsorted(self._starts, idx, side="right") - 1
        for k in np.unique(shard_of):
            rows = np.flatnonzero(shard_of == k)
            local = idx[rows] - self._starts[k]
            a = self._arrays(int(k))
            input_ids[rows] = a["input_ids"][local]
            lengths[rows] = a["lengths"][local]
            b_start[rows] = a["segment_b_start"][local]
            positions[rows] = a["masked_positions"][local]
            ids[rows] = a["masked_ids"][local]
            count[rows] = a["masked_count"][local]
            nsp[rows] = a["nsp"][local]
        pos = np.arange(length)[None, :]
        attention = pos < lengths[:, None]
        token_type = (pos >= b_start[:, None]) & attention
        weights = np.arange(p)[None, :] < count[:, None]
        return {
            "input_ids": torch.from_numpy(input_ids),
            "token_type_ids": torch.from_numpy(token_type.astype(np.int64)),
            "attention_mask": torch.from_numpy(attention.astype(np.int64)),
            "masked_lm_positions": torch.from_numpy(positions),
            "masked_lm_ids": torch.from_numpy(ids),
            "masked_lm_weights": torch.from_numpy(weights.astype(np.float32)),
            "next_sentence_labels": torch.from_numpy(nsp),
        }

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)) or (getattr(index, "ndim", None) == 0):
            return {k: v[0] for k, v in self.get_batch([int(index)]).items()}
        return self.get_batch(index)

    def __repr__(self) -> str:
        return (
            f"PretrainingDataset({str(self.data_dir)!r}: {self.num_samples} samples, seq {self.seq_length}, "
            f"{self.max_predictions} predictions, {len(self._shards)} shards)"
        )
