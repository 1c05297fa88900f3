"""SQuAD v1.1: official metric, windowed features, span decoding, the two CLIs.

Everything is built here: a WordPiece tokenizer trained on the test's own sentences,
a BERT of a few thousand parameters, and SQuAD files about a made-up world. The
learning test compares F1 of the same model before and after fine-tuning on a task
a tiny model learns in a few dozen steps (the answer is the word after "code is").
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import load_script
from lbllm.squad.features import (
    BadQuestionError,
    SquadFormatError,
    check_squad,
    examples_from_json,
    load_examples,
    load_squad_json,
    prepare_eval_features,
    prepare_train_features,
    read_squad_json,
)
from lbllm.squad.metrics import aggregate_seeds, evaluate, exact_match_score, f1_score, normalize_answer
from lbllm.squad.postprocess import best_spans, nbest_predictions, postprocess_predictions

ROOT = Path(__file__).resolve().parents[1]
RUN_SQUAD = ROOT / "scripts" / "run_squad.py"
SQUAD_EVAL = ROOT / "scripts" / "squad_eval.py"

# Small lengths so windows and overflow are exercised on short contexts.
SEQ, STRIDE, QLEN = 64, 16, 16

# ----------------------------------------------------------------------------- data

FILLER = [
    "the river runs north past the old mill .",
    "a farmer sells bread and honey at the market .",
    "the tower bell rings twice every evening .",
    "children play near the stone bridge in summer .",
    "the baker wakes before the sun rises .",
    "merchants from the coast bring salt and fish .",
    "snow covers the hills during the long winter .",
    "the mayor lives in a house with a red door .",
]
CODES = ["amber", "falcon", "violet", "copper", "maple", "glacier", "ember", "orchid", "cobalt", "juniper"]
QUESTIONS = ["what is the secret code ?", "which code is written here ?", "tell me the code ."]


def make_squad(n: int, seed: int, prefix: str, long_every: int = 0) -> dict:
    """SQuAD v1.1 dict: each context hides one "the code is X ." among filler
    sentences; every `long_every`-th context is long enough to need several windows."""
    rng = random.Random(seed)
    paragraphs = []
    for i in range(n):
        k = 10 if long_every and i % long_every == 0 else 3
        sentences = [rng.choice(FILLER) for _ in range(k)]
        code = rng.choice(CODES)
        sentences.insert(rng.randrange(k + 1), f"the code is {code} .")
        context = " ".join(sentences)
        start = context.index(f"code is {code}") + len("code is ")
        qa = {"id": f"{prefix}{i}", "question": rng.choice(QUESTIONS), "answers": [{"text": code, "answer_start": start}]}
        paragraphs.append({"context": context, "qas": [qa]})
    return {"version": "1.1", "data": [{"title": "world", "paragraphs": paragraphs}]}


def write_json(path: Path, obj: object) -> Path:
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def squad_files(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("squad")
    return (
        write_json(d / "train.json", make_squad(48, seed=1, prefix="t", long_every=4)),
        write_json(d / "dev.json", make_squad(16, seed=2, prefix="d", long_every=4)),
    )


def save_tiny_bert(d: Path) -> Path:
    """A save_pretrained BertForPreTraining + fast WordPiece tokenizer in `d`, as
    pretraining writes it: the QA head is missing and gets initialized by the loader."""
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertForPreTraining, BertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    corpus = FILLER + QUESTIONS + [f"the code is {c} ." for c in CODES] + ["where does the mayor live ?"]
    tok.train_from_iterator(corpus * 20, trainers.WordPieceTrainer(vocab_size=400, special_tokens=specials))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    tok.decoder = decoders.WordPiece()
    tokenizer = BertTokenizerFast(tokenizer_object=tok, **dict(zip(["pad_token", "unk_token", "cls_token", "sep_token", "mask_token"], specials)))
    tokenizer.save_pretrained(d)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128,
    )  # fmt: skip
    BertForPreTraining(config).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def run(script: Path, *args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True, timeout=300)


# -------------------------------------------------------------------------- metrics


def test_normalize_answer_follows_official_order():
    assert normalize_answer("The  Quick, brown fox!") == "quick brown fox"
    assert normalize_answer("U.S. Army") == "us army"
    assert normalize_answer("the,") == ""  # punctuation first, then the article goes
    assert normalize_answer("Theatre an anthem") == "theatre anthem"  # only whole words
    assert normalize_answer("  a\tb\n c ") == "b c"


def test_exact_match_and_f1_by_hand():
    assert exact_match_score("an apple", "Apple.") == 1.0
    assert exact_match_score("apple pie", "apple") == 0.0
    # pred {big, red, dog}, gold {red, dog, barked}: 2 shared, P = R = 2/3
    assert f1_score("the big red dog", "a red dog barked") == pytest.approx(2 / 3)
    # multiset overlap: pred {red, red, dog} vs gold {red, dog} -> 2 shared, P=2/3, R=1
    assert f1_score("red red dog", "red dog") == pytest.approx(0.8)
    assert f1_score("", "red dog") == 0.0 and exact_match_score("", "red dog") == 0.0
    # v1.1 quirk: both normalize to nothing -> EM 1 but F1 0
    assert exact_match_score("", "the") == 1.0 and f1_score("", "the") == 0.0


def test_evaluate_max_over_truths_and_unanswered(capsys):
    data = {"data": [{"paragraphs": [{"context": "x", "qas": [
        {"id": "q1", "question": "?", "answers": [{"text": "red dog", "answer_start": 0}, {"text": "big red dog", "answer_start": 0}]},
        {"id": "q2", "question": "?", "answers": [{"text": "Paris", "answer_start": 0}]},
        {"id": "q3", "question": "?", "answers": [{"text": "blue", "answer_start": 0}]},
    ]}]}]}  # fmt: skip
    preds = {"q1": "the big red dog", "q2": "in Paris France"}  # q3 unanswered
    result = evaluate(data, preds)
    # q1: EM 1 (second truth), F1 1; q2: EM 0, F1 = 2*(1/3)*1/(4/3) = 0.5; q3: 0
    assert result["exact_match"] == pytest.approx(100 / 3)
    assert result["f1"] == pytest.approx(100 * 1.5 / 3)
    assert "Unanswered question q3 will receive score 0." in capsys.readouterr().err
    assert evaluate(data["data"], preds, warn_unanswered=False) == result  # the "data" list works too


def test_squad_eval_cli_matches_evaluate(tmp_path, squad_files):
    _, dev = squad_files
    data = json.loads(dev.read_text())
    ids = [qa["id"] for a in data["data"] for p in a["paragraphs"] for qa in p["qas"]]
    contexts = {qa["id"]: (p["context"], qa["answers"][0]["text"]) for a in data["data"] for p in a["paragraphs"] for qa in p["qas"]}
    # a mix of exact, partial, wrong and missing predictions
    preds = {}
    for i, qid in enumerate(ids[:-2]):
        context, answer = contexts[qid]
        preds[qid] = [answer, f"code is {answer}", "river", f"The {answer.upper()}!"][i % 4]
    pred_file = write_json(tmp_path / "preds.json", preds)
    proc = run(SQUAD_EVAL, dev, pred_file)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == evaluate(data, preds, warn_unanswered=False)
    assert proc.stderr.count("Unanswered question") == 2


def test_squad_eval_cli_bad_predictions(tmp_path, squad_files):
    _, dev = squad_files
    bad = tmp_path / "preds.json"
    bad.write_text("[1, 2]")
    proc = run(SQUAD_EVAL, dev, bad)
    assert proc.returncode == 2 and str(bad) in proc.stderr and proc.stdout == ""


# ------------------------------------------------------------------------- features


def test_train_features_label_the_answer_span(tokenizer, squad_files):
    train, _ = squad_files
    examples = load_examples(train)
    feats = prepare_train_features(tokenizer, examples, SEQ, STRIDE, QLEN)
    assert len(feats) > len(examples)  # the long contexts overflowed
    labelled = 0
    for f in range(len(feats)):
        s, e = feats.start_positions[f], feats.end_positions[f]
        ex = examples[feats.example_index[f]]
        if s == 0:
            assert e == 0
            continue
        labelled += 1
        assert feats.offsets[f, s, 0] >= 0 and feats.offsets[f, e, 0] >= 0 and e >= s
        text = ex.context[feats.offsets[f, s, 0] : feats.offsets[f, e, 1]]
        assert normalize_answer(text) == normalize_answer(ex.answer_text)
        assert feats.token_type_ids[f, s] == 1 and feats.attention_mask[f, e] == 1
    # every example is labelled in at least one window
    assert labelled >= len(examples)
    assert set(feats.example_index[feats.start_positions > 0]) == set(range(len(examples)))


def test_long_context_windows_overlap_by_stride_and_cover_it(tokenizer):
    context = " ".join(FILLER * 2) + " the code is maple ."
    data = {"data": [{"paragraphs": [{"context": context, "qas": [
        {"id": "long", "question": "what is the secret code ?", "answers": [{"text": "maple", "answer_start": context.index("maple")}]}
    ]}]}]}  # fmt: skip
    examples = examples_from_json(data)
    feats = prepare_eval_features(tokenizer, examples, SEQ, STRIDE, QLEN)
    assert len(feats) >= 3
    windows = [[tuple(o) for o in feats.offsets[f] if o[0] >= 0] for f in range(len(feats))]
    for a, b in zip(windows, windows[1:]):
        assert a[-STRIDE:] == b[:STRIDE]  # consecutive windows share exactly `stride` tokens
    all_tokens = sorted({t for w in windows for t in w})
    assert all_tokens[0][0] == 0 and all_tokens[-1][1] == len(context)
    assert (feats.offsets[..., 0] >= 0).sum(axis=1).max() <= SEQ - 3
    # the training view labels the answer only in windows that contain it
    train = prepare_train_features(tokenizer, examples, SEQ, STRIDE, QLEN)
    inside = [f for f in range(len(train)) if train.start_positions[f] > 0]
    assert inside and len(inside) < len(train)


def test_long_questions_are_cut_to_max_query_length(tokenizer):
    question = " ".join(["which code is written here"] * 10) + " ?"
    data = {"data": [{"paragraphs": [{"context": "the code is amber .", "qas": [
        {"id": "q", "question": question, "answers": [{"text": "amber", "answer_start": 12}]}
    ]}]}]}  # fmt: skip
    examples = examples_from_json(data)
    feats = prepare_train_features(tokenizer, examples, SEQ, STRIDE, QLEN)
    assert len(feats) == 1
    question_tokens = int(((feats.token_type_ids[0] == 0) & (feats.attention_mask[0] == 1)).sum()) - 2  # CLS, SEP
    assert question_tokens == QLEN
    assert feats.start_positions[0] > 0


def test_stride_that_would_panic_the_tokenizer_is_refused(tokenizer):
    examples = examples_from_json(make_squad(1, seed=0, prefix="x"))
    with pytest.raises(ValueError, match="doc_stride"):
        prepare_eval_features(tokenizer, examples, max_seq_length=32, doc_stride=20, max_query_length=16)


def _two_questions() -> dict:
    """A valid file of two questions on one context; cases below break the second."""
    context = "the code is amber . the river runs north ."
    qas = [{"id": "q1", "question": "what is the code ?", "answers": [{"text": "amber", "answer_start": 12}]},
           {"id": "q2", "question": "where does it run ?", "answers": [{"text": "north", "answer_start": 35}]}]
    return {"version": "1.1", "data": [{"title": "t", "paragraphs": [{"context": context, "qas": qas}]}]}


def _break(case: str) -> dict:
    data = _two_questions()
    q2 = data["data"][0]["paragraphs"][0]["qas"][1]
    if case == "missing_id":
        del q2["id"]
    elif case == "missing_question":
        del q2["question"]
    elif case == "missing_answers":
        del q2["answers"]
    elif case == "empty_answers":
        q2["answers"] = []
    elif case == "answer_without_start":
        del q2["answers"][0]["answer_start"]
    elif case == "answer_start_not_int":
        q2["answers"][0]["answer_start"] = "35"
    elif case == "mismatched_answer_start":
        q2["answers"][0]["answer_start"] = 36  # off by one: context[36:41] is "orth "
    elif case == "mismatched_second_answer":
        q2["answers"].append({"text": "river", "answer_start": 3})
    elif case == "duplicate_id":
        q2["id"] = "q1"
    else:
        raise AssertionError(case)
    return data


BAD_QUESTION_CASES = ["missing_id", "missing_question", "missing_answers", "empty_answers", "answer_without_start",
                      "answer_start_not_int", "mismatched_answer_start", "mismatched_second_answer", "duplicate_id"]


@pytest.mark.parametrize("case", BAD_QUESTION_CASES)
def test_bad_question_is_an_error_naming_file_question_and_fix(case):
    with pytest.raises(BadQuestionError) as info:
        check_squad(_break(case), "dev.json")
    message = str(info.value)
    assert "\n" not in message and message.startswith("dev.json: question ")
    qid = {"missing_id": None, "duplicate_id": "q1"}.get(case, "q2")
    assert ("qas[1]" in message) and (qid is None or repr(qid) in message)
    assert "; " in message  # problem; fix
    if case.startswith("mismatched"):
        assert "answer_start" in message and "context[" in message
    if case == "duplicate_id":
        assert "qas[0]" in message and "unique id" in message


@pytest.mark.parametrize("case", BAD_QUESTION_CASES)
def test_skip_bad_examples_drops_only_the_bad_question(case):
    data, skipped = check_squad(_break(case), "dev.json", skip_bad_examples=True)
    assert len(skipped) == 1 and skipped[0].where == "data[0].paragraphs[0].qas[1]"
    (kept,) = data["data"][0]["paragraphs"][0]["qas"]
    assert kept["id"] == "q1" and kept["answers"][0]["text"] == "amber"  # a duplicate loses the later one
    assert [e.qid for e in examples_from_json(data)] == ["q1"]


def test_answer_start_is_checked_strictly_after_trimming_whitespace():
    data = _two_questions()
    qa = data["data"][0]["paragraphs"][0]["qas"][0]
    qa["answers"][0].update(text=" amber ", answer_start=11)  # leading space: start points at it
    ex = examples_from_json(data)[0]
    assert (ex.answer_text, ex.answer_start) == ("amber", 12)
    qa["answers"][0].update(text="amber", answer_start=13)  # not re-anchored to the nearest "amber"
    with pytest.raises(BadQuestionError, match="answer_start 13"):
        examples_from_json(data)
    # scoring reads only texts, so squad_eval can skip the offset check
    assert check_squad(data, check_answer_starts=False)[1] == []


@pytest.mark.parametrize("version,ok", [(None, True), ("1.1", True), ("1.0", False), ("v2.0", False), ("2.0", False)])
def test_version_must_be_1_1_when_present(version, ok):
    data = _two_questions()
    if version is None:
        del data["version"]
    else:
        data["version"] = version
    if ok:
        assert check_squad(data, "f.json")[1] == []
        return
    for skip in (False, True):  # structural: skipping does not help
        with pytest.raises(SquadFormatError, match='f.json: .*(version|"1.1")') as info:
            check_squad(data, "f.json", skip_bad_examples=skip)
        assert not isinstance(info.value, BadQuestionError)


def test_structural_errors_stay_errors_with_skip():
    for bad in ({"version": "1.1"}, {"data": [{"paragraphs": [{"context": "c"}]}]}, {"data": [{"title": "no paragraphs"}]}):
        with pytest.raises(SquadFormatError):
            check_squad(bad, "f.json", skip_bad_examples=True)
    data = _two_questions()
    data["data"][0]["paragraphs"][0]["qas"][1]["is_impossible"] = True
    with pytest.raises(SquadFormatError, match="2.0"):
        check_squad(data, "f.json", skip_bad_examples=True)


def test_make_corpus_squad_files_pass_the_strict_check(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "data_prep" / "make_corpus.py"), "--out", str(tmp_path), "--num_docs", "300",
                           "--squad_train", "200", "--squad_dev", "50"], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for name, count in (("train", 200), ("dev", 50)):
        data, skipped = load_squad_json(tmp_path / "squad" / f"{name}.json", skip_bad_examples=True)
        assert skipped == [] and len(examples_from_json(data)) == count


def test_read_squad_json_rejects_bad_files(tmp_path):
    with pytest.raises(SquadFormatError, match="not found"):
        read_squad_json(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(SquadFormatError, match="malformed JSON"):
        read_squad_json(tmp_path / "bad.json")
    write_json(tmp_path / "v2.json", {"version": "v2.0", "data": []})
    with pytest.raises(SquadFormatError, match="2.0"):
        read_squad_json(tmp_path / "v2.json")
    write_json(tmp_path / "shape.json", {"data": [{"paragraphs": [{"context": "c"}]}]})
    with pytest.raises(SquadFormatError, match="qas"):
        read_squad_json(tmp_path / "shape.json")


# ---------------------------------------------------------------------- postprocess


def test_best_spans_never_picks_invalid_spans():
    # tokens: 0 CLS, 1-2 question, 3 SEP, 4-9 context (chars 2t-8 .. 2t-7), 10 SEP, 11 pad
    offsets = np.full((1, 12, 2), -1, dtype=np.int32)
    for t in range(4, 10):
        offsets[0, t] = ((t - 4) * 2, (t - 4) * 2 + 1)
    start = np.full((1, 12), -10.0, dtype=np.float32)
    end = np.full((1, 12), -10.0, dtype=np.float32)
    start[0, [0, 1, 10, 11]] = 100.0  # CLS / question / SEP / pad: must be ignored
    end[0, [0, 2, 10, 11]] = 100.0
    start[0, 8], end[0, 5] = 9.0, 9.0  # best start and best end, but end < start
    start[0, 6], end[0, 7] = 4.0, 4.0  # the best valid span: 6..7, score 8
    s, e, score = best_spans(start, end, offsets, n_best=20, max_answer_length=30)
    assert (s[0], e[0]) == (6, 7) and score[0] == pytest.approx(8.0)
    # n_best=1 keeps only start 8 and end 5: no valid pair at all
    s, e, score = best_spans(start, end, offsets, n_best=1, max_answer_length=30)
    assert not np.isfinite(score[0]) and (s[0], e[0]) == (0, 0)


def test_best_spans_respects_max_answer_length():
    offsets = np.full((1, 12, 2), -1, dtype=np.int32)
    for t in range(4, 10):
        offsets[0, t] = ((t - 4) * 2, (t - 4) * 2 + 1)
    start = np.full((1, 12), -10.0, dtype=np.float32)
    end = np.full((1, 12), -10.0, dtype=np.float32)
    start[0, 4], end[0, 9] = 5.0, 5.0  # 6 tokens, score 10
    start[0, 6], end[0, 7] = 4.0, 4.0  # 2 tokens, score 8
    s, e, _ = best_spans(start, end, offsets, n_best=20, max_answer_length=3)
    assert (s[0], e[0]) == (6, 7)
    s, e, _ = best_spans(start, end, offsets, n_best=20, max_answer_length=6)
    assert (s[0], e[0]) == (4, 9)


def test_postprocess_picks_best_window_and_cuts_original_text(tokenizer):
    context = " ".join(FILLER * 2) + " The Code is Maple-Syrup ."
    data = {"data": [{"paragraphs": [{"context": context, "qas": [
        {"id": "q", "question": "what is the code ?", "answers": [{"text": "Maple-Syrup", "answer_start": context.index("Maple")}]}
    ]}]}]}  # fmt: skip
    examples = examples_from_json(data)
    feats = prepare_eval_features(tokenizer, examples, SEQ, STRIDE, QLEN)
    n, length = feats.input_ids.shape
    start = np.zeros((n, length), np.float32)
    end = np.zeros((n, length), np.float32)
    last = n - 1
    ctx = np.flatnonzero(feats.offsets[last, :, 0] >= 0)
    chars = [tuple(feats.offsets[last, t]) for t in ctx]
    maple = ctx[[c[0] for c in chars].index(context.index("Maple"))]
    syrup_end = ctx[[c[1] for c in chars].index(context.index("Syrup") + len("Syrup"))]
    start[last, maple], end[last, syrup_end] = 6.0, 6.0
    start[0, np.flatnonzero(feats.offsets[0, :, 0] >= 0)[0]] = 5.0  # a weaker span elsewhere
    end[0, np.flatnonzero(feats.offsets[0, :, 0] >= 0)[0]] = 5.0
    start[:, 0] = end[:, 0] = 50.0  # CLS never wins
    preds, nbest = postprocess_predictions(examples, feats.example_index, feats.offsets, start, end, 20, 30)
    assert preds == {"q": "Maple-Syrup"}  # original casing and punctuation
    assert nbest["q"][0]["text"] == "Maple-Syrup" and nbest["q"][0]["start_logit"] == 6.0


def _window(context: str, length: int = 16, first: int = 4) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Offsets of one hand-made window: tokens first.. are the whitespace words of
    `context` (by character), everything else (CLS, question, SEP, padding) is -1."""
    import re

    words = [(m.start(), m.end()) for m in re.finditer(r"\S+", context)]
    offsets = np.full((1, length, 2), -1, dtype=np.int32)
    for t, (lo, hi) in enumerate(words):
        offsets[0, first + t] = (lo, hi)
    return offsets, words


