"""The data card: what came in, what was removed and why, and what is left.

Written as `card.md` and a self-contained `card.html` beside the data, from
`stats.json` and a few examples per removal reason read back from `removed/` (with PII
masked, so a card can be shared even when the data cannot).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from lmlab.data.pii import mask
from lmlab.render import Section, write_pages

EXAMPLES_PER_REASON = 3
EXAMPLE_CHARS = 240


def _examples(removed: Path, per_reason: int) -> dict[str, list[tuple[str, str]]]:
    """The first few removed documents of each reason (streams the first 200k lines)."""
    out: dict[str, list[tuple[str, str]]] = {}
    if not removed.exists():
        return out
    with open(removed, encoding="utf-8") as f:
        for n, line in enumerate(f):
            if n > 200_000:
                break
            d = json.loads(line)
            reason = d.get("metadata", {}).get("reason", "?")
            got = out.setdefault(reason, [])
            if len(got) < per_reason:
                # masked whole, then cut: PII cut in half at the edge would not be recognised
                text = " ".join(mask(d["text"]).split())[:EXAMPLE_CHARS]
                got.append((d["id"], text))
    return out


def _plots(stats: dict, out: Path) -> list[Section]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    out.mkdir(parents=True, exist_ok=True)
    sections: list[Section] = []
    h = stats["histograms"]
    bins = {k: np.asarray(v) for k, v in h["bins"].items()}
    if sum(h["length:in"]):
        fig, ax = plt.subplots(figsize=(7, 3.2))
        ax.stairs(h["length:in"], bins["length"], label="read", fill=True, alpha=0.4)
        ax.stairs(h["length:out"], bins["length"], label="kept", linewidth=2)
        ax.set_xscale("log")
        nz = np.flatnonzero(np.asarray(h["length:in"]) + np.asarray(h["length:out"]))
        ax.set_xlim(
            bins["length"][max(nz[0] - 1, 0)],
            bins["length"][min(nz[-1] + 2, len(bins["length"]) - 1)],
        )
        ax.set_xlabel("document length (characters)")
        ax.set_ylabel("documents")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "lengths.png", dpi=110)
        plt.close(fig)
        sections.append(("Document lengths", out / "lengths.png"))
    steps = [s for s in stats["steps"] if sum(s["dropped"].values())]
    if steps:
        fig, ax = plt.subplots(figsize=(7, 0.45 * len(steps) + 1))
        names = [s["name"] for s in steps][::-1]
        ax.barh(names, [sum(s["dropped"].values()) for s in steps][::-1], color="#c44")
        ax.set_xlabel("documents removed")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        fig.tight_layout()
        fig.savefig(out / "removed.png", dpi=110)
        plt.close(fig)
        sections.append(("Removed per step", out / "removed.png"))
    for key, label, log in (
        ("perplexity", "Perplexity under the reference model (kept documents)", True),
        ("language_score", "Language-ID confidence (kept documents)", False),
    ):
        if sum(h.get(key) or []):
            fig, ax = plt.subplots(figsize=(7, 3))
            ax.stairs(h[key], bins[key], fill=True, color="#48a")
            if log:
                ax.set_xscale("log")
            ax.set_xlabel(label.lower())
            ax.set_ylabel("documents")
            fig.tight_layout()
            fig.savefig(out / f"{key}.png", dpi=110)
            plt.close(fig)
            sections.append((label, out / f"{key}.png"))
    langs = Counter(stats.get("languages") or {})
    if langs:
        top = langs.most_common(12)
        fig, ax = plt.subplots(figsize=(7, 0.35 * len(top) + 1))
        ax.barh([k for k, _ in top][::-1], [v for _, v in top][::-1], color="#6a4")
        ax.set_xlabel("documents (before the language filter)")
        fig.tight_layout()
        fig.savefig(out / "languages.png", dpi=110)
        plt.close(fig)
        sections.append(("Language mix", out / "languages.png"))
    return sections


def _chars(n: int) -> str:
    return f"{n / 1e6:,.1f} M characters" if n >= 1e6 else f"{n:,} characters"


def card_sections(stats: dict, out_dir: Path) -> list[Section]:
    read = stats["read"]
    kept = stats["kept"]
    n_kept = kept["train"]["documents"] + kept["val"]["documents"]
    chars_kept = kept["train"]["chars"] + kept["val"]["chars"]
    summary = (
        f"{read['documents']:,} documents ({_chars(read['chars'])}) read from "
        f"{len(stats['sources'])} source(s); {n_kept:,} kept ({_chars(chars_kept)}: "
        f"{kept['train']['documents']:,} train, {kept['val']['documents']:,} "
        f"validation); {stats['removed']:,} removed. Skipped input records: "
        f"{sum(read.get('skipped', {}).values()):,}."
    )
    sections: list[Section] = [("Summary", summary)]
    rows = [["source", "tasks", "read", "sampled out", "kept train", "kept val"]]
    for name, s in stats["sources"].items():
        rows.append(
            [
                name,
                str(s.get("tasks", 0)),
                f"{s.get('read', 0):,}",
                f"{s.get('sampled_out', 0):,}",
                f"{s.get('train_documents', 0):,}",
                f"{s.get('val_documents', 0):,}",
            ]
        )
    sections.append(("Sources", rows))
    if stats.get("tokens"):
        rows = [["split", "source", "documents", "tokens", "epochs", "tokens in split"]]
        for split, sp in stats["tokens"].items():
            for name, s in sp["sources"].items():
                rows.append(
                    [
                        split,
                        name,
                        f"{s['documents']:,}",
                        f"{s['tokens']:,}",
                        str(s["epochs"]),
                        f"{s['tokens_in_split']:,}",
                    ]
                )
        sections.append(("Tokens per source (in schedule order)", rows))
    skipped = read.get("skipped", {})
    if skipped:
        rows = [["problem", "records", "first places"]]
        for reason, n in skipped.items():
            where = ", ".join(read.get("examples", {}).get(reason, [])[:3])
            rows.append([reason, f"{n:,}", where])
        sections.append(("Unreadable input (skipped, with a warning)", rows))
    rows = [["step", "docs in", "docs out", "removed", "modified", "chars in → out", "seconds"]]
    for s in stats["steps"]:
        rows.append(
            [
                s["name"],
                f"{s['docs_in']:,}",
                f"{s['docs_out']:,}",
                f"{sum(s['dropped'].values()):,}",
                f"{s['modified']:,}",
                f"{s['chars_in']:,} → {s['chars_out']:,}",
                f"{s['seconds']:.2f}",
            ]
        )
    sections.append(("Steps", rows))
    examples = _examples(out_dir / "removed" / "removed.jsonl", EXAMPLES_PER_REASON)
    rows = [["reason", "documents", "examples (PII masked)"]]
    for s in stats["steps"]:
        for rule, n in s["dropped"].items():
            reason = f"{s['name']}:{rule}"
            ex = "\n".join(f"[{i}] {t}" for i, t in examples.get(reason, []))
            rows.append([reason, f"{n:,}", ex])
    if len(rows) > 1:
        sections.append(("Why documents were removed", rows))
    mh = stats.get("minhash")
    if mh:
        sizes = mh.get("size_histogram", {})
        rows = [["cluster size", "clusters"]] + [[str(k), f"{v:,}"] for k, v in sizes.items()]
        sections.append(
            (
                f"Near-duplicate clusters (MinHash, Jaccard threshold ≈ {mh['threshold']:.2f})",
                rows,
            )
        )
    if stats.get("pii"):
        rows = [["type", "replaced"]] + [[k, f"{v:,}"] for k, v in stats["pii"].items()]
        sections.append(("Personal information replaced", rows))
    findings = stats.get("contamination")
    if findings is not None and any(s["name"] == "decontaminate" for s in stats["steps"]):
        if findings:
            by_item: dict[str, list[dict]] = {}
            for f in findings:
                by_item.setdefault(f["item"], []).append(f)
            rows = [["evaluation item", "eval file", "training documents", "snippet"]]
            for item, fs in sorted(by_item.items()):
                docs = sorted({f["doc"] for f in fs})
                shown = ", ".join(docs[:5]) + (f" (+{len(docs) - 5})" if len(docs) > 5 else "")
                rows.append([item, fs[0]["eval_file"], shown, mask(fs[0]["snippet"])])
            sections.append(("Contamination: evaluation items found in the training data", rows))
        else:
            sections.append(("Contamination", "No evaluation item overlaps the training data."))
    return sections


def write_card(out_dir: str | Path, stats: dict) -> list[Path]:
    """Render `card.md` and `card.html` (plots under `card/`)."""
    out = Path(out_dir)
    sections = card_sections(stats, out)
    plots = _plots(stats, out / "card")
    title = f"Data card: {out.resolve().parent.name}/{out.name}"
    return write_pages(out, "card", title, sections[:1] + plots + sections[1:])
