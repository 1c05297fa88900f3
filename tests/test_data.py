"""Data pipeline: tokenizer, inputs (txt/jsonl/parquet/datasets), BERT sample
semantics, static and dynamic masking, shard format and reader, parts and merging,
sampler.

Everything runs on a tiny corpus generated here (with deliberately messy text) and a
tokenizer trained on it; nothing is read from outside the test's temp directories.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import helpers

from lbllm.data import DataError, GlobalBatchSampler, Manifest, PretrainingDataset, tokenizer_fingerprint
from lbllm.prep import create
from lbllm.prep.inputs import CorpusStats, ReadOptions, Source, expand_inputs, plan_units, read_documents
from lbllm.data.masking import MaskingConfig, mask_tokens, row_keys, uniform
from lbllm.data.sampler import FeistelPermutation
from lbllm.prep.samples import SampleConfig, num_to_predict, split_documents, split_sentences, tokenize_documents

ROOT = Path(__file__).resolve().parent.parent
SEQ, PREDS = 64, 10
ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def cli(script: str, *args, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, f"data_prep/{script}", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, env=ENV, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def load_script(name: str):
    return helpers.load_script(f"data_prep/{name}.py")




def shards_in_process(*args) -> int:
    """create_shards.py in this process with one worker (no interpreter start-up; no
    fork of the test process). Returns the exit status."""
    return load_script("create_shards").main([*map(str, args), "--workers", "1"])


def all_arrays(directory: Path, epoch: int = 0) -> dict[str, np.ndarray]:
    ds = PretrainingDataset(directory)
    return {k: v.numpy() for k, v in ds.get_batch(np.arange(len(ds)), epoch=epoch).items()}


def assert_same_samples(a: Path, b: Path) -> None:
    x, y = all_arrays(a), all_arrays(b)
    assert x["input_ids"].shape == y["input_ids"].shape, (a, b)
    for k in x:
        assert np.array_equal(x[k], y[k]), k


# ---------------------------------------------------------------------------------------
# Fixtures: messy corpus -> tokenizer -> shards
# ---------------------------------------------------------------------------------------

MESSY_DOCS = [
    "Ünïcödé café naïve résumé — “quoted” text. 東京 is a big city! Emoji 🎉 here.".encode(),
    "Bell\x07 char and null\x00 byte here. Zero\u200bwidth joins words.".encode(),
    b"\x00\x01\x02",  # control characters only: an empty document
    "\ufeff".encode(),  # a lone BOM: an empty document
    b"Just one sentence in this document.",
    b"Another lonely sentence",
    b"Literal [SEP] and [MASK] tokens are text here. They must not become separators.",
    b"Windows line one ends here.\r\nWindows line two ends here.\r",
    b"bad \xff\xfe bytes in here. The rest is fine.",
    b"Mr. Smith met Dr. Jones in the U.S. Army. Then they left.",
]


def _make_corpus(directory: Path) -> list[Path]:
    rng = random.Random(0)
    syllables = ["ka", "lo", "mi", "ren", "tu", "sa", "vor", "ni", "pel", "da", "qua", "zen", "bo", "fi", "gra"]
    words = sorted({"".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(400)})
    weights = [1.0 / (i + 1) for i in range(len(words))]  # Zipf-like

    def sentence() -> str:
        w = rng.choices(words, weights, k=rng.randint(4, 16))
        return " ".join([w[0].capitalize(), *w[1:]]) + rng.choice([".", ".", ".", "!", "?"])

    files = []
    for f in range(2):
        chunks: list[bytes] = []
        for d in range(260):
            lines = [" ".join(sentence() for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 6))]
            chunks.append("\n".join(lines).encode())
            if d % 40 == 7:
                chunks.append(MESSY_DOCS[(d // 40 + 5 * f) % len(MESSY_DOCS)])
        if f == 0:
            chunks.extend(MESSY_DOCS)
            chunks.append(" ".join(rng.choice(words) for _ in range(3000)).encode())  # one very long line
        separators = [b"\n\n", b"\n   \t\n", b"\n\n\n", "\n\u3000\n".encode()]
        body = b"".join(c + rng.choice(separators) for c in chunks)
        path = directory / f"part-{f}.txt"
        path.write_bytes(body)
        files.append(path)
    return files


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("lbllm_data")
    corpus = root / "corpus"
    corpus.mkdir()
    files = _make_corpus(corpus)
    cli("build_tokenizer.py", "--input", str(corpus / "*.txt"), "--vocab_size", 300, "--out", root / "tok")
    args = ["--input", *files, "--tokenizer", root / "tok", "--max_seq_length", SEQ, "--max_predictions_per_seq", PREDS,
            "--dupe_factor", 2, "--samples_per_shard", 700, "--unit_mb", 0.02, "--seed", 7]
    cli("create_shards.py", *args, "--out", root / "shards", "--workers", 2)
    return {"root": root, "files": files, "tok": root / "tok", "shards": root / "shards", "args": args}


@pytest.fixture(scope="session")
def everything(data) -> dict:
    """All samples as numpy arrays, plus the original (unmasked) tokens."""
    ds = PretrainingDataset(data["shards"], tokenizer_dir=data["tok"], max_seq_length=SEQ)
    batch = {k: v.numpy() for k, v in ds.get_batch(np.arange(len(ds))).items()}
    original = batch["input_ids"].copy()
    rows = np.repeat(np.arange(len(ds)), PREDS).reshape(len(ds), PREDS)
    real = batch["masked_lm_weights"] > 0
    original[rows[real], batch["masked_lm_positions"][real]] = batch["masked_lm_ids"][real]
    return {"ds": ds, "batch": batch, "original": original, "real": real}


# ---------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------


def test_tokenizer_loads_with_transformers(data):
    from transformers import AutoTokenizer, BertTokenizerFast

    for cls in (BertTokenizerFast, AutoTokenizer):
        tok = cls.from_pretrained(str(data["tok"]))
        assert tok.model_max_length == 512
        assert [tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id] == [0, 1, 2, 3, 4]
        enc = tok("Kalo mi.", "Ren tu!")
        tokens = tok.convert_ids_to_tokens(enc["input_ids"])
        first_sep = tokens.index("[SEP]")
        assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]" and first_sep < len(tokens) - 1
        assert enc["token_type_ids"] == [0] * (first_sep + 1) + [1] * (len(tokens) - first_sep - 1)
        assert tok.tokenize("KALO Café") == tok.tokenize("kalo cafe")  # lowercase + strip accents
    vocab = (data["tok"] / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] and len(vocab) <= 300
    assert any(t.startswith("##") for t in vocab)


def _plain_hf_vocab(files, vocab_size: int, limit_alphabet: int = 1000) -> list[str]:
    """The HF trainer alone, as build_tokenizer used it before: the control."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from lbllm.prep.tokenizer import SPECIAL_TOKENS, bert_normalizer

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]", continuing_subword_prefix="##"))
    tok.normalizer, tok.pre_tokenizer = bert_normalizer(True), pre_tokenizers.BertPreTokenizer()
    tok.train([str(f) for f in files], trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), limit_alphabet=limit_alphabet,
        continuing_subword_prefix="##", show_progress=False))
    vocab = tok.get_vocab()
    return sorted(vocab, key=vocab.get)


def _vocab(tok) -> list[str]:
    vocab = tok.get_vocab()
    return sorted(vocab, key=vocab.get)


def test_tokenizer_training_is_deterministic(tmp_path):
    """Thirteen two-letter words, each seen 3 times: every merge ties, and the HF trainer
    breaks the ties by hash-map order (tokenizers#1794), so which 6 merges fit in the
    vocabulary changes from run to run. build_tokenizer's must not, id for id; also when
    the alphabet limit cuts through characters of equal count."""
    from lbllm.prep.tokenizer import TokenizerConfig, train_tokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    words = [letters[i] + letters[i + 1] for i in range(0, 26, 2)]
    (tmp_path / "c.txt").write_text("\n".join([" ".join(words)] * 3) + "\n")
    files = [tmp_path / "c.txt"]
    size = 5 + 26 + 13 + 6
    plain = {tuple(_plain_hf_vocab(files, size)) for _ in range(4)}
    assert len(plain) > 1, "control: the HF trainer alone gave the same vocabulary 4 times"
    for limit in (1000, 20):  # 20 of 26 letters, all of count 3
        runs = {tuple(_vocab(train_tokenizer(files, TokenizerConfig(size, limit_alphabet=limit), workers)))
                for workers in (1, 2, 1, 2)}
        assert len(runs) == 1, f"limit_alphabet {limit}: {len(runs)} different vocabularies in 4 runs"
        vocab = list(runs.pop())
        if limit == 1000:
            assert len(vocab) == size and vocab[5:31] == list(letters)  # specials, alphabet, ##chars, merges
            assert sorted(vocab[31:44]) == vocab[31:44] == ["##" + w[1] for w in words]
            assert all(t in words for t in vocab[44:])
        else:
            assert vocab[5:25] == list(letters[:20])  # the tie cut by code point