def _example(qid: str, context: str):
    from lbllm.squad.features import SquadExample

    return SquadExample(qid=qid, question="?", context=context, answer_text="", answer_start=0, answers=("x",))


def test_nbest_ranks_multi_token_spans_with_softmax_probabilities():
    context = "alpha beta gamma delta epsilon zeta"
    offsets, _ = _window(context)
    start = np.full((1, 16), -10.0, np.float32)
    end = np.full((1, 16), -10.0, np.float32)
    start[0, [4, 5, 6]] = 3.0, 1.0, 0.0
    end[0, [5, 6, 4]] = 2.0, 1.5, -1.0
    start[0, 0] = end[0, 0] = 50.0  # CLS never enters the top-n
    # top-3 starts {4,5,6} x ends {5,6,4}; valid pairs by score: (4,5) 5.0, (4,6) 4.5, (5,5) 3.0,
    # (5,6) 2.5, (4,4) 2.0, (6,6) 1.5
    nbest = nbest_predictions([_example("q", context)], np.array([0]), offsets, start, end, n_best_size=3)
    got = nbest["q"]
    assert [e["text"] for e in got] == ["alpha beta", "alpha beta gamma", "beta"]
    assert [(e["start_logit"], e["end_logit"]) for e in got] == [(3.0, 2.0), (3.0, 1.5), (1.0, 2.0)]
    z = np.exp(np.array([5.0, 4.5, 3.0]) - 5.0)
    assert [e["probability"] for e in got] == pytest.approx(list(z / z.sum()), abs=1e-12)
    assert sum(e["probability"] for e in got) == pytest.approx(1.0, abs=1e-12)
    six = nbest_predictions([_example("q", context)], np.array([0]), offsets, start, end, n_best_size=20)["q"]
    assert [e["text"] for e in six[:6]] == ["alpha beta", "alpha beta gamma", "beta", "beta gamma", "alpha", "gamma"]
    assert all(a["probability"] >= b["probability"] for a, b in zip(six, six[1:]))
    assert sum(e["probability"] for e in six) == pytest.approx(1.0, abs=1e-9)


