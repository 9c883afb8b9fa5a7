"""Keyword rules (Zhao et al. §4.1.1): blocklists, and HTML-to-text for web pages.

Shipped lists live in `lmlab/data/lists/NAME.txt` (one entry a line, `#` comments): an
offensive-word list, web boilerplate phrases, and HTML remnants that betray a failed
extraction. A user list is any such file given by path. Each list becomes one regex
(built once per process), a trie of its entries, matched against the lowercased text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from html.parser import HTMLParser
from pathlib import Path

from lmlab.config import STRICT, Fraction, PosInt
from lmlab.errors import UsageError

LISTS_DIR = Path(__file__).parent / "lists"


def shipped_lists() -> list[str]:
    return sorted(p.stem for p in LISTS_DIR.glob("*.txt"))


@dataclass
class BlocklistConfig:
    """Drop a document when one list matches it often enough.

    `lists` names shipped lists (`offensive_en`, `boilerplate_en`, `html_remnants`) or
    paths of the user's own files. A list fires when its matches reach `max_matches`
    (or that list's entry in `max_matches_per_list`), or when matches per word reach
    `max_match_ratio`. Furniture phrases and stray tags are tolerated a few times.
    """

    __pydantic_config__ = STRICT

    lists: list[str] = field(
        default_factory=lambda: ["offensive_en", "boilerplate_en", "html_remnants"]
    )
    max_matches: PosInt | None = 1
    max_matches_per_list: dict[str, PosInt] = field(
        default_factory=lambda: {"boilerplate_en": 3, "html_remnants": 3}
    )
    max_match_ratio: Fraction | None = None

    def __post_init__(self) -> None:
        for name in self.lists:
            _list_path(name)
        if self.max_matches is None and self.max_match_ratio is None:
            raise UsageError("max_matches, max_match_ratio: set at least one (both are null)")


def _list_path(name: str) -> Path:
    shipped = LISTS_DIR / f"{name}.txt"
    if shipped.is_file():
        return shipped
    path = Path(name)
    if path.is_file():
        return path
    raise UsageError(
        f"lists: {name!r} is neither a shipped list ({', '.join(shipped_lists())}) "
        "nor an existing file"
    )


def load_list(name: str) -> list[str]:
    """Entries of a shipped list or a file: lowercased, without blanks and # comments."""
    lines = _list_path(name).read_text(encoding="utf-8").splitlines()
    return [ln.strip().lower() for ln in lines if ln.strip() and not ln.startswith("#")]


@lru_cache(maxsize=64)
def list_regex(name: str) -> re.Pattern[str]:
    """One regex for a whole list (cached per process).

    The entries form a trie (`fuck(?:ers?|ing)?`), so the engine follows one branch per
    character instead of trying every entry. A word boundary is required at an entry's
    edge that is a word character, so `shit` does not match inside `shitake`, while
    `&nbsp;` matches anywhere; a space matches any run of whitespace.
    """
    trie: dict = {}
    for entry in load_list(name):
        node = trie
        for ch in " ".join(entry.split()):
            node = node.setdefault(ch, {})
        node[""] = {}
    return re.compile(_emit(trie, "") or r"(?!)")


def _emit(node: dict, came_by: str) -> str:
    """Pattern for the entries below `node`, reached by the character `came_by`."""
    branches = []
    for ch, child in sorted(node.items()):
        if not ch:
            continue
        edge = r"\s+" if ch == " " else re.escape(ch)
        if not came_by and _is_word(ch):
            # "\b" checked after the first character: a pattern whose branches all
            # start with a literal lets the engine skip hopeless positions fast
            edge += r"(?<!\w.)"
        branches.append(edge + _emit(child, ch))
    if "" in node:  # an entry ends here
        branches.append(r"\b" if _is_word(came_by) else "")
    if len(branches) == 1:
        return branches[0]
    if branches[-1] == "":
        return "(?:" + "|".join(branches[:-1]) + ")?"
    return "(?:" + "|".join(branches) + ")"


def _is_word(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


_WORDS = re.compile(r"\w+")


def count_matches(text: str, name: str) -> int:
    return len(list_regex(name).findall(text.lower()))


def blocklist(text: str, cfg: BlocklistConfig) -> str | None:
    """Name of the first list in `cfg.lists` that fires on `text`, or None."""
    low = text.lower()
    n_words = None
    for name in cfg.lists:
        matches = len(list_regex(name).findall(low))
        if not matches:
            continue
        limit = cfg.max_matches_per_list.get(name, cfg.max_matches)
        if limit is not None and matches >= limit:
            return _reason(name)
        if cfg.max_match_ratio is not None:
            if n_words is None:
                n_words = max(len(_WORDS.findall(low)), 1)
            if matches / n_words >= cfg.max_match_ratio:
                return _reason(name)
    return None


def _reason(name: str) -> str:
    """A shipped list's name, or a user file's stem, as a snake_case rule name."""
    return re.sub(r"\W+", "_", Path(name).stem).strip("_").lower() or "blocklist"


# --- HTML to text -------------------------------------------------------------------

# fmt: off
_SKIP_TAGS = [
    "script", "style", "noscript", "template", "svg", "iframe", "head", "nav", "header",
    "footer", "aside", "form", "button", "select",
]
_BLOCK_TAGS = frozenset({
    "address", "article", "blockquote", "body", "br", "dd", "div", "dl", "dt", "figcaption",
    "figure", "h1", "h2", "h3", "h4", "h5", "h6", "hr", "html", "li", "main", "ol", "p", "pre",
    "section", "table", "tbody", "thead", "tfoot", "tr", "td", "th", "ul",
})
_VOID_TAGS = frozenset({
    "area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
    "track", "wbr",
})
# fmt: on
_SPACES = re.compile(r"\s+")
_MANY_BREAKS = re.compile(r"\n{3,}")


@dataclass
class HtmlConfig:
    """HTML-to-text extraction: which elements' content is page furniture, not text."""

    __pydantic_config__ = STRICT

    skip_tags: list[str] = field(default_factory=lambda: list(_SKIP_TAGS))
    min_text_chars: PosInt = 1  # fewer characters of text left: the page goes ("no_text")


class _TextExtractor(HTMLParser):
    """Collects visible text: skipped elements dropped, each block element on its own
    line, whitespace collapsed except inside <pre>. Entities are decoded by the parser."""

    def __init__(self, skip: frozenset[str]) -> None:
        super().__init__(convert_charrefs=True)
        self.skip = skip
        self.parts: list[str] = []
        self.skipping: list[str] = []  # open skipped elements
        self.pre = 0
        self.line_start = True

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "body" and "head" in self.skipping:  # </head> is optional
            del self.skipping[self.skipping.index("head") :]
        if tag in self.skip and tag not in _VOID_TAGS:
            self.skipping.append(tag)
        elif not self.skipping:
            if tag == "pre":
                self.pre += 1
            if tag in _BLOCK_TAGS:
                self._break()

    def handle_startendtag(self, tag: str, attrs: list) -> None:
        if not self.skipping and tag in _BLOCK_TAGS:
            self._break()

    def handle_endtag(self, tag: str) -> None:
        if self.skipping:
            if tag in self.skipping:  # close it and anything left open inside it
                del self.skipping[len(self.skipping) - 1 - self.skipping[::-1].index(tag) :]
            return
        if tag == "pre" and self.pre:
            self.pre -= 1
        if tag in _BLOCK_TAGS:
            self._break()

    def handle_data(self, data: str) -> None:
        if self.skipping or not data:
            return
        if not self.pre:
            data = _SPACES.sub(" ", data)
            if self.line_start:
                data = data.lstrip(" ")
        if data:
            self.parts.append(data)
            self.line_start = data.endswith("\n")

    def _break(self) -> None:
        """End the current line (once: nested blocks do not stack blank lines)."""
        if self.line_start:
            return
        if not self.pre:
            self.parts[-1] = self.parts[-1].rstrip(" ")
        self.parts.append("\n")
        self.line_start = True

    def text(self) -> str:
        return _MANY_BREAKS.sub("\n\n", "".join(self.parts)).strip()


def html_to_text(html: str, cfg: HtmlConfig) -> tuple[str, str | None]:
    """(visible text of an HTML page, None), or (html, "no_text") when nothing is left."""
    parser = _TextExtractor(frozenset(t.lower() for t in cfg.skip_tags))
    parser.feed(html)
    parser.close()
    text = parser.text()
    if len(text) < cfg.min_text_chars:
        return html, "no_text"
    return text, None


_HTML_START = re.compile(r"\s*(?:<!doctype html|<html|<head|<body|<\?xml)", re.IGNORECASE)
_ANY_TAG = re.compile(r"<(?:[a-zA-Z][a-zA-Z0-9]*[\s/>]|/[a-zA-Z][a-zA-Z0-9]*\s*>|!--)")


def looks_like_html(text: str) -> bool:
    """A page, not text that mentions tags: it opens with a doctype/<html>, or with a tag
    and has closing tags early on. Source code never starts with '<'."""
    head = text[:4096].lstrip("\ufeff \t\r\n")
    if _HTML_START.match(head):
        return True
    return head.startswith("<") and bool(_ANY_TAG.match(head)) and "</" in head
