"""Data preparation: what ``data_prep/*.py`` run to turn text into shard sets.

``inputs`` (where text comes from, how it is cut into units), ``samples`` (documents ->
BERT pretraining samples: sentences, pairs, NSP, masking), ``shard_writer`` (the files),
``corpus`` (the embedded synthetic corpus and its SQuAD sets). Training never imports
this package: it reads shards through ``lbllm.data``.
"""
