"""The shard format: file layout, the typed manifest, fingerprints and checks.


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
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from lbllm.data.masking import MaskingConfig
from lbllm.utils import UserError, write_json_atomic

__all__ = ["FORMAT_VERSION", "READABLE_VERSIONS", "MANIFEST_NAME", "HELDOUT_DIR", "FIELDS", "DataError", "Manifest",
           "check_npy_header", "sha256_file", "shard_fields", "shard_file_name", "tokenizer_fingerprint"]

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




_REQUIRED = ("num_samples", "seq_length", "max_predictions_per_seq", "tokenizer_fingerprint", "shards")
_DYNAMIC_REQUIRED = ("masked_lm_prob", "special_token_ids", "special_ids", "vocab_size", "mask_seed")


@dataclass(kw_only=True)
class Manifest:
    """``manifest.json`` of a shard set, the one description the writer
    (``create_shards.py``), the merger (``merge_shards.py``) and the reader share.

    The JSON is these fields by name (``None`` fields are left out) plus ``extra``, keys
    this version does not know, kept so that a newer writer's manifest survives a merge.
    ``read`` checks what the reader needs (the version, the sample geometry, the shard
    list, and for dynamic masking its rule) and names the file and key when it is missing.
    """

    format_version: int = FORMAT_VERSION
    num_samples: int
    # The sample rule (merge_shards.py: SAMPLE_KEYS must agree between merged sets).
    seq_length: int
    max_predictions_per_seq: int
    masked_lm_prob: float | None = None
    short_seq_prob: float | None = None
    random_next_prob: float | None = None
    whole_word_mask: bool | None = None
    dupe_factor: int | None = None
    masking: str = "static"
    seed: int | None = None
    mask_seed: int | None = None
    tokenizer_fingerprint: str
    vocab_size: int | None = None
    special_ids: dict[str, int] | None = None  # pad, cls, sep, mask
    special_token_ids: list[int] | None = None
    continuation_ids: list[int] | None = None  # dynamic whole-word masking only
    # How it was made.
    samples_per_shard: int | None = None
    unit_mb: float | None = None
    nsp_label: str | None = None
    read_options: dict[str, Any] | None = None
    inputs: list[dict[str, Any]] | None = None
    plan: dict[str, Any] | None = None  # {"units", "sha256"}: parts of one plan agree on it
    shards: list[dict[str, Any]]  # [{"num_samples": n, "files": {field: {file, dtype, shape, bytes, sha256}}}]
    stats: dict[str, Any] = field(default_factory=dict)
    heldout_fraction: float | None = None
    part: dict[str, Any] | None = None  # {"index", "num_parts", "units": [first, end]}
    heldout: dict[str, Any] | None = None  # {"dir", "num_samples", "documents"}: the held-out set inside
    heldout_of: str | None = None  # set in a held-out set's own manifest: its training set
    merged_from: list[dict[str, Any]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {**{k: v for k, v in out.items() if v is not None}, **self.extra}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str | os.PathLike = "manifest") -> "Manifest":
        if not isinstance(data, Mapping):
            raise DataError(f"{where}: not a JSON object; {_PREPARE_HINT} again")
        version = data.get("format_version")
        if version not in READABLE_VERSIONS:
            raise DataError(
                f"{where}: format_version {version!r}, this reader reads {READABLE_VERSIONS}; {_PREPARE_HINT} again")
        for key in _REQUIRED:
            if key not in data:
                raise DataError(f"{where}: manifest has no {key!r}; {_PREPARE_HINT} again")
        known = {f.name for f in fields(cls)} - {"extra"}
        m = cls(**{k: v for k, v in data.items() if k in known},
                extra={k: v for k, v in data.items() if k not in known})
        if m.masking not in ("static", "dynamic"):
            raise DataError(f"{where}: masking {m.masking!r} is neither 'static' nor 'dynamic'")
        if m.masking == "dynamic":
            for key in _DYNAMIC_REQUIRED:
                if getattr(m, key) is None:
                    raise DataError(f"{where}: a dynamic-masking manifest needs {key!r}; {_PREPARE_HINT} again")
        return m

    @classmethod
    def read(cls, data_dir: str | os.PathLike) -> "Manifest":
        """The manifest of the shard set in ``data_dir`` (DataError if there is none)."""
        data_dir = Path(data_dir)
        path = data_dir / MANIFEST_NAME
        if not data_dir.is_dir():
            raise DataError(f"data dir {data_dir}: not found ({_PREPARE_HINT})")
        if not path.is_file():
            raise DataError(f"{path}: no manifest, so no complete shard set there ({_PREPARE_HINT})")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: unreadable manifest ({e}); {_PREPARE_HINT} again") from e
        return cls.from_json(data, path)

    def write(self, directory: str | os.PathLike) -> None:
        """Write ``directory/manifest.json`` atomically (last: it marks the set complete)."""
        write_json_atomic(Path(directory) / MANIFEST_NAME, self.to_json())

    def masking_config(self) -> MaskingConfig:
        """The masking rule a dynamic set was prepared for."""
        return MaskingConfig(
            max_predictions=int(self.max_predictions_per_seq),
            masked_lm_prob=float(self.masked_lm_prob),
            mask_id=int(self.special_ids["mask"]),
            special_ids=tuple(int(i) for i in self.special_token_ids),
            vocab_size=int(self.vocab_size),
            whole_word_mask=bool(self.whole_word_mask),
            continuation_ids=tuple(int(i) for i in self.continuation_ids or ()),
        )


# Tokenizer fingerprint


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


def sha256_file(path: Path, block: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def shard_file_name(shard: int, name: str) -> str:
    return f"shard-{shard:05d}.{name}.npy"


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