def test_nbest_max_answer_length_excludes_a_higher_scoring_long_span():
    context = "one two three four five six"
    offsets, _ = _window(context)
    start = np.full((1, 16), -10.0, np.float32)
    end = np.full((1, 16), -10.0, np.float32)
    start[0, 4], end[0, 9] = 5.0, 5.0  # "one .. six", 6 tokens, score 10
    start[0, 6], end[0, 7] = 4.0, 4.0  # "three four", 2 tokens, score 8
    args = (np.array([0]), offsets, start, end)
    short = nbest_predictions([_example("q", context)], *args, n_best_size=20, max_answer_length=3)["q"]
    assert short[0]["text"] == "three four"
    assert all(len(e["text"].split()) <= 3 for e in short) and len(short) == 15  # 6 + 5 + 4 spans of <= 3 tokens
    full = nbest_predictions([_example("q", context)], *args, n_best_size=20, max_answer_length=6)["q"]
    assert full[0]["text"] == context and full[0]["start_logit"] == 5.0


def test_nbest_dedups_equal_texts_across_spans_and_windows():
    # "red fox" occurs twice; the context is seen in two windows of the same example,
    # interleaved with a window of another example
    context = "red fox and red fox"
    offsets, _ = _window(context)
    offsets = np.concatenate([offsets, offsets, offsets])
    start = np.full((3, 16), -10.0, np.float32)
    end = np.full((3, 16), -10.0, np.float32)
    start[0, 4], end[0, 5] = 2.0, 2.0  # "red fox" (first) score 4 in window 0
    start[2, 7], end[2, 8] = 3.0, 2.5  # "red fox" (second) score 5.5 in window 2
    start[2, 4], end[2, 5] = 1.0, 1.0  # the first again in window 2, weaker
    start[1, 6], end[1, 6] = 1.0, 1.0  # window 1 belongs to the other example
    examples = [_example("a", context), _example("b", context)]
    nbest = nbest_predictions(examples, np.array([0, 1, 0]), offsets, start, end, n_best_size=20)
    texts = [e["text"] for e in nbest["a"]]
    assert texts[0] == "red fox" and texts.count("red fox") == 1 and len(set(texts)) == len(texts)
    assert (nbest["a"][0]["start_logit"], nbest["a"][0]["end_logit"]) == (3.0, 2.5)  # the best copy
    assert nbest["b"][0]["text"] == "and"
    assert len(texts) == len({context[i:j] for i in range(len(context)) for j in range(len(context) + 1)} & set(texts))


