"""Shard format, manifest, and the memory-mapped reader of pretraining samples.

Layout of a data directory written by ``data_prep/create_shards.py``::

    manifest.json                       written last: its presence means "complete"
    shard-00000.input_ids.npy           [N, L] uint16 (int32 if vocab > 65536), 0-padded;
                                        masked (static) or the original text (dynamic)
    shard-00000.lengths.npy             [N] int16   real tokens incl. [CLS]/[SEP]
    shard-00000.segment_b_start.npy     [N] int16   first position of segment B (token type 1)
    shard-00000.masked_positions.npy    [N, P] int16 ascending, 0-padded        (static only)
    shard-00000.masked_ids.npy          [N, P] uint16/int32 original tokens     (static only)
    shard-00000.masked_count.npy        [N] int16   real entries of the two     (static only)
    shard-00000.nsp.npy                 [N] int8    1 = B is random, 0 = actual next
    shard-00001.* ...

Plain ``.npy`` files so that ``np.load(mmap_mode="r")`` gives O(1) random access with
nothing scanned at start; token types, attention mask and MLM weights are derived from
the small per-row integers, which keeps a seq-128 sample at about 330 bytes (static) or
262 bytes (dynamic). All shards of one preparation run hold ``samples_per_shard``
samples except the last; a set merged from several machines' parts has one short shard
per part (the reader does not care: it locates samples through the shard offsets).

``masking`` in the manifest says which: "static" sets carry the masking drawn at
preparation; "dynamic" sets carry the rule (``masked_lm_prob``,
``max_predictions_per_seq``, ``whole_word_mask``, ``special_token_ids``, ``mask_seed``,
``continuation_ids``) and the reader draws it per epoch (``lbllm.data.masking``).

The manifest records, per file, its size, dtype, shape and SHA-256: sizes are checked on
every open (one stat per file, catches truncation), .npy headers when a shard is first
mapped (catches a file swapped for another), checksums on request.
File names are relative to the data directory.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from lbllm.data.masking import DYNAMIC_STREAM, MaskingConfig, mask_tokens, row_keys
from lbllm.utils import UserError

# torch is imported where tensors are made, not here: data_prep scripts import this
# module for the writer and should not pay torch's start-up time.

# 2: adds "masking" (static | dynamic) and dynamic sets without the masked_* files.
# Version 1 sets (always static) are still read.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST_NAME = "manifest.json"
# create_shards.py --heldout_fraction writes the held-out set (a complete shard set of
# its own, static masks) into this subdirectory of the training set.
HELDOUT_DIR = "heldout"
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
_MASK_FIELDS = ("masked_positions", "masked_ids", "masked_count")


def shard_fields(masking: str) -> tuple[str, ...]:
    """The files of a shard: dynamic sets store no masking."""
    return tuple(f for f in FIELDS if masking == "static" or f not in _MASK_FIELDS)
_PREPARE_HINT = "prepare it with data_prep/create_shards.py"


class DataError(UserError):
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
    returns the manifest's shard records. Only ``fields`` are written."""

    def __init__(self, directory: Path, samples_per_shard: int, id_dtype: np.dtype,
                 fields: Sequence[str] = tuple(FIELDS)):
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard {samples_per_shard}: must be >= 1")
        self.fields = tuple(fields)
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
        merged = {name: np.concatenate([p[name] for p in self._pending]) for name in self.fields}
        head = {name: a[:rows] for name, a in merged.items()}
        rest = {name: a[rows:] for name, a in merged.items()}
        self._pending = [rest] if rest["lengths"].shape[0] else []
        self._pending_rows -= rows
        self._write(head)

    def _write(self, arrays: Mapping[str, np.ndarray]) -> None:
        shard = len(self.records)
        files: dict[str, dict[str, Any]] = {}
        for name in self.fields:
            rank, dtype = FIELDS[name]
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
    if version not in READABLE_VERSIONS:
        raise DataError(
            f"{path}: format_version {version!r}, this reader reads {READABLE_VERSIONS}; {_PREPARE_HINT} again"
        )
    for key in ("num_samples", "seq_length", "max_predictions_per_seq", "tokenizer_fingerprint", "shards"):
        if key not in manifest:
            raise DataError(f"{path}: manifest has no {key!r}; {_PREPARE_HINT} again")
    manifest.setdefault("masking", "static")
    if manifest["masking"] not in ("static", "dynamic"):
        raise DataError(f"{path}: masking {manifest['masking']!r} is neither 'static' nor 'dynamic'")
    if manifest["masking"] == "dynamic":
        for key in ("masked_lm_prob", "special_token_ids", "special_ids", "vocab_size", "mask_seed"):
            if key not in manifest:
                raise DataError(f"{path}: a dynamic-masking manifest needs {key!r}; {_PREPARE_HINT} again")
    return manifest


