"""Pretraining data: inputs, sample creation, masking, shard format and reader, sampler.

``inputs`` reads txt/jsonl/parquet files and ``datasets`` datasets and cuts them into
units of work, ``samples`` turns text into BERT samples (both used by
data_prep/create_shards.py), ``masking`` is the MLM corruption (static at preparation,
dynamic per epoch in the reader), ``shards`` stores and reads samples, ``sampler``
decides which rank sees which sample. See docs/data.md.
"""
from lbllm.data.sampler import GlobalBatchSampler
from lbllm.data.shards import DataError, PretrainingDataset, tokenizer_fingerprint

__all__ = ["DataError", "GlobalBatchSampler", "PretrainingDataset", "tokenizer_fingerprint"]