def test_nbest_question_without_valid_span_gets_empty_answer():
    context = "only words here"
    offsets, _ = _window(context)
    start = np.zeros((1, 16), np.float32)
    end = np.zeros((1, 16), np.float32)
    offsets[0] = -1  # no context tokens at all
    preds, nbest = postprocess_predictions([_example("q", context)], np.array([0]), offsets, start, end)
    assert preds == {"q": ""} and nbest == {"q": [{"text": "", "probability": 1.0, "start_logit": 0.0, "end_logit": 0.0}]}


def test_nbest_offsets_through_unicode_return_the_original_substring():
    context = "Le café à Zürich, 東京 e 😀 ok"
    offsets, words = _window(context)
    start = np.full((1, 16), -10.0, np.float32)
    end = np.full((1, 16), -10.0, np.float32)
    start[0, 4 + 3], end[0, 4 + 4] = 4.0, 4.0  # "Zürich, 東京"
    start[0, 4 + 6], end[0, 4 + 6] = 3.0, 3.0  # "😀"
    start[0, 4 + 1], end[0, 4 + 2] = 2.0, 2.0  # "café à"
    args = ([_example("q", context)], np.array([0]), offsets, start, end)
    # top-3 starts {Zürich 4, 😀 3, café 2} x ends {東京 4, 😀 3, à 2}: spans 8, 7, then a tie
    # at 6 ("😀" alone vs "café .. 東京") that goes to the earlier span
    texts = [e["text"] for e in nbest_predictions(*args, n_best_size=3)["q"]]
    assert texts == ["Zürich, 東京", "Zürich, 東京 e 😀", "café à Zürich, 東京"]
    assert [e["text"] for e in nbest_predictions(*args, n_best_size=3, max_answer_length=1)["q"]] == ["😀"]
    assert [e["text"] for e in nbest_predictions(*args, n_best_size=3, max_answer_length=2)["q"]] == ["Zürich, 東京", "😀", "café à"]


