"""Is an evaluation item in the training data? (Kaddour et al. §2.1, Zhao et al. §7.)

The data stage's n-gram index (`lmlab.data.contamination`, GPT-3's 13-gram overlap) is
built over the evaluation items actually scored, then every training document is scanned
against it. Each item is then clean or contaminated, and a metric is reported twice: on
all items and on the clean subset. A gap between the two is the contamination's effect
on the score; no gap means the score does not rest on memorised items.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from lmlab.console import progress
from lmlab.data.contamination import ContaminationConfig, build_index, find
from lmlab.errors import UsageError
from lmlab.eval.metrics import mean_stderr


def iter_documents(paths: Iterable[str | Path]) -> Iterable[tuple[str, str]]:
    """(id, text) of every document in JSONL files in lmlab's document format."""
    for path in paths:
        p = Path(path)
        if not p.is_file():
            raise UsageError(f"contamination: training documents {p} do not exist")
        with p.open(encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    raise UsageError(f"{p}:{lineno}: malformed JSON") from None
                yield str(row.get("id", f"{p.name}:{lineno}")), str(row.get("text", ""))


def contaminated_items(
    items: Sequence[tuple[str, str]],
    train_paths: Iterable[str | Path],
    ngram: int = 13,
    min_overlaps: int = 1,
) -> dict[str, list[str]]:
    """{item id: training document ids sharing >= min_overlaps n-grams with it}, for the
    items that have any. `items` are (id, text) pairs: the prompt with its answer."""
    if not items:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "items.jsonl"
        path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in items))
        index = build_index([path], ContaminationConfig(ngram=ngram, fields=["text"]))
    found: dict[str, set[str]] = {}
    with progress("contamination scan", None, unit="docs") as bar:
        for doc_id, text in iter_documents(train_paths):
            for m in find(text, index):
                if m.ngram_count >= min_overlaps:
                    found.setdefault(m.item_id, set()).add(doc_id)
            bar.update(1)
    return {k: sorted(v) for k, v in sorted(found.items())}


def split_by_contamination(
    records: Sequence[dict], ids: Sequence[str], contaminated: dict[str, list[str]], metric: str
) -> dict:
    """A metric on all items, the clean ones and the contaminated ones, each with its
    standard error and count."""
    out = {}
    groups = {
        "all": list(range(len(records))),
        "clean": [i for i, k in enumerate(ids) if k not in contaminated],
        "contaminated": [i for i, k in enumerate(ids) if k in contaminated],
    }
    for name, idx in groups.items():
        value, stderr = mean_stderr([float(records[i][metric]) for i in idx])
        out[name] = {"value": value, "stderr": stderr, "n": len(idx)}
    return out
