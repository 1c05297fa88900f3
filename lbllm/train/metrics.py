"""metrics.jsonl: one JSON object per optimizer step, written by rank 0; optionally the
same rows as TensorBoard event files."""
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


# metrics.jsonl field -> TensorBoard tag (the rest go under "other/")
_TB_GROUPS = (("eval_", "heldout/"), ("trust_ratio_", "trust_ratio/"), ("grad_noise", "noise/"),
              ("sgd_noise", "noise/"), ("grad_sqnorm", "noise/"), ("seq_per_s", "speed/"), ("tokens_per_s", "speed/"),
              ("mfu", "speed/"), ("step_time", "speed/"), ("loss", "train/"), ("mlm_", "train/"), ("nsp_", "train/"),
              ("lr", "schedule/"), ("global_batch", "schedule/"), ("samples", "schedule/"), ("epoch", "schedule/"),
              ("grad_norm", "train/"))


def tensorboard_tag(key: str) -> str:
    for prefix, group in _TB_GROUPS:
        if key.startswith(prefix):
            return group + key
    return "other/" + key


class TensorBoardWriter:
    """Each metrics row as TensorBoard scalars at its step (held-out metrics, LR, batch,
    gradient norm, noise scales, throughput, trust-ratio spread) and, where the row has
    them, the per-parameter trust ratios as a histogram. Rank 0 only. Events of an earlier
    run in the dir after the resumed step (all of them on a fresh start) are dropped by
    TensorBoard (``purge_step``), as metrics.jsonl is cut back or rewritten."""

    def __init__(self, log_dir: Path | None, enabled: bool = True, resume_step: int | None = None):
        self._tb = None
        if log_dir is None or not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        # A fresh start purges every earlier event in the dir (step >= 1), a resume those after it.
        self._tb = SummaryWriter(str(log_dir), purge_step=(resume_step or 0) + 1)

    def write(self, record: dict) -> None:
        if self._tb is None:
            return
        step = int(record["step"])
        for key, value in record.items():
            if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            self._tb.add_scalar(tensorboard_tag(key), value, step)
        layers = record.get("trust_ratios")
        if layers:
            import torch

            self._tb.add_histogram("trust_ratio/per_parameter", torch.tensor(list(layers.values())), step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
