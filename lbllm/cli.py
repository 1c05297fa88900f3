"""Command-line flags generated from a config dataclass, so each option, its default and
its help are written once: on the field (`name: type = default` followed by a docstring).

`choices` (and `nargs` / `const`) come from the field's metadata
(`field(default=..., metadata={"choices": ...})`);
a field without a default is a required flag; `X | None` is an optional X.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Collection

__all__ = ["field_docs", "add_dataclass_arguments", "dataclass_from_args"]


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass: the string literal right after each field."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for prev, node in zip(body, body[1:]):
        if (isinstance(prev, ast.AnnAssign) and isinstance(prev.target, ast.Name) and isinstance(node, ast.Expr)
                and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)):
            docs[prev.target.id] = " ".join(node.value.value.split())
    return docs


def _flag_type(hint: Any) -> type:
    """`int | None` -> int, `Path` -> str (the dataclass converts), `str` -> str."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        hint = args[0]
    return str if hint is Path else hint


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, skip: Collection[str] = ()) -> None:
    """One `--name` flag per field of `cls`, with its default and docstring as help;
    fields in `skip` get none (a CLI that spells those differently adds its own)."""
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kw: dict[str, Any] = {"help": docs.get(f.name, "")}
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            kw["required"] = True
        else:
            kw["default"] = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if kw["default"] is not None and "default" not in kw["help"]:
                kw["help"] = f"{kw['help']} (default: {kw['default']})".strip()
        typ = _flag_type(hints[f.name])
        if typ is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = typ
        for key in ("choices", "nargs", "const"):
            if key in f.metadata:
                kw[key] = f.metadata[key]
        parser.add_argument(f"--{f.name}", **kw)


def dataclass_from_args(cls: type, args: argparse.Namespace, **values: Any) -> Any:
    """`cls` built from the parsed flags of its fields (other flags are ignored);
    `values` gives fields that have no flag of their own, or overrides them."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.name not in values}, **values)
