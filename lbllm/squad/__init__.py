"""SQuAD v1.1: features, fine-tuning, post-processing and the official EM/F1.

The metric, reading and decoding modules need only numpy, so `squad_eval.py` and
input validation stay fast; the torch-backed fine-tuning names are imported on
first use.
"""

from __future__ import annotations

from typing import Any

from lbllm.squad.features import (
    EvalFeatures,
    SquadExample,
    SquadFormatError,
    TrainFeatures,
    examples_from_json,
    load_examples,
    prepare_eval_features,
    prepare_train_features,
    read_squad_json,
)
from lbllm.squad.metrics import evaluate, exact_match_score, f1_score, normalize_answer
from lbllm.squad.postprocess import best_spans, postprocess_predictions

# `finetune` itself is not re-exported: the submodule of the same name would shadow it
# once imported. Use `from lbllm.squad.finetune import finetune`.
_LAZY = {"SquadConfig", "load_qa_model", "predict", "seed_everything", "train"}

__all__ = [
    "EvalFeatures",
    "SquadExample",
    "SquadFormatError",
    "TrainFeatures",
    "best_spans",
    "evaluate",
    "exact_match_score",
    "examples_from_json",
    "f1_score",
    "load_examples",
    "normalize_answer",
    "postprocess_predictions",
    "prepare_eval_features",
    "prepare_train_features",
    "read_squad_json",
    *sorted(_LAZY),
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module("lbllm.squad.finetune"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
