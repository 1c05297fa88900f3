"""Model FLOPs of one BERT pretraining sequence, for throughput and MFU figures.

Counted the way MFU is usually reported (Chowdhery et al. 2022, appendix B; the
NVIDIA and DeepSpeed BERT figures): the FLOPs the model needs, whatever an
implementation actually spends, with a multiply-add as 2 FLOPs and training as 3x the
forward (forward + backward for activations + backward for weights):

* 6 x (non-embedding encoder parameters) x (tokens in the sequence);
* attention scores and the weighted values: 2 matmuls of seq x seq x hidden per layer,
  i.e. 12 x layers x seq x hidden per token for training;
* the MLM head (transform, LayerNorm, decoder over the vocabulary) only at the positions
  that are predicted, 6 x its parameters x predictions; the pooler and NSP classifier
  once per sequence. Embedding lookups count nothing.

A dense-head implementation (HF's BertForPreTraining computes logits at every position)
spends more than this; its MFU is still measured against the same model FLOPs, so the
figures compare implementations of one model.
"""
from __future__ import annotations

# Dense bf16 tensor-core peak per device, TFLOP/s (vendor datasheets, SXM parts).
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "V100": 125.0}


def encoder_parameters(config) -> int:
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    attention = 4 * h * h + 4 * h  # Q, K, V, output projections with biases
    ffn = 2 * h * i + i + h
    norms = 2 * 2 * h
    return layers * (attention + ffn + norms)


def mlm_head_parameters(config) -> int:
    h, v = config.hidden_size, config.vocab_size
    return h * h + h + 2 * h + h * v + v  # transform, LayerNorm, decoder (tied weights) + bias


def training_flops_per_sequence(config, seq_len: int, predictions: float) -> float:
    """Training FLOPs of one sequence of `seq_len` tokens with `predictions` masked positions."""
    h, layers = config.hidden_size, config.num_hidden_layers
    flops = 6.0 * encoder_parameters(config) * seq_len
    flops += 12.0 * layers * seq_len * h * seq_len
    flops += 6.0 * mlm_head_parameters(config) * predictions
    flops += 6.0 * (h * h + h + 2 * h + 2)  # pooler + NSP classifier
    return flops


def peak_flops(device_name: str) -> float | None:
    """The bf16 peak of a CUDA device by its name (e.g. "NVIDIA H200"), None if unknown."""
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in device_name:
            return tflops * 1e12
    return None