def test_unicode_context_through_the_tokenizer_offsets(tokenizer):
    context = "the code is Zürich-東京 😀 today ."
    data = {"data": [{"paragraphs": [{"context": context, "qas": [
        {"id": "u", "question": "what is the code ?", "answers": [{"text": "Zürich-東京", "answer_start": 12}]}
    ]}]}]}  # fmt: skip
    examples = examples_from_json(data)
    feats = prepare_eval_features(tokenizer, examples, SEQ, STRIDE, QLEN)
    offs = feats.offsets[0]
    first = int(np.flatnonzero(offs[:, 0] == context.index("Zürich"))[0])
    last = int(np.flatnonzero(offs[:, 1] == context.index("京") + 1)[0])
    emoji = int(np.flatnonzero(offs[:, 0] == context.index("😀"))[0])
    start = np.zeros(feats.input_ids.shape, np.float32)
    end = np.zeros(feats.input_ids.shape, np.float32)
    start[0, first], end[0, last] = 5.0, 5.0
    start[0, emoji], end[0, emoji] = 4.0, 4.0
    preds, nbest = postprocess_predictions(examples, feats.example_index, feats.offsets, start, end, 20, 30)
    assert preds == {"u": "Zürich-東京"}
    assert "😀" in [e["text"] for e in nbest["u"]]
    assert all(e["text"] in context for e in nbest["u"])


