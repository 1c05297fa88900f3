"""Joining shard sets into one: the work behind ``data_prep/merge_shards.py``,
which documents the rules."""
from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

from lbllm.data.format import (HELDOUT_DIR, MANIFEST_NAME, DataError, Manifest, check_npy_header, sha256_file,
                               shard_file_name)
from lbllm.utils import UserError, make_temp_dir, publish_directory

# What defines a sample: every set being merged must agree.
SAMPLE_KEYS = (
    "format_version", "seq_length", "max_predictions_per_seq", "masked_lm_prob", "whole_word_mask", "masking",
    "tokenizer_fingerprint", "vocab_size", "special_ids", "special_token_ids", "continuation_ids",
)
# Parts of one plan must also agree on how they were made.
PART_KEYS = SAMPLE_KEYS + (
    "short_seq_prob", "random_next_prob", "dupe_factor", "seed", "mask_seed", "samples_per_shard", "unit_mb",
    "read_options", "plan", "heldout_fraction",
)
MODES = ("link", "move", "copy")


def load_parts(dirs: Sequence[Path]) -> list[tuple[Path, Manifest]]:
    """The manifests, in merge order, checked for agreement."""
    try:
        parts = [(d, Manifest.read(d)) for d in dirs]
    except DataError as e:
        raise UserError(str(e)) from e
    with_part = [m.part is not None for _, m in parts]
    if any(with_part) and not all(with_part):
        odd = next(d for (d, _), w in zip(parts, with_part) if not w)
        raise UserError(f"{odd}: not a --num_parts part, but other --parts are; merge parts of one plan only")
    keys = SAMPLE_KEYS
    if all(with_part):
        keys = PART_KEYS
        parts.sort(key=lambda dm: dm[1].part["index"])
        num_parts = parts[0][1].part["num_parts"]
        for d, m in parts:
            if m.part["num_parts"] != num_parts:
                raise UserError(f"{d}: part of {m.part['num_parts']} parts, {parts[0][0]} of {num_parts}; "
                                 "merge the parts of one plan")
        indices = [m.part["index"] for _, m in parts]
        if len(set(indices)) != len(indices):
            dup = next(i for i in indices if indices.count(i) > 1)
            twice = ", ".join(str(d) for d, m in parts if m.part["index"] == dup)
            raise UserError(f"--parts: part {dup} given twice ({twice}); pass each part once")
        missing = sorted(set(range(num_parts)) - set(indices))
        if missing:
            raise UserError(f"--parts: missing part(s) {', '.join(map(str, missing))} of {num_parts}; "
                             "prepare them with create_shards.py --num_parts/--part")
    first_dir, first = parts[0]
    for d, m in parts[1:]:
        for key in keys:
            if getattr(m, key) != getattr(first, key):
                raise UserError(f"{d}: {key} is {_short(getattr(m, key))}, {first_dir} has {_short(getattr(first, key))}; "
                                 "sets to merge must be prepared with the same settings and tokenizer")
    return parts


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def merged_stats(manifests: Sequence[Manifest]) -> dict[str, Any]:
    """Counts summed; the two fractions recomputed from the summed counts."""
    stats: dict[str, Any] = {}
    for m in manifests:
        s = dict(m.stats)
        n = int(m.num_samples)
        s.setdefault("nsp_random_samples", round(s.get("nsp_random_fraction", 0.0) * n))  # version-1 manifests
        s.setdefault("masked_tokens", round(s.get("mean_masked_count", 0.0) * n))
        for key, value in s.items():
            if isinstance(value, int) and not isinstance(value, bool):
                stats[key] = stats.get(key, 0) + value
    total = max(1, sum(int(m.num_samples) for m in manifests))
    stats["nsp_random_fraction"] = stats["nsp_random_samples"] / total
    stats["mean_masked_count"] = stats["masked_tokens"] / total
    return stats


def _place(src: Path, dst: Path, mode: str, out: Path) -> None:
    if mode == "copy":
        shutil.copy2(src, dst)
        return
    try:
        os.link(src, dst)
    except OSError as e:
        raise UserError(f"{src}: cannot hard-link it into {out} ({e.strerror}); put --out on the same file system "
                         "as the parts, or pass --mode copy") from e


