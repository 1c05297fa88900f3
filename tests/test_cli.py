"""lbllm.cli: flags generated from a config dataclass (pretrain_bert.py's come from RunConfig)."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from helpers import load_script
from lbllm.cli import add_dataclass_arguments, dataclass_from_args, field_docs
from lbllm.train.config import RunConfig


@dataclass
class Example:
    source: Path
    """Where to read from."""
    steps: int | None = None
    """How many; default: all."""
    rate: float = 0.5
    mode: str = field(default="fast", metadata={"choices": ("fast", "slow")})
    """Fast or slow."""
    verbose: bool = False


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_dataclass_arguments(p, Example)
    return p


def test_types_defaults_choices_and_required():
    args = _parser().parse_args(["--source", "a/b", "--steps", "3", "--mode", "slow", "--verbose"])
    ex = dataclass_from_args(Example, args)
    assert ex == Example(source="a/b", steps=3, rate=0.5, mode="slow", verbose=True)
    assert dataclass_from_args(Example, _parser().parse_args(["--source", "x"])).steps is None
    with pytest.raises(SystemExit):
        _parser().parse_args(["--steps", "3"])  # --source is required
    with pytest.raises(SystemExit):
        _parser().parse_args(["--source", "x", "--mode", "medium"])
    with pytest.raises(SystemExit):
        _parser().parse_args(["--source", "x", "--steps", "many"])


def test_help_is_the_field_docstring():
    assert field_docs(Example) == {"source": "Where to read from.", "steps": "How many; default: all.",
                                   "mode": "Fast or slow."}
    text = _parser().format_help()
    assert "Where to read from." in text and "(default: 0.5)" in text and "(default: fast)" in text


def test_pretrain_flags_are_runconfig_fields():
    """One source: every RunConfig field is a flag with the field's default, and nothing
    else is, besides what the launcher passes."""
    cli = load_script("pretrain_bert.py")
    args = cli.parse_args(["--deepspeed_config", "c.json", "--data_dir", "d", "--output_dir", "o"])
    names = {f.name for f in dataclasses.fields(RunConfig)}
    assert set(vars(args)) - names == {"local_rank", "deepspeed"}
    for f in dataclasses.fields(RunConfig):
        if f.default is not dataclasses.MISSING:
            assert getattr(args, f.name) == f.default, f.name
    assert all(doc for doc in (field_docs(RunConfig).get(n) for n in names))
