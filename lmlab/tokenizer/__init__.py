"""Byte-level BPE tokenizer (Zhao et al. §4.1.2), trained with the `tokenizers` library.

Byte-level means every string is encodable (no unknown token) and decoding is exact.
The special tokens frame documents and chat turns; the chat template is the one place
that decides how a conversation becomes tokens, shared by SFT, evaluation and `chat`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

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


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE on an iterator of texts (streamed, never held whole)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


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


def load_tokenizer(path: str | Path) -> Tokenizer:
    f = find_tokenizer_file(path)
    try:
        return Tokenizer.from_file(str(f))
    except Exception as e:  # the Rust error text names what is wrong
        raise CheckpointError(f"{f}: not a valid tokenizer.json ({e})") from None


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
