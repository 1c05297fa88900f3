"""BERT configurations by size name.

The sizes are the compact BERTs of Turc et al. 2019 ("Well-Read Students Learn Better")
plus the original BERT-Base and BERT-Large of Devlin et al. 2019. Attention heads are
hidden/64 and the feed-forward width is 4x hidden, as in both papers.
"""
from __future__ import annotations

import json
from pathlib import Path

from transformers import BertConfig, BertForPreTraining

from lbllm.utils import UserError

# name -> (layers, hidden)
MODEL_SIZES: dict[str, tuple[int, int]] = {
    "tiny": (2, 128),
    "mini": (4, 256),
    "small": (4, 512),
    "medium": (8, 512),
    "base": (12, 768),
    "large": (24, 1024),
}


class ModelConfigError(UserError):
    """A model size name or config file that cannot be used."""


def build_bert_config(
    size_or_path: str,
    vocab_size: int,
    max_position_embeddings: int = 512,
    dropout: float | None = None,
) -> BertConfig:
    """A `BertConfig` for a size name (`tiny` ... `large`) or a JSON file of BertConfig fields.

    `vocab_size` always comes from the tokenizer, so a config file cannot disagree with
    the data. `dropout`, when given, sets both hidden and attention dropout (0 makes the
    model deterministic, which the exactness tests need).
    """
    if size_or_path in MODEL_SIZES:
        layers, hidden = MODEL_SIZES[size_or_path]
        config = BertConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=max(1, hidden // 64),
            intermediate_size=4 * hidden,
            max_position_embeddings=max_position_embeddings,
        )
    else:
        path = Path(size_or_path)
        if not path.is_file():
            raise ModelConfigError(
                f"--model_config {size_or_path!r}: not a size name ({', '.join(MODEL_SIZES)}) "
                "and not an existing BertConfig JSON file"
            )
        try:
            fields = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ModelConfigError(f"--model_config {path}: malformed JSON ({exc})") from None
        fields["vocab_size"] = vocab_size
        fields.setdefault("max_position_embeddings", max_position_embeddings)
        config = BertConfig(**fields)
    if dropout is not None:
        if not 0.0 <= dropout < 1.0:
            raise ModelConfigError(f"--dropout {dropout}: must be in [0, 1)")
        config.hidden_dropout_prob = dropout
        config.attention_probs_dropout_prob = dropout
    return config


def build_pretraining_model(config: BertConfig) -> BertForPreTraining:
    """A freshly initialized HF `BertForPreTraining` (MLM + NSP heads, tied decoder)."""
    return BertForPreTraining(config)
