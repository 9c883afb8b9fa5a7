"""Language identification (Zhao et al. §4.1.1, "language" filtering).

py3langid (a maintained fork of langid.py, Lui & Baldwin 2012) ships its naive-Bayes
model inside the wheel, so nothing is downloaded at run time. The model is loaded once
per process, on first use, and scores only a prefix of each document: the language of a
page is settled long before its end, and the cost grows with the characters scored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from lmlab.config import STRICT, Fraction, PosInt
from lmlab.errors import UsageError

_identifier: Any = None


def _model() -> Any:
    """The py3langid identifier with normalised probabilities, loaded on first call."""
    global _identifier
    if _identifier is None:
        try:
            from py3langid.langid import MODEL_FILE, LanguageIdentifier
        except ImportError:
            raise UsageError(
                "language: the language step needs py3langid (pip install py3langid)"
            ) from None
        _identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    return _identifier


def known_languages() -> list[str]:
    """ISO 639 codes the model can return."""
    return sorted(_model().labels)


def detect(text: str, max_chars: int = 2000) -> tuple[str, float]:
    """(language code, probability of that language) for the first `max_chars` chars."""
    lang, prob = _model().classify(text[:max_chars])
    return lang, float(prob)


_CODE = re.compile(r"[a-z]{2,3}")


@dataclass
class LanguageConfig:
    """Keep documents in `languages` (None: any) whose language probability reaches
    `min_score`, or the language's own entry in `thresholds`. `label_only` records the
    language and score in the metadata and drops nothing."""

    __pydantic_config__ = STRICT

    languages: list[str] | None = field(default_factory=lambda: ["en"])
    min_score: Fraction = 0.65
    thresholds: dict[str, Fraction] = field(default_factory=dict)
    label_only: bool = False
    max_chars: PosInt = 2000

    def __post_init__(self) -> None:
        named = list(self.languages or []) + list(self.thresholds)
        bad = [c for c in named if not _CODE.fullmatch(c)]
        if bad:
            raise UsageError(f"languages: {bad[0]!r} is not an ISO 639 code like 'en' or 'fr'")
        if named:
            known = set(known_languages())
            unknown = [c for c in named if c not in known]
            if unknown:
                raise UsageError(
                    f"languages: the model does not know {unknown[0]!r} "
                    f"(it knows {len(known)} codes: {', '.join(sorted(known)[:12])}, ...)"
                )


def language_filter(text: str, cfg: LanguageConfig) -> tuple[str, float, str | None]:
    """(language, score, reason): reason is `not_<languages>` or `low_score`, else None."""
    lang, score = detect(text, cfg.max_chars)
    if cfg.label_only:
        return lang, score, None
    if cfg.languages is not None and lang not in cfg.languages:
        return lang, score, "not_" + "_".join(cfg.languages)
    if score < cfg.thresholds.get(lang, cfg.min_score):
        return lang, score, "low_score"
    return lang, score, None
