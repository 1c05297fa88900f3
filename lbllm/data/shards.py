"""The memory-mapped reader of pretraining samples (the format: ``lbllm/data/format.py``)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from lbllm.data.format import (
    _PREPARE_HINT,
    MANIFEST_NAME,
    DataError,
    Manifest,
    check_npy_header,
    sha256_file,
    shard_fields,
    tokenizer_fingerprint,
)
from lbllm.data.masking import DYNAMIC_STREAM, MaskingConfig, mask_tokens, row_keys

# torch is imported where tensors are made, not here: data_prep scripts import this
# module and should not pay torch's start-up time.
if TYPE_CHECKING:
    import torch

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
        self.manifest = m = Manifest.read(self.data_dir)
        self.seq_length = int(m.seq_length)
        self.max_predictions = int(m.max_predictions_per_seq)
        self.num_samples = int(m.num_samples)
        self.masking = str(m.masking)
        self.fields = shard_fields(self.masking)
        self.epoch = 0  # the default of get_batch(epoch=None); see set_epoch
        if self.masking == "dynamic":
            self.mask_seed = int(m.mask_seed if mask_seed is None else mask_seed)
            if self.mask_seed < 0:
                raise ValueError(f"mask_seed {self.mask_seed}: must be >= 0")
            self._mask_cfg: MaskingConfig | None = m.masking_config()
        else:
            self.mask_seed = None
            self._mask_cfg = None
        if tokenizer_dir is not None:
            found = tokenizer_fingerprint(tokenizer_dir)
            if found != m.tokenizer_fingerprint:
                raise DataError(
                    f"tokenizer {tokenizer_dir} (fingerprint {found[:12]}) is not the one {self.data_dir} was made "
                    f"with (fingerprint {m.tokenizer_fingerprint[:12]}); pass the matching tokenizer or "
                    "re-create the shards"
                )
        if max_seq_length is not None and int(max_seq_length) != self.seq_length:
            raise DataError(
                f"{self.data_dir} holds sequences of length {self.seq_length}, but {max_seq_length} was asked for; "
                f"{_PREPARE_HINT} with --max_seq_length {max_seq_length}"
            )
        self._shards: list[_Shard] = []
        start = 0
        for record in m.shards:
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
