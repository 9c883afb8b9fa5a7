"""`lmlab memorization`: plant canaries in pre-training documents, then measure what a
trained model gives back (exposure, extraction by prefix prompting, PII in samples)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from lmlab.cli.app import app
from lmlab.errors import UsageError

mem_app = typer.Typer(
    help="Memorisation and privacy probes: canaries, exposure, extraction, PII.",
    no_args_is_help=True,
)
app.add_typer(mem_app, name="memorization")

JsonOut = Annotated[bool, typer.Option("--json", help="One JSON object.")]
Model = Annotated[str, typer.Option(help="Run directory, checkpoint or store name.")]


def _rows(path: Path, flag: str) -> list[dict]:
    """A JSONL file's objects; a bad line is a usage error naming it."""
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as e:
                    raise UsageError(f"{flag} {path}:{n}: malformed JSON ({e})") from None
                if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                    raise UsageError(f"{flag} {path}:{n}: needs an object with a string 'text'")
                rows.append(row)
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{flag} {path}: cannot read ({e})") from None
    return rows


def _load(model: str):
    from lmlab import load_model, load_tokenizer
    from lmlab.model.loading import resolve_checkpoint

    if not model:
        raise UsageError("memorization: give --model")
    ckpt = resolve_checkpoint(model)
    return load_model(ckpt), load_tokenizer(ckpt)


