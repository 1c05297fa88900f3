"""Run arguments and the DeepSpeed config: typed, validated before anything starts.

Batch arithmetic follows DeepSpeed's rule (train_batch_size = micro x accumulation x
world) but is checked here first, so a wrong config is one clear line instead of an
assertion deep in engine start-up.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

from lbllm.utils import UserError, read_json


class ConfigError(UserError):
    """A run argument or DeepSpeed config entry that cannot be used."""


@dataclass
class RunConfig:
    """The arguments of one pretraining run; pretrain_bert.py's flags are generated from
    these fields (lbllm.cli): name, default and help are written here only."""

    deepspeed_config: Path
    """DeepSpeed JSON (batch, optimizer, schedule, ZeRO, precision)."""
    data_dir: Path
    """Shards made by data_prep/create_shards.py."""
    output_dir: Path
    """Gets metrics.jsonl, run.json, checkpoints/, phase_state.pt and final/ (HF format)."""
    tokenizer: Path | None = None
    """Tokenizer dir (default: DATA_DIR/../tokenizer)."""
    model_config: str = "tiny"
    """Size name (tiny|mini|small|medium|base|large) or a BertConfig JSON path."""
    max_steps: int | None = None
    """Optimizer steps to run (default: the schedule's total_num_steps)."""
    seed: int = 42
    """Seeds the model initialization and the order of the samples."""
    dropout: float | None = None
    """Hidden and attention dropout; 0 disables all dropout (default: BERT's 0.1)."""
    phase: int = field(default=1, metadata={"choices": (1, 2)})
    """1, or 2: continues from --init_checkpoint with a new schedule (You et al. 2020)."""
    init_checkpoint: Path | None = None
    """A finished phase-1 output dir: weights and optimizer moments; the schedule restarts."""
    resume: str | None = field(default=None, metadata={"choices": ("auto",)})
    """auto: continue from the newest checkpoint in output_dir."""
    save_interval: int = 0
    """Optimizer steps between checkpoints (0: only at the end)."""
    save_interval_minutes: float = 0.0
    """Also checkpoint when this many minutes have passed since the last one (0: off)."""
    keep_last: int = 0
    """Keep only the newest K checkpoints (0: keep all); the one `latest` names is never removed."""
    overwrite: bool = False
    """Start from scratch in an output_dir that holds an earlier run (its metrics,
    checkpoints and export are deleted first); without it such a dir needs --resume auto."""
    max_seq_length: int | None = None
    """Fail unless the shards have this sequence length."""
    loss_normalization: str = field(default="global", metadata={"choices": ("global", "micro")})
    """global: the sum over all masked tokens of the global batch divided by their number
    (Goyal et al. remark 3); micro: the mean of micro-batch means (NVIDIA's recipe), which
    weights tokens unequally when micro-batches differ."""
    noise_scale_interval: int = 0
    """Measure the gradient noise scale B_simple every K steps (0: never)."""
    eval_data: Path | None = None
    """Held-out shards (create_shards.py --heldout_fraction writes DATA_DIR/heldout): logs eval_mlm_loss/acc."""
    eval_interval_samples: int = 0
    """Evaluate every N consumed samples (0: only after the last step)."""
    eval_batch_size: int | None = None
    """Sequences per evaluation forward (default: the micro-batch size)."""
    tensorboard: Path | None = field(default=None, metadata={"nargs": "?", "const": ""})
    """Also write TensorBoard event files to this dir (the flag alone: OUTPUT_DIR/tensorboard)."""
    log_interval: int = 0
    """When stderr is not a terminal (a log file), one progress line every N steps
    (0: about 50 per phase); on a terminal, rank 0 shows a progress bar."""
    trust_ratio_interval: int = 100
    """LAMB/LARS: every K optimizer steps also log each parameter's trust ratio
    (metrics.jsonl `trust_ratios`, a TensorBoard histogram); min / median / max are logged
    every step (0: only those)."""
    pack_sequences: bool = False
    """Pack several short samples into one row (block-diagonal attention, positions per
    sample): no compute on padding, the same losses as the unpacked batches."""
    compile: str | None = None
    """torch.compile the model (DeepSpeed's engine.compile) with this backend: inductor fuses
    kernels on GPUs; aot_eager only captures the graphs (a cheap check). Parts that fail to
    compile run eagerly (torch._dynamo suppress_errors)."""
    stop_at_eval_loss: float | None = None
    """Finish the run (checkpoint, export) at the first held-out evaluation with MLM loss <= X
    (steps-to-target studies; needs --eval_data and --eval_interval_samples)."""
    max_consecutive_skips: int = 10
    """Stop (exit 3, the last checkpoint kept) after this many skipped non-finite steps in a row."""
    inject_nan_at_steps: str = ""
    """Testing: comma-separated steps whose loss is made NaN (to exercise the skipping)."""

    @functools.cached_property
    def nan_steps(self) -> frozenset[int]:
        """--inject_nan_at_steps as a set (parsed once; the step loop asks every micro-batch)."""
        return frozenset(int(x) for x in self.inject_nan_at_steps.split(",") if x.strip())

    def __post_init__(self) -> None:
        if self.tensorboard == "":
            self.tensorboard = Path(self.output_dir) / "tensorboard"
        for name in ("deepspeed_config", "data_dir", "output_dir", "tokenizer", "init_checkpoint", "eval_data",
                     "tensorboard"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, Path(value))
        if self.phase not in (1, 2):
            raise ConfigError(f"--phase {self.phase}: must be 1 or 2")
        if self.phase == 2 and self.init_checkpoint is None and self.resume is None:
            raise ConfigError("--phase 2 continues from phase 1: pass --init_checkpoint PHASE1_OUTPUT_DIR")
        if self.resume not in (None, "auto"):
            raise ConfigError(f"--resume {self.resume!r}: only 'auto' is supported")
        if self.max_steps is not None and self.max_steps < 0:
            raise ConfigError(f"--max_steps {self.max_steps}: must be >= 0")
        if self.loss_normalization not in ("global", "micro"):
            raise ConfigError(f"--loss_normalization {self.loss_normalization!r}: must be 'global' or 'micro'")
        if self.noise_scale_interval < 0:
            raise ConfigError(f"--noise_scale_interval {self.noise_scale_interval}: must be >= 0")
        if self.eval_interval_samples < 0:
            raise ConfigError(f"--eval_interval_samples {self.eval_interval_samples}: must be >= 0")
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            raise ConfigError(f"--eval_batch_size {self.eval_batch_size}: must be >= 1")
        if self.stop_at_eval_loss is not None and not (self.eval_data and self.eval_interval_samples):
            raise ConfigError(f"--stop_at_eval_loss {self.stop_at_eval_loss}: needs --eval_data DIR and "
                              "--eval_interval_samples N (the evaluations it watches)")
        if self.eval_data is None and self.eval_interval_samples:
            raise ConfigError("--eval_interval_samples needs --eval_data DIR (a held-out set, e.g. DATA_DIR/heldout)")
        try:
            bad = any(step < 1 for step in self.nan_steps)
        except ValueError:
            bad = True
        if bad:
            raise ConfigError(f"--inject_nan_at_steps {self.inject_nan_at_steps!r}: give steps >= 1 as 5,6")
        for name in ("save_interval", "save_interval_minutes", "keep_last", "max_consecutive_skips",
                     "trust_ratio_interval", "log_interval"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name} {getattr(self, name)}: must be >= 0")
        if not self.deepspeed_config.is_file():
            raise ConfigError(f"--deepspeed_config {self.deepspeed_config}: file not found")
        if not self.data_dir.is_dir():
            raise ConfigError(
                f"--data_dir {self.data_dir}: directory not found (prepare it with data_prep/create_shards.py)"
            )
        if self.eval_data is not None:
            if not self.eval_data.is_dir():
                raise ConfigError(f"--eval_data {self.eval_data}: directory not found (prepare a held-out set with "
                                  "data_prep/create_shards.py --heldout_fraction F; it is written to OUT/heldout)")
            if self.eval_data.resolve() == self.data_dir.resolve():
                raise ConfigError(f"--eval_data {self.eval_data}: is the training set; pass its held-out set "
                                  f"({self.data_dir / 'heldout'}) or another set of documents never trained on")
        if self.tokenizer is None:
            self.tokenizer = self.data_dir.parent / "tokenizer"
        if not (self.tokenizer / "tokenizer_config.json").is_file():
            raise ConfigError(
                f"--tokenizer {self.tokenizer}: no tokenizer there (build one with data_prep/build_tokenizer.py "
                "or pass --tokenizer DIR)"
            )
        if self.init_checkpoint is not None and not (self.init_checkpoint / "phase_state.pt").is_file() \
                and not (self.init_checkpoint / "checkpoints" / "latest").is_file():
            raise ConfigError(
                f"--init_checkpoint {self.init_checkpoint}: no phase_state.pt or DeepSpeed checkpoint there "
                "(pass the output_dir of a finished phase-1 run)"
            )


def load_json_config(path: Path) -> dict:
    config = read_json(path, ConfigError, "pass an existing DeepSpeed JSON config", "fix the file")
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level")
    return config


@dataclass(frozen=True)
class BatchLayout:
    """How one global batch splits: global = micro x accumulation x world."""

    global_batch_size: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    world_size: int


def _split(total: int, known: int, known_key: str, world_size: int, source: str) -> int:
    """The missing factor of train_batch_size = known x missing x world, which must be whole."""
    missing, rem = divmod(total, known * world_size)
    if rem or missing == 0:
        raise ConfigError(
            f"{source}: train_batch_size={total} is not a multiple of {known_key}={known} "
            f"x world_size={world_size}; change one of them"
        )
    return missing


def resolve_batch_layout(ds_config: dict, world_size: int, source: str = "DeepSpeed config") -> BatchLayout:
    """Fill in the one missing value of (train_batch_size, micro, accumulation) or check all three."""
    total = ds_config.get("train_batch_size")
    micro = ds_config.get("train_micro_batch_size_per_gpu")
    accum = ds_config.get("gradient_accumulation_steps")
    for key, value in (("train_batch_size", total), ("train_micro_batch_size_per_gpu", micro),
                       ("gradient_accumulation_steps", accum)):
        if value is not None and (not isinstance(value, int) or value <= 0):
            raise ConfigError(f"{source}: {key}={value!r} must be a positive integer")
    if total is not None and micro is not None and accum is None:
        accum = _split(total, micro, "train_micro_batch_size_per_gpu", world_size, source)
    elif total is not None and accum is not None and micro is None:
        micro = _split(total, accum, "gradient_accumulation_steps", world_size, source)
    elif total is None and micro is not None:
        accum = accum or 1
        total = micro * accum * world_size
    elif total is not None and micro is None and accum is None:
        accum = 1
        micro = _split(total, accum, "gradient_accumulation_steps", world_size, source)
    elif total is None:
        raise ConfigError(f"{source}: set train_batch_size and train_micro_batch_size_per_gpu")
    if total != micro * accum * world_size:
        raise ConfigError(
            f"{source}: train_batch_size={total} != train_micro_batch_size_per_gpu={micro} x "
            f"gradient_accumulation_steps={accum} x world_size={world_size} (= {micro * accum * world_size}); "
            "fix one of them or drop gradient_accumulation_steps to let it be derived"
        )
    return BatchLayout(total, micro, accum, world_size)