def test_tokenizer_alphabet_matches_the_hf_trainer(tmp_path):
    """The first pass counts characters the way the trainer sees words (normalizer, then
    whitespace and punctuation splits): the alphabet and the ## characters are exactly the
    HF trainer's own, on text with accents, CJK, punctuation inside words and symbols."""
    from lbllm.prep.tokenizer import TokenizerConfig, train_tokenizer

    text = ("Café naïve résumé don't stop—now! x² = y³ + 1; 東京都 is big. (e-mail) a_b "
            "Ångström ﬁne ÆØ $5 #tag @you ~tilde `tick` ½ \u00a0nbsp tab\there ok…\n") * 3
    (tmp_path / "u.txt").write_text(text, encoding="utf-8")
    files = [tmp_path / "u.txt"]
    ours = _vocab(train_tokenizer(files, TokenizerConfig(6)))  # no merges fit: alphabet + ##chars only
    theirs = _plain_hf_vocab(files, 6)
    assert sorted(ours) == sorted(theirs) and len(ours) > 40


@pytest.mark.parametrize("lowercase", [True, False])
def test_fast_normalizer_equals_the_rust_one(lowercase):
    from lbllm.prep.tokenizer import bert_normalizer, normalize_fast

    text = ("Ünïcödé ÀÉÎÕÜ ﬁ ǅ İstanbul ΣΑΣ σς 東京 e\u0301 a\u0308\u0301 \x00\x07\ufffd \u200b\u00ad "
            "tab\tnl\n\r\u3000\u2028 ½ x² Ⅻ 🙂 Straße ﬀ\n") * 2
    assert normalize_fast(text, lowercase) == bert_normalizer(lowercase).normalize_str(text)


def test_build_tokenizer_without_input_writes_nothing(tmp_path):
    proc = cli("build_tokenizer.py", "--input", str(tmp_path / "nope*.txt"), "--vocab_size", 100,
               "--out", tmp_path / "tok", check=False)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "no input files" in proc.stderr
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------
# Text handling
# ---------------------------------------------------------------------------------------


def test_split_sentences():
    assert split_sentences("One here. Two there! Three? 4 is a digit. \"Quoted\" start.") == [
        "One here.", "Two there!", "Three?", "4 is a digit.", "\"Quoted\" start."
    ]
    assert split_sentences("no split after e.g. lowercase. Mr. Smith and J. R. R. Tolkien met. Ok.") == [
        "no split after e.g. lowercase.", "Mr. Smith and J. R. R. Tolkien met.", "Ok."
    ]
    assert split_sentences("He said \"stop.\" Then left.") == ["He said \"stop.\"", "Then left."]
    assert split_sentences("   \t ") == []


def test_units_cover_files_and_cut_at_blank_lines(data):
    units = plan_units(data["files"], 20_000)
    assert len(units) > 4
    for path in data["files"]:
        mine = [u for u in units if u.path == str(path)]
        assert mine[0].start == 0 and mine[-1].end == path.stat().st_size
        assert all(a.end == b.start for a, b in zip(mine, mine[1:]))
        raw = path.read_bytes()
        for u in mine[1:]:
            line_before = raw[: u.start - 1].rsplit(b"\n", 1)[-1]
            assert raw[u.start - 1 : u.start] == b"\n" and not line_before.strip()
    assert expand_inputs([str(data["files"][0].parent)]) == sorted(data["files"])


def test_corpus_stats_count_messy_text(data):
    stats = json.loads((data["shards"] / "manifest.json").read_text())["stats"]
    assert stats["empty_documents_skipped"] >= 4  # control-only and BOM-only documents
    assert stats["decode_errors"] >= 1
    assert stats["long_sentences_split"] >= 1
    assert stats["documents"] > 500 and stats["sentences"] > stats["documents"]


# ---------------------------------------------------------------------------------------
# Input formats: txt, jsonl, parquet, datasets
# ---------------------------------------------------------------------------------------


def _sentence_maker(seed: int):
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ren", "tu", "sa", "vor", "ni", "pel", "da", "qua", "zen", "bo", "fi", "gra"]
    words = sorted({"".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(400)})

    def sentence() -> str:
        w = rng.choices(words, k=rng.randint(4, 14))
        return " ".join([w[0].capitalize(), *w[1:]]) + rng.choice([".", ".", "!", "?"])

    return rng, sentence


def _documents(seed: int, count: int) -> list[list[str]]:
    """Documents as lists of non-blank lines, with some messy ones mixed in."""
    rng, sentence = _sentence_maker(seed)
    docs = [[" ".join(sentence() for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 5))]
            for _ in range(count)]
    messy = [
        ["Ünïcödé café naïve résumé — “quoted” text. 東京 is a big city! Emoji 🎉 here."],
        ["Bell\x07 char and null\x00 byte here. Zero\u200bwidth joins words."],
        ["\x00\x01\x02"],  # control characters only: an empty document
        ["Windows line one ends here.\r", "Windows line two ends here.\r"],
        ["Literal [SEP] and [MASK] tokens are text here. They must not become separators."],
        ["bad \ufffd\ufffd bytes in here. The rest is fine."],
        ["Just one sentence in this document."],
    ]
    for i, doc in enumerate(messy):
        docs.insert((i * 7919 + seed) % len(docs), doc)
    return docs


def _write_txt(path: Path, docs: list[list[str]]) -> Path:
    path.write_text("".join("\n".join(d) + "\n\n" for d in docs), encoding="utf-8")
    return path


def _write_jsonl(path: Path, docs: list[list[str]], extra_empty: bool = True) -> Path:
    lines = [json.dumps({"id": i, "text": "\n".join(d)}) for i, d in enumerate(docs)]
    if extra_empty:  # empty records: counted, and they change nothing else
        lines[3:3] = [json.dumps({"text": None}), json.dumps({"text": "  \n\t "}), ""]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _write_parquet(path: Path, docs: list[list[str]], row_group_size: int | None = None) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = ["\n".join(d) for d in docs]
    texts.insert(2, None)
    pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts}), path,
                   row_group_size=row_group_size or len(texts))
    return path


def test_same_documents_in_every_format_give_identical_shards(data, tmp_path):
    """The same documents as txt, jsonl, parquet and a saved `datasets` dataset give
    the same samples (all arrays equal): the format only changes how documents are read."""
    import datasets

    parts = [_documents(seed, 50) for seed in (1, 2)]
    common = ["--tokenizer", data["tok"], "--max_seq_length", SEQ, "--max_predictions_per_seq", PREDS,
              "--dupe_factor", 2, "--seed", 3, "--unit_mb", 1]
    made = {}
    for fmt, writer in (("txt", _write_txt), ("jsonl", _write_jsonl), ("parquet", _write_parquet)):
        files = [writer(tmp_path / f"in-{i}.{fmt}", docs) for i, docs in enumerate(parts)]
        assert shards_in_process("--input", *files, *common, "--out", tmp_path / fmt) == 0
        made[fmt] = json.loads((tmp_path / fmt / "manifest.json").read_text())
    assert made["txt"]["stats"]["units"] == 2 and made["txt"]["num_samples"] > 200
    assert_same_samples(tmp_path / "txt", tmp_path / "jsonl")
    assert_same_samples(tmp_path / "txt", tmp_path / "parquet")
    assert made["jsonl"]["stats"]["empty_documents_skipped"] == made["txt"]["stats"]["empty_documents_skipped"] + 4
    assert made["parquet"]["stats"]["empty_documents_skipped"] == made["txt"]["stats"]["empty_documents_skipped"] + 2
    assert [i["format"] for i in made["parquet"]["inputs"]] == ["parquet", "parquet"]
    # One txt file == one dataset with the same documents (saved to disk, a DatasetDict).
    everything = parts[0] + parts[1]
    _write_txt(tmp_path / "all.txt", everything)
    saved = tmp_path / "saved_dataset"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["\n".join(d) for d in everything]})}
                         ).save_to_disk(str(saved))
    assert shards_in_process("--input", tmp_path / "all.txt", *common, "--out", tmp_path / "all") == 0
    assert shards_in_process("--hf_dataset", saved, "--hf_split", "train", *common, "--out", tmp_path / "hf") == 0
    assert_same_samples(tmp_path / "all", tmp_path / "hf")
    hf = json.loads((tmp_path / "hf" / "manifest.json").read_text())
    assert hf["inputs"][0]["format"] == "hf" and hf["inputs"][0]["rows"] == len(everything)


