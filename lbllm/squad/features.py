"""SQuAD v1.1 json -> examples -> fixed-length model features.

A context longer than the window is split into overlapping windows ("features") by
the fast tokenizer itself (`return_overflowing_tokens` + `stride`), so one example can
own several features. Everything downstream is vectorized with numpy over features:
the per-feature Python loops of the original BERT recipe dominate preprocessing time
on SQuAD's 88k training questions.

Conventions shared with postprocess.py and finetune.py:
- question first, context second, truncation only of the context;
- `stride` is the tokenizers-library overlap between consecutive windows (the meaning
  HF's run_qa.py gives `--doc_stride`), not the step between window starts;
- questions longer than `max_query_length` tokens are cut to that many tokens, as in
  the original BERT recipe, so every window keeps room for context;
- `offsets[f, t] = (char_start, char_end)` into the example's context for context
  tokens and (-1, -1) for everything else (CLS, question, SEP, padding);
- training answers that do not lie wholly inside a window point at CLS (index 0);
- files are checked, not repaired: an `answer_start` that does not point at its text
  (after trimming surrounding whitespace) is an error, or a skipped question on request.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lbllm.utils import UserError, read_json

__all__ = [
    "SquadFormatError",
    "BadQuestionError",
    "BadQuestion",
    "SquadExample",
    "TrainFeatures",
    "EvalFeatures",
    "read_squad_json",
    "load_squad_json",
    "check_squad",
    "trim_answer",
    "check_lengths",
    "answer_token_positions",
    "examples_from_json",
    "load_examples",
    "prepare_train_features",
    "prepare_eval_features",
]

# Tokenize this many examples per call: batched enough for the Rust tokenizer to
# parallelize, small enough that the Python-side BatchEncoding stays modest in memory.
_CHUNK = 2048


class SquadFormatError(UserError):
    """The file is not usable SQuAD v1.1; the message names the file and the fix."""


class BadQuestionError(SquadFormatError):
    """One question is unusable (the rest of the file may be fine), so a caller can
    offer to skip such questions instead."""


@dataclass(frozen=True)
class SquadExample:
    """One question about one context. `answer_start`/`answer_text` are the first gold
    answer (the one trained on); `answers` keeps all of them for scoring."""

    qid: str
    question: str
    context: str
    answer_text: str
    answer_start: int
    answers: tuple[str, ...]

    @property
    def answer_end(self) -> int:
        """Exclusive character end of the training answer."""
        return self.answer_start + len(self.answer_text)


@dataclass
class TrainFeatures:
    """Padded training windows; `lengths` lets the loader trim padding per batch."""

    input_ids: np.ndarray  # (N, L) int32
    token_type_ids: np.ndarray  # (N, L) int8
    attention_mask: np.ndarray  # (N, L) int8
    start_positions: np.ndarray  # (N,) int64, 0 (CLS) when the answer is not in the window
    end_positions: np.ndarray  # (N,) int64
    example_index: np.ndarray  # (N,) int64 into the example list
    offsets: np.ndarray  # (N, L, 2) int32, -1 outside the context
    lengths: np.ndarray  # (N,) int64 real (unpadded) token count
    num_skipped: int = 0  # examples dropped because they have no answer position (answer_start < 0)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass
class EvalFeatures:
    """Padded evaluation windows plus what post-processing needs to map back to text."""

    input_ids: np.ndarray
    token_type_ids: np.ndarray
    attention_mask: np.ndarray
    example_index: np.ndarray  # (N,) int64 into the example list
    offsets: np.ndarray  # (N, L, 2) int32, -1 outside the context
    lengths: np.ndarray

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


# --------------------------------------------------------------------------- reading

# A question-level problem names the question by id when it has one, else by position.
_SHAPE = '{"data": [{"paragraphs": [{"context": str, "qas": [{"id", "question", "answers": [{"text", "answer_start"}]}]}]}]}'


@dataclass(frozen=True)
class BadQuestion:
    """One unusable question: `problem` and `fix` read as one sentence after its name."""

    qid: str | None
    where: str  # data[a].paragraphs[p].qas[q]
    problem: str
    fix: str

    def message(self, path: str | os.PathLike) -> str:
        name = f"question {self.qid!r} ({self.where})" if self.qid is not None else f"question {self.where}"
        return f"{path}: {name} {self.problem}; {self.fix}"


def read_squad_json(path: str | os.PathLike, *, check_answer_starts: bool = True) -> dict:
    """Load a SQuAD v1.1 file, refusing any unusable question (see `load_squad_json`)."""
    return load_squad_json(path, check_answer_starts=check_answer_starts)[0]


def load_squad_json(
    path: str | os.PathLike, *, skip_bad_examples: bool = False, check_answer_starts: bool = True
) -> tuple[dict, list[BadQuestion]]:
    """Load and check a SQuAD v1.1 file, failing with a message a user can act on
    instead of a KeyError (or a silently wrong label) deep in preprocessing.

    Returns (data, skipped): with `skip_bad_examples`, unusable questions are left out
    of `data` and listed in `skipped`; otherwise the first one raises BadQuestionError.
    """
    path = Path(path)
    data = read_json(path, SquadFormatError, "pass an existing SQuAD v1.1 json file",
                     "regenerate or re-download the file")
    return check_squad(data, path, skip_bad_examples=skip_bad_examples, check_answer_starts=check_answer_starts)


def _fail(path: str | os.PathLike, what: str) -> SquadFormatError:
    return SquadFormatError(f"{path}: not SQuAD v1.1 format ({what}); expected {_SHAPE}")


def _check_version(data: dict, path: str | os.PathLike) -> None:
    """An absent "version" is fine (hand-made files); any other than "1.1" is not,
    since a 2.0 file trains on unanswerable questions as if they had answers."""
    if "version" not in data:
        return
    version = str(data["version"])
    if version.lower().lstrip("v").startswith("2"):
        raise _fail(path, f"version {data['version']!r} is SQuAD 2.0, which has unanswerable questions")
    if version != "1.1":
        raise SquadFormatError(
            f'{path}: "version" is {data["version"]!r}, not "1.1"; pass a SQuAD v1.1 file '
            '(if it is one, set "version": "1.1" or drop the key)'
        )


def _short(text: str, limit: int = 60) -> str:
    """repr of a snippet, cut so an error stays one readable line."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _answer_problem(context: str, answer: Any, check_start: bool) -> tuple[str, str] | None:
    """(problem, fix) for one gold answer, or None when it is usable."""
    if not isinstance(answer, dict) or not isinstance(answer.get("text"), str) or \
            not isinstance(answer.get("answer_start"), int) or isinstance(answer.get("answer_start"), bool):
        return ('has an answer without a string "text" and an integer "answer_start"',
                'give every answer {"text": str, "answer_start": int}')
    if not answer["text"].strip():
        return 'has an answer with an empty "text"', "give the answer its text or remove it"
    if check_start and trim_answer(context, answer["text"], answer["answer_start"]) is None:
        text, start = answer["text"], answer["answer_start"]
        return (f"has answer_start {start} that does not match the context "
                f"(context[{start}:{start + len(text)}] is {_short(context[max(0, start):start + len(text)])}, "
                f"the answer text is {_short(text)})",
                "set answer_start to the character offset of the text in the context")  # fmt: skip
    return None


