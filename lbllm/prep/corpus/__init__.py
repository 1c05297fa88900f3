"""Generate the embedded synthetic pretraining corpus and a SQuAD v1.1 task about it.

Why synthetic: the project must demonstrate "pretraining helps SQuAD" offline, in
minutes, on a CPU. Real Wikipedia is neither embedded nor small. So we invent a world:
a seeded knowledge base (people, cities, countries, rivers, mountains, companies,
institutions, with attributes and relations) is rendered into encyclopedia-style
documents, and separately into SQuAD paragraphs with questions.

What makes pretraining matter:
- every fact is stated in several documents (the subject's own, and those of related
  entities) with different phrasings, so masked-LM training can memorise the world and
  learn that the phrasings mean the same thing;
- questions use wording that SQuAD contexts never use for that relation (but that the
  corpus does use, in its corpus-only phrasings), so lexical overlap alone does not
  find the answer sentence;
- each context holds distractor facts of the same type (a sibling's birth year, a rival
  company's founder), so the answer type alone does not find the span either.

Output (see DESIGN.md "Contracts"):
    DIR/corpus/part-00000.txt ...   one document per blank-line-separated block
    DIR/squad/train.json, dev.json  SQuAD v1.1; train and dev subjects are disjoint

Only the standard library and numpy are used. Same arguments give byte-identical files.

Modules: ``world`` (the knowledge base and its made-up names), ``phrasings`` (how each
relation is worded; the question types), ``facts`` (a fact's template fields),
``documents`` (the corpus), ``squad`` (the SQuAD paragraphs and questions). The CLI is
``data_prep/make_corpus.py``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from lbllm.utils import write_text_atomic

from .documents import iter_chunks, iter_documents, render_document, write_corpus
from .phrasings import CONTEXT_TEMPLATES, CORPUS_TEMPLATES, QUESTION_TYPES, SQUAD_KINDS, TEMPLATES, QuestionType
from .squad import make_squad_split, split_subjects
from .world import MIN_ENTITIES, SYLLABLES, Entity, KnowledgeBase, build_knowledge_base, num_entities_for

__all__ = ["CONTEXT_TEMPLATES", "CORPUS_TEMPLATES", "DEFAULT_MAX_PART_MB", "DEFAULT_NUM_DOCS", "DEFAULT_SQUAD_DEV",
           "DEFAULT_SQUAD_TRAIN", "Entity", "KnowledgeBase", "MIN_ENTITIES", "QUESTION_TYPES", "QuestionType",
           "SQUAD_KINDS", "SYLLABLES", "TEMPLATES", "build_knowledge_base", "generate", "iter_chunks",
           "iter_documents", "make_squad_split", "num_entities_for", "render_document", "split_subjects",
           "write_corpus"]

DEFAULT_NUM_DOCS = 3000  # ~3 MB of text
DEFAULT_SQUAD_TRAIN = 4000
DEFAULT_SQUAD_DEV = 1000
DEFAULT_MAX_PART_MB = 50.0


def generate(out_dir: str | os.PathLike, num_docs: int = DEFAULT_NUM_DOCS, seed: int = 0,
             squad_train: int = DEFAULT_SQUAD_TRAIN, squad_dev: int = DEFAULT_SQUAD_DEV,
             max_part_mb: float = DEFAULT_MAX_PART_MB, workers: int = 1) -> dict[str, Any]:
    """Write corpus and SQuAD files under `out_dir`; return summary statistics.
    `workers` only changes speed, never the output."""
    if seed < 0:
        raise ValueError(f"--seed must be >= 0, got {seed}")
    if num_docs < 1:
        raise ValueError(f"--num_docs must be >= 1, got {num_docs}")
    if squad_train < 0 or squad_dev < 0:
        raise ValueError("--squad_train and --squad_dev must be >= 0")
    if not max_part_mb > 0:
        raise ValueError(f"--max_part_mb must be > 0, got {max_part_mb}")
    t0 = time.perf_counter()
    out = Path(out_dir)
    kb = build_knowledge_base(num_entities_for(num_docs), seed)
    n_docs, n_bytes, n_parts = write_corpus(
        iter_chunks(kb, num_docs, seed, workers), out / "corpus",
        max(1, int(max_part_mb * 1024 * 1024)))
    dev_fraction = squad_dev / max(1, squad_train + squad_dev)
    train_subj, dev_subj = split_subjects(kb, seed, dev_fraction)
    (out / "squad").mkdir(parents=True, exist_ok=True)
    for split, subjects, n in (("train", train_subj, squad_train), ("dev", dev_subj, squad_dev)):
        data = make_squad_split(kb, subjects, n, seed, split)
        write_text_atomic(out / "squad" / f"{split}.json", json.dumps(data, indent=None))
    return {"docs": n_docs, "bytes": n_bytes, "parts": n_parts,
            "entities": len(kb.entities), "train_questions": squad_train,
            "dev_questions": squad_dev, "seconds": time.perf_counter() - t0}
