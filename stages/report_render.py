"""Markdown building and HTML rendering of the report (stage `report`).

``Document`` collects the markdown of reports/report.md with links to its figures, and
``render_html`` turns that markdown into one self-contained HTML page whose figures are
embedded as data URIs.
"""

from __future__ import annotations

import base64
import html
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from stages.common import StageError

log = logging.getLogger("flowmatch.report")

MAX_FIGURE_BYTES = 2 * 1024 * 1024
MIME_TYPES = {".png": "image/png", ".gif": "image/gif", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml"}
FIGURE_SUFFIXES = tuple(MIME_TYPES)


@dataclass
class Document:
    """A markdown document under construction, with the figures it references."""

    base: Path
    lines: list[str] = field(default_factory=list)

    def heading(self, level: int, text: str) -> None:
        self.lines += ["#" * level + " " + text, ""]

    def paragraph(self, text: str) -> None:
        self.lines += [text, ""]

    def bullets(self, items: Iterable[str]) -> None:
        self.lines += [f"- {item}" for item in items] + [""]

    def table(self, header: list[str], rows: list[list[str]], align_right_from: int = 1) -> None:
        """Append a table; columns from ``align_right_from`` on are right-aligned (numbers)."""
        rule = ["---" if i < align_right_from else "---:" for i in range(len(header))]
        self.lines.append(_table_row(header))
        self.lines.append(_table_row(rule))
        self.lines += [_table_row(row) for row in rows]
        self.lines.append("")

    def figure(self, path: Path, caption: str, stage: str = "") -> None:
        """Reference the figure at ``path`` if it exists and is under the size limit, else write why it is left out."""
        if not path.is_file():
            writer = f" (the `{stage}` stage writes it)" if stage else ""
            self.paragraph(f"*Missing figure:* `{path.as_posix()}` does not exist{writer}. {caption}")
            return
        size = path.stat().st_size
        if size >= MAX_FIGURE_BYTES:
            log.warning("%s is %d bytes, over the %d-byte limit; not embedded", path, size, MAX_FIGURE_BYTES)
            self.paragraph(f"*Figure left out:* `{path.as_posix()}` is {size / 2**20:.1f} MiB, over the 2 MiB limit. {caption}")
            return
        target = os.path.relpath(path, self.base).replace(os.sep, "/")
        self.lines += [f"![{_escape_alt(caption)}]({target})", "", f"*{caption}*", ""]

    def text(self) -> str:
        while self.lines and not self.lines[-1]:
            self.lines.pop()
        return "\n".join(self.lines) + "\n"


def _table_row(cells: list[str]) -> str:
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def _escape_alt(text: str) -> str:
    return re.sub(r"([\[\]\\*_`])", r"\\\1", text)


def format_value(value: object) -> str:
    """Format a metric value for the report: 4 significant digits for floats, JSON-like otherwise."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if value is None:
        return "null"
    if isinstance(value, list):
        return "[" + ", ".join(format_value(item) for item in value) + "]"
    return str(value)


def code(name: str) -> str:
    return f"`{name}`"


def slugify(title: str) -> str:
    """Anchor of a heading as GitHub makes it: lower case, punctuation removed, spaces to hyphens."""
    slug = re.sub(r"[^\w\- ]", "", title.strip().lower())
    return slug.replace(" ", "-")


def data_uri(path: Path) -> str:
    mime = MIME_TYPES.get(path.suffix.lower())
    if mime is None:
        raise StageError(f"{path}: cannot embed a figure of type '{path.suffix}'; accepted: {', '.join(MIME_TYPES)}")
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


HTML_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 72rem; margin: 2rem auto; padding: 0 1rem; line-height: 1.5; color: #222; }
h1, h2, h3 { line-height: 1.2; }
h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2rem; margin-top: 2.5rem; }
table { border-collapse: collapse; margin: 0.8rem 0; font-size: 0.85rem; display: block; overflow-x: auto; }
th, td { border: 1px solid #ccc; padding: 0.2rem 0.6rem; white-space: nowrap; }
th { background: #f3f3f3; }
code { font-size: 0.9em; background: #f5f5f5; padding: 0 0.2rem; }
img { max-width: 100%; height: auto; display: block; margin: 0.5rem auto; }
""".strip()


def render_html(markdown_text: str, base: Path) -> str:
    """Render the report's markdown to one HTML page: figures become data URIs, headings get anchors."""
    from markdown_it import MarkdownIt

    parser = MarkdownIt("commonmark", {"html": False}).enable("table")
    tokens = parser.parse(markdown_text)
    used: dict[str, int] = {}
    title = "Report"
    for index, token in enumerate(tokens):
        if token.type == "heading_open":
            text = tokens[index + 1].content
            slug = slugify(text)
            count = used.get(slug, 0)
            used[slug] = count + 1
            token.attrSet("id", slug if count == 0 else f"{slug}-{count}")
            if token.tag == "h1":
                title = text
        for child in token.children or []:
            if child.type == "image":
                child.attrSet("src", data_uri(base / str(child.attrGet("src"))))
    body = parser.renderer.render(tokens, parser.options, {})
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{html.escape(title)}</title>\n<style>\n{HTML_STYLE}\n</style>\n</head>\n<body>\n{body}</body>\n</html>\n"
    )
