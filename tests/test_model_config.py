"""Model sizes, config validation and the masked-position loss."""
import json

import pytest
import torch
import torch.nn.functional as F

from lbllm.model import MODEL_SIZES, ModelConfigError, PretrainingModel, build_bert_config, build_pretraining_model
from lbllm.train.config import ConfigError, resolve_batch_layout


@pytest.mark.parametrize("name", list(MODEL_SIZES))
def test_size_names(name):
    layers, hidden = MODEL_SIZES[name]
    cfg = build_bert_config(name, vocab_size=1000)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (layers, hidden, 4 * hidden)
    assert cfg.hidden_size % cfg.num_attention_heads == 0 and cfg.vocab_size == 1000


def test_large_matches_bert_large():
    cfg = build_bert_config("large", vocab_size=30522)
    model = build_pretraining_model(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert 330e6 < n < 345e6  # BERT-Large with heads is ~335M parameters


def test_json_config_and_errors(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                                "intermediate_size": 128, "vocab_size": 5}))
    cfg = build_bert_config(str(path), vocab_size=300, dropout=0.0)
    assert cfg.vocab_size == 300 and cfg.hidden_dropout_prob == 0.0 and cfg.attention_probs_dropout_prob == 0.0
    with pytest.raises(ModelConfigError, match="size name"):
        build_bert_config("huge", vocab_size=10)
    path.write_text("{oops")
    with pytest.raises(ModelConfigError, match="malformed JSON"):
        build_bert_config(str(path), vocab_size=10)


def test_masked_position_loss_equals_full_vocab_loss():
    """Decoding only masked positions gives the same loss as HF's full-sequence MLM loss."""
    torch.manual_seed(0)
    cfg = build_bert_config("tiny", vocab_size=97, max_position_embeddings=32, dropout=0.0)
    hf = build_pretraining_model(cfg).eval()
    wrapped = PretrainingModel(hf)
    B, L, P = 3, 16, 4
    ids = torch.randint(5, 97, (B, L))
    positions = torch.tensor([[1, 3, 5, 0], [2, 4, 0, 0], [1, 2, 3, 7]])
    weights = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.float32)
    targets = torch.randint(5, 97, (B, P))
    nsp = torch.tensor([0, 1, 0])
    tt = torch.zeros(B, L, dtype=torch.long)
    am = torch.ones(B, L, dtype=torch.long)
    out = wrapped(ids, tt, am, positions, targets, weights, nsp)
    labels = torch.full((B, L), -100)
    for b in range(B):
        for p in range(P):
            if weights[b, p] > 0:
                labels[b, positions[b, p]] = targets[b, p]
    ref = hf(input_ids=ids, token_type_ids=tt, attention_mask=am)
    ref_mlm = F.cross_entropy(ref.prediction_logits.reshape(-1, 97), labels.reshape(-1), reduction="sum")
    ref_nsp = F.cross_entropy(ref.seq_relationship_logits, nsp, reduction="sum")
    assert int(out.mlm_count) == int(weights.sum())
    torch.testing.assert_close(out.mlm_loss_sum, ref_mlm, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.nsp_loss_sum, ref_nsp, rtol=1e-5, atol=1e-5)


def test_batch_layout_derivation_and_errors():
    lay = resolve_batch_layout({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 4}, world_size=2)
    assert lay.gradient_accumulation_steps == 8
    lay = resolve_batch_layout({"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 3}, world_size=2)
    assert lay.global_batch_size == 24
    with pytest.raises(ConfigError, match="train_batch_size=64 != train_micro_batch_size_per_gpu=4 x gradient_accumulation_steps=3"):
        resolve_batch_layout({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 4,
                              "gradient_accumulation_steps": 3}, world_size=2)
    with pytest.raises(ConfigError, match="not a multiple"):
        resolve_batch_layout({"train_batch_size": 10, "train_micro_batch_size_per_gpu": 4}, world_size=1)
