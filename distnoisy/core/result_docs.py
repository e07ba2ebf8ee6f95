"""Markdown result documents: sections that tools regenerate in place (``## title``)."""

from __future__ import annotations

import os
from pathlib import Path

#: The first line of docs/benchmarks.md (written when the file does not exist yet).
BENCHMARKS_HEADER = (
    "# distnoisy benchmarks — figures measured by `python -m distnoisy.bench`, "
    "ratios side by side in one run\n"
)


def replace_section(document: str, title: str, body: str) -> str:
    """Put ``body`` under the heading ``## title``, replacing that section if present."""
    heading = f"## {title}"
    lines = document.splitlines()
    if heading in lines:
        start = lines.index(heading)
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines)
        )
        lines = lines[:start] + lines[end:]
        insert_at = start
    else:
        insert_at = len(lines)
    section = [heading, "", *body.rstrip("\n").splitlines(), ""]
    if insert_at == len(lines) and lines and lines[-1] != "":
        section.insert(0, "")
    lines[insert_at:insert_at] = section
    return "\n".join(lines).rstrip("\n") + "\n"


def write_section(path: Path, title: str, body: str, header: str = "") -> None:
    """Replace (or append) the ``## title`` section of the Markdown file ``path`` atomically;
    a missing file starts from ``header``."""
    path = Path(path)
    text = path.read_text() if path.exists() else header
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(replace_section(text, title, body))
    os.replace(tmp, path)
