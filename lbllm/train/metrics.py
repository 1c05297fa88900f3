"""metrics.jsonl: one JSON object per optimizer step, written by rank 0."""
from __future__ import annotations

import json
from pathlib import Path

from lbllm.utils import write_text_atomic


class MetricsWriter:
    """Appends one line per step and flushes it, so a crash loses at most the current step.

    On resume the file is first cut back to the resumed step (atomically: temp + rename),
    so it never holds the same step twice.
    """

    def __init__(self, path: Path, enabled: bool = True, resume_step: int | None = None):
        self.path = Path(path)
        self.enabled = enabled
        self._fh = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            mode = "w"
        else:
            self._truncate_after(resume_step)
            mode = "a"
        self._fh = open(self.path, mode, encoding="utf-8")

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (json.JSONDecodeError, KeyError):
                continue  # a torn last line from a crash
        write_text_atomic(self.path, "".join(k + "\n" for k in kept))

    def write(self, record: dict) -> None:
        if self._fh is None:
            return
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
