"""What every part of lbllm shares: the error a user can fix, atomic writes, seeding,
free ports, and reading JSON / JSON-lines files with one clear error.

Only the standard library is imported here; numpy and torch are imported by the one
function that seeds them, so data-preparation CLIs stay light.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import socket
import tempfile
import uuid
from pathlib import Path
from typing import Any

__all__ = [
    "UserError", "read_json", "read_jsonl", "write_text_atomic", "write_json_atomic",
    "make_temp_dir", "publish_directory", "seed_everything", "free_port",
]


class UserError(ValueError):
    """Input a user can fix (a file, a flag, a config key). The message is one line that
    names it and says the fix; every CLI catches this one class, prints the line and
    exits 2, having written nothing. Subclasses say which part of the project raised it."""


# ---------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------


def read_json(path: str | os.PathLike, error: type[Exception] = UserError, missing_hint: str = "check the path",
              malformed_hint: str = "fix the file") -> Any:
    """Parse `path`, raising `error` with a message naming the file and the fix."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: file not found; {missing_hint}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(f"{path}: malformed JSON ({err}); {malformed_hint}") from None


def read_jsonl(path: str | os.PathLike, error: type[Exception] = UserError) -> list[dict]:
    """The records of a JSON-lines file (metrics.jsonl); a bad line names the file and line."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: file not found; is this the output dir of pretrain_bert.py?")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise error(f"{path}:{n}: not a JSON line; is this a metrics.jsonl of pretrain_bert.py?") from None
    return rows


# ---------------------------------------------------------------------------------------
# Writing: readers never see a half-written file or directory
# ---------------------------------------------------------------------------------------


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a temp file next to `path` (same file system) and rename it into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    write_text_atomic(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def make_temp_dir(out_dir: str | os.PathLike) -> Path:
    """An empty ``OUT.tmp-XXXX`` next to ``out_dir`` (same file system, so the final
    rename is atomic), with the permissions a plain ``mkdir`` would give."""
    out_dir = Path(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out_dir.name}.tmp-", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    return tmp


def publish_directory(tmp_dir: str | os.PathLike, out_dir: str | os.PathLike) -> None:
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
# Processes
# ---------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a launcher's --master_port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