def _question_problem(qa: Any, context: str, check_starts: bool) -> tuple[str, str] | None:
    """(problem, fix) for one question, or None when it can be trained on and scored."""
    if not isinstance(qa, dict):
        return "is not an object", 'make it {"id": str, "question": str, "answers": [...]}'
    for key in ("id", "question"):
        if not isinstance(qa.get(key), str):
            return f'lacks a string "{key}"', f'give it a "{key}" string'
    answers = qa.get("answers")
    if not isinstance(answers, list) or not answers:
        return 'lacks "answers" (a non-empty list)', 'add "answers": [{"text": str, "answer_start": int}]'
    for answer in answers:
        problem = _answer_problem(context, answer, check_starts)
        if problem is not None:
            return problem
    return None


def check_squad(
    data: Any, path: str | os.PathLike = "SQuAD data", *, skip_bad_examples: bool = False,
    check_answer_starts: bool = True,
) -> tuple[dict, list[BadQuestion]]:
    """Check parsed SQuAD json; returns (usable data, skipped questions).

    Structure above the question level (no "data" list, a paragraph without context,
    SQuAD 2.0, a wrong "version") always raises SquadFormatError. A question that
    lacks a field, has an answer whose `answer_start` does not point at its text (after
    trimming surrounding whitespace), or repeats an earlier question's id raises
    BadQuestionError, or with `skip_bad_examples` is left out (a repeat: the later one)
    and listed. `check_answer_starts=False` is for scoring, which only reads the texts.
    """
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise _fail(path, 'top level must be an object with a "data" list')
    _check_version(data, path)
    skipped: list[BadQuestion] = []
    seen: dict[str, str] = {}
    articles = []
    for a, article in enumerate(data["data"]):
        if not isinstance(article, dict) or not isinstance(article.get("paragraphs"), list):
            raise _fail(path, f'data[{a}] has no "paragraphs" list')
        paragraphs = []
        for p, paragraph in enumerate(article["paragraphs"]):
            where = f"data[{a}].paragraphs[{p}]"
            if not isinstance(paragraph, dict) or not isinstance(paragraph.get("context"), str):
                raise _fail(path, f'{where} has no "context" string')
            if not isinstance(paragraph.get("qas"), list):
                raise _fail(path, f'{where} has no "qas" list')
            kept = []
            for q, qa in enumerate(paragraph["qas"]):
                qid = qa.get("id") if isinstance(qa, dict) and isinstance(qa.get("id"), str) else None
                if isinstance(qa, dict) and qa.get("is_impossible"):
                    raise _fail(path, f"question {qid!r} is_impossible (SQuAD 2.0)")
                problem = _question_problem(qa, paragraph["context"], check_answer_starts)
                if problem is None and qid in seen:
                    problem = (f"repeats the id of the question at {seen[qid]}", "give every question a unique id")
                if problem is None:
                    seen[qid] = f"{where}.qas[{q}]"
                    kept.append(qa)
                    continue
                bad = BadQuestion(qid, f"{where}.qas[{q}]", *problem)
                if not skip_bad_examples:
                    raise BadQuestionError(bad.message(path))
                skipped.append(bad)
            paragraphs.append({**paragraph, "qas": kept} if len(kept) < len(paragraph["qas"]) else paragraph)
        articles.append({**article, "paragraphs": paragraphs})
    return ({**data, "data": articles} if skipped else data), skipped


