"""Prompt templates: how a question is framed, as plain `{question}` slots or as Jinja.

Plain templates hold one `{question}` slot, filled by replacement rather than
`str.format`, so braces elsewhere in a template or a question are kept as written. Jinja
templates are lm-evaluation-harness's `doc_to_text` / `doc_to_target` form: a missing field
is an error, never an empty string, and a trailing newline is kept.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from lmlab.errors import UsageError

DEFAULT_TEMPLATE = "Q: {question}\nA:"
CHAT_TEMPLATE = "{question}"  # the chat template already marks whose turn it is

QUESTION_TEMPLATES = (  # the same question, phrased k ways: Kaddour et al.'s brittle prompts
    DEFAULT_TEMPLATE,
    "Question: {question}\nAnswer:",
    "{question}\nThe answer:",
    "Solve this.\n{question}\n",
)


def default_template(chat: bool) -> str:
    """The bare question in a chat (the turn markers frame it), else "Q: ...\\nA:"."""
    return CHAT_TEMPLATE if chat else DEFAULT_TEMPLATE


def check_template(template: str) -> None:
    if "{question}" not in template:
        raise UsageError(f"prompt: a template must contain {{question}} (got {template!r})")


def fill(template: str, question: str) -> str:
    """`template` with its `{question}` slot replaced by `question`."""
    return template.replace("{question}", question)


@cache
def _jinja():
    from jinja2 import BaseLoader, Environment, StrictUndefined

    return Environment(loader=BaseLoader(), undefined=StrictUndefined, keep_trailing_newline=True)


def render_jinja(template: str, fields: dict[str, Any]) -> str:
    """A Jinja template rendered with `fields` (a document's columns); an undefined name
    raises instead of rendering empty."""
    return _jinja().from_string(template).render(**fields)
