#!/usr/bin/env python
"""Fine-tune a BERT checkpoint on SQuAD v1.1 and score it with the official metric.

    python scripts/run_squad.py --model_dir DIR --train_file train.json \
        --predict_file dev.json --output_dir OUT [--epochs 2] [--max_steps N] \
        [--lr 3e-5] [--batch_size 32] [--seeds 1,2,3] [--n_best_size 20] \
        [--max_answer_length 30] [--dropout P] [--skip_bad_examples]
    deepspeed --num_gpus K scripts/run_squad.py ...   (data parallel over K ranks)

DIR is a save_pretrained directory (a pretraining checkpoint is fine: the QA head is
initialized fresh, from the seed) with fast-tokenizer files. Defaults are the published
base/large recipe (lbllm.squad.config.SquadConfig). Each seed fine-tunes a fresh copy
of the model; OUT/results.json holds exact_match and f1 in percent as means over the
seeds, their sample std, and every seed's numbers (steps, losses, timings, examples/s);
OUT/predictions.json ({question id: answer text}) and OUT/nbest_predictions.json are
the first seed's. Inputs are all checked, and the model loaded, before OUT is created;
bad input exits 2 with one line on stderr. Under the launcher `--batch_size` is the
global batch and only rank 0 prints and writes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

from lbllm.cli import add_dataclass_arguments, dataclass_from_args
from lbllm.squad.config import SquadConfig
from lbllm.train.data_parallel import from_env
from lbllm.squad.features import BadQuestionError, load_squad_json
from lbllm.squad.metrics import aggregate_seeds
from lbllm.utils import UserError, seed_everything, write_json_atomic

DEFAULTS = {f.name: f.default for f in fields(SquadConfig)}


# Fields whose flags read differently from the field: the lengths default to what fits
# the model, seeds come as a list, and the progress bar is switched off.
CUSTOM_FLAGS = ("seed", "max_seq_length", "doc_stride", "n_best_size", "progress")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    d = DEFAULTS
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_dir", type=Path, required=True, help="save_pretrained dir with config, weights, tokenizer")
    p.add_argument("--train_file", type=Path, required=True, help="SQuAD v1.1 training json")
    p.add_argument("--predict_file", type=Path, required=True, help="SQuAD v1.1 json to predict and score")
    p.add_argument("--output_dir", type=Path, required=True, help="gets predictions.json, nbest_predictions.json, results.json")
    add_dataclass_arguments(p, SquadConfig, skip=CUSTOM_FLAGS)  # the recipe: names, defaults, help from SquadConfig
    p.add_argument("--seed", type=int, default=None, help=f"one seed, the same as --seeds S (default {d['seed']})")
    p.add_argument("--seeds", default=None, help="comma-separated seeds, one fine-tuning run each, e.g. 1,2,3")
    p.add_argument("--max_seq_length", type=int, default=None,
                   help=f"window length in tokens (default {d['max_seq_length']}, or the model's position limit if smaller)")
    p.add_argument("--doc_stride", type=int, default=None,
                   help=f"token overlap between windows of a long context (default {d['doc_stride']}, "
                        "or half the context room when max_seq_length is small)")
    p.add_argument("--n_best_size", "--n_best", dest="n_best_size", type=int, default=d["n_best_size"],
                   help=f"top start/end logits combined per window, and answers kept per question (default {d['n_best_size']})")
    p.add_argument("--skip_bad_examples", action="store_true",
                   help="skip (and count) unusable questions instead of stopping at the first")
    p.add_argument("--no_progress", action="store_true", help="no tqdm bars")
    p.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher (LOCAL_RANK is read)")
    return p.parse_args(argv)


def parse_seeds(args: argparse.Namespace) -> list[int]:
    """--seeds 1,2,3, or --seed S, or the default seed; repeats are refused (the
    std over seeds would count one run twice)."""
    if args.seed is not None and args.seeds is not None:
        raise UserError("pass either --seed S or --seeds S1,S2,..., not both")
    if args.seeds is None:
        return [args.seed if args.seed is not None else DEFAULTS["seed"]]
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise UserError(f"--seeds {args.seeds!r}: expected comma-separated integers such as 1,2,3") from None
    if len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds {args.seeds!r} repeats a seed; pass distinct seeds")
    return seeds


def read_squad(path: Path, skip_bad: bool) -> tuple[dict, list]:
    """Load one file; a bad question names the flag that would skip it."""
    try:
        data, skipped = load_squad_json(path, skip_bad_examples=skip_bad)
    except BadQuestionError as err:
        raise UserError(f"{err}, or pass --skip_bad_examples to skip such questions") from None
    if not any(p["qas"] for a in data["data"] for p in a["paragraphs"]):
        extra = f" after skipping {len(skipped)} bad ones" if skipped else ""
        raise UserError(f"{path}: contains no usable questions{extra}; pass a SQuAD v1.1 file with questions")
    return data, skipped


def check_model_dir(model_dir: Path) -> int | None:
    """Fail fast on a directory that cannot be a checkpoint; return its position limit."""
    if not model_dir.is_dir():
        raise UserError(f"{model_dir}: model directory not found; pass a directory written by save_pretrained")
    config = model_dir / "config.json"
    if not config.is_file():
        raise UserError(f"{model_dir}: no config.json; pass a directory written by save_pretrained")
    if not ((model_dir / "tokenizer.json").is_file() or (model_dir / "vocab.txt").is_file()):
        raise UserError(f"{model_dir}: no tokenizer files (tokenizer.json or vocab.txt); save the tokenizer into it")
    try:
        with open(config, encoding="utf-8") as f:
            limit = json.load(f).get("max_position_embeddings")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise UserError(f"{config}: malformed JSON ({err}); re-save the checkpoint") from None
    return limit if isinstance(limit, int) else None


def resolve_lengths(args: argparse.Namespace, position_limit: int | None) -> tuple[int, int]:
    """Defaults that fit the model; explicit values that do not are errors, not clamps."""
    max_seq = args.max_seq_length
    if max_seq is None:
        max_seq = min(DEFAULTS["max_seq_length"], position_limit or DEFAULTS["max_seq_length"])
    elif position_limit is not None and max_seq > position_limit:
        raise UserError(
            f"--max_seq_length {max_seq} exceeds {args.model_dir}'s {position_limit} positions; pass --max_seq_length <= {position_limit}"
        )
    stride = args.doc_stride
    if stride is None:
        stride = max(0, min(DEFAULTS["doc_stride"], (max_seq - args.max_query_length - 3) // 2))
    return max_seq, stride


def build_config(args: argparse.Namespace, max_seq: int, stride: int, seed: int) -> SquadConfig:
    try:
        return dataclass_from_args(SquadConfig, args, seed=seed, max_seq_length=max_seq, doc_stride=stride,
                                   progress=not args.no_progress)
    except ValueError as err:
        raise UserError(f"invalid option: {err}") from None


def load_model(model_dir: Path, seed: int, dropout: float | None):
    """Seed, then load: the fresh QA head is initialized while loading."""
    from lbllm.squad.finetune import load_qa_model

    seed_everything(seed)
    try:
        return load_qa_model(model_dir, dropout)
    except Exception as err:  # transformers raises many types for unusable dirs
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{model_dir}: cannot load model/tokenizer ({msg}); pass a save_pretrained directory") from None


def report_seed(m: dict, eval_windows: int) -> None:
    print(f"run_squad: seed {m['seed']}: exact_match {m['exact_match']:.2f} f1 {m['f1']:.2f} | train "
          f"{m['train_examples']} windows in {m['train_seconds']:.1f}s ({m['train_examples_per_s'] or 0:.1f} examples/s), "
          f"predict {eval_windows} windows in {m['predict_seconds']:.1f}s ({m['predict_examples_per_s'] or 0:.1f} examples/s)",
          file=sys.stderr)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dp = from_env()
    t_start = time.perf_counter()
    try:
        # Cheap checks first: no torch import, no model load, before any slow work.
        seeds = parse_seeds(args)
        train_data, train_skipped = read_squad(args.train_file, args.skip_bad_examples)
        predict_data, predict_skipped = read_squad(args.predict_file, args.skip_bad_examples)
        position_limit = check_model_dir(args.model_dir)
        if args.output_dir.exists() and not args.output_dir.is_dir():
            raise UserError(f"{args.output_dir}: exists and is not a directory; pass a directory path")
        cfg = build_config(args, *resolve_lengths(args, position_limit), seed=seeds[0])
        model, tokenizer, load_info = load_model(args.model_dir, seeds[0], cfg.dropout)
    except UserError as err:  # SquadFormatError is one
        if dp.is_main:  # every rank finds the same error; one line is enough
            print(f"run_squad: error: {err}", file=sys.stderr)
        return 2

    from lbllm.squad.finetune import finetune, prepare_data

    skipped = train_skipped + predict_skipped
    if dp.is_main:
        print(f"run_squad: loaded {args.model_dir}: {len(load_info['fresh'])} new tensors "
              f"({', '.join(load_info['fresh']) or 'none'}), {len(load_info['unused'])} checkpoint tensors unused; "
              f"windows of {cfg.max_seq_length} tokens, overlap {cfg.doc_stride}; seeds {seeds}; {dp.world_size} rank(s)",
              file=sys.stderr)  # fmt: skip
        if skipped:
            print(f"run_squad: skipped {len(skipped)} bad questions ({len(train_skipped)} in {args.train_file}, "
                  f"{len(predict_skipped)} in {args.predict_file}); first: "
                  f"{skipped[0].message(args.train_file if train_skipped else args.predict_file)}", file=sys.stderr)  # fmt: skip
        args.output_dir.mkdir(parents=True, exist_ok=True)
    dp.init(cfg.resolved_device(dp.local_rank))
    data = prepare_data(tokenizer, train_data, predict_data, cfg)
    runs = []
    for i, seed in enumerate(seeds):
        if i:
            model, _, _ = load_model(args.model_dir, seed, cfg.dropout)
        runs.append(finetune(model, data, replace(cfg, seed=seed), dp))
        if dp.is_main:
            report_seed(runs[-1].metrics, len(data.eval_feats))
    dp.close()
    if not dp.is_main:
        return 0

    config = {k: v for k, v in runs[0].config.items() if k != "seed"}
    results = {
        **aggregate_seeds([r.metrics for r in runs]),
        "train_steps": runs[0].metrics["train_steps"],
        "epochs": runs[0].metrics["epochs"],
        **data.counts(),
        "num_skipped_bad_examples": len(skipped),
        "num_skipped_bad_train_examples": len(train_skipped),
        "num_skipped_bad_predict_examples": len(predict_skipped),
        "preprocess_seconds": data.preprocess_seconds,
        "total_seconds": time.perf_counter() - t_start,
        "world_size": dp.world_size,
        "device": str(cfg.resolved_device(dp.local_rank)),
        "config": {**config, "seeds": seeds},
        "model_dir": str(args.model_dir),
        "train_file": str(args.train_file),
        "predict_file": str(args.predict_file),
        "new_head_tensors": load_info["fresh"],
    }
    write_json_atomic(args.output_dir / "predictions.json", runs[0].predictions)
    write_json_atomic(args.output_dir / "nbest_predictions.json", runs[0].nbest)
    write_json_atomic(args.output_dir / "results.json", results)
    spread = f" (std {results['exact_match_std']:.2f} / {results['f1_std']:.2f} over {len(seeds)} seeds)" if len(seeds) > 1 else ""
    print(
        f"squad: exact_match {results['exact_match']:.2f} f1 {results['f1']:.2f}{spread} | "
        f"{results['train_steps']} steps per seed, {results['num_eval_examples']} questions scored | {args.output_dir}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
