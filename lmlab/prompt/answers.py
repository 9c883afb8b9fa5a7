"""Reading an answer out of a generation: lm-evaluation-harness's extraction filters, the
"answer is" phrase that chain-of-thought output ends with, numbers in canonical form, and
answers of a known shape (`read_answer`)."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from lmlab.errors import UsageError

INVALID = "[invalid]"
"""What an extraction filter returns when nothing matches (lm-evaluation-harness's fallback)."""


# --- lm-evaluation-harness filters ---------------------------------------------------------


def extract_regex(
    text: str, pattern: str | re.Pattern, group_select: int = 0, fallback: str = INVALID
) -> str:
    """lm-eval's `regex` filter: `findall` matches of `pattern`, pick one by index
    (0 = first, -1 = last); with several groups the first non-empty one is kept; stripped.
    Returns `fallback` when nothing matches or the index is out of range."""
    try:
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
    except re.error as e:
        raise UsageError(f"extract_regex: invalid regex {pattern!r}: {e}") from None
    matches = regex.findall(text)
    if not matches or not -len(matches) <= group_select < len(matches):
        return fallback
    match = matches[group_select]
    if isinstance(match, tuple):
        match = next((m for m in match if m), fallback)
    return match.strip()


_ANSWER_PHRASE = re.compile(r"\banswer\s*(?:is|:)\s*:?\s*(.+?)(?:\.(?=\s|$)|\n|$)", re.IGNORECASE)


def extract_answer_is(text: str, fallback: str = INVALID) -> str:
    """The X in "... the answer is X." (also "Answer: X"); the last such phrase wins, as
    chain-of-thought output may restate intermediate answers. X ends at a sentence-ending
    period, a newline or the end of text; surrounding quotes/asterisks/$ are dropped."""
    matches = _ANSWER_PHRASE.findall(text)
    if not matches:
        return fallback
    answer = matches[-1].strip().strip("*\"'`$ ").strip()
    return answer or fallback


# A number: optional minus (not a hyphen inside a word), digits with optional thousands
# commas, optional decimals. "$1,234.50" -> 1234.5; "x-5" -> 5; "3-4" -> 3.
_NUMBER = re.compile(
    r"(?:(?<![\w.])[-\u2212])?(?<![\d.])(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?"
)


def canonical_number(s: str) -> str:
    """A number's canonical text, so that "1,000", "1000.00" and "1000" compare equal:
    no commas, no trailing zeros, "-0" is "0". Non-numbers come back stripped, unchanged."""
    text = s.strip().replace(",", "").replace("\u2212", "-").lstrip("$")
    try:
        d = Decimal(text)
    except InvalidOperation:
        return s.strip()
    if not d.is_finite():
        return s.strip()
    if d == d.to_integral_value():
        return str(int(d))
    return format(d.normalize(), "f")


def extract_number(text: str, which: str = "first", fallback: str = INVALID) -> str:
    """The first (or "last") number in the text, canonicalised by `canonical_number`.
    Handles thousands commas, negatives and decimals; GSM8K-style chain-of-thought is
    usually scored with "last"."""
    if which not in ("first", "last"):
        raise UsageError(f"extract_number: which must be 'first' or 'last', not {which!r}")
    matches = _NUMBER.findall(text)
    if not matches:
        return fallback
    return canonical_number(matches[0] if which == "first" else matches[-1])


def strip_lower(text: str) -> str:
    """lm-eval's `remove_whitespace` + `lowercase` filters in one."""
    return text.strip().lower()


# --- answers of a known shape ----------------------------------------------------------------

FORMS = ("integer", "yes_no", "word", "comma_list", "word_list")
_ANSWER_IS = re.compile(r"answer is\s*:?", re.IGNORECASE)
_INTEGER = re.compile(r"-?\d(?:[\d,]*\d)?")
_YESNO = re.compile(r"\b(yes|no)\b", re.IGNORECASE)
_WORD = re.compile(r"[a-z]+")


def _integers(text: str) -> list[str]:
    return [str(int(m.replace(",", ""))) for m in _INTEGER.findall(text)]


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _join_words(form: str, words: list[str]) -> str | None:
    if not words:
        return None
    if form == "word":
        return "".join(words)
    return (", " if form == "comma_list" else " ").join(words)


def read_answer(text: str, form: str) -> str | None:
    """The answer in `text` in the canonical text of its `form`, or None.

    Forms: "integer" ("1,234" -> "1234"), "yes_no" (lower case), "word" (one token of
    lower-case letters), "comma_list" and "word_list" (lower-case words joined by ", " or
    " "). The text after the first "answer is" (to the end of its line, or of its sentence
    for a word) is read first; failing that, the last integer, the last yes/no, the last
    word, or the words of the last line that has any."""
    if form not in FORMS:
        raise UsageError(f"answer form {form!r}; allowed: {', '.join(FORMS)}")
    m = _ANSWER_IS.search(text)
    if m:
        tail = text[m.end() :].split("\n")[0].strip()
        if form == "integer":
            nums = _integers(tail)
            if nums:
                return nums[0]
        elif form == "yes_no":
            yn = _YESNO.search(tail)
            if yn:
                return yn.group(1).lower()
        else:  # one token stops at the end of its sentence, a list at the end of its line
            tail = re.split(r"[.!?](?:\s|$)", tail)[0] if form == "word" else tail.rstrip(".!? ")
            ans = _join_words(form, _words(tail))
            if ans is not None:
                return ans
    if form == "integer":
        nums = _integers(text)
        return nums[-1] if nums else None
    if form == "yes_no":
        yn = _YESNO.findall(text)
        return yn[-1].lower() if yn else None
    words = _words(text)
    if form == "word":
        return words[-1] if words else None
    lines = [ln for ln in text.split("\n") if _words(ln)]
    return _join_words(form, _words(lines[-1])) if lines else None
