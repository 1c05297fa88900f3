"""Pretraining data as training reads it: shard format, reader, masking, sampler.

``format`` is the shard layout and its typed ``Manifest`` (shared with the writer in
``lbllm.prep``), ``shards`` the memory-mapped reader, ``masking`` the MLM corruption
(static at preparation, dynamic per epoch in the reader), ``sampler`` decides which rank
sees which sample. How text becomes shards is ``lbllm.prep``. See docs/data.md.
"""
from lbllm.data.format import DataError, Manifest, tokenizer_fingerprint
from lbllm.data.sampler import GlobalBatchSampler
from lbllm.data.shards import PretrainingDataset

__all__ = ["DataError", "GlobalBatchSampler", "Manifest", "PretrainingDataset", "tokenizer_fingerprint"]
