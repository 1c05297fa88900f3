"""Training: DeepSpeed engine set-up, the loop, checkpoints, metrics. All distributed logic lives here."""
from lbllm.train.config import ConfigError, RunConfig

__all__ = ["ConfigError", "RunConfig"]
