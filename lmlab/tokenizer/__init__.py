"""Tokenizers (Zhao et al. §4.1.2): saving, loading, special tokens, the chat template.

Training (byte-level BPE, WordPiece, Unigram) is in `lmlab.tokenizer.train`; byte-level
means every string is encodable (no unknown token) and decoding is exact, whatever the
kind. The special tokens frame documents and chat turns; the chat template is the one
place that decides how a conversation becomes tokens, shared by SFT, evaluation and `chat`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from weakref import WeakKeyDictionary

from tokenizers import Tokenizer

from lmlab.errors import CheckpointError
from lmlab.utils import atomic_path, write_json

EOS = "<|endoftext|>"
PAD = "<|pad|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
END = "<|end|>"
SPECIAL_TOKENS = [EOS, PAD, USER, ASSISTANT, END]

# Jinja form of `format_chat`, saved in tokenizer_config.json for tools that read it.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}<|end|>"
    "{% else %}<|assistant|>{{ m['content'] }}<|end|>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def save_tokenizer(tok: Tokenizer, out_dir: str | Path) -> None:
    """Write `tokenizer.json` plus a `tokenizer_config.json` naming the special tokens."""
    out = Path(out_dir)
    with atomic_path(out / "tokenizer.json") as tmp:
        tok.save(str(tmp))
    write_json(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": EOS,
            "pad_token": PAD,
            "bos_token": None,
            "chat_template": CHAT_TEMPLATE,
            "add_bos_token": False,
            "clean_up_tokenization_spaces": False,
        },
    )


def find_tokenizer_file(path: str | Path) -> Path:
    """`tokenizer.json` in a checkpoint, tokenizer or run directory (SFT model first)."""
    p = Path(path)
    candidates = (
        [p]
        if p.is_file()
        else [
            p / "tokenizer.json",
            p / "sft" / "model" / "tokenizer.json",
            p / "pretrain" / "model" / "tokenizer.json",
            p / "tokenizer" / "tokenizer.json",
        ]
    )
    for c in candidates:
        if c.is_file():
            return c
    raise CheckpointError(
        f"{p}: no tokenizer.json found (looked in {', '.join(map(str, candidates))})"
    )


# What `load_tokenizer` read beside each tokenizer it returned (tokenizer_config.json and
# generation_config.json, or what a GGUF file's metadata says instead), keyed by the
# tokenizer object: `lmlab.tokenizer.chat` finds the model's chat template and stop ids
# there wherever the tokenizer travels without its path.
_CONFIGS: WeakKeyDictionary[Tokenizer, tuple[dict, dict]] = WeakKeyDictionary()


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of a model form that carries its own (a GGUF file; the loader registry
    is asked first), else the `tokenizer.json` of a checkpoint, tokenizer or run directory.
    The config files read with it stay attached (`tokenizer_configs`). A store name
    stands for its model (`lmlab.model.store`)."""
    p = Path(path)
    if not (p / "tokenizer.json").is_file() and p.name != "tokenizer.json":
        # imported here: the data stages, which load tokenizer directories, stay torch-free
        from lmlab.model.loading import load_form_tokenizer
        from lmlab.model.store import resolve_model

        p = resolve_model(p)
        files = load_form_tokenizer(p)
        if files is not None:
            _CONFIGS[files.tokenizer] = (files.config, files.generation)
            return files.tokenizer
    f = find_tokenizer_file(p)
    try:
        tok = Tokenizer.from_file(str(f))
    except Exception as e:  # the Rust error text names what is wrong
        raise CheckpointError(f"{f}: not a valid tokenizer.json ({e})") from None
    _CONFIGS[tok] = _read_configs(f.parent)
    return tok


def tokenizer_configs(tok: Tokenizer) -> tuple[dict, dict]:
    """(tokenizer_config, generation_config) that `load_tokenizer` read with `tok`; empty
    dicts for a tokenizer made in memory."""
    return _CONFIGS.get(tok, ({}, {}))


def _read_configs(folder: Path) -> tuple[dict, dict]:
    found = []
    for name in ("tokenizer_config.json", "generation_config.json"):
        f = folder / name
        try:
            conf = json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{f}: invalid JSON ({e})") from None
        found.append(conf if isinstance(conf, dict) else {})
    config, generation = found
    jinja = folder / "chat_template.jinja"  # where transformers now saves the template
    if "chat_template" not in config and jinja.is_file():
        config["chat_template"] = jinja.read_text(encoding="utf-8")
    return config, generation


def save_model_tokenizer(tok: Tokenizer, out_dir: str | Path) -> None:
    """Write a model's own tokenizer as `load_tokenizer` read it: `tokenizer.json` with the
    `tokenizer_config.json` (special tokens, chat template) and `generation_config.json`
    (stop ids) that came with it, so it keeps its conventions wherever it is copied."""
    out = Path(out_dir)
    config, generation = tokenizer_configs(tok)
    with atomic_path(out / "tokenizer.json") as tmp:
        tok.save(str(tmp))
    write_json(out / "tokenizer_config.json", config)
    if generation:
        write_json(out / "generation_config.json", generation)


def _config_id(tok: Tokenizer, role: str) -> int | None:
    """The id of the `{role}_token` a tokenizer's config names (`eos`: the first of
    generation_config's `eos_token_id` first), or None."""
    config, generation = tokenizer_configs(tok)
    if role == "eos":
        eos = generation.get("eos_token_id")
        eos = eos[0] if isinstance(eos, list) and eos else eos
        if isinstance(eos, int):
            return eos
    token = config.get(f"{role}_token")
    token = token.get("content") if isinstance(token, dict) else token
    return tok.token_to_id(token) if isinstance(token, str) else None


def end_of_text_id(tok: Tokenizer) -> int:
    """The id that ends each document in the token shards: `<|endoftext|>` where the
    vocabulary has it (lmlab's, GPT-2's, SmolLM's), else the model's own EOS."""
    i = tok.token_to_id(EOS)
    if i is None:
        i = _config_id(tok, "eos")
    if i is None:
        raise CheckpointError(f"tokenizer has no {EOS} and its config names no eos_token")
    return i


def pad_id(tok: Tokenizer) -> int:
    """The id that pads a batch (its targets are masked, so any id is correct): `<|pad|>`,
    else the model's pad token, else its end of text."""
    i = tok.token_to_id(PAD)
    if i is None:
        i = _config_id(tok, "pad")
    return end_of_text_id(tok) if i is None else i


def special_id(tok: Tokenizer, token: str) -> int:
    i = tok.token_to_id(token)
    if i is None:
        raise CheckpointError(f"tokenizer has no special token {token}")
    return i


def format_chat(messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """Render a conversation exactly as CHAT_TEMPLATE does (tested to agree)."""
    parts = []
    for m in messages:
        tag = USER if m["role"] == "user" else ASSISTANT
        parts.append(f"{tag}{m['content']}{END}")
    if add_generation_prompt:
        parts.append(ASSISTANT)
    return "".join(parts)


def iter_texts(jsonl: str | Path) -> Iterator[str]:
    with open(jsonl, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)["text"]
