"""BERT models by size name. Architecture only: no DeepSpeed, no torch.distributed."""
from lbllm.model.bert import MODEL_SIZES, ModelConfigError, build_bert_config, build_pretraining_model
from lbllm.model.pretraining import PretrainingLosses, PretrainingModel, StepStats

__all__ = [
    "MODEL_SIZES",
    "ModelConfigError",
    "build_bert_config",
    "build_pretraining_model",
    "PretrainingLosses",
    "PretrainingModel",
    "StepStats",
]
