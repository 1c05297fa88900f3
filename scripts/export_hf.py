#!/usr/bin/env python
"""Export any checkpoint of a pretraining run in Hugging Face format.

    python scripts/export_hf.py RUN_DIR OUT [--tag stepNNNNNNNN]

RUN_DIR is a pretrain_bert.py --output_dir; the checkpoint is the one ``latest`` names
unless --tag picks another (``ls RUN_DIR/checkpoints``). The weights are the fp32 master
weights: under ZeRO 1/2/3 they are partitioned across the ranks that saved them, and
DeepSpeed's zero_to_fp32 joins the partitions here, in one process, whatever the world
size of the run. OUT gets what the run's own export (RUN_DIR/final) holds: config,
weights and tokenizer, loadable by AutoModelForPreTraining and
AutoModelForQuestionAnswering (scripts/run_squad.py --model_dir OUT). OUT is written
atomically; an existing non-empty OUT is refused. Errors: one line, exit 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lbllm.utils import UserError


def export(run_dir: Path, out: Path, tag: str | None) -> str:
    from transformers import BertTokenizerFast

    from lbllm.model import build_bert_config, build_pretraining_model
    from lbllm.train import checkpoint as ckpt

    info_path = run_dir / "run.json"
    if not info_path.is_file():
        raise UserError(f"{info_path}: not found; RUN_DIR must be a pretrain_bert.py --output_dir")
    info = json.loads(info_path.read_text())
    tags = ckpt.checkpoint_tags(run_dir)
    tag = tag or ckpt.latest_tag(run_dir)
    if tag is None or tag not in tags:
        raise UserError(f"{run_dir / ckpt.CHECKPOINT_SUBDIR}: no checkpoint {tag or '(latest)'}; "
                        f"available: {', '.join(tags) or 'none (run with --save_interval)'}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: exists and is not empty; choose a new OUT")
    tok_dir = Path(info.get("tokenizer") or Path(info["data_dir"]).parent / "tokenizer")
    if not (tok_dir / "tokenizer_config.json").is_file():
        raise UserError(f"{tok_dir}: the run's tokenizer is not there any more")
    tokenizer = BertTokenizerFast.from_pretrained(str(tok_dir))
    bert_config = build_bert_config(info["model_config"], vocab_size=len(tokenizer), dropout=info.get("dropout"))
    state = ckpt.checkpoint_module_state_dict(run_dir, tag)
    ckpt.export_hf(state, build_pretraining_model(bert_config), tokenizer, out)
    return tag


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--tag", help="checkpoint tag, e.g. step00000200 (default: the latest)")
    a = p.parse_args(argv)
    try:
        tag = export(a.run_dir, a.out, a.tag)
    except UserError as e:
        print(f"export_hf: {e}", file=sys.stderr)
        return 2
    print(f"export_hf: {a.run_dir} checkpoint {tag} -> {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
