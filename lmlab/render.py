"""Markdown + self-contained HTML pages from sections (run report, data card).

A section is a heading and a body: a paragraph (str), a table (list of rows, the first
one the header) or a plot (`Path` to a PNG, embedded in the HTML as base64 so the page
is one file that can be mailed or attached to a paper).
"""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path

from lmlab.utils import write_text

Section = tuple[str, "str | list[list[str]] | Path"]

_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222}table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;
padding:4px 8px;text-align:left;vertical-align:top}th{background:#f3f3f3}img{max-width:100%}
td{white-space:pre-wrap}"""


def md_table(rows: list[list[str]]) -> str:
    def cell(x: str) -> str:
        return str(x).replace("|", "\\|").replace("\n", "<br>")  # a line break in a cell

    head, *body = rows
    lines = ["| " + " | ".join(map(cell, head)) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(map(cell, r)) + " |" for r in body]
    return "\n".join(lines)


def html_table(rows: list[list[str]]) -> str:
    head, *body = rows
    th = "".join(f"<th>{html.escape(str(h))}</th>" for h in head)
    trs = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in body
    )
    return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


def write_pages(out_dir: Path, stem: str, title: str, sections: list[Section]) -> list[Path]:
    """Write `<stem>.md` and `<stem>.html` in `out_dir`; image paths in the .md are relative."""
    md = [f"# {title}", ""]
    body = [f"<h1>{html.escape(title)}</h1>"]
    for heading, content in sections:
        md += [f"## {heading}", ""]
        body.append(f"<h2>{html.escape(heading)}</h2>")
        if isinstance(content, Path):
            rel = os.path.relpath(content, out_dir)
            md += [f"![{heading}]({rel})", ""]
            b64 = base64.b64encode(content.read_bytes()).decode()
            body.append(f'<img alt="{html.escape(heading)}" src="data:image/png;base64,{b64}">')
        elif isinstance(content, str):
            md += [content, ""]
            body.append(f"<p>{html.escape(content)}</p>")
        else:
            md += [md_table(content), ""]
            body.append(html_table(content))
    md_path, html_path = out_dir / f"{stem}.md", out_dir / f"{stem}.html"
    write_text(md_path, "\n".join(md))
    write_text(
        html_path,
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body>" + "\n".join(body) + "</body></html>\n",
    )
    return [md_path, html_path]
