#!/usr/bin/env python
"""Data pipeline figures, each as a ratio against a baseline or target measured in the
same run:

(a) preparation: tokens/s of ``create_shards.py`` end to end (a fresh process: start-up,
    planning, reading, sentence splitting, tokenizing, pairing, masking, writing,
    checksums) against raw ``tokenizers`` ``Tokenizer.encode_batch`` throughput on the
    same text with the same cores. Target: at least 0.5x.
(b) loader: samples/s of ``PretrainingDataset.get_batch`` on the sampler's shuffled
    micro-batches of seq-128 samples, static and dynamic masking. Target: 20,000/s.
(c) start-up: a fresh process that imports lbllm, opens the prepared set (manifest,
    tokenizer fingerprint, file sizes and headers), builds the sampler and fetches the
    first batch. Target: under 5 s. Use ``--large`` for a prepared set made from 1 GB
    of text (``make_corpus.py --num_docs 1000000``; takes a while on 2 cores).

(d) tokenizer training: ``train_tokenizer`` (deterministic: a numpy character-count
    pass, then the HF trainer with the ``##`` characters reserved) against the HF
    WordPiece trainer alone on the same text and cores. No target: the price of
    reproducible vocabularies.

    python scripts/bench_data.py                      # ~20 MB corpus, a few minutes on 2 cores
    python scripts/bench_data.py --large --workdir /tmp/bench_data   # 1 GB for (c), ~30-40 min
    python scripts/bench_data.py --wikitext ../shared/data/wikitext-2  # (a) on real text too

Speed depends on what else runs on the machine: the script prints the load average
before and after, and the ratios (same run, same conditions) are the figures to quote.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
TARGET_PREP_RATIO = 0.5
TARGET_LOADER = 20_000
TARGET_STARTUP_S = 5.0


def child_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def sh(*args, env: dict | None = None) -> tuple[float, float]:
    """Run a command (quietly unless it fails); returns its wall time and the CPU time
    of it and its children (worker processes included)."""
    t0, c0 = time.perf_counter(), child_cpu_s()
    proc = subprocess.run([str(a) for a in args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        sys.exit(f"bench_data: {' '.join(map(str, args[:3]))} ... failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0, child_cpu_s() - c0


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def make_corpus(work: Path, num_docs: int, workers: int) -> list[str]:
    out = work / f"corpus-{num_docs}"
    files = sorted(glob.glob(str(out / "corpus" / "*.txt")))
    if not files:
        print(f"  generating {num_docs:,} documents with make_corpus.py ...", flush=True)
        sh(PY, "data_prep/make_corpus.py", "--out", out, "--num_docs", num_docs, "--squad_train", 10,
           "--squad_dev", 10, "--workers", workers)
        files = sorted(glob.glob(str(out / "corpus" / "*.txt")))
    return files


def build_tokenizer(work: Path, name: str, files: list[str], sample_mb: float = 8.0) -> Path:
    """A BERT-size WordPiece vocabulary trained on the first ``sample_mb`` of text."""
    tok = work / f"tokenizer-{name}"
    if not (tok / "tokenizer.json").is_file():
        sample = work / f"tokenizer-sample-{name}.txt"
        with open(files[0], "rb") as f:
            sample.write_bytes(f.read(int(sample_mb * 2**20)))
        sh(PY, "data_prep/build_tokenizer.py", "--input", sample, "--vocab_size", 30522, "--out", tok)
    return tok


def prepare(files: list[str], tok: Path, out: Path, workers: int, *extra) -> tuple[float, float, dict]:
    """Wall and CPU seconds of create_shards.py (seq 128, 20 predictions) and its manifest."""
    seconds, cpu = sh(PY, "data_prep/create_shards.py", "--input", *files, "--tokenizer", tok, "--max_seq_length", 128,
                      "--max_predictions_per_seq", 20, "--workers", workers, "--out", out, *extra)
    return seconds, cpu, json.loads((out / "manifest.json").read_text())


def raw_tokenizer(files: list[str], tok: Path, workers: int, batch: int = 8192) -> tuple[float, float, int]:
    """Tokens per wall second and per CPU second of the Rust tokenizer alone on the same
    text (its own thread pool on ``workers`` cores), lines in large batches: the
    ceiling for any preparation. Reading the text is not timed."""
    code = f"""