def trim_answer(context: str, text: str, start: int) -> tuple[str, int] | None:
    """(text, start) with surrounding whitespace trimmed, or None when `answer_start`
    does not point at the text: a wrong offset would train on the wrong span, and
    guessing another occurrence of the text may guess wrong, so it is refused."""
    stripped = text.strip()
    if not stripped or start < 0:
        return None
    start += len(text) - len(text.lstrip())
    return (stripped, start) if context[start : start + len(stripped)] == stripped else None


def examples_from_json(data: dict) -> list[SquadExample]:
    """Flatten SQuAD json into examples, refusing unusable questions (check_squad);
    pass the data `load_squad_json` returned to work on the usable ones only."""
    data, _ = check_squad(data)
    examples: list[SquadExample] = []
    for article in data["data"]:
        for paragraph in article["paragraphs"]:
            context = paragraph["context"]
            for qa in paragraph["qas"]:
                first = qa["answers"][0]
                text, start = trim_answer(context, first["text"], first["answer_start"])
                examples.append(
                    SquadExample(
                        qid=qa["id"],
                        question=qa["question"],
                        context=context,
                        answer_text=text,
                        answer_start=start,
                        answers=tuple(a["text"] for a in qa["answers"]),
                    )
                )
    return examples


def load_examples(path: str | os.PathLike) -> list[SquadExample]:
    """read_squad_json + examples_from_json, for callers that only want examples."""
    return examples_from_json(read_squad_json(path))


# ---------------------------------------------------------------------- tokenization


