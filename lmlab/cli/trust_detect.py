"""`lmlab detect-generated`: how likely a model finds a text (mean log-likelihood, log-rank,
DetectGPT-style curvature), and with labelled texts how well each score separates human
from machine text (AUROC)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from lmlab.cli.app import app
from lmlab.errors import UsageError


def read_texts(path: Path, labelled: bool = False) -> tuple[list[str], list[int]]:
    """Texts (and labels) from a file: JSONL with a "text" field per line (and "label", 1
    machine or 0 human, when `labelled`), or a .txt file that is one text."""
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: cannot read ({e})") from None
    if path.suffix == ".txt" and not labelled:
        return [raw], []
    if path.suffix != ".jsonl":
        allowed = ".jsonl" if labelled else ".jsonl or .txt"
        raise UsageError(f"{path}: expected a {allowed} file")
    texts, labels = [], []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}:{n}: not JSON ({e.msg})") from None
        text = row.get("text") if isinstance(row, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise UsageError(f'{path}:{n}: needs a non-empty string field "text"')
        texts.append(text)
        if labelled:
            label = row.get("label")
            if label not in (0, 1) or isinstance(label, float):
                raise UsageError(f'{path}:{n}: "label" must be 1 (machine) or 0 (human)')
            labels.append(int(label))
    if not texts:
        raise UsageError(f"{path}: no texts")
    return texts, labels


@app.command("detect-generated")
def detect_generated(
    text: Annotated[str | None, typer.Argument(help="The text (or --file / --labelled).")] = None,
    model: Annotated[str, typer.Option(help="The scoring model (any lmlab-loadable form).")] = "",
    file: Annotated[
        Path | None, typer.Option(help="Texts: JSONL with a text field, or one .txt text.")
    ] = None,
    labelled: Annotated[
        Path | None,
        typer.Option(help="JSONL with text and label (1 machine, 0 human): report AUROC."),
    ] = None,
    method: Annotated[
        list[str] | None,
        typer.Option(help="loglik, logrank or curvature (repeatable; default all three)."),
    ] = None,
    perturbations: Annotated[
        int, typer.Option(help="Perturbed copies per text for curvature.")
    ] = 10,
    tokens: Annotated[int, typer.Option(help="Score each text's first N tokens.")] = 200,
    seed: Annotated[int, typer.Option(help="Seed of the perturbations.")] = 0,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    json_out: Annotated[bool, typer.Option("--json", help="JSON output.")] = False,
) -> None:
    """Score texts for being machine-generated (higher: more likely machine), without a
    watermark; with --labelled, the AUROC of each method."""
    from lmlab import load_model, load_tokenizer
    from lmlab.trust.detect import METHODS, check_methods, evaluate, score_texts

    methods = check_methods(method or METHODS)
    if not model:
        raise UsageError("detect-generated: give --model (the model that scores the texts)")
    if sum(x is not None for x in (text, file, labelled)) != 1:
        raise UsageError("detect-generated: give exactly one of TEXT, --file, --labelled")
    if tokens < 1:
        raise UsageError("detect-generated: --tokens must be at least 1")
    if "curvature" in methods and perturbations < 1:
        raise UsageError("detect-generated: curvature needs --perturbations of at least 1")
    labels: list[int] = []
    if text is not None:
        if not text.strip():
            raise UsageError("detect-generated: empty text")
        texts = [text]
    else:
        texts, labels = read_texts(file or labelled, labelled is not None)
    opts = {"max_tokens": tokens, "perturbations": perturbations, "seed": seed}
    tok = load_tokenizer(model)
    lm = load_model(model, device=device)
    if labelled is not None:
        found = evaluate(lm, tok, texts, labels, methods, **opts)
        if json_out:
            print(json.dumps(found))
            return
        print(f"{found['n']} texts: {found['machine']} machine, {found['human']} human")
        for m, a in found["auroc"].items():
            print(f"AUROC {m:<10} {a:.4f}")
        return
    scores = score_texts(lm, tok, texts, methods, **opts)
    for t, s in zip(texts, scores, strict=True):
        row = {"tokens": s.tokens, **{m: getattr(s, m) for m in methods}}
        if json_out:
            print(json.dumps(row))
        else:
            cols = "  ".join(f"{m} {row[m]:.4f}" for m in methods)
            print(f"{cols}  tokens {s.tokens}  {t[:40]!r}")