def test_record_formats_many_units_independent_of_workers(data, tmp_path):
    """jsonl cut at line ends and parquet row groups cut into row ranges: many units,
    byte-identical output for 1 and 2 workers, every record read exactly once."""
    docs = _documents(5, 400)
    jsonl = _write_jsonl(tmp_path / "in.jsonl", docs)
    parquet = _write_parquet(tmp_path / "in.parquet", docs, row_group_size=90)
    units = plan_units([Source("jsonl", str(jsonl)), Source("parquet", str(parquet))], 6000)
    stats = CorpusStats()
    read = [d for u in units for d in read_documents(u, stats)]
    assert sum(u.kind == "jsonl" for u in units) > 5 and sum(u.kind == "parquet" for u in units) > 5
    assert len({u.group for u in units if u.kind == "parquet"}) == 5  # 408 rows in groups of 90
    assert len(read) == 2 * len(docs) + 3  # + jsonl's null and blank records, parquet's null
    args = ["--input", jsonl, parquet, "--tokenizer", data["tok"], "--max_seq_length", SEQ, "--unit_mb", 6000 / 2**20,
            "--samples_per_shard", 500]
    assert shards_in_process(*args, "--out", tmp_path / "one") == 0
    cli("create_shards.py", *args, "--out", tmp_path / "two", "--workers", 2)
    for p in (tmp_path / "one").iterdir():
        assert p.read_bytes() == (tmp_path / "two" / p.name).read_bytes(), p.name


def test_saved_dataset_with_many_units(data, tmp_path):
    """A `datasets` dataset (a select()ed view, saved) is cut into row ranges by text
    size; reading the units gives every row once, in order."""
    import datasets

    docs = _documents(6, 300)
    ds = datasets.Dataset.from_dict({"body": ["\n".join(d) for d in docs], "n": list(range(len(docs)))})
    ds.select(range(len(docs) - 1, -1, -1)).save_to_disk(str(tmp_path / "ds"))  # reversed
    source = Source("hf", str(tmp_path / "ds"))
    options = ReadOptions(text_field="body")
    units = plan_units([source], 5000, options)
    assert len(units) > 5 and units[0].start == 0 and units[-1].end == len(docs)
    assert all(a.end == b.start for a, b in zip(units, units[1:]))
    read = [d for u in units for d in read_documents(u, CorpusStats(), options, [source])]
    assert read == [[line for line in d if line.strip()] for d in reversed(docs)]
    args = ["--hf_dataset", tmp_path / "ds", "--text_field", "body", "--tokenizer", data["tok"],
            "--max_seq_length", SEQ, "--unit_mb", 5000 / 2**20]
    cli("create_shards.py", *args, "--out", tmp_path / "two", "--workers", 2)
    assert shards_in_process(*args, "--out", tmp_path / "one") == 0
    assert_same_samples(tmp_path / "one", tmp_path / "two")


def _run_fails(tmp_path, *args, capsys=None) -> str:
    """create_shards must exit 2 with one line on stderr and write nothing; in this
    process when ``capsys`` is given (faster), else as a subprocess with 2 workers."""
    out = tmp_path / "out" / "shards"
    if capsys is not None:
        capsys.readouterr()
        assert shards_in_process(*args, "--out", out) == 2
        stderr = capsys.readouterr().err
    else:
        proc = cli("create_shards.py", *args, "--out", out, "--workers", 2, check=False)
        assert proc.returncode == 2, proc.stderr
        stderr = proc.stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert not (tmp_path / "out").exists()
    return stderr


def test_bad_records_are_clear_errors_or_counted(data, tmp_path, capsys):
    docs = _documents(7, 40)
    common = ["--tokenizer", data["tok"], "--max_seq_length", SEQ, "--unit_mb", 0.002]
    path = _write_jsonl(tmp_path / "bad.jsonl", docs, extra_empty=False)
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[30] = '{"text": "cut off'  # not JSON
    lines[35] = '{"body": "wrong key"}'
    lines[36] = '["a list"]'
    lines[37] = '{"text": 42}'
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    err = _run_fails(tmp_path, "--input", path, *common)  # raised in a worker process
    assert f"{path}:31:" in err and "not JSON" in err and "--on_bad_record skip" in err
    assert shards_in_process("--input", path, *common, "--on_bad_record", "skip", "--out", tmp_path / "ok") == 0
    stats = json.loads((tmp_path / "ok" / "manifest.json").read_text())["stats"]
    assert stats["bad_records_skipped"] == 4
    assert stats["documents"] + stats["empty_documents_skipped"] == len(docs) - 4
    # A wrong --text_field is caught before any work, naming the keys that exist.
    err = _run_fails(tmp_path, "--input", path, *common, "--text_field", "content", capsys=capsys)
    assert "--text_field content" in err and f"{path}:1" in err and "id, text" in err
    parquet = _write_parquet(tmp_path / "x.parquet", docs)
    err = _run_fails(tmp_path, "--input", parquet, *common, "--text_field", "content", capsys=capsys)
    assert "id, text" in err
    assert "not text" in _run_fails(tmp_path, "--input", parquet, *common, "--text_field", "id", capsys=capsys)
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    assert "parquet" in _run_fails(tmp_path, "--input", tmp_path / "broken.parquet", *common, capsys=capsys)
    # Empty inputs: a clear error, nothing written.
    (tmp_path / "empty.jsonl").write_text("")
    assert "empty" in _run_fails(tmp_path, "--input", tmp_path / "empty.jsonl", *common, capsys=capsys)
    (tmp_path / "blank.jsonl").write_text('{"text": "  "}\n{"text": null}\n')
    assert "no samples" in _run_fails(tmp_path, "--input", tmp_path / "blank.jsonl", *common, capsys=capsys)
    (tmp_path / "c.txt.gz").write_bytes(b"\x1f\x8b")
    assert "decompress" in _run_fails(tmp_path, "--input", tmp_path / "c.txt.gz", *common, capsys=capsys)


def test_bad_dataset_arguments(data, tmp_path, capsys):
    import datasets

    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["A b. C d."] * 4})}).save_to_disk(str(saved))
    common = ["--tokenizer", data["tok"], "--max_seq_length", SEQ]
    def fails(*args) -> str:
        return _run_fails(tmp_path, *args, *common, capsys=capsys)

    assert "has splits train" in fails("--hf_dataset", saved, "--hf_split", "test")
    assert "has columns text" in fails("--hf_dataset", saved, "--text_field", "body")
    assert "no such directory" in fails("--hf_dataset", tmp_path / "no_such_dataset")
    assert "--hf_dataset" in fails("--input", saved)  # a hint: not a directory of text files
    assert "--input or --hf_dataset" in fails()


def test_huge_document_is_cut_and_counted(data, tmp_path):
    """A file with no blank lines is one document; past MAX_DOCUMENT_UNITS units it is
    cut at a line end (bounded worker memory), and the cut is counted."""
    from lbllm.prep.inputs import MAX_DOCUMENT_UNITS

    _, sentence = _sentence_maker(9)
    path = tmp_path / "huge.txt"
    path.write_text("\n".join(" ".join(sentence() for _ in range(5)) for _ in range(600)) + "\n", encoding="utf-8")
    unit = 2000
    units = plan_units([path], unit)
    assert units[0].start == 0 and units[-1].end == path.stat().st_size
    assert all(a.end == b.start for a, b in zip(units, units[1:]))
    assert sum(u.forced_cut for u in units) >= 2
    assert all(u.num_bytes <= (MAX_DOCUMENT_UNITS + 2) * unit for u in units)
    raw = path.read_bytes()
    assert all(raw[u.start - 1 : u.start] == b"\n" for u in units[1:])  # cut at line ends
    assert shards_in_process("--input", path, "--tokenizer", data["tok"], "--max_seq_length", SEQ,
                             "--unit_mb", unit / 2**20, "--out", tmp_path / "s") == 0
    stats = json.loads((tmp_path / "s" / "manifest.json").read_text())["stats"]
    assert stats["units_cut_inside_document"] == sum(u.forced_cut for u in units)


WIKITEXT = """ = {title} = 

 {para}
 {para}

 = = {section} = = 

 {para}

 = = = {section} = = = 

 {para}
"""