def _repeats(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        out = []
    if not out or any(r < 0 for r in out):
        raise UsageError(f"--repeats {text}: a comma-separated list of counts >= 0, e.g. 0,1,10")
    return out


@mem_app.command("canaries")
def canaries(
    docs: Annotated[Path, typer.Option(help="Documents (JSONL with 'text').")],
    out: Annotated[Path, typer.Option(help="Where to write the documents with canaries.")],
    repeats: Annotated[
        str, typer.Option(help="Insertions per canary, one count per canary.")
    ] = "0,1,5,20,100",
    format: Annotated[str, typer.Option(help="The canary sentence; '{}' is the secret.")] = (
        "my secret code is {}"
    ),
    digits: Annotated[int, typer.Option(help="Digits of each secret (|R| = 10^digits).")] = 4,
    seed: Annotated[int, typer.Option(help="Seed of the secrets and positions.")] = 0,
    canaries_out: Annotated[
        Path | None,
        typer.Option("--canaries", help="The canary list (default: canaries.json beside --out)."),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace this command's earlier output.")] = False,
) -> None:
    """Insert canaries into DOCS, each copy a line of its own in a seeded document; write
    the documents and a canaries.json (secrets and repeats) for `exposure`."""
    from lmlab.trust.memorization import insert_canaries, make_canaries
    from lmlab.utils import claim_output_file, json_with, read_json, write_json, write_jsonl

    counts = _repeats(repeats)
    meta_path = canaries_out or out.parent / "canaries.json"

    def is_own(p: Path) -> bool:  # a JSONL written next to our canaries.json
        try:
            return read_json(meta_path).get("documents") == p.name
        except (OSError, ValueError, AttributeError):
            return False

    out_abs = claim_output_file(out, "canary documents", is_own, overwrite, "--out")
    meta_abs = claim_output_file(
        meta_path, "canary list", json_with("canaries", "documents"), overwrite, "--canaries"
    )
    if out_abs == Path(docs).resolve():
        raise UsageError(f"--out {out}: is the input --docs; write to a new file")
    rows = _rows(docs, "--docs")
    cs = make_canaries(format, len(counts), digits, seed)
    texts = insert_canaries([r["text"] for r in rows], cs, counts, seed)
    write_jsonl(out_abs, ({**r, "text": t} for r, t in zip(rows, texts, strict=True)))
    write_json(
        meta_abs,
        {
            "documents": out_abs.name,
            "format": format,
            "digits": digits,
            "seed": seed,
            "canaries": [c.to_dict() for c in cs],
        },
    )
    print(
        f"wrote {len(rows)} documents with {sum(counts)} canary lines to {out}; list in {meta_path}"
    )


@mem_app.command("exposure")
def exposure_cmd(
    model: Model = "",
    canaries: Annotated[Path | None, typer.Option(help="canaries.json from `canaries`.")] = None,
    exact_limit: Annotated[
        int, typer.Option(help="Rank exactly up to this many candidate secrets.")
    ] = 10_000,
    samples: Annotated[int, typer.Option(help="Candidates sampled above the limit.")] = 5000,
    json_out: JsonOut = False,
) -> None:
    """Exposure of each canary: log2 |R| - log2 rank of its secret among all candidates."""
    from lmlab.trust.memorization import Canary, exposure

    if canaries is None:
        raise UsageError("memorization exposure: give --canaries (canaries.json)")
    try:
        meta = json.loads(canaries.read_text(encoding="utf-8"))
        cs = [
            Canary(c["format"], str(c["secret"]), int(c.get("repeats", 0)))
            for c in meta["canaries"]
        ]
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--canaries {canaries}: cannot read ({e})") from None
    except (ValueError, KeyError, TypeError) as e:
        raise UsageError(
            f"--canaries {canaries}: not a canary list ({type(e).__name__}: {e}); "
            "expected {'canaries': [{'format', 'secret', 'repeats'}]}"
        ) from None
    for c in cs:
        if not c.secret.isdigit() or "{}" not in c.format:
            raise UsageError(f"--canaries {canaries}: bad canary {c.format!r} / {c.secret!r}")
    if exact_limit < 1 or samples < 2:
        raise UsageError("--exact-limit must be >= 1 and --samples >= 2")
    m, tok = _load(model)
    rows = [exposure(m, tok, c, exact_limit, samples) for c in cs]
    if json_out:
        print(json.dumps({"canaries": rows}))
        return
    for r in rows:
        rank = r["rank"] if r["rank"] is not None else f"~{r['sampled_rank']:.0f}"
        print(
            f"repeats {r['repeats']:>5}  secret {r['secret']}  rank {rank} of "
            f"{r['candidates']}  exposure {r['exposure']:.2f} ({r['method']})"
        )


@mem_app.command("extract")
def extract_cmd(
    model: Model = "",
    data: Annotated[Path | None, typer.Option(help="Training documents (JSONL 'text').")] = None,
    prefix: Annotated[int, typer.Option(help="Prompt with this many tokens.")] = 32,
    suffix: Annotated[int, typer.Option(help="Tokens that must come back exactly.")] = 32,
    limit: Annotated[int, typer.Option(help="Test at most this many documents (0 = all).")] = 0,
    json_out: JsonOut = False,
) -> None:
    """Prefix-prompting extraction: which documents' next SUFFIX tokens the model gives
    back greedily from their first PREFIX tokens."""
    from lmlab.trust.memorization import extract_texts

    if data is None:
        raise UsageError("memorization extract: give --data (documents JSONL)")
    if limit < 0:
        raise UsageError(f"--limit {limit}: must be >= 0 (0 = all)")
    rows = _rows(data, "--data")
    if limit:
        rows = rows[:limit]
    m, tok = _load(model)
    found = extract_texts(m, tok, [r["text"] for r in rows], prefix, suffix)
    if json_out:
        print(json.dumps(found))
        return
    print(
        f"extracted {len(found['extracted'])} of {found['tested']} documents "
        f"({found['rate']:.1%}; {found['too_short']} shorter than {prefix + suffix} tokens)"
    )
    for i, t in zip(found["extracted"][:10], found["texts"], strict=False):
        print(f"  [{i}] {t[:120]!r}")


@mem_app.command("pii")
def pii_cmd(
    model: Model = "",
    prompts: Annotated[
        Path | None, typer.Option(help="Prompts, one per line (default: unconditional).")
    ] = None,
    samples: Annotated[int, typer.Option(help="Samples per prompt.")] = 16,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per sample.")] = 64,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    json_out: JsonOut = False,
) -> None:
    """Sample the model and count the PII lmlab's detector finds in what it writes."""
    from lmlab.trust.memorization import pii_report, sample_texts

    if samples < 1 or max_new_tokens < 1 or temperature <= 0:
        raise UsageError("--samples and --max-new-tokens must be >= 1, --temperature > 0")
    texts = [""]
    if prompts is not None:
        try:
            texts = [ln for ln in prompts.read_text(encoding="utf-8").splitlines() if ln.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"--prompts {prompts}: cannot read ({e})") from None
        if not texts:
            raise UsageError(f"--prompts {prompts}: no prompts (one per line)")
    m, tok = _load(model)
    rep = pii_report(sample_texts(m, tok, texts, samples, max_new_tokens, temperature, seed))
    if json_out:
        print(json.dumps(rep))
        return
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(rep["counts"].items())) or "none"
    print(f"{rep['with_pii']} of {rep['texts']} samples hold PII: {kinds}")
    for ex in rep["examples"]:
        print(f"  [{ex['index']}] {ex['redacted'][:120]!r}")