def merge(dirs: Sequence[Path], out: Path, mode: str = "link", verify: bool = False) -> Manifest:
    """Write the merged set to ``out`` (atomically). Returns its manifest."""
    if mode not in MODES:
        raise UserError(f"--mode {mode}: must be one of {', '.join(MODES)}")
    parts = load_parts(dirs)
    resolved = out.resolve()
    for d, _ in parts:
        if resolved == d.resolve() or d.resolve() in resolved.parents:
            raise UserError(f"--out {out}: is (inside) the part {d}; choose a directory next to the parts")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST_NAME).is_file())):
        raise UserError(f"--out {out}: exists and is not a shard directory (no {MANIFEST_NAME}); choose another path")
    manifests = [m for _, m in parts]
    if sum(int(m.num_samples) for m in manifests) == 0:
        raise UserError("--parts: together they hold no samples")
    with_heldout = [m.heldout is not None for m in manifests]
    if any(with_heldout) and not all(with_heldout):
        odd = next(d for (d, _), w in zip(parts, with_heldout) if not w)
        raise UserError(f"{odd}: has no {HELDOUT_DIR}/ set but other --parts do; prepare all with the same "
                         "--heldout_fraction")
    heldout_parts = load_parts([d / m.heldout["dir"] for d, m in parts]) if all(with_heldout) else None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out)
    try:
        held = None
        if heldout_parts is not None:
            (tmp / HELDOUT_DIR).mkdir()
            held = _write_merged(heldout_parts, tmp / HELDOUT_DIR, mode, verify, out)
        merged = _write_merged(parts, tmp, mode, verify, out, heldout=held)
        publish_directory(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if mode == "move":
        for d, m in [*(heldout_parts or []), *parts]:  # held-out sets first: they live inside the parts
            (d / MANIFEST_NAME).unlink()  # first: a part must never look complete with files gone
            for record in m.shards:
                for info in record["files"].values():
                    (d / info["file"]).unlink(missing_ok=True)
            try:
                d.rmdir()
            except OSError:
                pass  # something else lives there; leave it
    return merged


def _write_merged(parts: Sequence[tuple[Path, Manifest]], tmp: Path, mode: str, verify: bool, out: Path,
                  heldout: Manifest | None = None) -> Manifest:
    """Place the parts' files into ``tmp`` under continuous shard numbers and write the
    merged manifest there (last). Returns it."""
    manifests = [m for _, m in parts]
    total = sum(int(m.num_samples) for m in manifests)
    shards: list[dict[str, Any]] = []
    for d, m in parts:
        for record in m.shards:
            files = {}
            for name, info in record["files"].items():
                src = d / info["file"]
                if not src.is_file() or src.stat().st_size != info["bytes"]:
                    raise UserError(f"{src}: missing or not {info['bytes']} bytes as its manifest says; "
                                     "prepare that part again")
                try:
                    check_npy_header(src, info)
                except DataError as e:
                    raise UserError(str(e)) from e
                if verify and sha256_file(src) != info["sha256"]:
                    raise UserError(
                        f"{src}: SHA-256 does not match its manifest (corrupt); prepare that part again"
                    )
                dst = tmp / shard_file_name(len(shards), name)
                _place(src, dst, mode, out)
                files[name] = {**info, "file": dst.name}
            shards.append({**record, "files": files})
    first = manifests[0]
    independent = first.part is None  # separately prepared sets: their inputs and plans differ
    merged = dataclasses.replace(
        first,
        part=None,
        num_samples=total,
        shards=shards,
        stats=merged_stats(manifests),
        inputs=[i for m in manifests for i in m.inputs or []] if independent else first.inputs,
        plan=None if independent else first.plan,
        merged_from=[{"dir": str(d), "num_samples": int(m.num_samples),
                      **({"part": m.part["index"]} if m.part else {})} for d, m in parts],
        heldout=None if heldout is None else {"dir": HELDOUT_DIR, "num_samples": heldout.num_samples,
                                              "documents": heldout.stats.get("documents", 0)},
    )
    merged.write(tmp)  # last: its presence marks completeness
    return merged