def _window_room(max_seq_length: int, max_query_length: int) -> int:
    """Context tokens per window in the worst case ([CLS] q [SEP] c [SEP])."""
    return max_seq_length - max_query_length - 3


def check_lengths(max_seq_length: int, doc_stride: int, max_query_length: int) -> None:
    """The Rust tokenizer panics (not raises) when stride >= window, so refuse early."""
    if max_query_length < 1:
        raise ValueError(f"max_query_length must be >= 1, got {max_query_length}")
    room = _window_room(max_seq_length, max_query_length)
    if room < 2:
        raise ValueError(
            f"max_seq_length {max_seq_length} leaves no room for context after a "
            f"{max_query_length}-token question; raise max_seq_length or lower max_query_length"
        )
    if not 0 <= doc_stride < room:
        raise ValueError(
            f"doc_stride {doc_stride} must be in [0, {room}) = [0, max_seq_length - max_query_length - 3); "
            "lower doc_stride or raise max_seq_length"
        )


def _truncate_questions(tokenizer: Any, questions: Sequence[str], max_query_length: int) -> list[str]:
    """Cut each question after its `max_query_length`-th token, in text space, so the
    pair tokenization that follows stays one batched call."""
    questions = [q.lstrip() for q in questions]  # leading spaces only waste offsets
    enc = tokenizer(questions, add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for q, offs in zip(questions, enc["offset_mapping"]):
        out.append(q[: offs[max_query_length - 1][1]] if len(offs) > max_query_length else q)
    return out


def _pad(rows: Sequence[Sequence[Any]], mask: np.ndarray, fill: float, dtype: Any, width: int = 0) -> np.ndarray:
    """Ragged Python rows -> right-padded array via one flat C-level pass.

    Converting unpadded rows this way is ~2x faster than asking the tokenizer to pad
    to max_length and converting the padded lists (most windows are far shorter).
    `width` > 0 flattens one more level (offset pairs)."""
    flat = chain.from_iterable(rows)
    if width:
        flat = chain.from_iterable(flat)
    count = int(mask.sum()) * max(1, width)
    values = np.fromiter(flat, dtype=dtype, count=count)
    out = np.full(mask.shape + ((width,) if width else ()), fill, dtype=dtype)
    out[mask] = values.reshape(-1, width) if width else values
    return out


def _tokenize(
    tokenizer: Any,
    examples: Sequence[SquadExample],
    max_seq_length: int,
    doc_stride: int,
    max_query_length: int,
) -> dict[str, np.ndarray]:
    """Batched windowed tokenization of all examples into padded numpy arrays."""
    check_lengths(max_seq_length, doc_stride, max_query_length)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("SQuAD features need a fast (Rust) tokenizer for offset mappings")
    keys = ("input_ids", "token_type_ids", "example_index", "offsets", "lengths")
    parts: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    for lo in range(0, len(examples), _CHUNK):
        chunk = examples[lo : lo + _CHUNK]
        questions = _truncate_questions(tokenizer, [e.question for e in chunk], max_query_length)
        enc = tokenizer(
            questions,
            [e.context for e in chunk],
            truncation="only_second",
            max_length=max_seq_length,
            stride=doc_stride,
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
            return_token_type_ids=True,
            return_attention_mask=False,
        )
        ids = enc["input_ids"]
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        mask = np.arange(max_seq_length) < lengths[:, None]
        # sequence_ids is None for special tokens; as float, None becomes NaN, which
        # gives a vectorized "is context" mask without a per-token Python loop.
        seq_ids = np.full(mask.shape, np.nan, dtype=np.float32)
        seq_ids[mask] = np.array(list(chain.from_iterable(enc.sequence_ids(i) for i in range(len(ids)))), dtype=np.float32)
        offsets = _pad(enc["offset_mapping"], mask, -1, np.int32, width=2)
        offsets[seq_ids != 1] = -1
        # Compact dtypes: full SQuAD is ~88k windows x 384 tokens; widened per batch.
        parts["input_ids"].append(_pad(ids, mask, tokenizer.pad_token_id or 0, np.int32))
        parts["token_type_ids"].append(_pad(enc["token_type_ids"], mask, 0, np.int8))
        parts["offsets"].append(offsets)
        parts["lengths"].append(lengths)
        parts["example_index"].append(np.asarray(enc["overflow_to_sample_mapping"], dtype=np.int64) + lo)
    if not examples:
        return {
            "input_ids": np.zeros((0, max_seq_length), dtype=np.int32),
            "token_type_ids": np.zeros((0, max_seq_length), dtype=np.int8),
            "attention_mask": np.zeros((0, max_seq_length), dtype=np.int8),
            "example_index": np.zeros(0, dtype=np.int64),
            "offsets": np.zeros((0, max_seq_length, 2), dtype=np.int32),
            "lengths": np.zeros(0, dtype=np.int64),
        }
    arrays = {k: np.concatenate(v) for k, v in parts.items()}
    arrays["attention_mask"] = (np.arange(max_seq_length) < arrays["lengths"][:, None]).astype(np.int8)
    return arrays


def prepare_eval_features(
    tokenizer: Any,
    examples: Sequence[SquadExample],
    max_seq_length: int = 384,
    doc_stride: int = 128,
    max_query_length: int = 64,
) -> EvalFeatures:
    """Windows for prediction; offsets map logits back to context characters."""
    a = _tokenize(tokenizer, examples, max_seq_length, doc_stride, max_query_length)
    return EvalFeatures(**a)


def answer_token_positions(offsets: np.ndarray, char_start: np.ndarray, char_end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Token start/end of each feature's answer, or (0, 0) when it is not wholly inside.

    `offsets` is (N, L, 2) with -1 outside the context; `char_start`/`char_end` are the
    answer's [start, end) per feature (start < 0 marks "no usable answer"). The start
    token is the last context token starting at or before char_start, the end token
    the first context token ending at or after char_end.
    """
    n, length, _ = offsets.shape
    ctx = offsets[..., 0] >= 0
    has_ctx = ctx.any(axis=1)
    first_ctx = np.argmax(ctx, axis=1)
    last_ctx = length - 1 - np.argmax(ctx[:, ::-1], axis=1)
    rows = np.arange(n)
    inside = (
        has_ctx
        & (char_start >= 0)
        & (offsets[rows, first_ctx, 0] <= char_start)
        & (offsets[rows, last_ctx, 1] >= char_end)
    )
    starts_ok = ctx & (offsets[..., 0] <= char_start[:, None])
    start_tok = length - 1 - np.argmax(starts_ok[:, ::-1], axis=1)
    ends_ok = ctx & (offsets[..., 1] >= char_end[:, None])
    end_tok = np.argmax(ends_ok, axis=1)
    start_tok = np.where(inside, start_tok, 0).astype(np.int64)
    end_tok = np.where(inside, end_tok, 0).astype(np.int64)
    return start_tok, end_tok


def prepare_train_features(
    tokenizer: Any,
    examples: Sequence[SquadExample],
    max_seq_length: int = 384,
    doc_stride: int = 128,
    max_query_length: int = 64,
) -> TrainFeatures:
    """Windows with start/end token labels. Examples without an answer position
    (answer_start < 0, only possible for hand-built examples: examples_from_json
    refuses them) are dropped, as training on a wrong label is worse than not training."""
    usable = [e for e in examples if e.answer_start >= 0]
    a = _tokenize(tokenizer, usable, max_seq_length, doc_stride, max_query_length)
    idx = a["example_index"]
    char_start = np.array([e.answer_start for e in usable], dtype=np.int64)[idx] if usable else np.zeros(0, np.int64)
    char_end = np.array([e.answer_end for e in usable], dtype=np.int64)[idx] if usable else np.zeros(0, np.int64)
    start, end = answer_token_positions(a["offsets"], char_start, char_end)
    # Report indices against the caller's list, not the filtered one.
    keep = np.array([i for i, e in enumerate(examples) if e.answer_start >= 0], dtype=np.int64)
    a["example_index"] = keep[idx] if len(keep) else idx
    return TrainFeatures(
        start_positions=start, end_positions=end, num_skipped=len(examples) - len(usable), **a
    )