def _wikitext(seed: int, articles: int) -> str:
    """Text shaped like WikiText: titles, sections, subsections, paragraphs per line."""
    rng, sentence = _sentence_maker(seed)

    def para() -> str:
        return " ".join(sentence() for _ in range(rng.randint(2, 6)))

    out = []
    for _ in range(articles):
        block = WIKITEXT
        while "{para}" in block:
            block = block.replace("{para}", para(), 1)
        out.append(" \n" + block.format(title=sentence()[:-1], section=sentence()[:-1]))
    return "".join(out)


def test_wikitext_headings(data, tmp_path):
    """Headings kept as text are one-sentence documents that cannot have an actual
    next: NSP drifts above 0.5. Dropping them, or using titles as article boundaries,
    brings it back to 0.5."""
    path = tmp_path / "wiki.txt"
    path.write_text(_wikitext(11, 160), encoding="utf-8")
    docs = {h: read_documents(plan_units([path], 1 << 30)[0], CorpusStats(), ReadOptions(headings=h))
            for h in ("keep", "drop", "articles")}
    assert len(docs["articles"]) == 160 and not any(l.strip().startswith("=") for d in docs["articles"] for l in d)
    assert len(docs["keep"]) == 160 * 6 and len(docs["drop"]) == 160 * 3
    units = plan_units([path], 3000, ReadOptions(headings="articles"))
    assert all(path.read_bytes()[u.start :].startswith(b" = ") for u in units[1:])  # cut before a title
    fractions = {}
    for h in ("keep", "drop", "articles"):
        assert shards_in_process("--input", path, "--tokenizer", data["tok"], "--max_seq_length", SEQ,
                                 "--unit_mb", 0.05, "--headings", h, "--out", tmp_path / h) == 0
        m = json.loads((tmp_path / h / "manifest.json").read_text())
        fractions[h] = m["stats"]["nsp_random_fraction"]
        assert m["read_options"]["headings"] == h and m["num_samples"] > 900
    assert fractions["keep"] > 0.58
    assert abs(fractions["drop"] - 0.5) < 0.04 and abs(fractions["articles"] - 0.5) < 0.04, fractions


# ---------------------------------------------------------------------------------------
# Sample semantics (Devlin et al. 2019 / create_pretraining_data)
# ---------------------------------------------------------------------------------------


def test_sample_layout(everything):
    b = everything["batch"]
    ids, types, attn = b["input_ids"], b["token_type_ids"], b["attention_mask"]
    lengths = attn.sum(1)
    assert ids.shape[1] == SEQ and (lengths <= SEQ).all() and (lengths >= 5).all()
    rows = np.arange(len(ids))
    b_start = np.argmax(types, axis=1)
    assert (ids[:, 0] == 2).all() and (ids[rows, lengths - 1] == 3).all() and (ids[rows, b_start - 1] == 3).all()
    assert (b_start >= 3).all() and (b_start <= lengths - 2).all()  # A and B non-empty
    pos = np.arange(SEQ)[None]
    assert ((attn == 1) == (pos < lengths[:, None])).all()
    assert ((types == 1) == ((pos >= b_start[:, None]) & (pos < lengths[:, None]))).all()
    assert (ids[pos >= lengths[:, None]] == 0).all()
    # Exactly three special tokens per row in the original text: [CLS] and two [SEP];
    # text spelling "[SEP]" or "[MASK]" was tokenized as text.
    original = everything["original"]
    assert ((original[:, :] <= 4) & (pos < lengths[:, None])).sum() == 3 * len(ids)
    assert (lengths == SEQ).mean() > 0.5  # most pairs fill the sequence


def test_masking_rates(everything):
    b, original, real = everything["batch"], everything["original"], everything["real"]
    lengths = b["attention_mask"].sum(1)
    count = real.sum(1)
    expected = num_to_predict(lengths, SampleConfig(max_seq_length=SEQ, max_predictions_per_seq=PREDS))
    assert (count == expected).all()
    assert abs(count.sum() / lengths.sum() - 0.15) < 0.02
    rows = np.repeat(np.arange(len(lengths)), PREDS).reshape(-1, PREDS)[real]
    positions = b["masked_lm_positions"][real]
    assert (np.diff(b["masked_lm_positions"], axis=1)[real[:, 1:]] > 0).all()  # ascending, unique
    assert (b["masked_lm_positions"][~real] == 0).all() and (b["masked_lm_ids"][~real] == 0).all()
    assert (original[rows, positions] > 4).all()  # never a special token
    assert (b["masked_lm_ids"][real] == original[rows, positions]).all()
    shown = b["input_ids"][rows, positions]
    as_mask = (shown == 4).mean()
    unchanged = (shown == original[rows, positions]).mean()
    random_tok = 1 - as_mask - unchanged
    assert real.sum() > 10_000
    assert abs(as_mask - 0.8) < 0.02 and abs(unchanged - 0.1) < 0.015 and abs(random_tok - 0.1) < 0.015
    assert (shown > 4).sum() == (shown != 4).sum()  # random replacements are never special
    # Outside the masked positions the input is the original text.
    untouched = np.ones_like(real, shape=b["input_ids"].shape)
    untouched[rows, positions] = False
    assert (b["input_ids"][untouched] == original[untouched]).all()


