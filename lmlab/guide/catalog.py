"""The model catalog: the models of Zhao et al. Table 1 and Yang et al. Fig. 1 as checked data,
filters over it, and the evolutionary tree drawn from it.

The data file (`data/catalog.yaml`) holds only what a survey states; each entry says which
source gave which field, so the loader can refuse a value that no source vouches for. A
field the surveys leave out is None, and a filter on that field never matches it (a model
of unknown size is neither above nor below a bound)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from lmlab.errors import UsageError

ARCHITECTURES = ("encoder-only", "encoder-decoder", "decoder-only", "other")
CATEGORIES = ("causal decoder", "prefix decoder", "encoder-decoder")
STYLES = ("BERT-style", "GPT-style")
ADAPTATIONS = ("IT", "RLHF")
EVALUATIONS = ("ICL", "CoT")
# Fig. 1's colours: decoder-only blue, encoder-only pink, encoder-decoder green, the rest grey.
COLOURS = {
    "encoder-only": "#d98d9e",
    "encoder-decoder": "#7fa87f",
    "decoder-only": "#7d93b2",
    "other": "#a5a5a5",
    "not given": "#cfcfcf",
}
TREE_SUFFIXES = (".svg", ".png")
# Fields that are the catalog's own bookkeeping, not a survey's statement.
META_FIELDS = ("name", "aliases", "zhao_table1_name", "preset", "notes", "sources")
RELEASE_RE = re.compile(r"(\d{4})(?:-(\d{2}))?")


@dataclass(frozen=True)
class Entry:
    """One model as the surveys describe it; None where they do not say."""

    name: str
    aliases: tuple[str, ...] = ()
    zhao_table1_name: str | None = None
    organization: str | None = None
    architecture: str | None = None
    category: str | None = None
    yang_table1: str | None = None
    open: bool | None = None
    size_b: float | None = None
    release: str | None = None
    fig1_year: int | None = None
    base_model: str | None = None
    adaptation: tuple[str, ...] | None = None
    pretrain_data: str | None = None
    data_timestamp: str | None = None
    hardware: str | None = None
    training_time: str | None = None
    evaluation: tuple[str, ...] | None = None
    preset: str | None = None
    notes: str | None = None
    sources: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def year(self) -> int | None:
        return int(self.release[:4]) if self.release else None

    @property
    def when(self) -> float | None:
        """The release as a fractional year (mid-month, or mid-year when only the year is
        known), the tree's vertical axis."""
        if not self.release:
            return None
        m = RELEASE_RE.fullmatch(self.release)
        assert m is not None  # checked on load
        if m.group(2) is None:
            return int(m.group(1)) + 0.5
        return int(m.group(1)) + (int(m.group(2)) - 0.5) / 12

    def row(self) -> dict[str, Any]:
        """Plain JSON-ready fields, in file order."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, tuple):
                v = list(v)
            elif isinstance(v, dict):
                v = {k: list(x) for k, x in v.items()}
            out[f.name] = v
        return out


FIELD_NAMES = tuple(f.name for f in fields(Entry))
DATA_FIELDS = tuple(n for n in FIELD_NAMES if n not in META_FIELDS)
LIST_FIELDS = ("adaptation", "evaluation")


def default_path() -> Path:
    return Path(str(resources.files("lmlab.guide") / "data" / "catalog.yaml"))


def load_catalog(path: str | Path | None = None) -> list[Entry]:
    """Read and check the catalog; a bad file is a UsageError naming the entry and key."""
    p = Path(path) if path is not None else default_path()
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise UsageError(f"{p}: cannot read the catalog: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise UsageError(f"{p}: not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("models"), list):
        raise UsageError(f"{p}: expected a mapping with a `models` list")
    known = raw.get("sources") or {}
    if not isinstance(known, dict) or not all(isinstance(v, dict) for v in known.values()):
        raise UsageError(f"{p}: sources: expected a mapping of source name to its description")
    entries: list[Entry] = []
    seen: dict[str, str] = {}
    presets: dict[str, str] = {}
    for i, item in enumerate(raw["models"]):
        e = _entry(item, f"{p}: models[{i}]", set(known))
        for label in (e.name, *e.aliases):
            if label.lower() in seen:
                raise UsageError(
                    f"{p}: models[{i}] ({e.name}): name {label!r} is also {seen[label.lower()]}"
                )
            seen[label.lower()] = e.name
        if e.preset is not None:
            if e.preset in presets:
                raise UsageError(
                    f"{p}: models[{i}] ({e.name}): preset: {e.preset!r} already links to "
                    f"{presets[e.preset]}"
                )
            presets[e.preset] = e.name
        entries.append(e)
    return entries


def _entry(item: Any, where: str, known_sources: set[str]) -> Entry:
    if not isinstance(item, dict):
        raise UsageError(f"{where}: expected a mapping, got {type(item).__name__}")
    name = item.get("name")
    if not isinstance(name, str) or not name.strip():
        raise UsageError(f"{where}: name: expected a non-empty string")
    where = f"{where} ({name})"
    unknown = sorted(set(item) - set(FIELD_NAMES))
    if unknown:
        raise UsageError(f"{where}: {unknown[0]}: unknown key; known: {', '.join(FIELD_NAMES)}")

    def bad(key: str, want: str) -> UsageError:
        return UsageError(f"{where}: {key}: expected {want}, got {item[key]!r}")

    kw: dict[str, Any] = {"name": name}
    for key, value in item.items():
        if key == "name" or value is None:
            continue
        if key in ("aliases", *LIST_FIELDS):
            allowed = {"adaptation": ADAPTATIONS, "evaluation": EVALUATIONS}.get(key)
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                raise bad(key, "a list of strings")
            if allowed and not set(value) <= set(allowed):
                raise bad(key, f"a list of {', '.join(allowed)}")
            kw[key] = tuple(value)
        elif key == "open":
            if not isinstance(value, bool):
                raise bad(key, "true or false")
            kw[key] = value
        elif key == "size_b":
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise bad(key, "a positive number of billions")
            kw[key] = value
        elif key == "fig1_year":
            if isinstance(value, bool) or not isinstance(value, int) or not 1990 <= value <= 2100:
                raise bad(key, "a year")
            kw[key] = value
        elif key in ("release", "data_timestamp"):
            text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
            m = RELEASE_RE.fullmatch(text) if isinstance(text, str) else None
            if m is None or (m.group(2) is not None and not 1 <= int(m.group(2)) <= 12):
                raise bad(key, "YYYY or YYYY-MM")
            kw[key] = text
        elif key == "sources":
            kw[key] = _sources(value, where, known_sources)
        else:
            choices = {
                "architecture": ARCHITECTURES,
                "category": CATEGORIES,
                "yang_table1": STYLES,
            }.get(key)
            if not isinstance(value, str) or not value.strip():
                raise bad(key, "a non-empty string")
            if choices and value not in choices:
                raise bad(key, " | ".join(choices))
            kw[key] = value
    entry = Entry(**kw)
    _check_provenance(entry, where)
    return entry


def _sources(value: Any, where: str, known: set[str]) -> dict[str, tuple[str, ...]]:
    if not isinstance(value, dict):
        raise UsageError(f"{where}: sources: expected a mapping of source to the fields it gives")
    out = {}
    for src, given in value.items():
        if src not in known:
            raise UsageError(
                f"{where}: sources: {src!r} is not a source of this file; known: "
                f"{', '.join(sorted(known)) or 'none'}"
            )
        if not isinstance(given, list) or not all(g in DATA_FIELDS for g in given):
            raise UsageError(
                f"{where}: sources.{src}: expected a list of fields from {', '.join(DATA_FIELDS)}"
            )
        out[src] = tuple(given)
    return out


def _check_provenance(e: Entry, where: str) -> None:
    """Every value comes from exactly one named source, and a source names only set fields."""
    claimed: dict[str, str] = {}
    for src, given in e.sources.items():
        for f in given:
            if f in claimed:
                raise UsageError(f"{where}: {f}: claimed by both {claimed[f]} and {src}")
            if getattr(e, f) is None:
                raise UsageError(f"{where}: {f}: sources.{src} names it but it has no value")
            claimed[f] = src
    for f in DATA_FIELDS:
        if getattr(e, f) is not None and f not in claimed:
            raise UsageError(f"{where}: {f}: has a value but no source gives it (see `sources`)")
    if not e.sources and (e.preset is None or not e.notes):
        raise UsageError(f"{where}: sources: an entry no survey gives needs a preset and notes")


def find(entries: list[Entry], name: str) -> Entry:
    """The entry called `name` (or one of its aliases), case-insensitively."""
    want = name.lower()
    for e in entries:
        if e.name.lower() == want or want in (a.lower() for a in e.aliases):
            return e
    raise UsageError(f"{name!r}: no such model in the catalog")


def preset_links(entries: list[Entry]) -> dict[str, str]:
    """preset name -> catalog entry name."""
    return {e.preset: e.name for e in entries if e.preset is not None}


def filter_entries(
    entries: list[Entry],
    *,
    architecture: str | None = None,
    open_: bool | None = None,
    organization: str | None = None,
    min_size: float | None = None,
    max_size: float | None = None,
    since: int | None = None,
    until: int | None = None,
    name: str | None = None,
) -> list[Entry]:
    """The entries matching every given criterion (sizes in billions, years inclusive;
    organization and name match a case-insensitive substring, name also the aliases)."""
    if architecture is not None and architecture not in ARCHITECTURES:
        raise UsageError(f"--arch {architecture}: unknown; known: {', '.join(ARCHITECTURES)}")
    for label, v in (("--min-size", min_size), ("--max-size", max_size)):
        if v is not None and (not math.isfinite(v) or v < 0):
            raise UsageError(f"{label} {v}: expected a non-negative number of billions")
    if min_size is not None and max_size is not None and min_size > max_size:
        raise UsageError(f"--min-size {min_size} is above --max-size {max_size}")
    if since is not None and until is not None and since > until:
        raise UsageError(f"--since {since} is after --until {until}")
    out = []
    for e in entries:
        if architecture is not None and e.architecture != architecture:
            continue
        if open_ is not None and e.open is not open_:
            continue
        if organization is not None and organization.lower() not in (e.organization or "").lower():
            continue
        if min_size is not None and (e.size_b is None or e.size_b < min_size):
            continue
        if max_size is not None and (e.size_b is None or e.size_b > max_size):
            continue
        if since is not None and (e.year is None or e.year < since):
            continue
        if until is not None and (e.year is None or e.year > until):
            continue
        if name is not None and not any(
            name.lower() in label.lower() for label in (e.name, *e.aliases)
        ):
            continue
        out.append(e)
    return out


UNKNOWN = "not given"  # the tree's column for entries whose architecture no survey gives
BRANCHES = ("other", "encoder-only", "encoder-decoder", "decoder-only", UNKNOWN)
MAX_LANES = {"other": 1, "encoder-only": 2, "encoder-decoder": 3, "decoder-only": 5, UNKNOWN: 2}


def _branch(e: Entry) -> str:
    return e.architecture or UNKNOWN


def _layout(entries: list[Entry]) -> tuple[dict[str, tuple[float, float]], dict[str, float]]:
    """(x, y) per entry name and the trunk's x per branch. Branches sit side by side as in
    Fig. 1 (grey, pink, green, blue), then those of unknown architecture; the models of one
    branch and year share the year's band, spread over a few lanes in release order so
    that labels do not collide."""
    pos: dict[str, tuple[float, float]] = {}
    trunks: dict[str, float] = {}
    x0 = 0.0
    for branch in BRANCHES:
        members = [e for e in entries if _branch(e) == branch]
        if not members:
            continue
        by_year: dict[int, list[Entry]] = {}
        for e in sorted(members, key=lambda e: (e.when or 0.0, e.name.lower())):
            by_year.setdefault(e.year or 0, []).append(e)
        lanes = min(MAX_LANES[branch], max(len(g) for g in by_year.values()))
        for year, group in by_year.items():
            rows = math.ceil(len(group) / lanes)
            for k, e in enumerate(group):
                row, lane = divmod(k, lanes)
                pos[e.name] = (x0 + lane * 1.3, year + (row + 0.5) / rows)
        trunks[branch] = x0 - 0.3
        x0 += lanes * 1.3 + 0.5
    return pos, trunks


def draw_tree(entries: list[Entry], path: str | Path, *, overwrite: bool = False) -> int:
    """Draw the evolutionary tree of `entries` to an .svg or .png file; returns how many
    models it drew (those without a release date cannot be placed and are left out).

    Matplotlib's object API with the Agg canvas: no display is needed, and no global
    pyplot state is touched."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in TREE_SUFFIXES:
        raise UsageError(
            f"{path}: the tree is drawn as .svg or .png, not {suffix or 'no suffix'!r}"
        )
    if path.exists() and not overwrite:
        raise UsageError(f"{path} exists; pass --overwrite to replace it")
    if path.exists() and not path.is_file():
        raise UsageError(f"{path} exists and is not a file")
    dated = [e for e in entries if e.release is not None]
    if not dated:
        raise UsageError("no model to draw: none of the selected models has a release date")

    from matplotlib import rc_context
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    from lmlab.utils import atomic_path

    pos, trunks = _layout(dated)
    years = sorted({e.year for e in dated if e.year is not None})
    lo, hi = years[0], years[-1] + 1
    right = max(x for x, _ in pos.values()) + 1.3
    fig = Figure(figsize=(max(5.0, 1.05 * (right + 0.5)), max(3.5, 1.1 * (hi - lo) + 1.4)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for y in range(lo, hi + 1):
        ax.axhline(y, color="#dde1e8", linestyle=(0, (6, 4)), linewidth=1, zorder=0)
    for branch, tx in trunks.items():
        top = max(y for e in dated if _branch(e) == branch for y in [pos[e.name][1]])
        trunk = dict(color=COLOURS[branch], linewidth=5, alpha=0.45, solid_capstyle="round")
        ax.plot([tx, tx], [lo, top + 0.15], zorder=1, **trunk)
    for e in dated:
        x, y = pos[e.name]
        colour = COLOURS[_branch(e)]
        # Fig. 1: filled = open, hollow = closed; faint when no survey says which
        face = {True: colour, False: "white", None: colour + "40"}[e.open]
        ax.plot(
            x,
            y,
            marker="s",
            markersize=7,
            color=colour,
            markerfacecolor=face,
            markeredgewidth=1.6,
            linestyle="none",
            zorder=3,
        )
        ax.annotate(
            e.name,
            (x, y),
            xytext=(6, 0),
            textcoords="offset points",
            va="center",
            fontsize=7,
            color="#333333",
            zorder=4,
        )
    ax.set_ylim(lo - 0.05, hi + 0.05)
    ax.set_xlim(-0.6, right)
    ax.set_yticks([y + 0.5 for y in range(lo, hi)], [str(y) for y in range(lo, hi)])
    ax.set_xticks(list(trunks.values()), list(trunks), fontsize=8)
    ax.tick_params(length=0)
    for label in ax.get_xticklabels():
        label.set_horizontalalignment("left")
    for side in ("top", "right", "bottom", "left"):
        ax.spines[side].set_visible(False)
    handles = [Line2D([], [], color=COLOURS[b], linewidth=5, alpha=0.6, label=b) for b in trunks]
    for label, face in (("open source", "#666666"), ("closed source", "white")):
        handles.append(
            Line2D(
                [],
                [],
                marker="s",
                linestyle="none",
                color="#666666",
                markerfacecolor=face,
                label=label,
            )
        )
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7, frameon=False)
    ax.set_title("LLM evolutionary tree (after Yang et al. Fig. 1)", fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    # SVG text stays text (searchable, and a third of the size of glyph outlines)
    with atomic_path(path) as tmp, rc_context({"svg.fonttype": "none"}):
        fig.savefig(tmp, format=suffix[1:], dpi=90)
    return len(dated)
