"""Small synthetic corpora for the data-pipeline tests: English-like web pages that pass
the published quality rules, plus planted duplicates, PII, HTML and junk."""

from __future__ import annotations

import json
import random
from pathlib import Path

NOUNS = [
    "river",
    "city",
    "garden",
    "teacher",
    "engine",
    "market",
    "village",
    "doctor",
    "window",
    "forest",
    "library",
    "mountain",
    "harbor",
    "farmer",
    "bridge",
    "student",
    "museum",
    "island",
    "kitchen",
    "painter",
    "orchard",
    "station",
    "lawyer",
    "valley",
    "council",
    "theatre",
    "bakery",
    "tunnel",
    "factory",
    "meadow",
    "captain",
]
VERBS = [
    "visited",
    "described",
    "repaired",
    "painted",
    "opened",
    "crossed",
    "studied",
    "improved",
    "measured",
    "protected",
    "watched",
    "explained",
    "covered",
    "followed",
    "planted",
    "finished",
]
ADJS = [
    "old",
    "quiet",
    "busy",
    "narrow",
    "bright",
    "famous",
    "small",
    "distant",
    "gentle",
    "careful",
    "wooden",
    "green",
]


# No template has more than three fixed words in a row, so pages do not trip the Gopher
# duplicated n-gram rules the way real boilerplate does.
TEMPLATES = [
    "The {a1} {n1} {v} the {a2} {n2} near the {n3}.",
    "Yesterday a {n1} {v} every {a1} {n2}, and {a2} {n3} stayed.",
    "Why would the {n1} be {a1} when {n2} {v} our {n3}?",
    "Many {n1} say {n2} was {a1} before {n3} {v} it.",
    "In the {a2} {n3}, our {n1} {v} a {a1} {n2}.",
    "She said {n1} {v} {n2} twice, so {a1} {n3} laughed.",
]


def sentence(rng: random.Random) -> str:
    n1, n2, n3 = rng.sample(NOUNS, 3)
    a1, a2 = rng.sample(ADJS, 2)
    return rng.choice(TEMPLATES).format(n1=n1, n2=n2, n3=n3, a1=a1, a2=a2, v=rng.choice(VERBS))


def page(rng: random.Random, paragraphs: int = 3, sentences: int = 4) -> str:
    """An English-like page that passes the Gopher, C4 and FineWeb rules."""
    return "\n\n".join(
        "\n".join(sentence(rng) for _ in range(sentences)) for _ in range(paragraphs)
    )


def near_copy(text: str, rng: random.Random, edit: float = 0.03) -> str:
    words = text.split(" ")
    for i in rng.sample(range(len(words)), max(1, int(edit * len(words)))):
        words[i] = rng.choice(NOUNS)
    return " ".join(words)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def web_corpus(root: Path, n: int = 40, seed: int = 0) -> dict:
    """Two JSONL files of pages with planted problems; returns what was planted."""
    rng = random.Random(seed)
    pages = [page(rng) for _ in range(n)]
    rows = [
        {"id": f"web-{i}", "text": t, "metadata": {"url": f"u{i}"}} for i, t in enumerate(pages)
    ]
    planted = {
        "exact": "copy-exact",
        "near": "copy-near",
        "pii": "pii-1",
        "html": "html-1",
        "french": "fr-1",
        "junk": "junk-1",
    }
    extra = [
        {"id": "copy-exact", "text": pages[0]},
        {"id": "copy-near", "text": near_copy(pages[1], rng)},
        {
            "id": "pii-1",
            "text": page(rng)
            + "\nWrite to jane.doe@example.com or call +1 415-555-0134 for the full story.",
        },
        {
            "id": "html-1",
            "text": "<html><head><script>var x = 1;</script></head><body>"
            + "".join(f"<p>{sentence(rng)}</p>" for _ in range(14))
            + "</body></html>",
        },
        {
            "id": "fr-1",
            "text": (
                "Le petit village se trouve au bord de la rivière et les habitants y vivent "
                "depuis des siècles. Chaque matin, les enfants marchent jusqu'à l'école en "
                "traversant le vieux pont de pierre. "
            )
            * 4,
        },
        {"id": "junk-1", "text": "Click here to buy the best garden products today.\n" * 40},
    ]
    a = write_jsonl(root / "part-a.jsonl", rows[: n // 2] + extra[:3])
    b = write_jsonl(root / "part-b.jsonl", rows[n // 2 :] + extra[3:])
    return {"files": [a, b], "planted": planted, "pages": pages}