# ------------------------------------------------------------------ fine-tuning / CLI


def _load_run_squad():
    """scripts/ is not a package: load the CLI module to test its pure helpers."""
    return load_script("scripts/run_squad.py")


def test_schedule_and_config_validation():
    import torch

    from lbllm.schedules import build_scheduler
    from lbllm.squad.finetune import SquadConfig

    # fine-tuning's schedule (lbllm.schedules, as train() builds it): warmup 2 of 10 updates,
    # then linear to 0 at update 10; with no warmup the decay starts at the first update
    def lrs(total, warmup):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = build_scheduler("WarmupPolyDecay", {"total_num_steps": total, "warmup_num_steps": warmup})(opt)
        out = []
        for _ in range(total):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out
    assert lrs(10, 2) == pytest.approx([0.5, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0])
    assert lrs(5, 0) == pytest.approx([0.8, 0.6, 0.4, 0.2, 0.0])
    cfg = SquadConfig(epochs=2, batch_size=8)
    assert cfg.total_steps(20) == 6 and cfg.warmup_steps(6) == 0
    assert SquadConfig(max_steps=7).total_steps(1000) == 7
    for bad in (dict(lr=0), dict(batch_size=0), dict(warmup_proportion=1.0), dict(doc_stride=400), dict(max_steps=-1),
                dict(n_best_size=0), dict(dropout=1.0)):
        with pytest.raises(ValueError):
            SquadConfig(**bad)


def test_defaults_are_the_published_recipe_in_config_and_cli(tmp_path):
    from lbllm.squad.config import SquadConfig

    cfg = SquadConfig()
    assert (cfg.lr, cfg.epochs, cfg.warmup_proportion) == (3e-5, 2.0, 0.1)
    assert (cfg.max_seq_length, cfg.doc_stride, cfg.max_query_length) == (384, 128, 64)
    assert (cfg.n_best_size, cfg.max_answer_length, cfg.dropout) == (20, 30, None)
    cli = _load_run_squad()
    args = cli.parse_args(["--model_dir", "m", "--train_file", "t", "--predict_file", "p", "--output_dir", "o"])
    for name in ("lr", "epochs", "warmup_proportion", "max_query_length", "n_best_size", "max_answer_length",
                 "batch_size", "eval_batch_size", "weight_decay", "max_grad_norm", "dropout"):
        assert getattr(args, name) == getattr(cfg, name), name
    assert cli.resolve_lengths(args, 512) == (384, 128)  # the None defaults resolve to the config's
    assert cli.parse_args(["--model_dir", "m", "--train_file", "t", "--predict_file", "p", "--output_dir", "o",
                           "--n_best", "7"]).n_best_size == 7  # the old flag name still works


def test_seed_flags():
    cli = _load_run_squad()
    base = ["--model_dir", "m", "--train_file", "t", "--predict_file", "p", "--output_dir", "o"]
    assert cli.parse_seeds(cli.parse_args(base)) == [42]
    assert cli.parse_seeds(cli.parse_args(base + ["--seed", "7"])) == [7]
    assert cli.parse_seeds(cli.parse_args(base + ["--seeds", "1,2,3"])) == [1, 2, 3]
    for bad in (["--seeds", "1,x"], ["--seeds", "1,1"], ["--seed", "1", "--seeds", "2"]):
        with pytest.raises(cli.UserError):
            cli.parse_seeds(cli.parse_args(base + bad))


