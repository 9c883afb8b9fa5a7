"""A GGUF file's tokenizer (`tokenizer.ggml.*` metadata) rebuilt as a `tokenizers.Tokenizer`,
with the special tokens, chat template and stop ids it declares.

It lives in the model layer because the loader registry asks the GGUF form for it
(`lmlab.model.formats.gguf`); `lmlab.tokenizer.load_tokenizer` gets it from there.

- **gpt2** (byte-level BPE): the vocabulary and merges as stored, and the split regex
  that `tokenizer.ggml.pre` names, as llama.cpp maps the name (`PRE_TOKENIZERS`): a
  vocabulary's merges were learned on text split that way, so another split gives other
  tokens. A name not in the table is refused rather than guessed.
- **llama** (SentencePiece): BPE whose merges rank pairs by the score of the token they
  make (llama.cpp's SentencePiece tokenizer merges the highest-scoring pair first), `▁`
  for spaces with one prepended (`tokenizer.ggml.add_space_prefix`), and byte fallback
  (`<0x0A>`) for characters the vocabulary lacks.
- Control tokens (type 3) are special tokens and user-defined ones (type 4) plain added
  tokens: both match whole in text, as llama.cpp matches them. BOS/EOS are added to
  every encoding when the file says so (`tokenizer.ggml.add_bos_token`; a SentencePiece
  file that does not say adds BOS, as llama.cpp does).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from lmlab.errors import CheckpointError, UsageError

CONTROL, USER_DEFINED = 3, 4  # gguf.TokenType values

# Each split regex as llama.cpp's llama-vocab.cpp has it for the names it gives it.
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _byte_level(split: str | None = None, digits: bool = False) -> pre_tokenizers.PreTokenizer:
    """Split (GPT-2's regex when `split` is None), then map bytes to GPT-2's alphabet."""
    steps: list[pre_tokenizers.PreTokenizer] = []
    if digits:  # every digit its own piece first (StarCoder, SmolLM)
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    if split is None:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    else:
        steps.append(pre_tokenizers.Split(Regex(split), behavior="isolated"))
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    return steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)


# tokenizer.ggml.pre -> the pre-tokenizer llama.cpp uses for that name
PRE_TOKENIZERS = {
    "gpt-2": lambda: _byte_level(),
    "gpt2": lambda: _byte_level(),
    "smollm": lambda: _byte_level(digits=True),
    "starcoder": lambda: _byte_level(digits=True),
    "refact": lambda: _byte_level(digits=True),
    "codeshell": lambda: _byte_level(digits=True),
    "llama-bpe": lambda: _byte_level(LLAMA3_SPLIT),
    "llama3": lambda: _byte_level(LLAMA3_SPLIT),
    "llama-v3": lambda: _byte_level(LLAMA3_SPLIT),
    "qwen2": lambda: _byte_level(QWEN2_SPLIT),
    "deepseek-r1-qwen": lambda: _byte_level(QWEN2_SPLIT),
}


def _split_shape(spec: Any) -> Any:
    """A `tokenizer.json` pre-tokenizer reduced to what decides how text is split."""
    if not isinstance(spec, dict):
        return spec
    kind = spec.get("type")
    if kind == "Sequence":
        steps = tuple(_split_shape(s) for s in spec.get("pretokenizers") or [])
        return steps[0] if len(steps) == 1 else steps
    if kind == "ByteLevel":
        return kind, bool(spec.get("add_prefix_space", True)), bool(spec.get("use_regex", True))
    if kind == "Digits":
        return kind, bool(spec.get("individual_digits", False))
    if kind == "Split":
        pattern = spec.get("pattern") or {}
        return (
            kind,
            pattern.get("Regex", pattern.get("String")),
            spec.get("behavior"),
            bool(spec.get("invert", False)),
        )
    return kind, json.dumps(spec, sort_keys=True)


def pre_tokenizer_name(spec: Any, prefer: str | None = None) -> str | None:
    """The `tokenizer.ggml.pre` name whose split `spec` (a `tokenizer.json` pre_tokenizer)
    is, or None: `prefer` (the name a converted file had) when it fits, else the first
    name in `PRE_TOKENIZERS` that does (names with one split are aliases to llama.cpp)."""
    shape = _split_shape(spec)
    names = [prefer] if prefer in PRE_TOKENIZERS else []
    for name in [*names, *PRE_TOKENIZERS]:
        probe = Tokenizer(models.BPE())
        probe.pre_tokenizer = PRE_TOKENIZERS[name]()
        if _split_shape(json.loads(probe.to_str())["pre_tokenizer"]) == shape:
            return name
    return None


def value(reader: Any, key: str, default: Any = None) -> Any:
    """A metadata value as Python (str, int, float, bool, or a list), or `default`."""
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def read_gguf_tokenizer(reader: Any, path: str | Path) -> tuple[Tokenizer, dict, dict]:
    """(tokenizer, tokenizer_config, generation_config) of a parsed GGUF file: the last two
    as the dicts a Hugging Face directory's JSON files hold."""
    kind = value(reader, "tokenizer.ggml.model")
    tokens = value(reader, "tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        missing = "tokenizer.ggml.model" if kind is None else "tokenizer.ggml.tokens"
        raise CheckpointError(f"{path}: key {missing!r} is missing (the file has no tokenizer)")
    types = value(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise CheckpointError(
            f"{path}: key 'tokenizer.ggml.token_type' has {len(types)} entries for "
            f"{len(tokens)} tokens"
        )
    ids = {}
    for role, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        ids[role] = _token_id(reader, f"tokenizer.ggml.{key}_token_id", len(tokens), path)
    ends = [
        _token_id(reader, f"tokenizer.ggml.{k}_token_id", len(tokens), path) for k in ("eot", "eom")
    ]
    if kind == "gpt2":
        tok = _gpt2(reader, tokens, path)
        add_bos = bool(value(reader, "tokenizer.ggml.add_bos_token", False))
    elif kind == "llama":
        unk = tokens[ids["unk"]] if ids["unk"] is not None else None
        tok = _sentencepiece(reader, tokens, unk, path)
        add_bos = bool(value(reader, "tokenizer.ggml.add_bos_token", True))
    else:
        raise UsageError(
            f"{path}: tokenizer.ggml.model = {kind!r} is not supported (lmlab rebuilds gpt2 "
            "and llama)"
        )
    _add_special(tok, tokens, types, kind == "gpt2")
    add_eos = bool(value(reader, "tokenizer.ggml.add_eos_token", False))
    names = {role: tokens[i] for role, i in ids.items() if i is not None}
    _add_post_processor(tok, names, ids, add_bos, add_eos)

    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
    config.update({f"{role}_token": names.get(role) for role in ("bos", "eos", "unk", "pad")})
    config.update(add_bos_token=add_bos, add_eos_token=add_eos, clean_up_tokenization_spaces=False)
    template = value(reader, "tokenizer.chat_template")
    if isinstance(template, str):
        config["chat_template"] = template
    stops = [i for i in (ids["eos"], *ends) if i is not None]
    stops = list(dict.fromkeys(stops))
    generation: dict[str, Any] = {}
    if ids["bos"] is not None:
        generation["bos_token_id"] = ids["bos"]
    if stops:
        generation["eos_token_id"] = stops[0] if len(stops) == 1 else stops
    if ids["pad"] is not None:
        generation["pad_token_id"] = ids["pad"]
    return tok, config, generation


def _token_id(reader: Any, key: str, n: int, path: str | Path) -> int | None:
    i = value(reader, key)
    if i is not None and not 0 <= i < n:
        raise CheckpointError(f"{path}: key {key!r} = {i} is not a token id (0..{n - 1})")
    return i


def _gpt2(reader: Any, tokens: list[str], path: str | Path) -> Tokenizer:
    pre = value(reader, "tokenizer.ggml.pre")
    if pre not in PRE_TOKENIZERS:
        said = "is missing" if pre is None else f"= {pre!r} is not a pre-tokenizer lmlab knows"
        raise UsageError(
            f"{path}: key 'tokenizer.ggml.pre' {said} (known: {', '.join(PRE_TOKENIZERS)})"
        )
    merges = value(reader, "tokenizer.ggml.merges")
    if merges is None:
        raise CheckpointError(f"{path}: key 'tokenizer.ggml.merges' is missing (gpt2 needs it)")
    tok = Tokenizer(models.BPE(vocab=_vocab(tokens), merges=[_pair(m) for m in merges]))
    tok.pre_tokenizer = PRE_TOKENIZERS[pre]()
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece(reader: Any, tokens: list[str], unk: str | None, path: str | Path) -> Tokenizer:
    vocab = _vocab(tokens)
    merges = value(reader, "tokenizer.ggml.merges")
    if merges is not None:
        pairs = [_pair(m) for m in merges]
    else:
        scores = value(reader, "tokenizer.ggml.scores")
        if scores is None or len(scores) != len(tokens):
            raise CheckpointError(
                f"{path}: key 'tokenizer.ggml.scores' is missing or does not match the tokens"
            )
        pairs = merges_from_scores(tokens, scores)
    bpe = models.BPE(vocab=vocab, merges=pairs, unk_token=unk, fuse_unk=True, byte_fallback=True)
    tok = Tokenizer(bpe)
    prefix = bool(value(reader, "tokenizer.ggml.add_space_prefix", True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if prefix else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(steps)
    return tok


def merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """SentencePiece's merge order as BPE merges: every split of a token into two tokens,
    ranked by the token's score (highest first; ties: longer left piece, then longer right
    piece, then token order), which is the pair llama.cpp's tokenizer would merge first."""
    ids = {t: i for i, t in enumerate(tokens)}
    found = []
    for token, score in zip(tokens, scores, strict=True):
        pairs = [
            (token[:k], token[k:])
            for k in range(1, len(token))
            if token[:k] in ids and token[k:] in ids
        ]
        pairs.sort(key=lambda p: (ids[p[0]], ids[p[1]]))
        found.extend((-score, -len(a), -len(b), a, b) for a, b in pairs)
    found.sort(key=lambda f: f[:3])  # stable: equal keys keep token order
    return [(a, b) for *_, a, b in found]


def _vocab(tokens: list[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)  # a repeated string keeps its first id
    return vocab


def _pair(merge: str) -> tuple[str, str]:
    a, _, b = merge.partition(" ")
    return a, b


def _add_special(tok: Tokenizer, tokens: list[str], types: list[int], byte_level: bool) -> None:
    """Control tokens as special tokens, user-defined ones as added tokens. In a byte-level
    vocabulary a control token spelled outside GPT-2's byte alphabet is a mislabel of
    llama.cpp's converter and is skipped, as transformers skips it."""
    alphabet = set(pre_tokenizers.ByteLevel.alphabet()) if byte_level else None
    control = [
        AddedToken(t, special=True, normalized=False)
        for t, ty in zip(tokens, types, strict=True)
        if ty == CONTROL and (alphabet is None or set(t) <= alphabet)
    ]
    user = [
        AddedToken(t, special=False, normalized=False)
        for t, ty in zip(tokens, types, strict=True)
        if ty == USER_DEFINED
    ]
    tok.add_special_tokens(control)
    tok.add_tokens(user)


def _add_post_processor(
    tok: Tokenizer, names: dict[str, str], ids: dict[str, int | None], bos: bool, eos: bool
) -> None:
    bos = bos and ids["bos"] is not None
    eos = eos and ids["eos"] is not None
    if not (bos or eos):
        return
    head = [names["bos"]] if bos else []
    tail = [names["eos"]] if eos else []
    single = [*head, "$A", *tail]
    pair = [*single, *head, "$B", *tail]
    special = [(names[r], ids[r]) for r, on in (("bos", bos), ("eos", eos)) if on]
    tok.post_processor = processors.TemplateProcessing(
        single=" ".join(single), pair=" ".join(pair), special_tokens=list(dict.fromkeys(special))
    )
