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

from lbllm.squad.features import (
    SquadFormatError,
    examples_from_json,
    load_examples,
    prepare_eval_features,
    prepare_train_features,
    read_squad_json,
)
from lbllm.squad.metrics import evaluate, exact_match_score, f1_score, normalize_answer
from lbllm.squad.postprocess import best_spans, postprocess_predictions

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


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A save_pretrained BertForPreTraining + fast WordPiece tokenizer, as pretraining
    writes it: the QA head is missing and gets initialized by the loader."""
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertForPreTraining, BertTokenizerFast

    d = tmp_path_factory.mktemp("tiny_bert")
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
    examples, _ = examples_from_json(data)
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
    examples, _ = examples_from_json(data)
    feats = prepare_train_features(tokenizer, examples, SEQ, STRIDE, QLEN)
    assert len(feats) == 1
    question_tokens = int(((feats.token_type_ids[0] == 0) & (feats.attention_mask[0] == 1)).sum()) - 2  # CLS, SEP
    assert question_tokens == QLEN
    assert feats.start_positions[0] > 0


def test_stride_that_would_panic_the_tokenizer_is_refused(tokenizer):
    examples, _ = examples_from_json(make_squad(1, seed=0, prefix="x"))
    with pytest.raises(ValueError, match="doc_stride"):
        prepare_eval_features(tokenizer, examples, max_seq_length=32, doc_stride=20, max_query_length=16)


def test_misplaced_answer_start_is_reanchored():
    data = make_squad(1, seed=0, prefix="x")
    qa = data["data"][0]["paragraphs"][0]["qas"][0]
    true_start = qa["answers"][0]["answer_start"]
    qa["answers"][0]["answer_start"] = true_start + 3
    (ex,), bad = examples_from_json(data)
    assert bad == 0 and ex.answer_start == true_start


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
    examples, _ = examples_from_json(data)
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
    preds = postprocess_predictions(examples, feats.example_index, feats.offsets, start, end, 20, 30)
    assert preds == {"q": "Maple-Syrup"}  # original casing and punctuation


# ------------------------------------------------------------------ fine-tuning / CLI


def test_schedule_and_config_validation():
    from lbllm.squad.finetune import SquadConfig, linear_warmup_decay

    # warmup 2 of 10 steps: 0, .5, 1, then linear to 0 at step 10
    assert [linear_warmup_decay(s, 10, 2) for s in (0, 1, 2, 6, 10, 11)] == [0.0, 0.5, 1.0, 0.5, 0.0, 0.0]
    assert linear_warmup_decay(0, 5, 0) == 1.0
    cfg = SquadConfig(epochs=2, batch_size=8)
    assert cfg.total_steps(20) == 6 and cfg.warmup_steps(6) == 0
    assert SquadConfig(max_steps=7).total_steps(1000) == 7
    for bad in (dict(lr=0), dict(batch_size=0), dict(warmup_proportion=1.0), dict(doc_stride=400), dict(max_steps=-1)):
        with pytest.raises(ValueError):
            SquadConfig(**bad)


def test_finetuning_is_reproducible(model_dir, squad_files):
    from lbllm.squad.finetune import SquadConfig, finetune, load_qa_model

    train, dev = squad_files
    cfg = SquadConfig(max_steps=4, max_seq_length=SEQ, doc_stride=STRIDE, max_query_length=QLEN,
                      batch_size=8, lr=1e-3, progress=False, threads=1, device="cpu", seed=3)  # fmt: skip
    model, tok, _ = load_qa_model(model_dir)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    _, first = finetune(model, tok, train, dev, cfg)
    model.load_state_dict(state)
    _, second = finetune(model, tok, train, dev, cfg)
    assert first["train_loss"] == second["train_loss"] and first["f1"] == second["f1"]


def test_finetuning_learns_the_cue_task(model_dir, squad_files):
    from lbllm.squad.finetune import SquadConfig, finetune, load_qa_model

    train, dev = squad_files
    cfg = dict(max_seq_length=SEQ, doc_stride=STRIDE, max_query_length=QLEN, batch_size=16,
               lr=3e-3, warmup_proportion=0.1, progress=False, threads=1, device="cpu", seed=0)  # fmt: skip
    model, tok, info = load_qa_model(model_dir)
    assert info["fresh"] == ["qa_outputs.bias", "qa_outputs.weight"]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    preds0, before = finetune(model, tok, train, dev, SquadConfig(max_steps=0, **cfg))
    model.load_state_dict(state)
    preds1, after = finetune(model, tok, train, dev, SquadConfig(max_steps=40, **cfg))
    assert set(preds0) == set(preds1) == {e.qid for e in load_examples(dev)}
    assert before["train_steps"] == 0 and after["train_steps"] == 40
    assert after["f1"] >= before["f1"] + 40.0, (before["f1"], after["f1"])
    assert after["exact_match"] > before["exact_match"]


def test_run_squad_end_to_end(model_dir, squad_files, tmp_path):
    train, dev = squad_files
    out = tmp_path / "out"
    proc = run(RUN_SQUAD, "--model_dir", model_dir, "--train_file", train, "--predict_file", dev,
               "--output_dir", out, "--max_steps", 3, "--batch_size", 8, "--max_seq_length", SEQ,
               "--doc_stride", STRIDE, "--max_query_length", QLEN, "--threads", 1, "--device", "cpu")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    preds = json.loads((out / "predictions.json").read_text())
    assert set(preds) == {e.qid for e in load_examples(dev)}
    assert all(isinstance(v, str) for v in preds.values())
    results = json.loads((out / "results.json").read_text())
    assert results["train_steps"] == 3 and results["num_train_features"] > 48
    assert 0.0 <= results["exact_match"] <= 100.0 and 0.0 <= results["f1"] <= 100.0
    scored = run(SQUAD_EVAL, dev, out / "predictions.json")
    assert json.loads(scored.stdout) == {"exact_match": results["exact_match"], "f1": results["f1"]}
    assert sorted(p.name for p in out.iterdir()) == ["predictions.json", "results.json"]  # no temp files
    assert "squad: exact_match" in proc.stdout.strip().splitlines()[-1]
    assert "LOAD REPORT" not in proc.stderr and "qa_outputs" in proc.stderr


@pytest.mark.parametrize("case", ["missing_predict", "malformed_train", "squad_v2", "missing_model", "too_long_seq"])
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
    else:
        args["--max_seq_length"], expect = 512, "--max_seq_length"
    out = tmp_path / "out"
    proc = run(RUN_SQUAD, *[x for kv in args.items() for x in kv], "--output_dir", out)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(expect) in lines[0], proc.stderr
    assert not out.exists()
