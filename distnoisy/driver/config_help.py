"""Every config key with its default and one line of meaning, read off the schema itself.

The meaning of a key is the first sentence of the comment written above its field in the
schema's dataclass (:mod:`distnoisy.config`, each method's parameter dataclass, the
post-training config), so a key added to a schema is listed with its default the moment it
exists; ``tests/test_commands.py`` checks that every leaf key of :class:`~distnoisy.config.Config`
appears, and that every key of ``config.py`` has a meaning.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import re
import textwrap
from typing import Any

from distnoisy.core.choices import (
    CIFAR_N_SETS,
    DATASETS,
    INSTANCE_FEATURES,
    LAUNCHERS,
    NOISE_KINDS,
    SPLITS,
    STORE_BACKENDS,
    STORE_DTYPES,
)

#: Keys whose value is one of a fixed set (checked by :func:`distnoisy.config.validate`); the
#: help lists the set after the meaning.
_CHOICES: dict[str, tuple[str, ...]] = {
    "data.name": DATASETS,
    "data.split": SPLITS,
    "noise.kind": NOISE_KINDS,
    "noise.instance_features": INSTANCE_FEATURES,
    "noise.cifar_n": CIFAR_N_SETS,
    "scaling.launcher": LAUNCHERS,
    "store.backend": STORE_BACKENDS,
    "store.dtype": STORE_DTYPES,
}

#: Meanings of keys whose field is declared outside the run schema's modules.
_NAMELESS = {"method.name": "The training method (docs/methods.md); its keys are listed below."}

_WIDTH = 100
_KEY_COLUMN = 36


@functools.cache
def field_comments(cls: type) -> dict[str, str]:
    """``{field: comment}`` of a dataclass: the ``#`` lines right above each field (or a
    comment after it on its line), joined into one paragraph; fields without one are absent.

    Inherited fields are read from the class that declares them.
    """
    out: dict[str, str] = {}
    for base in reversed(cls.__mro__[:-1]):
        if dataclasses.is_dataclass(base) and "__dataclass_fields__" in vars(base):
            out.update(_own_comments(base))
    return out


def _own_comments(cls: type) -> dict[str, str]:
    try:
        lines, _ = inspect.getsourcelines(cls)
    except (OSError, TypeError):  # no source (a frozen build): no meanings, keys still listed
        return {}
    source = textwrap.dedent("".join(lines))
    body = source.splitlines()
    node = ast.parse(source).body[0]
    assert isinstance(node, ast.ClassDef)
    out: dict[str, str] = {}
    group: str | None = None  # the first field of a block of fields under one comment
    last_line = -2
    for stmt in node.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        above: list[str] = []
        row = stmt.lineno - 2  # the line above the field, 0-based
        while row >= 0 and body[row].strip().startswith("#"):
            above.insert(0, body[row].strip().lstrip("#").strip())
            row -= 1
        end = stmt.end_lineno or stmt.lineno
        after = body[end - 1].partition("  # ")[2].strip()
        name = stmt.target.id
        if above or after:
            out[name] = " ".join(above) or after
            group = name
        elif group is not None and stmt.lineno == last_line + 1:
            # A field right below a commented one, with no comment of its own: the comment
            # covers the block (e.g. "NCE and RCE weights" above alpha, then beta).
            out[name] = f"(see {group})"
        else:
            group = None
        last_line = end
    return out


def first_sentence(text: str) -> str:
    """The first sentence of a comment, as plain text (no reStructuredText markup)."""
    text = re.sub(r":\w+:`~?([^`]+)`", r"\1", text).replace("``", "")
    depth = 0
    for i, ch in enumerate(text):
        depth += {"(": 1, ")": -1, "[": 1, "]": -1}.get(ch, 0)
        if ch == "." and depth <= 0 and text[i + 1 : i + 2] in (" ", ""):
            word = text[:i].rsplit(" ", 1)[-1].lower()
            if word in ("e.g", "i.e", "etc", "vs", "cf"):
                continue
            return text[: i + 1]
    return text


def format_default(value: Any) -> str:
    """A default as one would type it in ``key=value`` (``true``, ``null``, ``[]``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return str(value)


def leaf_keys(node: Any, prefix: str = "") -> list[tuple[str, Any, str]]:
    """``(key, default, meaning)`` of every leaf key of a schema instance, in field order."""
    out: list[tuple[str, Any, str]] = []
    comments = field_comments(type(node))
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out += leaf_keys(value, f"{key}.")
            continue
        meaning = first_sentence(comments.get(f.name, ""))
        if meaning.startswith("(see "):
            meaning = f"(see {prefix}{meaning[5:]}"
        out.append((key, value, meaning))
    return out


def with_choices(meaning: str, choices: tuple[str, ...] | list[str]) -> str:
    """``meaning`` followed by the values a key takes."""
    if meaning and not meaning.endswith("."):
        meaning += "."
    return f"{meaning} One of: {', '.join(choices)}.".strip()


def key_lines(keys: list[tuple[str, Any, str]]) -> list[str]:
    """One entry per key: ``key=default`` then its meaning (wrapped at 100 columns)."""
    lines = []
    for key, value, meaning in keys:
        left = f"  {key}={format_default(value)}"
        if not meaning:
            lines.append(left)
            continue
        head = left.ljust(_KEY_COLUMN) if len(left) < _KEY_COLUMN - 1 else left + "  "
        wrapped = textwrap.wrap(
            meaning, _WIDTH, initial_indent=head, subsequent_indent=" " * _KEY_COLUMN
        )
        lines += wrapped if len(head) < _WIDTH - 20 else [left, *wrapped[1:]]
    return lines


def run_keys_help() -> str:
    """The key list of ``python -m distnoisy.train --help``: every key of
    :class:`~distnoisy.config.Config` with its default and meaning, then each method's
    ``method.*`` keys."""
    from distnoisy.config import Config
    from distnoisy.methods import METHODS
    from distnoisy.models import MODELS

    choices = {
        **_CHOICES,
        "method.name": METHODS.names(),
        "model.name": MODELS.names(),
    }
    keys = [
        (k, v, with_choices(m or _NAMELESS.get(k, ""), choices[k]) if k in choices else m)
        for k, v, m in leaf_keys(Config())
    ]
    lines = ["Keys (key=default, then its meaning):", *key_lines(keys), ""]
    lines.append("Method keys (method.*; each method takes only its own):")
    for name in METHODS.names():
        params = METHODS.get(name).Params(name=name)
        own = [k for k in leaf_keys(params, "method.") if k[0] != "method.name"]
        lines.append(f"  method.name={name}:" + ("" if own else " no keys of its own"))
        lines += ["  " + line for line in key_lines(own)]
    return "\n".join(lines)
