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

Tokens are the real ones: padding counts nothing, so unpacked rows of short samples waste
compute that packed rows do not. A dense-head implementation (HF's BertForPreTraining
computes logits at every position) spends more than this; its MFU is still measured
against the same model FLOPs, so the figures compare implementations of one model.
"""
from __future__ import annotations

import os

# Dense bf16 tensor-core peak per device, TFLOP/s (vendor datasheets); the more specific
# names first (an "H100 PCIe" is not an SXM H100). V100 has no bf16: its fp16 peak.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200", 989.0), ("H100", 989.0), ("A100", 312.0),
                    ("L40S", 362.0), ("V100", 125.0))


def encoder_parameters(config) -> int:
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    attention = 4 * h * h + 4 * h  # Q, K, V, output projections with biases
    ffn = 2 * h * i + i + h
    norms = 2 * 2 * h
    return layers * (attention + ffn + norms)


def mlm_head_parameters(config) -> int:
    h, v = config.hidden_size, config.vocab_size
    return h * h + h + 2 * h + h * v + v  # transform, LayerNorm, decoder (tied weights) + bias


def training_flops(config, lengths, predictions: float) -> float:
    """Training FLOPs of sequences with these real (non-padding) lengths and this many
    predicted positions in all: padding is not work the model needs, so a padded batch and
    the same samples packed are credited the same."""
    h, layers = config.hidden_size, config.num_hidden_layers
    lengths = [float(n) for n in lengths]
    flops = 6.0 * encoder_parameters(config) * sum(lengths)
    flops += 12.0 * layers * h * sum(n * n for n in lengths)
    flops += 6.0 * mlm_head_parameters(config) * predictions
    flops += 6.0 * (h * h + h + 2 * h + 2) * len(lengths)  # pooler + NSP classifier
    return flops


def training_flops_per_sequence(config, seq_len: int, predictions: float) -> float:
    """Training FLOPs of one sequence of `seq_len` real tokens with `predictions` masked positions."""
    return training_flops(config, [seq_len], predictions)


def peak_flops(device_name: str | None) -> float | None:
    """The bf16 peak of a CUDA device by its name (e.g. "NVIDIA H200"), None if unknown or
    on CPU (None); ``LBLLM_PEAK_TFLOPS`` overrides it (a device not listed, or a clock limit)."""
    override = os.environ.get("LBLLM_PEAK_TFLOPS")
    if override:
        return float(override) * 1e12
    if device_name is None:
        return None
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in device_name:
            return tflops * 1e12
    return None