def test_aggregate_seeds_mean_and_sample_std():
    per_seed = [{"seed": 1, "exact_match": 80.0, "f1": 88.0, "train_steps": 5},
                {"seed": 2, "exact_match": 82.0, "f1": 90.0, "train_steps": 5},
                {"seed": 3, "exact_match": 84.0, "f1": 95.0, "train_steps": 5}]  # fmt: skip
    out = aggregate_seeds(per_seed)
    assert out["exact_match"] == 82.0 and out["exact_match_std"] == 2.0  # sqrt((4 + 0 + 4) / 2)
    assert out["f1"] == 91.0 and out["f1_std"] == pytest.approx(13**0.5, abs=1e-12)  # sqrt((9 + 1 + 16) / 2)
    assert out["seeds"] == [1, 2, 3] and out["per_seed"] == per_seed
    one = aggregate_seeds(per_seed[:1])
    assert (one["exact_match"], one["f1"], one["exact_match_std"], one["f1_std"]) == (80.0, 88.0, 0.0, 0.0)
    with pytest.raises(ValueError):
        aggregate_seeds([])


def _cfg(**kw):
    from lbllm.squad.finetune import SquadConfig

    base = dict(max_seq_length=SEQ, doc_stride=STRIDE, max_query_length=QLEN, progress=False, threads=1, device="cpu")
    return SquadConfig(**{**base, **kw})


def test_finetuning_is_reproducible(model_dir, squad_files):
    from lbllm.squad.finetune import finetune, load_qa_model, prepare_data

    train, dev = squad_files
    cfg = _cfg(max_steps=4, batch_size=8, lr=1e-3, seed=3)
    model, tok, _ = load_qa_model(model_dir)
    data = prepare_data(tok, train, dev, cfg)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    first = finetune(model, data, cfg).metrics
    model.load_state_dict(state)
    second = finetune(model, data, cfg).metrics
    assert first["train_losses"] == second["train_losses"] and len(first["train_losses"]) == 4
    assert first["train_loss"] == second["train_loss"] and first["f1"] == second["f1"]
    assert first["train_examples"] == 4 * 8 and first["train_examples_per_s"] > 0 and first["predict_examples_per_s"] > 0


def test_loss_is_the_model_loss_and_independent_of_padding(model_dir, squad_files, tokenizer):
    """qa_loss_sum / batch is BertForQuestionAnswering's loss of each window on its own
    (no padding), however wide the batch is padded: a batch's loss is then the sum of
    its slices' losses, which data parallelism relies on."""
    import torch
    from lbllm.squad.finetune import load_qa_model, qa_loss_sum

    train, _ = squad_files
    model, _, _ = load_qa_model(model_dir, dropout=0.0)
    assert model.config.hidden_dropout_prob == 0.0 and model.config.attention_probs_dropout_prob == 0.0
    feats = prepare_train_features(tokenizer, load_examples(train)[:8], SEQ, STRIDE, QLEN)
    assert len(set(feats.lengths.tolist())) > 1  # windows of different lengths share the batch
    cols = ("input_ids", "token_type_ids", "attention_mask")
    t = {k: torch.from_numpy(np.asarray(getattr(feats, k))).long() for k in cols}
    s, e = torch.from_numpy(feats.start_positions), torch.from_numpy(feats.end_positions)
    with torch.no_grad():
        out = model(**t)
        batch = float(qa_loss_sum(out.start_logits, out.end_logits, s, e, t["attention_mask"]) / len(s))
        alone = [float(model(**{k: v[i : i + 1, : feats.lengths[i]] for k, v in t.items()},
                             start_positions=s[i : i + 1], end_positions=e[i : i + 1]).loss) for i in range(len(s))]  # fmt: skip
        padded_hf = float(model(**t, start_positions=s, end_positions=e).loss)
    assert batch == pytest.approx(np.mean(alone), abs=1e-5)
    assert abs(padded_hf - batch) > 1e-3  # HF's own loss would change with the padding


def test_finetuning_learns_the_cue_task(model_dir, squad_files):
    from lbllm.squad.finetune import finetune, load_qa_model, prepare_data

    train, dev = squad_files
    kw = dict(batch_size=16, lr=3e-3, warmup_proportion=0.1, seed=0)
    model, tok, info = load_qa_model(model_dir)
    assert info["fresh"] == ["qa_outputs.bias", "qa_outputs.weight"]
    data = prepare_data(tok, train, dev, _cfg(**kw))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    r0 = finetune(model, data, _cfg(max_steps=0, **kw))
    model.load_state_dict(state)
    r1 = finetune(model, data, _cfg(max_steps=40, **kw))
    before, after = r0.metrics, r1.metrics
    assert set(r0.predictions) == set(r1.predictions) == set(r1.nbest) == {e.qid for e in load_examples(dev)}
    assert all(r1.predictions[q] == r1.nbest[q][0]["text"] for q in r1.predictions)
    assert before["train_steps"] == 0 and after["train_steps"] == 40
    assert after["f1"] >= before["f1"] + 40.0, (before["f1"], after["f1"])
    assert after["exact_match"] > before["exact_match"]


def _flags(model_dir, train, dev, out, *extra):
    return ["--model_dir", model_dir, "--train_file", train, "--predict_file", dev, "--output_dir", out,
            "--batch_size", 8, "--max_seq_length", SEQ, "--doc_stride", STRIDE, "--max_query_length", QLEN,
            "--threads", 1, "--device", "cpu", "--no_progress", *extra]  # fmt: skip


