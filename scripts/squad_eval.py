#!/usr/bin/env python
"""Score SQuAD v1.1 predictions exactly as the official v1.1 evaluate script does.

    python scripts/squad_eval.py DATA_JSON PREDICTIONS_JSON
    -> {"exact_match": 81.2, "f1": 88.5}

PREDICTIONS_JSON is {question id: answer text}. Questions without a prediction score
0 (and are named on stderr). Bad input (including a "version" other than 1.1, a
question without answers, a repeated question id) exits 2 with one line on stderr;
answer_start offsets are not checked, as scoring reads only the answer texts.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lbllm.squad.features import SquadFormatError, read_squad_json
from lbllm.utils import read_json
from lbllm.squad.metrics import evaluate


def read_predictions(path: Path) -> dict[str, str]:
    """Load {id: text}; anything else would fail obscurely inside normalization."""
    preds = read_json(path, SquadFormatError, "pass the predictions.json written by run_squad.py",
                      "regenerate the predictions file")
    if not isinstance(preds, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in preds.items()):
        raise SquadFormatError(f"{path}: predictions must be a JSON object {{question id: answer text}}")
    return preds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Official SQuAD v1.1 EM/F1 (percent).")
    parser.add_argument("data_json", type=Path, help="SQuAD v1.1 dataset with gold answers")
    parser.add_argument("predictions_json", type=Path, help="{question id: answer text}")
    args = parser.parse_args(argv)
    try:
        data = read_squad_json(args.data_json, check_answer_starts=False)  # scoring reads only the texts
        predictions = read_predictions(args.predictions_json)
    except SquadFormatError as err:
        print(f"squad_eval: error: {err}", file=sys.stderr)
        return 2
    try:
        result = evaluate(data, predictions)
    except ValueError as err:
        print(f"squad_eval: error: {args.data_json}: {err}; pass a dataset with questions", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
