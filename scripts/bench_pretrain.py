#!/usr/bin/env python
"""Pretraining throughput: lbllm's training step against plain HF + torch AdamW, in one process.

For each model size and sequence length, on the same shards and at the same micro-batch:

  hf             HF BertForPreTraining (MLM logits at every position, labels -100 elsewhere)
                 with torch.optim.AdamW (fused on CUDA), bf16 autocast on CUDA: the baseline.
  lbllm          the project's step: Trainer.train_step on the DeepSpeed engine with LAMB,
                 the sparse MLM head and the prefetching loader on real shards (bf16 with
                 fp32 masters under ZeRO 1 on CUDA, fp32 on CPU).
  lbllm-packed   the same with --pack_sequences (short samples share rows: what packing buys).
  lbllm-dense    the same with the MLM head over every position (what the sparse head buys).
  lbllm-eager    the same with HF's eager attention instead of SDPA (what SDPA buys).

Each row: sequences/s, tokens/s, MFU, peak memory and the time the step waited for data.
MFU uses the model FLOPs of lbllm/model/flops.py (6 x encoder parameters x real tokens +
12 x layers x length^2 x hidden + the MLM head at the predicted positions), the same for
every variant, against the device's dense bf16 peak (H200/H100 SXM: 989 TFLOP/s); on CPU it
is not reported.

    python scripts/bench_pretrain.py --device cpu --models tiny --seqs 128 --steps 5   # seconds
    python scripts/bench_pretrain.py --models base,large --seqs 128,512 --json out.json  # one GPU

`--micro 0` (the CUDA default) takes the largest power-of-2 micro-batch that fits for each
row, found with the hf variant (the most memory-hungry) and used for all variants.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import glob
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from lbllm.model.flops import peak_flops, training_flops  # noqa: E402
from lbllm.utils import write_json_atomic  # noqa: E402

VARIANTS = ("hf", "lbllm", "lbllm-packed", "lbllm-dense", "lbllm-eager")
BERT_VOCAB = 30522


def prepare_data(root: Path, seqs: list[int], vocab: int, num_docs: int) -> Path:
    """The synthetic corpus, a WordPiece tokenizer and shards per sequence length (kept if there)."""
    py = sys.executable
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    quiet = {"stdout": subprocess.DEVNULL, "env": env, "cwd": ROOT, "check": True}
    if not (root / "tokenizer" / "tokenizer_config.json").is_file():
        subprocess.run([py, "data_prep/make_corpus.py", "--out", str(root), "--num_docs", str(num_docs),
                        "--squad_train", "10", "--squad_dev", "10"], **quiet)
        corpus = sorted(glob.glob(str(root / "corpus" / "*.txt")))
        subprocess.run([py, "data_prep/build_tokenizer.py", "--input", *corpus, "--vocab_size", str(vocab),
                        "--out", str(root / "tokenizer")], **quiet)
    corpus = sorted(glob.glob(str(root / "corpus" / "*.txt")))
    for seq in seqs:
        if not (root / f"shards_{seq}" / "manifest.json").is_file():
            subprocess.run([py, "data_prep/create_shards.py", "--input", *corpus, "--tokenizer",
                            str(root / "tokenizer"), "--max_seq_length", str(seq), "--max_predictions_per_seq",
                            str(max(1, round(0.15 * seq * 20 / 128))), "--dupe_factor", "2", "--workers", "2",
                            "--out", str(root / f"shards_{seq}")], **quiet)
    return root


def bert_config_for(model: str, vocab: int):
    from lbllm.model import build_bert_config

    return build_bert_config(model, vocab_size=vocab, dropout=0.1)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- the baseline

def bench_hf(args, device, config, dataset, micro: int) -> dict:
    from transformers import BertForPreTraining

    torch.manual_seed(0)
    model = BertForPreTraining(config).to(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01,
                            **({"fused": True} if device.type == "cuda" else {}))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    times, waits = [], []
    n = len(dataset)
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        idx = [(step * micro + j) % n for j in range(micro)]
        b = dataset.get_batch(idx, epoch=0)
        labels = torch.full_like(b["input_ids"], -100)
        rows = torch.arange(micro)[:, None].expand_as(b["masked_lm_positions"])
        real = b["masked_lm_weights"] > 0
        labels[rows[real], b["masked_lm_positions"][real]] = b["masked_lm_ids"][real]
        batch = {k: v.to(device, non_blocking=True) for k, v in b.items()}
        labels = labels.to(device, non_blocking=True)
        t_data = time.perf_counter()
        with autocast:
            out = model(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"],
                        attention_mask=batch["attention_mask"], labels=labels,
                        next_sentence_label=batch["next_sentence_labels"])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
            waits.append(t_data - t0)
    return {"times": times, "waits": waits}


# --------------------------------------------------------------------------- lbllm's step

def bench_lbllm(args, device, config, data: Path, seq: int, micro: int, variant: str, workdir: Path) -> dict:
    from lbllm.model import PretrainingModel, build_pretraining_model
    from lbllm.train.config import RunConfig
    from lbllm.train.prefetch import StepLoader
    from lbllm.train.trainer import Trainer, prepare

    cuda = device.type == "cuda"
    ds_config = {"train_batch_size": micro, "train_micro_batch_size_per_gpu": micro,
                 "optimizer": {"type": "LAMB", "params": {"lr": 1e-4, "weight_decay": 0.01}},
                 "gradient_clipping": 1.0, "zero_optimization": {"stage": 1 if cuda else 0},
                 "bf16": {"enabled": cuda}, "steps_per_print": 10**9}
    cfg_path = workdir / f"ds_{variant}_{seq}.json"
    cfg_path.write_text(json.dumps(ds_config))
    run = RunConfig(deepspeed_config=cfg_path, data_dir=data / f"shards_{seq}", output_dir=workdir / f"run_{variant}",
                    tokenizer=data / "tokenizer", model_config=args.model_name, max_steps=args.warmup + args.steps,
                    seed=0, overwrite=True)
    setup = prepare(run)
    setup.bert_config = config.__class__.from_dict(config.to_dict())
    if variant == "lbllm-eager":
        setup.bert_config._attn_implementation = "eager"

    class BenchTrainer(Trainer):
        def make_model(self):
            return PretrainingModel(build_pretraining_model(self.s.bert_config),
                                    sparse_mlm_head=variant != "lbllm-dense")

    tr = BenchTrainer(setup)
    tr.build()
    sampler = tr.restore()
    loader = StepLoader(setup.dataset, sampler, tr.batch_size_at, 1, setup.max_steps, pin_memory=cuda,
                        pack=variant == "lbllm-packed")
    times, waits = [], []
    try:
        for step in range(1, setup.max_steps + 1):
            t0 = time.perf_counter()
            b = loader.next_step()
            t_data = time.perf_counter()
            tr.train_step(b, measure_noise=False)
            sync(device)
            if step > args.warmup:
                times.append(time.perf_counter() - t0)
                waits.append(t_data - t0)
    finally:
        loader.close()
    del tr
    return {"times": times, "waits": waits}


# --------------------------------------------------------------------------- driver

def largest_micro(args, device, config, dataset) -> int:
    """The largest power-of-2 micro-batch the hf baseline fits (it uses the most memory)."""
    micro, best = 8, None
    while micro <= 4096:
        try:
            bench_hf(argparse.Namespace(warmup=1, steps=0), device, config, dataset, micro)
            best = micro
            micro *= 2
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            torch.cuda.empty_cache()
    if best is None:
        raise SystemExit("bench_pretrain: micro-batch 8 does not fit; pass --micro")
    return best


def row(model: str, seq: int, variant: str, micro: int, result: dict, flops: float,
        peak: float | None, mem: float | None) -> dict:
    """One table row; `flops`: model FLOPs of an average sequence of the data (real tokens)."""
    step = sum(result["times"]) / len(result["times"])
    seq_per_s = micro / step
    return {"model": model, "seq": seq, "variant": variant, "micro_batch": micro, "seq_per_s": seq_per_s,
            "tokens_per_s": seq_per_s * seq, "mfu": None if peak is None else seq_per_s * flops / peak,
            "model_tflops_per_s": seq_per_s * flops / 1e12, "peak_mem_gb": mem,
            "data_wait_frac": sum(result["waits"]) / sum(result["times"]), "step_ms": 1000 * step}


def render(result: dict) -> str:
    """A --json result as a markdown table (speed-ups against hf at the same model and seq)."""
    lines = [f"Device: {result['device']}; MFU against {(result['peak_flops'] or 0) / 1e12:g} TFLOP/s dense bf16 "
             "(model FLOPs: lbllm/model/flops.py).", "",
             "| model | seq | variant | micro | seq/s | tokens/s | MFU | vs hf | peak mem (GB) | data wait |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['seq']} | {r['variant']} | {r['micro_batch']} | {r['error']} "
                         "| | | | | |")
            continue
        speed = result["speedup_vs_hf"].get(f"{r['model']}/{r['seq']}/{r['variant']}")
        lines.append(f"| {r['model']} | {r['seq']} | {r['variant']} | {r['micro_batch']} | {r['seq_per_s']:.1f} | "
                     f"{r['tokens_per_s']:.0f} | {'-' if r['mfu'] is None else format(r['mfu'], '.1%')} | "
                     f"{'1.00x' if r['variant'] == 'hf' else '-' if speed is None else f'{speed:.2f}x'} | "
                     f"{'-' if r['peak_mem_gb'] is None else format(r['peak_mem_gb'], '.1f')} | "
                     f"{r['data_wait_frac']:.1%} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    ap.add_argument("--models", default="tiny", help="comma-separated size names (tiny ... large)")
    ap.add_argument("--seqs", default="128", help="comma-separated sequence lengths")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--micro", type=int, default=None, help="micro-batch (0: largest that fits; CPU default 8)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per row")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--vocab", type=int, default=None, help=f"model vocabulary (default {BERT_VOCAB} for base/large, "
                    "else the tokenizer's)")
    ap.add_argument("--data", default=None, help="prepared dir (tokenizer/, shards_SEQ/); default a temp dir")
    ap.add_argument("--num_docs", type=int, default=400, help="synthetic corpus size when --data is made")
    ap.add_argument("--json", default=None, help="write {rows, speedup_vs_hf} here")
    ap.add_argument("--render", default=None, metavar="JSON", help="print a --json result as a markdown table, run nothing")
    args = ap.parse_args(argv)
    if args.render:
        print(render(json.loads(Path(args.render).read_text())))
        return
    from lbllm.train.engine import ensure_distributed_env

    ensure_distributed_env()  # a world of one, in this process
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_pretrain: --device cuda but torch sees no CUDA device; pass --device cpu")
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"bench_pretrain: unknown --variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    seqs = [int(s) for s in args.seqs.split(",")]
    models = [m for m in args.models.split(",") if m]
    micro_arg = args.micro if args.micro is not None else (0 if device.type == "cuda" else 8)
    tmp = tempfile.TemporaryDirectory(prefix="bench_pretrain_")
    data = prepare_data(Path(args.data) if args.data else Path(tmp.name) / "data", seqs, vocab=1000 if
                        device.type == "cpu" else 8192, num_docs=args.num_docs)
    from transformers import BertTokenizerFast

    from lbllm.data import PretrainingDataset

    tok_vocab = len(BertTokenizerFast.from_pretrained(str(data / "tokenizer")))
    peak = peak_flops(torch.cuda.get_device_name() if device.type == "cuda" else None)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"bench_pretrain: device {name}; bf16 peak {peak / 1e12 if peak else '-'} TFLOP/s; "
          f"{args.steps} timed steps after {args.warmup}", flush=True)
    rows = []
    for model in models:
        vocab = args.vocab or (max(BERT_VOCAB, tok_vocab) if model in ("base", "large") else tok_vocab)
        config = bert_config_for(model, vocab)
        for seq in seqs:
            if seq > config.max_position_embeddings:
                continue
            dataset = PretrainingDataset(data / f"shards_{seq}", tokenizer_dir=data / "tokenizer")
            probe = dataset.get_batch(list(range(min(256, len(dataset)))), epoch=0)
            flops = training_flops(config, probe["attention_mask"].sum(1).tolist(),
                                   float(probe["masked_lm_weights"].sum())) / probe["input_ids"].shape[0]
            micro = micro_arg or largest_micro(args, device, config, dataset)
            for variant in variants:
                if device.type == "cuda":
                    gc.collect()  # the previous variant's engine holds reference cycles
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                args.model_name = model
                try:
                    with tempfile.TemporaryDirectory(prefix="bench_run_") as work:
                        if variant == "hf":
                            result = bench_hf(args, device, config, dataset, micro)
                        else:
                            result = bench_lbllm(args, device, config, data, seq, micro, variant, Path(work))
                except torch.cuda.OutOfMemoryError as exc:  # a row that does not fit; the others still run
                    rows.append({"model": model, "seq": seq, "variant": variant, "micro_batch": micro,
                                 "error": f"out of memory ({str(exc).splitlines()[0][:120]})"})
                    print(f"  {model:>5} seq {seq:>3} {variant:<12} micro {micro:>4}: out of memory", flush=True)
                    write_result(args.json, name, peak, rows)
                    continue
                mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
                r = row(model, seq, variant, micro, result, flops, peak, mem)
                rows.append(r)
                mfu = "-" if r["mfu"] is None else format(r["mfu"], ".1%")
                print(f"  {model:>5} seq {seq:>3} {variant:<12} micro {micro:>4}: {r['seq_per_s']:9.1f} seq/s "
                      f"{r['tokens_per_s']:11.0f} tok/s  MFU {mfu}  data wait {r['data_wait_frac']:.1%}", flush=True)
                write_result(args.json, name, peak, rows)  # row by row: a later failure keeps these
    for key, value in speedups(rows).items():
        print(f"  speedup vs hf {key}: {value:.2f}x", flush=True)
    tmp.cleanup()
    if any("error" in r for r in rows):
        sys.exit(1)


def speedups(rows: list[dict]) -> dict:
    out = {}
    for r in rows:
        base = next((x for x in rows if x["model"] == r["model"] and x["seq"] == r["seq"] and x["variant"] == "hf"
                     and "error" not in x), None)
        if base and r["variant"] != "hf" and "error" not in r:
            out[f"{r['model']}/{r['seq']}/{r['variant']}"] = r["seq_per_s"] / base["seq_per_s"]
    return out


def write_result(path: str | None, device: str, peak: float | None, rows: list[dict]) -> None:
    if path:
        write_json_atomic(path, {"device": device, "peak_flops": peak, "rows": rows, "speedup_vs_hf": speedups(rows)})


if __name__ == "__main__":
    main()