def test_run_squad_end_to_end_over_seeds_skipping_bad_questions(model_dir, squad_files, tmp_path):
    train, dev = squad_files
    bad_train = json.loads(train.read_text())
    bad_train["data"][0]["paragraphs"][0]["qas"][0]["answers"][0]["answer_start"] += 1
    bad_dev = json.loads(dev.read_text())
    paragraphs = bad_dev["data"][0]["paragraphs"]
    paragraphs[1]["qas"][0]["id"] = paragraphs[0]["qas"][0]["id"]  # a repeated id: the later one goes
    train_file, dev_file = write_json(tmp_path / "train.json", bad_train), write_json(tmp_path / "dev.json", bad_dev)
    out = tmp_path / "out"
    proc = run(RUN_SQUAD, *_flags(model_dir, train_file, dev_file, out, "--max_steps", 3, "--seeds", "3,4",
                                  "--skip_bad_examples", "--n_best_size", 5))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["nbest_predictions.json", "predictions.json", "results.json"]
    results = json.loads((out / "results.json").read_text())
    assert results["num_skipped_bad_examples"] == 2 and "skipped 2 bad questions" in proc.stderr
    assert results["num_eval_examples"] == 15 and results["num_train_examples"] == 47
    assert results["seeds"] == [3, 4] and [r["seed"] for r in results["per_seed"]] == [3, 4]
    em = [r["exact_match"] for r in results["per_seed"]]
    f1 = [r["f1"] for r in results["per_seed"]]
    assert results["exact_match"] == pytest.approx(np.mean(em)) and results["f1"] == pytest.approx(np.mean(f1))
    assert results["f1_std"] == pytest.approx(np.std(f1, ddof=1)) and results["exact_match_std"] == pytest.approx(np.std(em, ddof=1))
    for r in results["per_seed"]:
        assert r["train_steps"] == 3 and len(r["train_losses"]) == 3
        assert r["train_examples_per_s"] > 0 and r["predict_examples_per_s"] > 0
    # the seed is set before loading, so the fresh QA head (and the first loss) differs
    assert results["per_seed"][0]["train_losses"][0] != results["per_seed"][1]["train_losses"][0]
    assert results["train_steps"] == 3 and results["num_train_features"] > 47 and results["config"]["seeds"] == [3, 4]
    assert proc.stderr.count("run_squad: seed ") == 2 and proc.stderr.count("examples/s") == 4
    preds = json.loads((out / "predictions.json").read_text())
    nbest = json.loads((out / "nbest_predictions.json").read_text())
    assert set(preds) == set(nbest) and len(preds) == 15
    assert all(preds[q] == nbest[q][0]["text"] and 1 <= len(nbest[q]) <= 5 for q in preds)
    assert all(sum(e["probability"] for e in nbest[q]) == pytest.approx(1.0) for q in nbest)
    # predictions.json is the first seed's, scored against the usable questions
    scored = run(SQUAD_EVAL, dev, out / "predictions.json")
    assert scored.returncode == 0, scored.stderr
    assert "squad: exact_match" in proc.stdout.strip().splitlines()[-1]
    assert "LOAD REPORT" not in proc.stderr and "qa_outputs" in proc.stderr


@pytest.mark.parametrize("case", ["missing_predict", "malformed_train", "squad_v2", "missing_model", "too_long_seq",
                                  "mismatched_answer", "duplicate_id", "wrong_version", "bad_seeds"])
def test_run_squad_bad_input_exits_2_without_output(case, model_dir, squad_files, tmp_path):
    train, dev = squad_files
    args = {"--model_dir": model_dir, "--train_file": train, "--predict_file": dev}
    expect = None
    if case == "missing_predict":
        args["--predict_file"] = expect = tmp_path / "nope.json"
    elif case == "malformed_train":
        args["--train_file"] = expect = tmp_path / "train.json"
        expect.write_text('{"data": [')
    elif case == "squad_v2":
        args["--predict_file"] = expect = write_json(tmp_path / "v2.json", {"version": "v2.0", "data": []})
    elif case == "missing_model":
        args["--model_dir"] = expect = tmp_path / "no_model"
    elif case == "too_long_seq":
        args["--max_seq_length"], expect = 512, "--max_seq_length"
    elif case == "mismatched_answer":
        data = json.loads(train.read_text())
        data["data"][0]["paragraphs"][5]["qas"][0]["answers"][0]["answer_start"] -= 2
        args["--train_file"] = write_json(tmp_path / "train.json", data)
        expect = f"{tmp_path / 'train.json'}: question 't5'"
    elif case == "duplicate_id":
        data = json.loads(dev.read_text())
        data["data"][0]["paragraphs"][3]["qas"][0]["id"] = "d1"
        args["--predict_file"] = write_json(tmp_path / "dev.json", data)
        expect = f"{tmp_path / 'dev.json'}: question 'd1'"
    elif case == "wrong_version":
        data = json.loads(dev.read_text())
        data["version"] = "1.0"
        args["--predict_file"] = expect = write_json(tmp_path / "dev.json", data)
    else:
        args["--seeds"], expect = "1,1", "--seeds"
    out = tmp_path / "out"
    proc = run(RUN_SQUAD, *[x for kv in args.items() for x in kv], "--output_dir", out)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(expect) in lines[0], proc.stderr
    if case in ("mismatched_answer", "duplicate_id"):
        assert "--skip_bad_examples" in lines[0]
    assert not out.exists()