def masking_config_from_manifest(manifest: Mapping[str, Any]) -> MaskingConfig:
    """The masking rule a dynamic set was prepared for."""
    return MaskingConfig(
        max_predictions=int(manifest["max_predictions_per_seq"]),
        masked_lm_prob=float(manifest["masked_lm_prob"]),
        mask_id=int(manifest["special_ids"]["mask"]),
        special_ids=tuple(int(i) for i in manifest["special_token_ids"]),
        vocab_size=int(manifest["vocab_size"]),
        whole_word_mask=bool(manifest.get("whole_word_mask", False)),
        continuation_ids=tuple(int(i) for i in manifest.get("continuation_ids", ())),
    )


def check_npy_header(path: Path, info: Mapping[str, Any]) -> int:
    """Raise DataError unless the .npy header of ``path`` describes the manifest record
    ``info`` (dtype and shape): a few hundred bytes read. Returns the data's offset."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            fmt = np.lib.format
            read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            offset = f.tell()
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a valid .npy file ({e}); {_PREPARE_HINT} again") from e
    if list(shape) != info["shape"] or dtype.name != info["dtype"] or fortran:
        raise DataError(
            f"{path}: {dtype.name}{list(shape)}, manifest says {info['dtype']}{info['shape']}; {_PREPARE_HINT} again"
        )
    return offset


@dataclass
class _Shard:
    start: int  # global index of its first sample
    num_samples: int
    files: dict[str, dict[str, Any]]


class PretrainingDataset:
    """Random access to the samples of a shard directory, in batches.

    Nothing is scanned or loaded at construction beyond the manifest and a ``stat`` of
    every file; shards are memory-mapped (headers checked) on first use. ``get_batch``
    gathers a batch with one fancy index per shard touched and derives the masks
    vectorized, so a batch costs O(batch) work regardless of the dataset size. Works as
    a map-style dataset (no torch base class needed): ``dataset[i]`` is one sample,
    ``dataset[list_of_indices]`` a batch (use ``DataLoader(dataset,
    sampler=GlobalBatchSampler(...), batch_size=None)``).

    Dynamic-masking sets are masked in ``get_batch`` as a pure function of
    ``(mask_seed, epoch, global sample index)``; ``mask_seed`` defaults to the
    manifest's (the preparation seed). Static sets return their stored masking and
    ignore ``epoch``."""

    def __init__(
        self,
        data_dir: str | os.PathLike,
        tokenizer_dir: str | os.PathLike | None = None,
        max_seq_length: int | None = None,
        verify_checksums: bool = False,
        mask_seed: int | None = None,
    ):
        self.data_dir = Path(data_dir)
        self.manifest = read_manifest(self.data_dir)
        m = self.manifest
        self.seq_length = int(m["seq_length"])
        self.max_predictions = int(m["max_predictions_per_seq"])
        self.num_samples = int(m["num_samples"])
        self.masking = str(m["masking"])
        self.fields = shard_fields(self.masking)
        self.epoch = 0  # the default of get_batch(epoch=None); see set_epoch
        if self.masking == "dynamic":
            self.mask_seed = int(m["mask_seed"] if mask_seed is None else mask_seed)
            if self.mask_seed < 0:
                raise ValueError(f"mask_seed {self.mask_seed}: must be >= 0")
            self._mask_cfg: MaskingConfig | None = masking_config_from_manifest(m)
        else:
            self.mask_seed = None
            self._mask_cfg = None
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
        """Every file exists with the manifest's size (one ``stat`` each: catches missing
        and truncated files at start, in O(files) metadata reads and no data reads);
        SHA-256 on request. The .npy headers are checked when a shard is first mapped,
        so that a 100 GB set with tens of thousands of files still opens in seconds."""
        for shard in self._shards:
            for name in self.fields:
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
                if verify_checksums and sha256_file(path) != info["sha256"]:
                    raise DataError(f"{path}: SHA-256 does not match the manifest (corrupt); {_PREPARE_HINT} again")

    @staticmethod
    def _check_header(path: Path, info: dict[str, Any]) -> int:
        """The .npy header must describe the manifest's dtype and shape (a few hundred
        bytes read per file; catches a file swapped for another of the same size).
        Returns where the data starts."""
        return check_npy_header(path, info)

    # Memory maps are per process: drop them when pickled (DataLoader workers).
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_open"] = [None] * len(self._shards)
        return state

    def _arrays(self, k: int) -> dict[str, np.ndarray]:
        arrays = self._open[k]
        if arrays is None:
            arrays = {}
            for name in self.fields:
                info = self._shards[k].files[name]
                path = self.data_dir / info["file"]
                offset = self._check_header(path, info)
                try:
                    arrays[name] = np.memmap(path, dtype=np.dtype(info["dtype"]), mode="r", offset=offset,
                                             shape=tuple(info["shape"]))
                except (OSError, ValueError) as e:
                    raise DataError(f"{path}: unreadable shard file ({e}); {_PREPARE_HINT} again") from e
            self._open[k] = arrays
        return arrays

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        """The epoch ``get_batch`` and ``dataset[i]`` use when not given one (for a
        DataLoader, which cannot pass it); the trainer passes it explicitly."""
        self.epoch = int(epoch)

    def get_batch(
        self, indices: Sequence[int] | np.ndarray | "torch.Tensor", epoch: int | None = None
    ) -> dict[str, "torch.Tensor"]:
        """Samples ``indices`` as model inputs (BERT names, Hugging Face conventions).

        ``epoch`` (default: ``self.epoch``) selects the dynamic masking; a sample's
        masking depends on (mask_seed, epoch, its index) only."""
        import torch

        if isinstance(indices, torch.Tensor):
            indices = indices.cpu().numpy()
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = self.num_samples
        if idx.size and (idx.min() < -n or idx.max() >= n):
            bad = idx[(idx < -n) | (idx >= n)][0]
            raise IndexError(f"sample index {bad} out of range for {n} samples")
        idx = np.where(idx < 0, idx + n, idx)
        rows = self._gather(idx)
        if self._mask_cfg is not None:
            epoch = self.epoch if epoch is None else int(epoch)
            if epoch < 0:
                raise ValueError(f"epoch {epoch}: must be >= 0")
            keys = row_keys((self.mask_seed, DYNAMIC_STREAM, epoch), idx)
            m = mask_tokens(rows["input_ids"], rows["lengths"], self._mask_cfg, keys)
            rows.update(input_ids=m.input_ids, masked_positions=m.positions, masked_ids=m.ids, masked_count=m.count)
        length, p = self.seq_length, self.max_predictions
        pos = np.arange(length)[None, :]
        attention = pos < rows["lengths"][:, None]
        token_type = (pos >= rows["segment_b_start"][:, None]) & attention
        weights = np.arange(p)[None, :] < rows["masked_count"][:, None]
        return {
            "input_ids": torch.from_numpy(rows["input_ids"]),
            "token_type_ids": torch.from_numpy(token_type.astype(np.int64)),
            "attention_mask": torch.from_numpy(attention.astype(np.int64)),
            "masked_lm_positions": torch.from_numpy(rows["masked_positions"]),
            "masked_lm_ids": torch.from_numpy(rows["masked_ids"]),
            "masked_lm_weights": torch.from_numpy(weights.astype(np.float32)),
            "next_sentence_labels": torch.from_numpy(rows["nsp"]),
        }

    def _gather(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        """The stored fields of samples ``idx`` as int64 arrays: one fancy index per
        shard touched."""
        b = idx.size
        width = {"input_ids": self.seq_length, "masked_positions": self.max_predictions,
                 "masked_ids": self.max_predictions}
        out = {name: np.zeros((b, width[name]) if name in width else b, dtype=np.int64) for name in self.fields}
        shard_of = np.searchsorted(self._starts, idx, side="right") - 1
        for k in np.unique(shard_of):
            sel = np.flatnonzero(shard_of == k)
            local = idx[sel] - self._starts[k]
            arrays = self._arrays(int(k))
            for name in self.fields:
                out[name][sel] = arrays[name][local]
        return out

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)) or (getattr(index, "ndim", None) == 0):
            return {k: v[0] for k, v in self.get_batch([int(index)]).items()}
        return self.get_batch(index)

    def __repr__(self) -> str:
        return (
            f"PretrainingDataset({str(self.data_dir)!r}: {self.num_samples} samples, seq {self.seq_length}, "
            f"{self.max_predictions} predictions, {self.masking} masking, {len(self._shards)} shards)"
        )