def test_nsp_pairs_are_actual_or_random_continuations(data, everything):
    """Reconstruct A and B and look them up in the tokenized corpus: for label 0, B
    follows A in the same document, directly unless the pair was truncated (the tail
    of A may then be cut); for label 1, A and B are runs of text but not joined."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(data["tok"] / "tokenizer.json"))
    tok.encode_special_tokens = True
    streams = []
    for unit in plan_units(data["files"], 1 << 30):
        docs = tokenize_documents(tok, split_documents(read_documents(unit, CorpusStats())), SEQ - 3, CorpusStats())
        streams += [" " + " ".join(str(t) for seg in doc for t in seg) + " " for doc in docs]
    corpus = "|".join(streams)

    def text(tokens) -> str:
        return f" {' '.join(map(str, tokens))} "

    def contiguous(tokens) -> bool:
        return text(tokens) in corpus

    def b_follows_a(a_tokens, b_tokens) -> bool:
        a, b = text(a_tokens), text(b_tokens)
        return any((ia := s.find(a)) >= 0 and s.find(b, ia + len(a) - 1) >= 0 for s in streams)

    b, original = everything["batch"], everything["original"]
    labels = b["next_sentence_labels"]
    assert abs(labels.mean() - 0.5) < 0.06
    lengths = b["attention_mask"].sum(1)
    b_start = np.argmax(b["token_type_ids"], axis=1)
    joined_random = 0
    checked = np.random.default_rng(0).choice(len(labels), 400, replace=False)
    for i in checked:
        a_tokens = original[i, 1 : b_start[i] - 1].tolist()
        b_tokens = original[i, b_start[i] : lengths[i] - 1].tolist()
        assert contiguous(a_tokens) and contiguous(b_tokens), i
        if labels[i] == 0:
            assert contiguous(a_tokens + b_tokens) if lengths[i] < SEQ else b_follows_a(a_tokens, b_tokens), i
        else:
            joined_random += contiguous(a_tokens + b_tokens)
    assert joined_random < 0.05 * (labels[checked] == 1).sum()


def test_whole_word_masking_masks_whole_words(data):
    from lbllm.prep.samples import documents_to_samples

    info = create.load_tokenizer(data["tok"])
    cfg = SampleConfig(max_seq_length=SEQ, max_predictions_per_seq=PREDS, whole_word_mask=True)
    create._init_worker(info.json, info.vocab, cfg, 0, False)
    unit = plan_units(data["files"][:1], 30_000)[0]
    stats = CorpusStats()
    docs = tokenize_documents(create._STATE["tokenizer"], split_documents(read_documents(unit, stats)), SEQ - 3,
                              stats)
    batch = documents_to_samples(docs, cfg, info.vocab, 0, 0, stats)
    cont = info.vocab.continuation_mask()
    checked = 0
    for r in range(batch.num_samples):
        n = batch.masked_count[r]
        pos = set(batch.masked_positions[r, :n].tolist())
        original = batch.input_ids[r].copy()
        original[batch.masked_positions[r, :n]] = batch.masked_ids[r, :n]
        for p in pos:
            if cont[original[p]] and original[p - 1] > 4:
                assert p - 1 in pos  # a continuation piece is masked only with its word start
            if p + 1 < batch.lengths[r] and cont[original[p + 1]]:
                assert p + 1 in pos  # and a masked word is masked to its end
                checked += 1
        assert n <= num_to_predict(batch.lengths[r : r + 1], cfg)[0]
    assert checked > 20


# ---------------------------------------------------------------------------------------
# Shards, manifest, reader
# ---------------------------------------------------------------------------------------


def test_output_independent_of_workers_and_idempotent(data, tmp_path):
    one = tmp_path / "one"
    cli("create_shards.py", *data["args"], "--out", one, "--workers", 1)
    two = data["shards"]
    assert (one / "manifest.json").read_bytes() == (two / "manifest.json").read_bytes()
    assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in two.iterdir())
    for p in one.iterdir():
        assert p.read_bytes() == (two / p.name).read_bytes(), p.name
    # Running again over a complete output replaces it with the identical set.
    cli("create_shards.py", *data["args"], "--out", one, "--workers", 2)
    assert (one / "manifest.json").read_bytes() == (two / "manifest.json").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one"]  # no temp or old dirs left


def test_typed_manifest_round_trips_the_json_the_writer_wrote(data, tmp_path):
    # One Manifest type for the writer, the merger and the reader: reading and writing
    # again gives the same JSON, keys in the same order (so every key the writer uses is
    # a field); a key from a newer writer survives; the held-out set's manifest too.
    for directory in (data["shards"], data["shards"] / "heldout"):
        if not (directory / "manifest.json").is_file():
            continue
        raw = json.loads((directory / "manifest.json").read_text())
        m = Manifest.read(directory)
        assert not m.extra, sorted(m.extra)
        assert list(m.to_json().items()) == list(raw.items())
    m = Manifest.read(data["shards"])
    assert (m.seq_length, m.max_predictions_per_seq, m.num_samples) == (SEQ, PREDS, len(PretrainingDataset(data["shards"])))
    newer = Manifest.from_json({**m.to_json(), "future_key": {"x": 1}})
    assert newer.extra == {"future_key": {"x": 1}}
    newer.write(tmp_path)
    assert json.loads((tmp_path / "manifest.json").read_text())["future_key"] == {"x": 1}


def test_manifest_and_checksums(data):
    m = json.loads((data["shards"] / "manifest.json").read_text())
    for key in ("format_version", "num_samples", "seq_length", "max_predictions_per_seq", "masked_lm_prob",
                "dupe_factor", "seed", "tokenizer_fingerprint", "vocab_size", "shards", "stats"):
        assert key in m, key
    assert (m["seq_length"], m["max_predictions_per_seq"], m["dupe_factor"], m["seed"]) == (SEQ, PREDS, 2, 7)
    assert m["tokenizer_fingerprint"] == tokenizer_fingerprint(data["tok"])
    counts = [s["num_samples"] for s in m["shards"]]
    assert len(counts) >= 3 and all(c == 700 for c in counts[:-1]) and 0 < counts[-1] <= 700
    assert sum(counts) == m["num_samples"]
    for shard in m["shards"]:
        for info in shard["files"].values():
            raw = (data["shards"] / info["file"]).read_bytes()
            assert hashlib.sha256(raw).hexdigest() == info["sha256"] and len(raw) == info["bytes"]
    assert m["shards"][0]["files"]["input_ids"]["dtype"] == "uint16"
    for key in ("documents", "empty_documents_skipped", "sentences", "decode_errors", "nsp_random_fraction",
                "mean_masked_count"):
        assert key in m["stats"], key
    assert 0.4 < m["stats"]["nsp_random_fraction"] < 0.6


def test_reader_batches(everything):
    import torch

    ds = everything["ds"]
    idx = [5, len(ds) - 1, 0, 701, 5]
    batch = ds.get_batch(idx)
    assert set(batch) == {"input_ids", "token_type_ids", "attention_mask", "masked_lm_positions", "masked_lm_ids",
                          "masked_lm_weights", "next_sentence_labels"}
    assert batch["input_ids"].shape == (5, SEQ) and batch["input_ids"].dtype == torch.long
    assert batch["masked_lm_positions"].shape == (5, PREDS) and batch["masked_lm_weights"].dtype == torch.float32
    assert batch["next_sentence_labels"].shape == (5,)
    assert torch.equal(batch["input_ids"][0], batch["input_ids"][4])
    one = ds[701]
    for k, v in batch.items():
        assert torch.equal(one[k], v[3]), k
    assert torch.equal(ds[-1]["input_ids"], batch["input_ids"][1])
    with pytest.raises(IndexError):
        ds.get_batch([len(ds)])
    assert ds.seq_length == SEQ and ds.max_predictions == PREDS and len(ds) == ds.num_samples


def test_reader_errors(data, tmp_path):
    with pytest.raises(DataError, match="create_shards.py"):
        PretrainingDataset(tmp_path / "missing")
    with pytest.raises(DataError, match="manifest"):
        PretrainingDataset(tmp_path)
    with pytest.raises(DataError, match="length 64"):
        PretrainingDataset(data["shards"], max_seq_length=128)
    other_tok = tmp_path / "other_tok"
    shutil.copytree(data["tok"], other_tok)
    vocab = (other_tok / "vocab.txt").read_text(encoding="utf-8").splitlines()
    vocab[10], vocab[11] = vocab[11], vocab[10]
    (other_tok / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        PretrainingDataset(data["shards"], tokenizer_dir=other_tok)
    assert str(other_tok) in str(e.value) and tokenizer_fingerprint(data["tok"])[:12] in str(e.value)


def test_corrupt_and_truncated_shards(data, tmp_path):
    copy = tmp_path / "shards"
    shutil.copytree(data["shards"], copy)
    victim = copy / "shard-00001.input_ids.npy"
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    raw[len(raw) // 2 + 1] ^= 0x55
    victim.write_bytes(bytes(raw))
    PretrainingDataset(copy)  # sizes still match: only a checksum notices
    with pytest.raises(DataError, match="shard-00001.input_ids.npy"):
        PretrainingDataset(copy, verify_checksums=True)
    # Two files of equal size swapped: the .npy headers give it away when the shard is
    # first used (no checksum needed; opening stays O(stat) for huge sets).
    a, b = copy / "shard-00002.masked_ids.npy", copy / "shard-00002.masked_positions.npy"
    a_bytes = a.read_bytes()
    a.write_bytes(b.read_bytes())
    ds = PretrainingDataset(copy)
    ds.get_batch([0, 700])  # shards 0 and 1 are fine
    with pytest.raises(DataError, match="shard-00002.masked_ids.npy"):
        ds.get_batch([1400])
    a.write_bytes(a_bytes)
    truncated = copy / "shard-00000.masked_ids.npy"
    truncated.write_bytes(truncated.read_bytes()[:-7])
    with pytest.raises(DataError, match="shard-00000.masked_ids.npy"):
        PretrainingDataset(copy)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--input": "nothing-here-*.txt"}, "no files"),
        ({"--tokenizer": "no_such_tokenizer"}, "tokenizer"),
        ({"--max_seq_length": "4"}, "max_seq_length"),
        ({"--max_seq_length": "5000"}, "max_seq_length"),
        ({"--max_predictions_per_seq": "0"}, "max_predictions_per_seq"),
    ],
)
def test_create_shards_bad_input(data, tmp_path, change, message):
    args = {"--input": str(data["files"][0]), "--tokenizer": str(data["tok"]), "--max_seq_length": "64"}
    args.update({k: str(tmp_path / v) if k == "--tokenizer" else v for k, v in change.items()})
    out = tmp_path / "out" / "shards"
    proc = cli("create_shards.py", *[x for kv in args.items() for x in kv], "--out", out, check=False)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr
    assert not (tmp_path / "out").exists()


def test_interrupted_run_leaves_no_output(data, tmp_path, monkeypatch):
    create_shards = load_script("create_shards")
    out = tmp_path / "shards"
    job = create_shards.parse_args([*map(str, data["args"]), "--out", str(out), "--workers", "1"])
    calls = []

    def failing_write(self, arrays):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if the user hit Ctrl-C after the first shard
        return original_write(self, arrays)

    from lbllm.prep.shard_writer import ShardWriter

    original_write = ShardWriter._write
    monkeypatch.setattr(ShardWriter, "_write", failing_write)
    with pytest.raises(KeyboardInterrupt):
        create_shards.run(job)
    assert list(tmp_path.iterdir()) == []  # neither OUT nor OUT.tmp-*
    # With a complete set already there, a failed re-run leaves it untouched.
    shutil.copytree(data["shards"], out)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        create_shards.run(job)
    assert (out / "manifest.json").read_bytes() == (data["shards"] / "manifest.json").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards"]


# ---------------------------------------------------------------------------------------
# Dynamic masking: a pure function of (seed, epoch, global sample index)
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def dynamic(data) -> Path:
    out = data["root"] / "dynamic"
    assert shards_in_process(*data["args"], "--masking", "dynamic", "--out", out) == 0
    return out


def test_dynamic_set_holds_the_static_samples_unmasked(data, dynamic, everything):
    """Same pairs in the same order as the static set; only the masking is left out
    (and its three files per shard)."""
    m = json.loads((dynamic / "manifest.json").read_text())
    assert m["masking"] == "dynamic" and m["mask_seed"] == 7 and m["special_token_ids"] == [0, 1, 2, 3, 4]
    assert sorted(m["shards"][0]["files"]) == ["input_ids", "lengths", "nsp", "segment_b_start"]
    assert json.loads((data["shards"] / "manifest.json").read_text())["masking"] == "static"
    ds = PretrainingDataset(dynamic, tokenizer_dir=data["tok"], max_seq_length=SEQ)
    assert len(ds) == len(everything["ds"]) and ds.masking == "dynamic"
    stored = np.concatenate([np.load(dynamic / s["files"]["input_ids"]["file"]) for s in m["shards"]])
    assert np.array_equal(stored, everything["original"])
    batch = {k: v.numpy() for k, v in ds.get_batch(np.arange(len(ds))).items()}
    for key in ("token_type_ids", "attention_mask", "next_sentence_labels"):
        assert np.array_equal(batch[key], everything["batch"][key]), key


def _dynamic_checks(batch: dict, original: np.ndarray, preds: int) -> dict:
    """Rates and invariants of one masked batch; returns the 80/10/10 shares."""
    lengths = batch["attention_mask"].sum(1)
    real = batch["masked_lm_weights"] > 0
    count = real.sum(1)
    expected = num_to_predict(lengths, SampleConfig(max_seq_length=SEQ, max_predictions_per_seq=preds))
    assert (count == expected).all()
    rows = np.repeat(np.arange(len(lengths)), preds).reshape(-1, preds)[real]
    positions = batch["masked_lm_positions"][real]
    assert (np.diff(batch["masked_lm_positions"], axis=1)[real[:, 1:]] > 0).all()
    assert (batch["masked_lm_positions"][~real] == 0).all() and (batch["masked_lm_ids"][~real] == 0).all()
    assert (positions < lengths[rows]).all() and (original[rows, positions] > 4).all()  # never [CLS]/[SEP]/[PAD]
    assert (batch["masked_lm_ids"][real] == original[rows, positions]).all()
    shown = batch["input_ids"][rows, positions]
    untouched = np.ones(original.shape, dtype=bool)
    untouched[rows, positions] = False
    assert (batch["input_ids"][untouched] == original[untouched]).all()
    assert (shown[shown != 4] > 4).all()  # random replacements are never special
    as_mask, unchanged = (shown == 4).mean(), (shown == original[rows, positions]).mean()
    return {"mask": as_mask, "same": unchanged, "random": 1 - as_mask - unchanged, "rate": count.sum() / lengths.sum()}


def test_dynamic_masking_rates_and_special_tokens(dynamic, everything):
    ds = PretrainingDataset(dynamic)
    for epoch in (0, 5):
        shares = _dynamic_checks({k: v.numpy() for k, v in ds.get_batch(np.arange(len(ds)), epoch=epoch).items()},
                                 everything["original"], PREDS)
        assert abs(shares["rate"] - 0.15) < 0.02
        assert abs(shares["mask"] - 0.8) < 0.02 and abs(shares["same"] - 0.1) < 0.015, shares
        assert abs(shares["random"] - 0.1) < 0.015, shares


def test_dynamic_masking_is_a_function_of_seed_epoch_and_index(dynamic):
    import torch

    ds = PretrainingDataset(dynamic)
    n = len(ds)
    idx = np.random.default_rng(1).choice(n, 96, replace=False)
    whole = ds.get_batch(idx, epoch=2)
    # Fetched in other batches (other neighbours, order, sizes, one at a time): same rows.
    for perm in (idx[::-1], np.concatenate([idx[50:], np.arange(10), idx[:50]])):
        other = ds.get_batch(perm, epoch=2)
        where = {int(i): k for k, i in enumerate(perm)}
        rows = [where[int(i)] for i in idx]
        for key, v in whole.items():
            assert torch.equal(v, other[key][rows]), key
    single = ds.get_batch(idx[7:8], epoch=2)
    assert all(torch.equal(single[k][0], whole[k][7]) for k in whole)
    # Independent of the split into world size x accumulation x micro-batch.
    steps = {split: _global_steps(n, 64, split[0], split[1], 3) for split in ((64, 1), (8, 4), (4, 2))}
    batches = {split: [ds.get_batch(step, epoch=1) for step in s] for split, s in steps.items()}
    for split in batches:
        for t in range(3):
            assert all(torch.equal(batches[split][t][k], batches[(64, 1)][t][k]) for k in whole)
    # A fresh reader (another process, another loader worker) masks the same; pickling too.
    import pickle

    again = pickle.loads(pickle.dumps(PretrainingDataset(dynamic))).get_batch(idx, epoch=2)
    assert all(torch.equal(again[k], whole[k]) for k in whole)
    # Another epoch or another seed: another mask for almost every row, same samples.
    for other in (ds.get_batch(idx, epoch=3), PretrainingDataset(dynamic, mask_seed=8).get_batch(idx, epoch=2)):
        differs = (other["masked_lm_positions"] != whole["masked_lm_positions"]).any(1).float().mean()
        assert differs > 0.9
        assert torch.equal(other["attention_mask"], whole["attention_mask"])
    ds.set_epoch(3)
    assert torch.equal(ds.get_batch(idx)["input_ids"], ds.get_batch(idx, epoch=3)["input_ids"])
    assert torch.equal(ds[int(idx[0])]["input_ids"], ds.get_batch(idx[:1], epoch=3)["input_ids"][0])


def test_static_sets_ignore_the_epoch(everything):
    import torch

    ds = everything["ds"]
    a, b = ds.get_batch(np.arange(50), epoch=0), ds.get_batch(np.arange(50), epoch=9)
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


def _reference_selection(ids, lengths, cfg: MaskingConfig, keys) -> list[list[int]]:
    """The per-row reference algorithm (create_pretraining_data), fed the same draws."""
    draws = uniform(keys, 0, ids.shape[1])
    out = []
    for r in range(ids.shape[0]):
        cand = [i for i in range(lengths[r]) if not cfg.is_special[ids[r, i]]]
        k = min(int(cfg.num_to_predict(lengths[r : r + 1])[0]), len(cand))
        if not cfg.whole_word_mask:
            out.append(sorted(sorted(cand, key=lambda i: draws[r, i])[:k]))
            continue
        words: list[list[int]] = []
        for i in cand:
            if words and cfg.is_continuation[ids[r, i]] and words[-1][-1] == i - 1:
                words[-1].append(i)
            else:
                words.append([i])
        picked: list[int] = []
        for word in sorted(words, key=lambda w: draws[r, w[0]]):
            if len(picked) >= k:
                break
            if len(picked) + len(word) <= k:
                picked.extend(word)
        out.append(sorted(picked))
    return out


@pytest.mark.parametrize("whole_word", [False, True])
def test_vectorized_selection_matches_the_reference_loop(data, everything, whole_word):
    """The batch-vectorized selection equals the reference's per-row loop on the same
    random draws, for plain and whole-word masking."""
    info = create.load_tokenizer(data["tok"])
    cfg = MaskingConfig(max_predictions=PREDS, masked_lm_prob=0.15, mask_id=4, special_ids=info.vocab.special_ids,
                        vocab_size=info.vocab.size, whole_word_mask=whole_word,
                        continuation_ids=tuple(np.flatnonzero(info.vocab.continuation_mask()).tolist()))
    ids = everything["original"][:400]
    lengths = everything["batch"]["attention_mask"][:400].sum(1)
    keys = row_keys((1, 2), np.arange(400))
    m = mask_tokens(ids, lengths, cfg, keys)
    reference = _reference_selection(ids, lengths, cfg, keys)
    assert [m.positions[r, : m.count[r]].tolist() for r in range(400)] == reference
    if whole_word:
        assert sum(len(r) for r in reference) > 0.9 * 0.15 * lengths.sum()
        assert any(cfg.is_continuation[ids[r, p]] for r, row in enumerate(reference) for p in row)


def test_dynamic_whole_word_masking_reads_its_rule_from_the_manifest(data, tmp_path):
    assert shards_in_process(*data["args"][:2], "--tokenizer", data["tok"], "--max_seq_length", SEQ,
                             "--max_predictions_per_seq", PREDS, "--whole_word_mask", "--masking", "dynamic",
                             "--out", tmp_path / "wwm") == 0
    m = json.loads((tmp_path / "wwm" / "manifest.json").read_text())
    assert m["whole_word_mask"] and len(m["continuation_ids"]) > 10
    ds = PretrainingDataset(tmp_path / "wwm")
    b = {k: v.numpy() for k, v in ds.get_batch(np.arange(len(ds)), epoch=1).items()}
    stored = np.concatenate([np.load(tmp_path / "wwm" / s["files"]["input_ids"]["file"]) for s in m["shards"]])
    cont = np.zeros(m["vocab_size"], dtype=bool)
    cont[m["continuation_ids"]] = True
    real = b["masked_lm_weights"] > 0
    for r in range(len(stored)):
        pos = set(b["masked_lm_positions"][r][real[r]].tolist())
        for p in pos:
            if p + 1 < b["attention_mask"][r].sum() and cont[stored[r, p + 1]]:
                assert p + 1 in pos  # a masked word is masked to its end


# ---------------------------------------------------------------------------------------
# Several machines: parts and merging
# ---------------------------------------------------------------------------------------


def test_parts_merge_to_the_single_machine_set(data, tmp_path):
    """K machines each write a part; the merged set has exactly the single-machine
    samples at every index (static masks included) and the same statistics."""
    merge_shards = load_script("merge_shards")
    for part in range(3):
        out = tmp_path / f"part-{part}"
        assert shards_in_process(*data["args"], "--num_parts", 3, "--part", part, "--out", out) == 0
    manifests = [json.loads((tmp_path / f"part-{i}" / "manifest.json").read_text()) for i in range(3)]
    ranges = [m["part"]["units"] for m in manifests]
    assert ranges[0][0] == 0 and ranges[0][1] == ranges[1][0] and ranges[1][1] == ranges[2][0]
    assert all(a < b for a, b in ranges) and ranges[2][1] == manifests[0]["plan"]["units"]
    # Parts given in any order; hard links, no copies.
    assert merge_shards.main(["--parts", str(tmp_path / "part-2"), str(tmp_path / "part-[01]"),
                              "--out", str(tmp_path / "all")]) == 0
    single = json.loads((data["shards"] / "manifest.json").read_text())
    merged = json.loads((tmp_path / "all" / "manifest.json").read_text())
    assert merged["num_samples"] == single["num_samples"]
    assert_same_samples(tmp_path / "all", data["shards"])
    for key, value in single["stats"].items():
        assert merged["stats"][key] == pytest.approx(value), key
    first = tmp_path / "all" / merged["shards"][0]["files"]["input_ids"]["file"]
    assert first.stat().st_nlink == 2 and (tmp_path / "part-0" / "manifest.json").is_file()
    PretrainingDataset(tmp_path / "all", tokenizer_dir=data["tok"], max_seq_length=SEQ, verify_checksums=True)
    # --mode move: the merged set stays, the parts go.
    assert merge_shards.main(["--parts", str(tmp_path / "part-*"), "--out", str(tmp_path / "moved"),
                              "--mode", "move"]) == 0
    assert_same_samples(tmp_path / "moved", data["shards"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["all", "moved"]


def test_dynamic_parts_merge_identically(data, dynamic, tmp_path):
    for part in range(2):
        assert shards_in_process(*data["args"], "--masking", "dynamic", "--num_parts", 2, "--part", part,
                                 "--out", tmp_path / f"p{part}") == 0
    cli("merge_shards.py", "--parts", tmp_path / "p0", tmp_path / "p1", "--out", tmp_path / "all", "--verify")
    for epoch in (0, 4):
        a, b = all_arrays(tmp_path / "all", epoch), all_arrays(dynamic, epoch)
        assert all(np.array_equal(a[k], b[k]) for k in a)


def test_merge_refuses_mismatched_or_incomplete_parts(data, tmp_path, capsys):
    merge_shards = load_script("merge_shards")

    def fails(*args) -> str:
        capsys.readouterr()
        assert merge_shards.main(["--parts", *map(str, args), "--out", str(tmp_path / "out" / "merged")]) == 2
        stderr = capsys.readouterr().err
        assert len(stderr.strip().splitlines()) == 1, stderr
        assert not (tmp_path / "out" / "merged").exists()
        return stderr

    small = [*data["args"][:2], "--tokenizer", data["tok"], "--max_seq_length", SEQ, "--max_predictions_per_seq", PREDS,
             "--unit_mb", 0.02]
    for part in range(2):
        assert shards_in_process(*small, "--num_parts", 3, "--part", part, "--out", tmp_path / f"p{part}") == 0
    assert shards_in_process(*small, "--num_parts", 3, "--part", 2, "--max_seq_length", 32,
                             "--out", tmp_path / "p2-short") == 0
    assert "missing part(s) 2 of 3" in fails(tmp_path / "p0", tmp_path / "p1")
    err = fails(tmp_path / "p0", tmp_path / "p1", tmp_path / "p2-short")
    assert "p2-short: seq_length is 32" in err
    shutil.copytree(tmp_path / "p1", tmp_path / "p1-copy")
    assert "part 1 given twice" in fails(tmp_path / "p0", tmp_path / "p1", tmp_path / "p1-copy")
    assert "not a --num_parts part" in fails(tmp_path / "p0", data["shards"])
    assert "no manifest" in fails(tmp_path / "p0", tmp_path)
    assert "no shard directory" in fails(tmp_path / "nothing-*")
    # Independent sets with the same sample definition concatenate; others do not.
    other_tok = tmp_path / "tok2"
    shutil.copytree(data["tok"], other_tok)
    vocab = (other_tok / "vocab.txt").read_text(encoding="utf-8").splitlines()
    vocab[10], vocab[11] = vocab[11], vocab[10]
    (other_tok / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    assert shards_in_process(*small, "--tokenizer", other_tok, "--out", tmp_path / "other") == 0
    assert shards_in_process(*small, "--seed", 99, "--out", tmp_path / "same") == 0
    assert "tokenizer_fingerprint" in fails(data["shards"], tmp_path / "other")
    assert merge_shards_cli(tmp_path, data["shards"], tmp_path / "same") == (
        len(PretrainingDataset(data["shards"])) + len(PretrainingDataset(tmp_path / "same")))


def merge_shards_cli(tmp_path, *parts) -> int:
    cli("merge_shards.py", "--parts", *parts, "--out", tmp_path / "concat")
    return len(PretrainingDataset(tmp_path / "concat"))


def test_reader_accepts_version_1_and_rejects_incomplete_dynamic_manifests(data, dynamic, tmp_path):
    old = tmp_path / "v1"
    shutil.copytree(data["shards"], old)
    m = json.loads((old / "manifest.json").read_text())
    m["format_version"] = 1
    del m["masking"]
    (old / "manifest.json").write_text(json.dumps(m))
    assert PretrainingDataset(old).masking == "static"
    broken = tmp_path / "dyn"
    shutil.copytree(dynamic, broken)
    m = json.loads((broken / "manifest.json").read_text())
    del m["special_token_ids"]
    (broken / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="special_token_ids"):
        PretrainingDataset(broken)


# ---------------------------------------------------------------------------------------
# Sampler (Goyal et al. 2017, remark 4)
# ---------------------------------------------------------------------------------------


def _steps(sampler: GlobalBatchSampler, num_steps: int) -> list[np.ndarray]:
    """This rank's samples per global step, in yield order."""
    it = iter(sampler)
    return [np.concatenate([next(it) for _ in range(sampler.gradient_accumulation_steps)]) for _ in range(num_steps)]


