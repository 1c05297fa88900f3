"""Data pipeline: tokenizer, BERT sample semantics, shard format and reader, sampler.

Everything runs on a tiny corpus generated here (with deliberately messy text) and a
tokenizer trained on it; nothing is read from outside the test's temp directories.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lbllm.data import DataError, GlobalBatchSampler, PretrainingDataset, tokenizer_fingerprint
from lbllm.data.sampler import FeistelPermutation
from lbllm.data.samples import (
    CorpusStats,
    SampleConfig,
    expand_inputs,
    num_to_predict,
    plan_units,
    read_documents,
    split_sentences,
    tokenize_documents,
)

ROOT = Path(__file__).resolve().parent.parent
SEQ, PREDS = 64, 10
ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def cli(script: str, *args, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, f"data_prep/{script}", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, env=ENV, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "data_prep" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


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
        docs = tokenize_documents(tok, read_documents(unit, CorpusStats()), SEQ - 3, CorpusStats())
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
    from lbllm.data.samples import documents_to_samples

    create_shards = load_script("create_shards")
    info = create_shards.load_tokenizer(data["tok"])
    cfg = SampleConfig(max_seq_length=SEQ, max_predictions_per_seq=PREDS, whole_word_mask=True)
    create_shards._init_worker(info.json, info.vocab, cfg, 0, False)
    unit = plan_units(data["files"][:1], 30_000)[0]
    stats = CorpusStats()
    docs = tokenize_documents(create_shards._STATE["tokenizer"], read_documents(unit, stats), SEQ - 3, stats)
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
    # Two files of equal size swapped: the .npy headers give it away, no checksum needed.
    a, b = copy / "shard-00002.masked_ids.npy", copy / "shard-00002.masked_positions.npy"
    a_bytes = a.read_bytes()
    a.write_bytes(b.read_bytes())
    with pytest.raises(DataError, match="shard-00002.masked_ids.npy"):
        PretrainingDataset(copy)
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

    original_write = create_shards.ShardWriter._write
    monkeypatch.setattr(create_shards.ShardWriter, "_write", failing_write)
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
