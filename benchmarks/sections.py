"""Where the benchmark scripts write their figures: a named section of a Markdown file."""

from __future__ import annotations

from pathlib import Path


def replace_section(path: Path, name: str, text: str) -> None:
    """Put ``text`` between the ``<!-- name:start -->`` and ``<!-- name:end -->`` markers."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    doc = path.read_text()
    head, found, rest = doc.partition(start)
    if not found or end not in rest:
        raise SystemExit(f"{path} has no {start} … {end} section")
    _, _, tail = rest.partition(end)
    path.write_text(f"{head}{start}\n{text}\n{end}{tail}")