def _global_steps(n, batch, micro, world, num_steps, seed=3, consumed=0) -> list[np.ndarray]:
    """All ranks' samples per global step, ordered as (accumulation step, rank)."""
    per_rank = [_steps(GlobalBatchSampler(n, batch, micro, world, r, seed, consumed), num_steps) for r in range(world)]
    out = []
    for t in range(num_steps):
        pieces = [per_rank[r][t].reshape(-1, micro) for r in range(world)]  # [accum, micro] per rank
        out.append(np.stack(pieces, axis=1).reshape(-1))
    return out


def test_feistel_is_a_permutation():
    for n in (1, 2, 3, 5, 64, 1000, 4097):
        perm = FeistelPermutation(n, [1, 2])(np.arange(n))
        assert sorted(perm.tolist()) == list(range(n))
    big = FeistelPermutation(10_000, [0, 0])(np.arange(10_000))
    assert abs(np.corrcoef(np.arange(10_000), big)[0, 1]) < 0.05  # no visible order left
    assert not np.array_equal(big, FeistelPermutation(10_000, [0, 1])(np.arange(10_000)))


def test_sampler_split_invariance():
    reference = _global_steps(1000, 64, 64, 1, 20)
    for micro, world in ((32, 2), (8, 4), (1, 8), (4, 1), (2, 16)):
        got = _global_steps(1000, 64, micro, world, 20)
        for t in range(20):
            assert np.array_equal(got[t], reference[t]), (micro, world, t)  # same set, even same order


