#!/usr/bin/env python
"""Fine-tune a BERT checkpoint on SQuAD v1.1 and score it with the official metric.

    python scripts/run_squad.py --model_dir DIR --train_file train.json \
        --predict_file dev.json --output_dir OUT [--epochs 3] [--max_steps N] \
        [--lr 5e-5] [--batch_size 32] [--seed 42]

DIR is a save_pretrained directory (a pretraining checkpoint is fine: the QA head is
initialized fresh) with fast-tokenizer files. Writes OUT/predictions.json
({question id: answer text}) and OUT/results.json (exact_match and f1 in percent,
plus steps, timings and counts). Inputs are all checked, and the model loaded,
before OUT is created; bad input exits 2 with one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from lbllm.squad.features import SquadFormatError, examples_from_json, read_squad_json

DEFAULT_MAX_SEQ_LENGTH = 384
DEFAULT_DOC_STRIDE = 128


class InputError(Exception):
    """Bad user input: reported as one line, exit code 2."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_dir", type=Path, required=True, help="save_pretrained dir with config, weights, tokenizer")
    p.add_argument("--train_file", type=Path, required=True, help="SQuAD v1.1 training json")
    p.add_argument("--predict_file", type=Path, required=True, help="SQuAD v1.1 json to predict and score")
    p.add_argument("--output_dir", type=Path, required=True, help="gets predictions.json and results.json")
    p.add_argument("--epochs", type=float, default=3.0, help="passes over the training windows (default 3)")
    p.add_argument("--max_steps", type=int, default=None, help="optimizer steps, overrides --epochs; 0 = evaluate only")
    p.add_argument("--lr", type=float, default=5e-5, help="peak learning rate (default 5e-5)")
    p.add_argument("--batch_size", type=int, default=32, help="training windows per step (default 32)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--max_seq_length", type=int, default=None,
                   help=f"window length in tokens (default {DEFAULT_MAX_SEQ_LENGTH}, or the model's position limit if smaller)")
    p.add_argument("--doc_stride", type=int, default=None,
                   help=f"token overlap between windows of a long context (default {DEFAULT_DOC_STRIDE}, "
                        "or half the context room when max_seq_length is small)")
    p.add_argument("--max_query_length", type=int, default=64, help="questions are cut to this many tokens")
    p.add_argument("--warmup_proportion", type=float, default=0.1)
    p.add_argument("--weight_decay", type=float, default=0.01)
    p.add_argument("--max_grad_norm", type=float, default=1.0, help="0 disables clipping")
    p.add_argument("--n_best", type=int, default=20, help="top start/end logits considered per window")
    p.add_argument("--max_answer_length", type=int, default=30, help="longest answer in tokens")
    p.add_argument("--eval_batch_size", type=int, default=64)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="auto", help='"auto" (CUDA if present), "cpu", "cuda", "cuda:1", ...')
    p.add_argument("--no_progress", action="store_true", help="no tqdm bars")
    return p.parse_args(argv)


def check_model_dir(model_dir: Path) -> int | None:
    """Fail fast on a directory that cannot be a checkpoint; return its position limit."""
    if not model_dir.is_dir():
        raise InputError(f"{model_dir}: model directory not found; pass a directory written by save_pretrained")
    config = model_dir / "config.json"
    if not config.is_file():
        raise InputError(f"{model_dir}: no config.json; pass a directory written by save_pretrained")
    if not ((model_dir / "tokenizer.json").is_file() or (model_dir / "vocab.txt").is_file()):
        raise InputError(f"{model_dir}: no tokenizer files (tokenizer.json or vocab.txt); save the tokenizer into it")
    try:
        with open(config, encoding="utf-8") as f:
            limit = json.load(f).get("max_position_embeddings")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise InputError(f"{config}: malformed JSON ({err}); re-save the checkpoint") from None
    return limit if isinstance(limit, int) else None


def check_questions(path: Path, data: dict, training: bool) -> None:
    """An empty file, or a training file with no locatable answer, would only fail
    (or silently train nothing) after the slow model load."""
    examples, unlocatable = examples_from_json(data)
    if not examples:
        raise InputError(f"{path}: contains no questions; pass a SQuAD v1.1 file with questions")
    if training and unlocatable == len(examples):
        raise InputError(f"{path}: no answer text is found in its context; check answer_start/text")