import resource, sys, time
from tokenizers import Tokenizer
tok = Tokenizer.from_file({str(tok / 'tokenizer.json')!r})
lines = [l for f in {files!r} for l in open(f, encoding='utf-8', errors='replace') if l.strip()]
def cpu():
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime
t, c = time.perf_counter(), cpu(); n = 0
for i in range(0, len(lines), {batch}):
    n += sum(len(e.ids) for e in tok.encode_batch(lines[i:i + {batch}], add_special_tokens=False))
print(n, time.perf_counter() - t, cpu() - c)
"""
    proc = subprocess.run([PY, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, "RAYON_NUM_THREADS": str(workers), "TOKENIZERS_PARALLELISM": "true"})
    tokens, seconds, cpu = proc.stdout.split()
    return int(tokens) / float(seconds), int(tokens) / float(cpu), int(tokens)


def figure_a(label: str, files: list[str], tok: Path, out: Path, workers: int, *extra) -> dict:
    """Raw tokenizer, preparation, raw tokenizer again: the baseline is the mean of the
    two raw runs around the preparation, which halves the effect of load that changes
    while the bench runs. Tokens per CPU second are printed too: they do not depend on
    what else the machine runs."""
    mb = sum(os.path.getsize(f) for f in files) / 2**20
    before = raw_tokenizer(files, tok, workers)
    seconds, cpu, manifest = prepare(files, tok, out, workers, *extra)
    after = raw_tokenizer(files, tok, workers)
    raw_tps, raw_cpu_tps = (before[0] + after[0]) / 2, (before[1] + after[1]) / 2
    tokens = manifest["stats"]["text_tokens"]
    prep_tps, prep_cpu_tps = tokens / seconds, tokens / cpu
    ratio, cpu_ratio = prep_tps / raw_tps, prep_cpu_tps / raw_cpu_tps
    print(f"(a) {label}: {mb:.1f} MB, {tokens:,} tokens -> {manifest['num_samples']:,} samples in "
          f"{seconds:.1f} s end to end ({cpu:.1f} CPU s)")
    print(f"    create_shards {prep_tps:,.0f} tokens/s vs raw encode_batch {raw_tps:,.0f} tokens/s "
          f"({before[0]:,.0f} before, {after[0]:,.0f} after; {before[2]:,} tokens): {ratio:.2f}x "
          f"(target >= {TARGET_PREP_RATIO}x) {'PASS' if ratio >= TARGET_PREP_RATIO else 'FAIL'}")
    print(f"    per CPU second: {prep_cpu_tps:,.0f} vs {raw_cpu_tps:,.0f} tokens = {cpu_ratio:.2f}x "
          f"(insensitive to other load)")
    print(f"    NSP random-next fraction {manifest['stats']['nsp_random_fraction']:.3f}")
    return {"label": label, "mb": mb, "seconds": seconds, "cpu_seconds": cpu, "prep_tokens_per_s": prep_tps,
            "raw_tokens_per_s": [before[0], after[0]], "ratio": ratio, "prep_tokens_per_cpu_s": prep_cpu_tps,
            "raw_tokens_per_cpu_s": [before[1], after[1]], "cpu_ratio": cpu_ratio}


def figure_b(data_dir: Path, label: str, micro_batches=(64, 256), seconds: float = 3.0) -> list[dict]:
    from lbllm.data import GlobalBatchSampler, PretrainingDataset

    ds = PretrainingDataset(data_dir)
    rows = []
    for micro in micro_batches:
        sampler = GlobalBatchSampler(len(ds), global_batch_size=micro * 16, micro_batch_size=micro, seed=1)
        it = iter(sampler)
        ds.get_batch(next(it), epoch=sampler.epoch)  # maps the shards
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            ds.get_batch(next(it), epoch=sampler.epoch)
            n += micro
        rate = n / (time.perf_counter() - t0)
        rows.append({"masking": label, "micro_batch": micro, "samples_per_s": rate})
        print(f"(b) loader, {label:>14} masking, micro-batch {micro:>4}: {rate:>9,.0f} samples/s "
              f"= {rate / TARGET_LOADER:.1f}x the {TARGET_LOADER:,}/s target "
              f"{'PASS' if rate >= TARGET_LOADER else 'FAIL'}")
    return rows


STARTUP = """
import time
t0 = time.perf_counter()
import torch  # what the trainer has imported anyway
from lbllm.data import GlobalBatchSampler, PretrainingDataset
t1 = time.perf_counter()
ds = PretrainingDataset({data!r}, tokenizer_dir={tok!r}, max_seq_length=128)
t2 = time.perf_counter()
# A phase-1 step (65,536 = 8 ranks x 128 accumulation x 64), resuming at step 7; smaller
# global batches for small sets.
batch = 512 * max(1, min(128, len(ds) // 512))
sampler = GlobalBatchSampler(len(ds), global_batch_size=batch, micro_batch_size=64, world_size=8, rank=3, seed=1,
                             consumed_samples=batch * 7)
batch = ds.get_batch(next(iter(sampler)), epoch=sampler.epoch)
t3 = time.perf_counter()
print(t1 - t0, t2 - t1, t3 - t2, len(ds), len(ds._shards))
"""


def figure_c(data_dir: Path, tok: Path, label: str) -> dict:
    code = STARTUP.format(data=str(data_dir), tok=str(tok))
    t0 = time.perf_counter()
    proc = subprocess.run([PY, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    total = time.perf_counter() - t0
    imports, open_s, first, n, shards = proc.stdout.split()
    size = sum(p.stat().st_size for p in data_dir.iterdir()) / 2**30
    print(f"(c) start-up on {label} ({int(n):,} samples, {int(shards)} shards, {size:.2f} GiB): {total:.2f} s to the "
          f"first batch in a fresh process = {total / TARGET_STARTUP_S:.2f}x the {TARGET_STARTUP_S:.0f} s budget "
          f"{'PASS' if total < TARGET_STARTUP_S else 'FAIL'}")
    print(f"    (python + torch + lbllm imports {float(imports):.2f} s, open {float(open_s):.3f} s, "
          f"sampler + first batch {float(first):.3f} s; page cache warm)")
    return {"label": label, "samples": int(n), "total_s": total, "open_s": float(open_s), "first_batch_s": float(first)}


TOKENIZER_TRAINING = """
import sys, time
from pathlib import Path
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from lbllm.prep.tokenizer import SPECIAL_TOKENS, TokenizerConfig, bert_normalizer, train_tokenizer
files, workers = [Path(f) for f in {files!r}], {workers}
def plain():
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]", continuing_subword_prefix="##"))
    tok.normalizer, tok.pre_tokenizer = bert_normalizer(True), pre_tokenizers.BertPreTokenizer()
    tok.train([str(f) for f in files], trainers.WordPieceTrainer(vocab_size=30522, special_tokens=list(SPECIAL_TOKENS),
              limit_alphabet=1000, continuing_subword_prefix="##", show_progress=False))
def ours():
    train_tokenizer(files, TokenizerConfig(30522), workers)
def timed(f):
    t = time.perf_counter(); f(); return time.perf_counter() - t
if __name__ == "__main__":
    print(timed(plain), timed(ours), timed(plain))
"""


def figure_d(label: str, files: list[str], workers: int) -> dict:
    """HF alone, ours, HF alone: the baseline is the mean of the two around ours."""
    mb = sum(os.path.getsize(f) for f in files) / 2**20
    script = Path(tempfile.mkdtemp(prefix="bench_tok-")) / "train.py"
    script.write_text(TOKENIZER_TRAINING.format(files=files, workers=workers))
    proc = subprocess.run([PY, str(script)], capture_output=True, text=True, check=True, cwd=ROOT,
                          env={**os.environ, "RAYON_NUM_THREADS": str(workers), "TOKENIZERS_PARALLELISM": "true"})
    before, ours, after = map(float, proc.stdout.split())
    base = (before + after) / 2
    print(f"(d) tokenizer training, {label} ({mb:.1f} MB, vocab 30,522): deterministic {ours:.1f} s vs the HF "
          f"trainer alone {base:.1f} s ({before:.1f} before, {after:.1f} after) = {ours / base:.2f}x the time")
    return {"label": label, "mb": mb, "deterministic_s": ours, "hf_alone_s": [before, after], "ratio": ours / base}


def wikitext_files(directory: Path, work: Path, repeat: int) -> list[str]:
    """The WikiText file(s), concatenated ``repeat`` times: the same real text, long
    enough that the fixed start-up of a process does not dominate."""
    sources = sorted(glob.glob(str(directory / "*.txt"))) or sorted(glob.glob(str(directory / "*.raw")))
    if not sources:
        sys.exit(f"bench_data: --wikitext {directory}: no .txt/.raw files there")
    out = work / f"wikitext-x{repeat}.txt"
    if not out.is_file():
        text = b"".join(Path(s).read_bytes() for s in sources)
        out.write_bytes(text * repeat)
    return [str(out)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num_docs", type=int, default=20_000, help="synthetic documents for (a) and (b) (~1 KB each)")
    ap.add_argument("--large", action="store_true", help="(c) on a set prepared from 1 GB of text")
    ap.add_argument("--large_docs", type=int, default=1_000_000, help="documents for --large (1,000,000 ~ 1.07 GB)")
    ap.add_argument("--wikitext", type=Path, help="a WikiText directory: (a) on real text too")
    ap.add_argument("--wikitext_repeat", type=int, default=16, help="concatenate the WikiText text this many times")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="cores for preparation and raw tokenizing")
    ap.add_argument("--workdir", type=Path, help="keep corpora, tokenizers and sets here (reused on the next run)")
    ap.add_argument("--json", type=Path, help="also write the figures as JSON here")
    a = ap.parse_args(argv)
    work = a.workdir or Path(tempfile.mkdtemp(prefix="bench_data-"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"workers": a.workers, "cpus": os.cpu_count(), "load_before": load()}
    print(f"bench_data: {a.workers} worker(s) on {os.cpu_count()} CPU(s); load average {results['load_before']}")
    try:
        files = make_corpus(work, a.num_docs, a.workers)
        tok = build_tokenizer(work, "synthetic", files)
        results["a"] = [figure_a(f"synthetic corpus ({a.num_docs:,} docs)", files, tok, work / "static", a.workers)]
        if a.wikitext:
            wiki = wikitext_files(a.wikitext, work, a.wikitext_repeat)
            wtok = build_tokenizer(work, "wikitext", wiki)
            results["a"].append(figure_a(f"WikiText x{a.wikitext_repeat} (--headings articles)", wiki, wtok,
                                         work / "wikitext", a.workers, "--headings", "articles"))
        prepare(files, tok, work / "dynamic", a.workers, "--masking", "dynamic")
        prepare(files, tok, work / "dynamic-wwm", a.workers, "--masking", "dynamic", "--whole_word_mask")
        results["b"] = (figure_b(work / "static", "static") + figure_b(work / "dynamic", "dynamic")
                        + figure_b(work / "dynamic-wwm", "dynamic+wwm"))
        results["c"] = [figure_c(work / "static", tok, f"the {a.num_docs:,}-doc set")]
        results["d"] = [figure_d(f"synthetic corpus ({a.num_docs:,} docs)", files, a.workers)]
        if a.wikitext:
            results["d"].append(figure_d(f"WikiText x{a.wikitext_repeat}", wiki, a.workers))
        if a.large:
            large_files = make_corpus(work, a.large_docs, a.workers)
            large = work / "large"
            if not (large / "manifest.json").is_file():
                mb = sum(os.path.getsize(f) for f in large_files) / 2**20
                print(f"  preparing {mb:,.0f} MB for (c) ...", flush=True)
                seconds, cpu, manifest = prepare(large_files, tok, large, a.workers)
                tps = manifest["stats"]["text_tokens"] / seconds
                results["large_prep"] = {"mb": mb, "seconds": seconds, "cpu_seconds": cpu, "tokens_per_s": tps,
                                         "samples": manifest["num_samples"]}
                print(f"    prepared {mb:,.0f} MB in {seconds:,.0f} s ({cpu:,.0f} CPU s): {tps:,.0f} tokens/s, "
                      f"{manifest['num_samples']:,} samples")
            results["c"].append(figure_c(large, tok, f"{a.large_docs:,} docs"))
    finally:
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    results["load_after"] = load()
    print(f"bench_data: load average {results['load_after']}")
    if a.json:
        a.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
