"""Reading the JSON files users hand us (configs, SQuAD data, predictions) with one clear error."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def read_json(path: str | os.PathLike, error: type[Exception], missing_hint: str, malformed_hint: str) -> Any:
    """Parse `path`, raising `error` with a message naming the file and the fix."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: file not found; {missing_hint}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(f"{path}: malformed JSON ({err}); {malformed_hint}") from None
