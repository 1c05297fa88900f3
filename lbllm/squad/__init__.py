"""SQuAD v1.1: features, fine-tuning, post-processing and the official EM/F1.

The metric, reading, config and decoding modules need only numpy, so `squad_eval.py`
and input validation stay fast; the torch-backed fine-tuning names are imported on
first use.
"""

from __future__ import annotations

from typing import Any

from lbllm.squad.config import SquadConfig
from lbllm.squad.features import (
    BadQuestion,
    BadQuestionError,
    EvalFeatures,
    SquadExample,
    SquadFormatError,
    TrainFeatures,
    check_squad,
    examples_from_json,
    load_examples,
    load_squad_json,
    prepare_eval_features,
    prepare_train_features,
    read_squad_json,
)
from lbllm.squad.metrics import aggregate_seeds, evaluate, exact_match_score, f1_score, normalize_answer
from lbllm.squad.postprocess import best_spans, nbest_predictions, postprocess_predictions

# `finetune` itself is not re-exported: the submodule of the same name would shadow it
# once imported. Use `from lbllm.squad.finetune import finetune`.
_LAZY = {"FinetuneResult", "SquadData", "load_qa_model", "predict", "prepare_data", "train"}

__all__ = [
    "BadQuestion",
    "BadQuestionError",
    "EvalFeatures",
    "SquadConfig",
    "SquadExample",
    "SquadFormatError",
    "TrainFeatures",
    "aggregate_seeds",
    "best_spans",
    "check_squad",
    "evaluate",
    "exact_match_score",
    "examples_from_json",
    "f1_score",
    "load_examples",
    "load_squad_json",
    "nbest_predictions",
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