def test_sampler_epochs_are_permutations():
    n, batch = 1003, 100
    s = GlobalBatchSampler(n, batch, 25, world_size=2, rank=0, seed=5)
    assert s.steps_per_epoch == 10 and s.gradient_accumulation_steps == 2
    steps = _global_steps(n, batch, 25, 2, 30, seed=5)
    tails = []
    for e in range(3):
        epoch = np.concatenate(steps[10 * e : 10 * (e + 1)])
        assert len(set(epoch.tolist())) == 1000 and epoch.min() >= 0 and epoch.max() < n
        tails.append(set(range(n)) - set(epoch.tolist()))
    assert tails[0] != tails[1] or tails[1] != tails[2]  # a different tail is dropped each epoch
    assert not np.array_equal(np.sort(steps[0]), np.sort(steps[10]))


def test_sampler_resume_and_state():
    n, batch = 1000, 48
    full = _global_steps(n, batch, 8, 2, 50)  # crosses several epochs (20 steps each)
    for k in (0, 7, 20, 33):
        resumed = _global_steps(n, batch, 8, 2, 50 - k, consumed=k * batch)
        assert all(np.array_equal(a, b) for a, b in zip(resumed, full[k:]))
        # ...also on a different number of ranks with a different accumulation split.
        other_split = _global_steps(n, batch, 4, 4, 10, consumed=k * batch)
        assert all(np.array_equal(a, b) for a, b in zip(other_split, full[k : k + 10]))
    s = GlobalBatchSampler(n, batch, 8, 2, 0, seed=3)
    it = iter(s)
    next(it)
    assert s.consumed_samples == 0  # mid-step: the step is not complete yet
    for _ in range(s.gradient_accumulation_steps - 1):
        next(it)
    assert s.consumed_samples == batch and s.epoch == 0


