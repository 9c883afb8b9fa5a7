"""Each model's own chat conventions: the template its conversations are rendered with and
the tokens that end its replies.

- **lmlab's models** keep lmlab's template (`format_chat`, whose Jinja form their
  `tokenizer_config.json` carries) and stop at `<|endoftext|>` and, in a chat, `<|end|>`:
  exactly as before, byte for byte.
- **Any other model** (a Hugging Face directory, a GGUF file, an lmlab checkpoint
  converted from one) brings its own: the Jinja `chat_template` of its tokenizer config,
  rendered as transformers' `apply_chat_template` renders it (a sandboxed Jinja
  environment with the same options, filters and globals, the special tokens as
  variables); it stops at the end-of-sequence ids of its `generation_config.json` (or
  GGUF metadata) and its tokenizer config's `eos_token`, and in a chat also at the
  end-of-turn tokens llama.cpp knows (`END_OF_TURN`) where its vocabulary has them.

The template and ids are found from the tokenizer object alone: `load_tokenizer` keeps
the config files it read with each tokenizer (`tokenizer_configs`), so evaluation,
prompting and the chat loop, which receive a tokenizer without its path, render with the
model's own template. A tokenizer built in memory with lmlab's special tokens is lmlab's.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from lmlab.errors import UsageError
from lmlab.tokenizer import (
    ASSISTANT,
    CHAT_TEMPLATE,
    END,
    EOS,
    USER,
    format_chat,
    load_tokenizer,
    special_id,
    tokenizer_configs,
)

# Tokens that end a turn in the chat formats llama.cpp recognises (its end-of-generation
# list); a chat reply stops at any that the vocabulary has, besides the model's EOS.
END_OF_TURN = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
)
SPECIAL_VARIABLES = ("bos_token", "eos_token", "unk_token", "pad_token")


def chat_template_of(source: Tokenizer | str | Path) -> str | None:
    """The chat template of a tokenizer (or of the model at a path): its config's
    `chat_template`, lmlab's for a tokenizer with lmlab's chat tokens, else None."""
    tok = source if isinstance(source, Tokenizer) else load_tokenizer(source)
    config, _ = tokenizer_configs(tok)
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: transformers uses "default"
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if isinstance(template, str):
        return template
    if all(tok.token_to_id(t) is not None for t in (USER, ASSISTANT, END)):
        return CHAT_TEMPLATE
    return None


def apply_chat_template(
    tok: Tokenizer, messages: list[dict[str, Any]], add_generation_prompt: bool = True
) -> str:
    """A conversation as text in the tokenizer's model's own chat template."""
    template = chat_template_of(tok)
    if template is None:
        raise UsageError(
            "this model has no chat template (its tokenizer config has no chat_template); "
            "use a plain prompt"
        )
    config, _ = tokenizer_configs(tok)
    variables = {k: _content(config.get(k)) for k in SPECIAL_VARIABLES if config.get(k)}
    return render_chat(template, messages, add_generation_prompt, **variables)


def encode_chat(
    tok: Tokenizer, messages: list[dict[str, Any]], add_generation_prompt: bool = True
) -> list[int]:
    """The token ids of a rendered conversation. The template writes any BOS itself, so the
    tokenizer adds none (as transformers' `apply_chat_template(tokenize=True)`)."""
    text = apply_chat_template(tok, messages, add_generation_prompt)
    return tok.encode(text, add_special_tokens=False).ids


def encode_exchange(
    tok: Tokenizer, messages: list[dict[str, Any]], reply: str
) -> tuple[list[int], list[int]]:
    """(prompt ids, reply ids) of a conversation and the assistant's reply to it, in the
    model's own template: the prompt ends with the assistant's header, the reply runs
    through the template's end of the turn. Instruction tuning learns the reply alone.
    lmlab's models: `format_chat(messages)`, then the reply and `<|end|>`, as always."""
    if chat_template_of(tok) == CHAT_TEMPLATE:
        return tok.encode(format_chat(messages)).ids, tok.encode(reply).ids + [special_id(tok, END)]
    prompt = apply_chat_template(tok, messages, add_generation_prompt=True)
    turn = {"role": "assistant", "content": reply}
    full = apply_chat_template(tok, [*messages, turn], add_generation_prompt=False)
    if not full.startswith(prompt):
        raise UsageError(
            "chat template: the conversation with the reply does not begin with the prompt "
            "rendered for generation, so the prompt cannot be told from the reply"
        )
    ids = tok.encode(prompt, add_special_tokens=False).ids
    return ids, tok.encode(full[len(prompt) :], add_special_tokens=False).ids


def render_chat(
    template: str,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool = True,
    **variables: Any,
) -> str:
    """Render `messages` with a Jinja chat template; lmlab's own is `format_chat`."""
    if template == CHAT_TEMPLATE:
        return format_chat(messages, add_generation_prompt)
    try:
        return _compile(template).render(
            messages=messages,
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **variables,
        )
    except jinja2.TemplateError as e:
        raise UsageError(f"chat template: {e}") from None


def stop_ids_of(tok: Tokenizer, chat: bool = False) -> list[int]:
    """The ids that end a generation: the model's EOS ids, and in a chat also its
    end-of-turn tokens (lmlab's models: `<|endoftext|>`, then `<|end|>`)."""
    if chat_template_of(tok) == CHAT_TEMPLATE:
        return [special_id(tok, EOS)] + ([special_id(tok, END)] if chat else [])
    config, generation = tokenizer_configs(tok)
    eos = generation.get("eos_token_id")
    ids = list(eos) if isinstance(eos, list) else [eos]
    ids.append(tok.token_to_id(_content(config.get("eos_token")) or ""))
    if chat:
        ids.extend(tok.token_to_id(t) for t in END_OF_TURN)
    ids = [i for i in dict.fromkeys(ids) if isinstance(i, int)]
    if not ids and tok.token_to_id(EOS) is not None:  # no config: GPT-2's and lmlab's EOS
        ids = [special_id(tok, EOS)]
    return ids


def _content(token: Any) -> str | None:
    """A special token as a string (configs may hold an AddedToken's dict)."""
    return token.get("content") if isinstance(token, dict) else token


# --- the Jinja environment, as transformers' apply_chat_template sets it up ---------------


class _Generation(Extension):
    """transformers' `{% generation %}...{% endgeneration %}` marks the assistant's part
    of a training example; rendering a prompt, it is its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(x: Any, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # transformers' filter: Jinja's own escapes HTML characters
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    """A chat template from a model file is untrusted code: the sandbox refuses unsafe
    attribute access and mutation of the values it is given."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, "jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateError as e:
        raise UsageError(f"chat template: {e}") from None
