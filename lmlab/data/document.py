"""The one record every data step passes along."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Document:
    """A document: stable `id`, `text`, and free-form `metadata` (source, path, module...)."""

    id: str
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "text": self.text, "metadata": self.metadata}

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> Document:
        return cls(id=str(row["id"]), text=row["text"], metadata=dict(row.get("metadata") or {}))