def test_sampler_errors_and_batch_ramp():
    with pytest.raises(ValueError, match="100.*8.*3"):
        GlobalBatchSampler(1000, 100, 8, world_size=3)
    with pytest.raises(ValueError, match="consumed_samples"):
        GlobalBatchSampler(1000, 64, 8, consumed_samples=10)
    with pytest.raises(ValueError):
        GlobalBatchSampler(10, 64, 8)
    s = GlobalBatchSampler(1000, 32, 8, seed=1)
    it = iter(s)
    next(it)
    with pytest.raises(RuntimeError):
        s.set_global_batch_size(64)
    for _ in range(3):
        next(it)
    s.set_global_batch_size(64)
    assert s.gradient_accumulation_steps == 8 and s.steps_per_epoch == 15
    first = np.concatenate([next(it) for _ in range(8)])
    state = s.state_dict()
    after = np.concatenate([next(it) for _ in range(8)])
    assert len(set(first.tolist()) | set(after.tolist())) == 128
    resumed = GlobalBatchSampler(1000, 32, 8, seed=1)
    resumed.load_state_dict(state)
    assert np.array_equal(np.concatenate([x for _, x in zip(range(8), iter(resumed))]), after)


# ---------------------------------------------------------------------------------------
# Held-out set (--heldout_fraction): documents never trained on, masks fixed
# ---------------------------------------------------------------------------------------


def _unmasked(directory: Path) -> np.ndarray:
    """Every sample's original tokens (static masks undone), one row per sample."""
    ds = PretrainingDataset(directory)
    b = {k: v.numpy() for k, v in ds.get_batch(np.arange(len(ds))).items()}
    ids = b["input_ids"].copy()
    for r in range(len(ids)):
        real = b["masked_lm_weights"][r] > 0
        ids[r, b["masked_lm_positions"][r][real]] = b["masked_lm_ids"][r][real]
    return ids


def _segments(ids: np.ndarray, sep: int) -> set[tuple[int, ...]]:
    """The token runs between [CLS]/[SEP] of every sample (its sentence runs)."""
    out = set()
    for row in ids:
        run: list[int] = []
        for t in row[1:]:
            if t == sep or t == 0:
                if len(run) >= 6:
                    out.add(tuple(run))
                run = []
                if t == 0:
                    break
            else:
                run.append(int(t))
    return out


@pytest.fixture(scope="session")
def heldout(data) -> Path:
    out = data["root"] / "with_heldout"
    assert shards_in_process(*data["args"], "--masking", "dynamic", "--heldout_fraction", 0.2, "--out", out) == 0
    return out


def test_heldout_set_holds_other_documents_with_fixed_masks(data, heldout, dynamic):
    train_m = json.loads((heldout / "manifest.json").read_text())
    held_m = json.loads((heldout / "heldout" / "manifest.json").read_text())
    full_m = json.loads((dynamic / "manifest.json").read_text())
    assert held_m["masking"] == "static" and held_m["dupe_factor"] == 1 and train_m["masking"] == "dynamic"
    assert train_m["heldout"] == {"dir": "heldout", "num_samples": held_m["num_samples"],
                                  "documents": train_m["stats"]["heldout_documents"]}
    # Every document lands in exactly one set; about the asked-for fraction is held out.
    assert train_m["stats"]["documents"] == full_m["stats"]["documents"]
    assert 0.1 < train_m["stats"]["heldout_documents"] / train_m["stats"]["documents"] < 0.3
    assert held_m["num_samples"] > 50 and train_m["num_samples"] < full_m["num_samples"]
    # No held-out sentence run appears in any training sample (nor as a random-next segment).
    sep = json.loads((heldout / "manifest.json").read_text())["special_ids"]["sep"]
    train_runs = _segments(all_arrays(heldout)["input_ids"], sep)
    held_runs = _segments(_unmasked(heldout / "heldout"), sep)
    assert len(held_runs) > 20 and not (held_runs & train_runs)
    control = _segments(all_arrays(dynamic)["input_ids"], sep)
    assert held_runs & control  # the check can fail: the full set does contain them
    # Masks are stored: reading twice (any epoch) gives the same predictions.
    ds = PretrainingDataset(heldout / "heldout", tokenizer_dir=data["tok"])
    a, b = ds.get_batch(np.arange(len(ds)), epoch=0), ds.get_batch(np.arange(len(ds)), epoch=5)
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


def test_heldout_split_is_the_same_for_workers_and_parts(data, heldout, tmp_path):
    merge_shards = load_script("merge_shards")
    cli("create_shards.py", *data["args"], "--masking", "dynamic", "--heldout_fraction", 0.2, "--workers", 2,
        "--out", tmp_path / "w2")
    assert_same_samples(tmp_path / "w2" / "heldout", heldout / "heldout")
    assert_same_samples(tmp_path / "w2", heldout)
    for part in range(2):
        assert shards_in_process(*data["args"], "--masking", "dynamic", "--heldout_fraction", 0.2,
                                 "--num_parts", 2, "--part", part, "--out", tmp_path / f"p{part}") == 0
    assert merge_shards.main(["--parts", str(tmp_path / "p0"), str(tmp_path / "p1"), "--out", str(tmp_path / "all"),
                              "--mode", "move"]) == 0
    assert_same_samples(tmp_path / "all" / "heldout", heldout / "heldout")
    assert_same_samples(tmp_path / "all", heldout)
    merged = json.loads((tmp_path / "all" / "manifest.json").read_text())
    assert merged["heldout"]["num_samples"] == json.loads((heldout / "manifest.json").read_text())["heldout"]["num_samples"]
    assert not (tmp_path / "p0").exists() and not (tmp_path / "p1").exists()
    # Parts with and without a held-out set do not merge.
    assert shards_in_process(*data["args"], "--masking", "dynamic", "--num_parts", 2, "--part", 0,
                             "--out", tmp_path / "q0") == 0
    assert shards_in_process(*data["args"], "--masking", "dynamic", "--heldout_fraction", 0.2, "--num_parts", 2,
                             "--part", 1, "--out", tmp_path / "q1") == 0
    assert merge_shards.main(["--parts", str(tmp_path / "q*"), "--out", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()


def test_heldout_fraction_out_of_range_is_one_line(data, tmp_path):
    proc = cli("create_shards.py", *data["args"], "--heldout_fraction", 0.9, "--out", tmp_path / "x", check=False)
    assert proc.returncode == 2 and "--heldout_fraction 0.9" in proc.stderr and not (tmp_path / "x").exists()
