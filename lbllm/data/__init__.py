"""Pretraining data: shard format and reader, global-batch sampler, sample creation.

``samples`` turns text into BERT samples (used by data_prep/create_shards.py),
``shards`` stores and reads them, ``sampler`` decides which rank sees which sample.
"""
from lbllm.data.sampler import GlobalBatchSampler
from lbllm.data.shards import DataError, PretrainingDataset, tokenizer_fingerprint

__all__ = ["DataError", "GlobalBatchSampler", "PretrainingDataset", "tokenizer_fingerprint"]
