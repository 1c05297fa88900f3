"""Writing shard sets: the arrays of ``lbllm.prep.samples`` into the files of the format
(``lbllm/data/format.py``); ``data_prep/create_shards.py`` adds the manifest."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from lbllm.data.format import FIELDS, sha256_file, shard_file_name

__all__ = ["ShardWriter"]


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
