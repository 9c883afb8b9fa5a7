"""JSON lines, plain or compressed: one document per record."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from lmlab.data.document import Document
from lmlab.data.sources.base import SURROGATE_ESCAPE, ReadStats, SourceConfig, Task
from lmlab.data.sources.common import MISSING, decoded, is_binary, open_file, utf8_clean


def read_jsonl(
    task: Task, cfg: SourceConfig, stats: ReadStats, at: list[Any]
) -> Iterator[Document]:
    """One document per line; the row's `metadata` object and its other fields become
    metadata (the row's own values win over `source`/`path`/`line`, keeping provenance)."""
    path = task.source_path
    tf, idf = cfg.text_field, cfg.id_field
    loads = json.loads
    with open_file(path) as fh:
        if is_binary(fh, path, stats):
            return
        for lineno, line in decoded(fh, path, cfg, stats, at):
            try:
                row = loads(line)
            except (ValueError, RecursionError) as e:
                if line.strip():  # a blank line is no record
                    msg = getattr(e, "msg", type(e).__name__)
                    stats.skip(
                        "malformed_json", path, f"{path}:{lineno}", f"malformed JSON ({msg})"
                    )
                continue
            where = f"{path}:{lineno}"
            if type(row) is not dict:
                detail = f"a JSON {type(row).__name__} where an object was expected"
                stats.skip("malformed_json", path, where, detail)
                continue
            if "\\u" in line and SURROGATE_ESCAPE.search(line) and not utf8_clean(row):
                stats.skip("invalid_utf8", path, where, "a lone surrogate escape (\\ud8xx)")
                continue
            text = row.pop(tf, MISSING)
            if type(text) is not str:
                if text is MISSING:
                    detail = f"no field {tf!r} (fields: {', '.join(map(str, row))})"
                    stats.skip("missing_text_field", path, where, detail)
                else:
                    detail = f"field {tf!r} is a {type(text).__name__}, not a string"
                    stats.skip("non_string_text", path, where, detail)
                continue
            rid = row.pop(idf, None)
            rmeta = row.pop("metadata", None)
            meta: dict[str, Any] = {"source": "jsonl", "path": path, "line": lineno}
            if row:
                meta.update(row)
            if type(rmeta) is dict:
                meta.update(rmeta)
            elif rmeta is not None:
                meta["metadata"] = rmeta
            doc_id = where if rid is None or rid == "" else str(rid)
            yield Document(id=doc_id, text=text, metadata=meta)
