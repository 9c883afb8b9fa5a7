"""The step registry: names a config file can use, each with its config and its function.

A *local* step looks at one document at a time and returns it (maybe changed) or a rule
name saying why it is dropped; the pipeline records `<step>:<rule>` as the reason. A
*global* step (de-duplication, the perplexity percentile) needs the whole corpus, so the
pipeline computes compact signatures per task, decides in one global pass, and applies
the decision per task (see `pipeline.py`). Steps are parsed from a list in which each
item is a step name or a one-key mapping `{name: {option: value}}`.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from lmlab.config import STRICT, Fraction, PosInt
from lmlab.data import contamination, dedup, filters, keywords, langid, perplexity, pii
from lmlab.data.document import Document
from lmlab.errors import UsageError

Apply = Callable[[Document, "StepStats"], "Document | str"]


@dataclass
class StepStats:
    """Per-step counters; summed across tasks, so everything in it must be additive."""

    name: str
    docs_in: int = 0
    docs_out: int = 0
    chars_in: int = 0
    chars_out: int = 0
    seconds: float = 0.0
    modified: int = 0
    dropped: Counter = field(default_factory=Counter)
    extra: Counter = field(default_factory=Counter)  # per-step labels: languages, PII types...
    findings: list = field(default_factory=list)  # capped list of notable matches (contamination)

    def merge(self, other: StepStats) -> None:
        for f in ("docs_in", "docs_out", "chars_in", "chars_out", "seconds", "modified"):
            setattr(self, f, getattr(self, f) + getattr(other, f))
        self.dropped.update(other.dropped)
        self.extra.update(other.extra)
        self.findings.extend(other.findings)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["seconds"] = round(self.seconds, 3)
        d["dropped"] = dict(self.dropped.most_common())
        d["extra"] = dict(self.extra.most_common())
        return d

    @classmethod
    def from_dict(cls, d: dict) -> StepStats:
        d = dict(d)
        d["dropped"] = Counter(d.get("dropped", {}))
        d["extra"] = Counter(d.get("extra", {}))
        return cls(**d)


# --- configs of steps that wrap another module's config -------------------------------


@dataclass
class MinHashStep(dedup.MinHashConfig):
    """MinHash-LSH near-duplicate removal (keeps the earliest document of each cluster).

    The step's defaults differ from datatrove/FineWeb's 14 x 8 (threshold 0.72): copies
    with a few percent of words edited have 5-gram Jaccard 0.4-0.8, which 14 x 8 finds
    only ~65% of the time (benchmarks/dedup_quality.py). 20 x 3 (threshold 0.37) finds
    99.7% of them, and checking each candidate pair on the full signatures (estimated
    Jaccard >= 0.45) removes the false positives between distinct documents (99.2% of
    the copies found, no distinct document removed).
    """

    bands: PosInt = 20
    rows: PosInt = 3
    verify: bool = True
    verify_threshold: Fraction | None = 0.45


@dataclass
class SpanStep(dedup.SpanDedupConfig):
    """Repeated lines or three-sentence spans, removed from every document but the first."""


@dataclass
class ExactStep:
    __pydantic_config__ = STRICT


@dataclass
class IndexStep:
    """Drop documents that duplicate an existing dataset, given its index (`lmlab data index`)."""

    __pydantic_config__ = STRICT
    path: str = ""

    def __post_init__(self) -> None:
        if not self.path:
            raise UsageError("dedup_index.path: give the index file built by `lmlab data index`")
        if not Path(self.path).is_file():
            raise UsageError(f"dedup_index.path: {self.path} does not exist")


@dataclass
class DecontaminateStep(contamination.ContaminationConfig):
    """Flag or drop documents sharing an n-gram with an evaluation set."""

    paths: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.paths:
            raise UsageError("decontaminate.paths: name at least one evaluation JSONL file")
        for p in self.paths:
            if not Path(p).is_file():
                raise UsageError(f"decontaminate.paths: {p} is not a file")


@dataclass
class LengthStep:
    """Drop documents outside a character-length range (cheap guard before costly steps)."""

    __pydantic_config__ = STRICT
    min_chars: PosInt = 1
    max_chars: PosInt | None = None


# --- local step functions ------------------------------------------------------------


def _text_rule(rule: Callable[[str, Any], str | None]) -> Callable[[Any, dict], Apply]:
    def make(cfg: Any, res: dict) -> Apply:
        def apply(doc: Document, st: StepStats) -> Document | str:
            return rule(doc.text, cfg) or doc

        return apply

    return make


def _text_modifier(rule: Callable[[str, Any], tuple[str, str | None]]) -> Callable:
    def make(cfg: Any, res: dict) -> Apply:
        def apply(doc: Document, st: StepStats) -> Document | str:
            text, reason = rule(doc.text, cfg)
            if reason:
                return reason
            if text != doc.text:
                st.modified += 1
                doc.text = text
            return doc

        return apply

    return make


def _make_html(cfg: keywords.HtmlConfig, res: dict) -> Apply:
    inner = _text_modifier(keywords.html_to_text)(cfg, res)

    def apply(doc: Document, st: StepStats) -> Document | str:
        return inner(doc, st) if keywords.looks_like_html(doc.text) else doc

    return apply


def _make_language(cfg: langid.LanguageConfig, res: dict) -> Apply:
    def apply(doc: Document, st: StepStats) -> Document | str:
        lang, score, reason = langid.language_filter(doc.text, cfg)
        doc.metadata["language"] = lang
        doc.metadata["language_score"] = round(float(score), 4)
        st.extra[lang] += 1
        return reason or doc

    return apply


def _make_length(cfg: LengthStep, res: dict) -> Apply:
    def apply(doc: Document, st: StepStats) -> Document | str:
        if len(doc.text) < cfg.min_chars:
            return "too_short"
        if cfg.max_chars is not None and len(doc.text) > cfg.max_chars:
            return "too_long"
        return doc

    return apply


def _make_pii(cfg: pii.PIIConfig, res: dict) -> Apply:
    def apply(doc: Document, st: StepStats) -> Document | str:
        text, counts = pii.redact(doc.text, cfg)
        if text != doc.text:
            st.modified += 1
            st.extra.update(counts)
            doc.text = text
        return doc

    return apply


MAX_FINDINGS = 10_000


def _make_decontaminate(cfg: DecontaminateStep, res: dict) -> Apply:
    index = contamination.load_index(res["contamination_index"])

    def apply(doc: Document, st: StepStats) -> Document | str:
        matches = contamination.find(doc.text, index)
        matches = [m for m in matches if m.ngram_count >= cfg.min_overlaps]
        if not matches:
            return doc
        st.extra["documents_with_overlap"] += 1
        for m in matches:
            st.extra[f"item:{m.item_id}"] += 1
            if len(st.findings) < MAX_FINDINGS:
                st.findings.append(
                    {
                        "item": m.item_id,
                        "eval_file": m.eval_file,
                        "doc": doc.id,
                        "ngrams": m.ngram_count,
                        "snippet": m.snippet,
                    }
                )
        doc.metadata["contamination"] = sorted({m.item_id for m in matches})
        return "overlap" if cfg.action == "drop" else doc

    return apply


def _make_perplexity(cfg: perplexity.PerplexityConfig, res: dict) -> Apply:
    score = perplexity.load_scorer(res["perplexity_model"])

    def apply(doc: Document, st: StepStats) -> Document | str:
        ppl = float(score(doc.text))
        doc.metadata["perplexity"] = round(ppl, 3)
        if cfg.label_only or cfg.max_perplexity is None:
            return doc
        return "above_max" if ppl > cfg.max_perplexity else doc

    return apply


def _make_index(cfg: IndexStep, res: dict) -> Apply:
    index = dedup.load_index(cfg.path)

    def apply(doc: Document, st: StepStats) -> Document | str:
        return dedup.index_reason(doc.text, index) or doc

    return apply


# --- one-off set-up in the main process (results are files the workers load) ---------


def _setup_decontaminate(cfg: DecontaminateStep, work: Path) -> dict:
    path = work / "contamination_index"
    if not path.exists():  # a relaunch reuses it (the work folder is keyed by the inputs)
        contamination.save_index(contamination.build_index(cfg.paths, cfg), path)
    return {"contamination_index": str(path)}


def _setup_perplexity(cfg: perplexity.PerplexityConfig, work: Path) -> dict:
    trained = work / "perplexity_model.npz"
    if cfg.model is None and trained.exists():  # a relaunch reuses the trained model
        return {"perplexity_model": str(trained)}
    return {"perplexity_model": perplexity.prepare_model(cfg, trained)}


@dataclass(frozen=True)
class StepDef:
    config: type
    kind: str  # "local" or "global"
    make: Callable[[Any, dict], Apply] | None = None
    setup: Callable[[Any, Path], dict] | None = None
    doc: str = ""


REGISTRY: dict[str, StepDef] = {
    "html_to_text": StepDef(keywords.HtmlConfig, "local", _make_html, doc="HTML pages → text"),
    "length": StepDef(LengthStep, "local", _make_length, doc="character-length bounds"),
    "language": StepDef(langid.LanguageConfig, "local", _make_language, doc="language ID"),
    "code_quality": StepDef(
        filters.CodeConfig,
        "local",
        _text_rule(filters.code_quality),
        doc="source-code file rules (StarCoder): long lines, alphanumeric share, encoded blobs",
    ),
    "gopher_quality": StepDef(
        filters.GopherQualityConfig,
        "local",
        _text_rule(filters.gopher_quality),
        doc="Gopher quality rules",
    ),
    "gopher_repetition": StepDef(
        filters.GopherRepetitionConfig,
        "local",
        _text_rule(filters.gopher_repetition),
        doc="Gopher repetition rules",
    ),
    "c4": StepDef(filters.C4Config, "local", _text_modifier(filters.c4_filter), doc="C4 rules"),
    "fineweb": StepDef(
        filters.FineWebConfig, "local", _text_rule(filters.fineweb_quality), doc="FineWeb rules"
    ),
    "blocklist": StepDef(
        keywords.BlocklistConfig, "local", _text_rule(keywords.blocklist), doc="keyword lists"
    ),
    "perplexity": StepDef(
        perplexity.PerplexityConfig,
        "local",
        _make_perplexity,
        _setup_perplexity,
        doc="reference-LM perplexity (percentile cut-off is global)",
    ),
    "dedup_index": StepDef(IndexStep, "local", _make_index, doc="duplicates of another dataset"),
    "pii": StepDef(pii.PIIConfig, "local", _make_pii, doc="privacy reduction"),
    "decontaminate": StepDef(
        DecontaminateStep,
        "local",
        _make_decontaminate,
        _setup_decontaminate,
        doc="evaluation-set n-gram overlap",
    ),
    "dedup_exact": StepDef(ExactStep, "global", doc="exact duplicate documents"),
    "dedup_spans": StepDef(SpanStep, "global", doc="repeated lines / sentence spans"),
    "minhash": StepDef(MinHashStep, "global", doc="MinHash-LSH near-duplicates"),
}


@dataclass
class Step:
    name: str
    config: Any


def parse_steps(items: list[Any], profile: str, where: str = "steps") -> list[Step]:
    """Validate a step list; every error names the item (`steps[3].gopher_quality.x`)."""
    steps: list[Step] = []
    seen: set[str] = set()
    for i, item in enumerate(items):
        if isinstance(item, str):
            name, opts = item, {}
        elif isinstance(item, dict) and len(item) == 1:
            name, opts = next(iter(item.items()))
            opts = opts or {}
        else:
            raise UsageError(f"{where}[{i}]: expected a step name or {{name: {{options}}}}")
        if name not in REGISTRY:
            known = ", ".join(REGISTRY)
            raise UsageError(f"{where}[{i}]: unknown step {name!r} (known: {known})")
        if name in seen:
            raise UsageError(f"{where}[{i}]: step {name!r} appears twice")
        seen.add(name)
        if not isinstance(opts, dict):
            raise UsageError(f"{where}[{i}].{name}: options must be a mapping")
        defaults = filters.PROFILES.get(profile, {}).get(name, {})
        merged = {**defaults, **opts}
        try:
            cfg = TypeAdapter(REGISTRY[name].config).validate_python(merged)
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(x) for x in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            raise UsageError(f"{where}[{i}].{name}{'.' + loc if loc else ''}: {msg}") from None
        steps.append(Step(name, cfg))
    kinds = [REGISTRY[s.name].kind for s in steps]
    if "global" in kinds:
        first = kinds.index("global")
        pct = [
            i
            for i, s in enumerate(steps)
            if s.name == "perplexity"
            and s.config.keep_percentile is not None
            and not s.config.label_only
        ]
        if pct and pct[0] != first - 1:  # its cut-off is decided in the global phase too
            raise UsageError(
                f"{where}: perplexity with keep_percentile must come right before the "
                "de-duplication steps"
            )
        last = len(kinds) - 1 - kinds[::-1].index("global")
        if "local" in kinds[first:last]:
            raise UsageError(
                f"{where}: the de-duplication steps must be consecutive "
                f"(found {steps[kinds.index('local', first)].name!r} between them)"
            )
    return steps


def dump_steps(steps: list[Step]) -> list[dict]:
    return [{s.name: dataclasses.asdict(s.config)} for s in steps]


def describe_steps(profile: str = "web") -> str:
    """Every step with its options and their defaults under `profile` (YAML-ish text)."""
    if profile not in filters.PROFILES:
        raise UsageError(f"profile: {profile!r} is not one of {sorted(filters.PROFILES)}")
    lines = []
    for name, d in REGISTRY.items():
        lines.append(f"{name}:  # {d.kind}: {d.doc}")
        defaults = filters.PROFILES[profile].get(name, {})
        for f in dataclasses.fields(d.config):
            if f.name.startswith("_"):
                continue
            if f.default is not dataclasses.MISSING:
                value = f.default
            elif f.default_factory is not dataclasses.MISSING:
                value = f.default_factory()
            else:
                value = "(required)"
            value = defaults.get(f.name, value)
            lines.append(f"  {f.name}: {value!r}")
    return "\n".join(lines) + "\n"
