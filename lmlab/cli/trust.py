"""`lmlab detect-watermark`: is this text watermarked (KGW), and how surely."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from lmlab.cli.app import app
from lmlab.errors import UsageError


def vocab_size_of(model: str, tok) -> int:
    """The model's vocabulary size (the green lists are permutations of it), read from its
    `config.json` without loading weights; a form without one (a GGUF file) has exactly
    its tokenizer's vocabulary."""
    from lmlab.model.checkpoint import read_config
    from lmlab.model.loading import find_format

    _, where = find_format(model)
    if where.is_dir() and (where / "config.json").is_file():
        cfg = read_config(where)
        for part in (cfg, cfg.get("model") or {}, cfg.get("text_config") or {}):
            if isinstance(part.get("vocab_size"), int):
                return part["vocab_size"]
    return tok.get_vocab_size(with_added_tokens=True)


@app.command("detect-watermark")
def detect_watermark(
    text: Annotated[str | None, typer.Argument(help="The text (or give --file).")] = None,
    model: Annotated[
        str, typer.Option(help="The generating model (its tokenizer and vocabulary size).")
    ] = "",
    file: Annotated[Path | None, typer.Option(help="Read the text from this file.")] = None,
    gamma: Annotated[float, typer.Option(help="Green list fraction used to generate.")] = 0.25,
    key: Annotated[int, typer.Option(help="The hashing key used to generate.")] = 15485863,
    scheme: Annotated[str, typer.Option(help="lefthash or selfhash.")] = "lefthash",
    threshold: Annotated[float, typer.Option(help="Watermarked when z exceeds this.")] = 4.0,
    count_repeats: Annotated[
        bool, typer.Option(help="Score repeated n-grams every time (transformers' default).")
    ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
) -> None:
    """Test TEXT for the KGW watermark: the z-score of its green tokens and the p-value."""
    from lmlab import load_tokenizer
    from lmlab.infer.options import WatermarkConfig
    from lmlab.trust.watermark import detect_text

    if not model:
        raise UsageError("detect-watermark: give --model (the model that generated the text)")
    if (text is None) == (file is None):
        raise UsageError("detect-watermark: give TEXT or --file, not both")
    if file is not None:
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"--file {file}: cannot read ({e})") from None
    cfg = WatermarkConfig(gamma=gamma, hashing_key=key, seeding_scheme=scheme).validate()
    tok = load_tokenizer(model)
    found = detect_text(text, tok, vocab_size_of(model, tok), cfg, not count_repeats, threshold)
    if json_out:
        print(json.dumps(found))
        return
    verdict = "watermarked" if found["prediction"] else "no watermark found"
    print(
        f"{verdict}: z = {found['z']:.2f}, p = {found['p_value']:.3g} "
        f"({found['green']} of {found['scored']} scored tokens green, gamma {gamma})"
    )