def resolve_lengths(args: argparse.Namespace, position_limit: int | None) -> tuple[int, int]:
    """Defaults that fit the model; explicit values that do not are errors, not clamps."""
    max_seq = args.max_seq_length
    if max_seq is None:
        max_seq = min(DEFAULT_MAX_SEQ_LENGTH, position_limit or DEFAULT_MAX_SEQ_LENGTH)
    elif position_limit is not None and max_seq > position_limit:
        raise InputError(
            f"--max_seq_length {max_seq} exceeds {args.model_dir}'s {position_limit} positions; pass --max_seq_length <= {position_limit}"
        )
    stride = args.doc_stride
    if stride is None:
        stride = max(0, min(DEFAULT_DOC_STRIDE, (max_seq - args.max_query_length - 3) // 2))
    return max_seq, stride


def write_json_atomic(path: Path, obj: object) -> None:
    """Readers never see a half-written file: write a temp file, then rename over."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, ensure_ascii=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        # Cheap checks first: no torch import, no model load, before any slow work.
        train_data = read_squad_json(args.train_file)
        predict_data = read_squad_json(args.predict_file)
        check_questions(args.train_file, train_data, training=True)
        check_questions(args.predict_file, predict_data, training=False)
        position_limit = check_model_dir(args.model_dir)
        if args.output_dir.exists() and not args.output_dir.is_dir():
            raise InputError(f"{args.output_dir}: exists and is not a directory; pass a directory path")
        max_seq, stride = resolve_lengths(args, position_limit)

        from lbllm.squad.finetune import SquadConfig, finetune, load_qa_model, seed_everything

        try:
            cfg = SquadConfig(
                epochs=args.epochs, max_steps=args.max_steps, lr=args.lr, batch_size=args.batch_size,
                eval_batch_size=args.eval_batch_size, seed=args.seed, max_seq_length=max_seq,
                doc_stride=stride, max_query_length=args.max_query_length,
                warmup_proportion=args.warmup_proportion, weight_decay=args.weight_decay,
                max_grad_norm=args.max_grad_norm, n_best=args.n_best,
                max_answer_length=args.max_answer_length, threads=args.threads,
                device=args.device, progress=not args.no_progress,
            )  # fmt: skip
        except ValueError as err:
            raise InputError(f"invalid option: {err}") from None

        seed_everything(cfg.seed)  # the fresh QA head is initialized while loading
        try:
            model, tokenizer, load_info = load_qa_model(args.model_dir)
        except Exception as err:  # transformers raises many types for unusable dirs
            msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise InputError(f"{args.model_dir}: cannot load model/tokenizer ({msg}); pass a save_pretrained directory") from None
    except (SquadFormatError, InputError) as err:
        print(f"run_squad: error: {err}", file=sys.stderr)
        return 2

    print(
        f"run_squad: loaded {args.model_dir}: {len(load_info['fresh'])} new tensors "
        f"({', '.join(load_info['fresh']) or 'none'}), {len(load_info['unused'])} checkpoint tensors unused; "
        f"windows of {cfg.max_seq_length} tokens, overlap {cfg.doc_stride}",
        file=sys.stderr,
    )
    args.output_dir.mkdir(parents=True, exist_ok=True)
    predictions, metrics = finetune(model, tokenizer, train_data, predict_data, cfg)
    results = {
        "exact_match": metrics.pop("exact_match"),
        "f1": metrics.pop("f1"),
        **metrics,
        "model_dir": str(args.model_dir),
        "train_file": str(args.train_file),
        "predict_file": str(args.predict_file),
        "new_head_tensors": load_info["fresh"],
    }
    write_json_atomic(args.output_dir / "predictions.json", predictions)
    write_json_atomic(args.output_dir / "results.json", results)
    print(
        f"squad: exact_match {results['exact_match']:.2f} f1 {results['f1']:.2f} | "
        f"{results['train_steps']} steps in {results['train_seconds']:.1f}s, "
        f"{results['num_eval_examples']} questions scored | {args.output_dir}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
