"""The data pipeline of Zhao et al. Fig. 3, as three resumable phases over tasks.

quality filtering → de-duplication → privacy reduction → tokenization. Inputs are split
into tasks (one per input file); the executor runs tasks in parallel and a relaunch
redoes only unfinished ones.

1. **filter** (per task): read → normalize → the local steps before de-duplication;
   survivors are written to the work folder together with compact de-duplication
   signatures (exact hashes, span hashes, MinHash band keys, perplexity scores).
2. **dedup** (once, global): decides from the signatures alone which documents are
   duplicates, which spans repeat, and the perplexity percentile cut-off.
3. **apply** (per task): applies those decisions, runs the local steps after
   de-duplication (PII, decontamination), and splits train/val by a hash of the id.

Then the outputs are merged in task order: `documents/{train,val}.jsonl`,
`removed/removed.jsonl` (every drop with `metadata.reason` = `step:rule`), `stats.json`,
the data card, and token shards when a tokenizer is given. Every intermediate file is
written atomically and followed by a completion marker, so the output of a run that
was killed and relaunched is byte-identical to an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import TypeAdapter, ValidationError

from lmlab.config import STRICT, Fraction, PosFloat, PosInt
from lmlab.console import log
from lmlab.data import dedup, perplexity
from lmlab.data.document import Document
from lmlab.data.executor import default_workers, is_done, mark_done, run_tasks
from lmlab.data.filters import normalize
from lmlab.data.sources import ReadStats, SourceConfig, list_tasks, read_task
from lmlab.data.steps import MAX_FINDINGS, REGISTRY, Step, StepStats, dump_steps, parse_steps
from lmlab.errors import UsageError
from lmlab.tokenizer import load_tokenizer
from lmlab.utils import (
    atomic_path,
    claim_output_dir,
    claim_output_file,
    hash_obj,
    mark_output,
    read_json,
    write_json,
)

# Part of every data cache key: bump it when a step decides differently for the same config
# (2: Gopher's alphabetic-words rule counts whitespace words), so no cached output made
# under older rules is resumed or reused.
RULES_VERSION = 2

DEFAULT_STEPS: dict[str, list[Any]] = {
    "web": [
        "html_to_text",
        "language",
        "gopher_repetition",
        "gopher_quality",
        "c4",
        "fineweb",
        "blocklist",
        "dedup_exact",
        "minhash",
        "pii",
    ],
    "code": [
        "code_quality",
        "gopher_repetition",
        "gopher_quality",
        "dedup_exact",
        "minhash",
        "pii",
    ],
}


@dataclass
class NamedSource(SourceConfig):
    """One input of a mixture: where to read, its name, and its sampling weight.

    weight < 1 keeps that share of the source's documents (chosen by a hash of the id,
    so the same ones every run); weight > 1 repeats the source in the token shards
    (2.5 = every document twice, half of them a third time).
    """

    name: str = "input"
    weight: PosFloat = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        for p in self.paths:  # checked on load, so a typo fails before any work starts
            if p != "stdlib" and not p.startswith("hf:") and not Path(p).exists():
                raise UsageError(f"paths: {p} does not exist")


@dataclass
class PipelineConfig:
    """Everything `lmlab data prepare` and the recipe's `data` stage accept."""

    __pydantic_config__ = STRICT

    sources: list[NamedSource] = field(
        default_factory=lambda: [NamedSource(name="stdlib", paths=["stdlib"], format="stdlib")]
    )
    profile: Literal["web", "code"] = "web"
    steps: list[Any] | None = None  # None = the profile's default steps
    val_fraction: Fraction = 0.0
    schedule: list[str] | None = None  # curriculum: source names in the order training sees them
    workers: PosInt | None = None
    task_mb: PosFloat = 64.0  # small input files are packed into tasks of about this size
    executor: Literal["local", "ray"] = "local"
    ray_address: str | None = None
    keep_work: bool = False

    def __post_init__(self) -> None:
        names = [s.name for s in self.sources]
        if not names:
            raise UsageError("sources: give at least one source")
        dup = [n for n, c in Counter(names).items() if c > 1]
        if dup:
            raise UsageError(f"sources: name {dup[0]!r} is used twice; give each source a name")
        if self.schedule and len(set(self.schedule)) < len(self.schedule):
            raise UsageError(f"schedule: each source may appear once ({self.schedule})")
        for n in self.schedule or []:
            if n not in names:
                raise UsageError(f"schedule: {n!r} is not a source name (sources: {names})")

    def parsed_steps(self) -> list[Step]:
        items = DEFAULT_STEPS[self.profile] if self.steps is None else self.steps
        return parse_steps(items, self.profile)


def load_config(data: dict, where: str) -> PipelineConfig:
    """Validate a config mapping; errors become one line naming the key and `where`."""
    try:
        cfg = TypeAdapter(PipelineConfig).validate_python(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        raise UsageError(f"{where}: {loc + ': ' if loc else ''}{msg}") from None
    try:
        cfg.parsed_steps()
    except UsageError as e:
        raise UsageError(f"{where}: {e}") from None
    return cfg


# --- the three phases ---------------------------------------------------------------


@dataclass
class Job:
    """What a worker needs for one task (picklable, so it can travel to Ray or a pool)."""

    index: int
    source: int
    task: list[Any]  # input files (sources.Task) read one after the other
    config: PipelineConfig
    work: Path
    key: str
    resources: dict


def _sampled(doc_id: str, share: float) -> bool:
    h = int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "big")
    return h / 2**64 < share


def _run_local(
    steps: list[tuple[Step, Any]], doc: Document, stats: list[StepStats]
) -> Document | str:
    for (step, apply), st in zip(steps, stats, strict=True):
        t0 = time.perf_counter()
        st.docs_in += 1
        st.chars_in += len(doc.text)
        res = apply(doc, st)
        st.seconds += time.perf_counter() - t0
        if isinstance(res, str):
            st.dropped[res] += 1
            return f"{step.name}:{res}"
        doc = res
        st.docs_out += 1
        st.chars_out += len(doc.text)
    return doc


def _percentile(step: Step) -> bool:
    """A perplexity step that cuts at a corpus percentile (decided in the global phase)."""
    cfg = step.config
    return step.name == "perplexity" and cfg.keep_percentile is not None and not cfg.label_only


def _split_steps(steps: list[Step]) -> tuple[list[Step], list[Step], list[Step]]:
    """(filter-phase steps, global steps, apply-phase steps).

    A percentile perplexity step ends the filter phase (its scores are made there, its
    cut-off decided globally), so the steps after it run only on documents it keeps.
    """
    kinds = [REGISTRY[s.name].kind for s in steps]
    cut = next((i + 1 for i, s in enumerate(steps) if _percentile(s)), None)
    if "global" not in kinds:
        return (steps, [], []) if cut is None else (steps[:cut], [], steps[cut:])
    first = kinds.index("global")
    last = len(kinds) - 1 - kinds[::-1].index("global")
    return steps[:first], steps[first : last + 1], steps[last + 1 :]


def _global_steps(steps: list[Step]) -> list[Step]:
    """What the global phase decides, in order: the percentile cut, then de-duplication.

    Span de-duplication goes last: which document keeps a repeated span must be decided
    among the documents that survive every other drop, or the span is lost everywhere.
    """
    _, glob, _ = _split_steps(steps)
    ppl = [s for s in steps if _percentile(s)]
    spans = [s for s in glob if s.name == "dedup_spans"]
    return ppl + [s for s in glob if s.name != "dedup_spans"] + spans


def _make(steps: list[Step], resources: dict) -> list[tuple[Step, Any]]:
    return [(s, REGISTRY[s.name].make(s.config, resources)) for s in steps]


def _writer(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "w", encoding="utf-8")


def _dump(f, doc: Document) -> None:
    f.write(json.dumps(doc.to_json(), ensure_ascii=False) + "\n")


def _drop(doc: Document, reason: str) -> Document:
    return Document(doc.id, doc.text, {**doc.metadata, "reason": reason})


# Fixed bin edges, so per-task histograms add up and stats stay small whatever the size.
HIST_BINS = {
    "length": np.logspace(1, 8, 29),  # characters: 10 … 100 M, 4 bins per decade
    "perplexity": np.logspace(0, 6, 49),  # 1 … 1e6, 8 bins per decade
    "language_score": np.linspace(0, 1, 21),
}


HIST_KEYS = ("length:in", "length:out", "perplexity", "language_score")


def _hist(values: list[float], kind: str) -> list[int]:
    edges = HIST_BINS[kind]
    clipped = np.clip(np.asarray(values, dtype=np.float64), edges[0], edges[-1])
    return np.histogram(clipped, bins=edges)[0].tolist()


def phase_filter(job: Job) -> dict:
    """Phase 1 for one task: read, normalize, pre-dedup steps, signatures."""
    if is_done(job.work, "filter", job.index, job.key):
        return read_json(job.work / "filter" / f"{job.index:05d}.stats.json")
    cfg = job.config
    src = cfg.sources[job.source]
    pre, glob, _ = _split_steps(cfg.parsed_steps())
    local = _make(pre, job.resources)
    step_stats = [StepStats(s.name) for s in pre]
    norm = StepStats("normalize")
    read = ReadStats()
    sampled_out = 0
    sig: dict[str, list] = {"ids": [], "exact": [], "bands": [], "span_hash": [], "span_doc": []}
    sig["ppl"] = []
    sig["chars"] = []
    gnames = {s.name: s.config for s in glob}
    lengths_in: list[int] = []
    base = job.work / "filter" / f"{job.index:05d}"
    with (
        atomic_path(base.with_suffix(".jsonl")) as kept_tmp,
        atomic_path(base.with_suffix(".removed.jsonl")) as rem_tmp,
        _writer(kept_tmp) as kept_f,
        _writer(rem_tmp) as rem_f,
    ):
        for doc in (d for t in job.task for d in read_task(t, src, read)):
            doc.metadata["source_name"] = src.name  # the mixture's name; `source` is the input's
            if src.weight < 1 and not _sampled(doc.id, src.weight):
                sampled_out += 1
                continue
            lengths_in.append(len(doc.text))
            t0 = time.perf_counter()
            norm.docs_in += 1
            norm.chars_in += len(doc.text)
            doc.text = normalize(doc.text)
            norm.seconds += time.perf_counter() - t0
            if not doc.text:
                norm.dropped["empty"] += 1
                _dump(rem_f, _drop(doc, "normalize:empty"))
                continue
            norm.docs_out += 1
            norm.chars_out += len(doc.text)
            res = _run_local(local, doc, step_stats)
            if isinstance(res, str):
                _dump(rem_f, _drop(doc, res))
                continue
            local_i = len(sig["ids"])
            sig["ids"].append(doc.id)
            if "dedup_exact" in gnames:
                sig["exact"].append(dedup.exact_hash(doc.text))
            if "minhash" in gnames:
                m = gnames["minhash"]
                signature = dedup.minhash_signature(doc.text, m)
                sig["bands"].append(dedup.band_keys(signature, m))
                if m.verify:  # candidate pairs are checked on the full signatures
                    sig.setdefault("minsig", []).append(signature)
            if "dedup_spans" in gnames:
                h = dedup.span_hashes(doc.text, gnames["dedup_spans"])
                sig["span_hash"].append(h)
                sig["span_doc"].append(np.full(len(h), local_i, dtype=np.int64))
            sig["ppl"].append(doc.metadata.get("perplexity", np.nan))
            sig["chars"].append(len(doc.text))
            _dump(kept_f, doc)
    _save_signatures(base.with_suffix(".sig.npz"), sig, gnames)
    stats = {
        "task": job.index,
        "source": src.name,
        "input": [t.label for t in job.task],
        "read": read.to_dict(),
        "sampled_out": sampled_out,
        "kept": len(sig["ids"]),
        "length_hist": _hist(lengths_in, "length"),
        "steps": [norm.to_dict()] + [s.to_dict() for s in step_stats],
    }
    write_json(base.with_suffix(".stats.json"), stats)
    mark_done(job.work, "filter", job.index, job.key)
    return stats


def _pack_ids(ids: list[str]) -> dict[str, np.ndarray]:
    """Ids as one UTF-8 blob plus offsets: a fixed-width array would pad every id to the
    longest (one 2 kB URL would make each id cost 8 kB)."""
    raw = [i.encode("utf-8") for i in ids]
    ends = np.cumsum([len(r) for r in raw], dtype=np.int64) if raw else np.zeros(0, np.int64)
    return {"id_blob": np.frombuffer(b"".join(raw), dtype=np.uint8), "id_ends": ends}


def _id_at(sig: dict, i: int) -> str:
    start = int(sig["id_ends"][i - 1]) if i else 0
    return sig["id_blob"][start : int(sig["id_ends"][i])].tobytes().decode("utf-8")


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, arr)


def _save_signatures(path: Path, sig: dict, gnames: dict) -> None:
    n = len(sig["ids"])
    arrays: dict[str, np.ndarray] = {
        **_pack_ids(sig["ids"]),
        "ppl": np.asarray(sig["ppl"], dtype=np.float64),
        "chars": np.asarray(sig["chars"], dtype=np.int64),
        "exact": np.asarray(sig["exact"], dtype=np.uint64),
    }
    if "minhash" in gnames:  # own .npy files, memory-mapped by the global phase
        m = gnames["minhash"]
        bands = np.stack(sig["bands"]) if n else np.zeros((0, m.bands), np.uint64)
        _save_npy(path.with_name(path.name.replace(".sig.npz", ".bands.npy")), bands.T.copy())
        if m.verify:
            minsig = np.stack(sig["minsig"]) if n else np.zeros((0, m.num_perm), np.uint32)
            _save_npy(path.with_name(path.name.replace(".sig.npz", ".minsig.npy")), minsig)
    cat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)  # noqa: E731
    arrays["span_hash"] = cat(sig["span_hash"], np.uint64)
    arrays["span_doc"] = cat(sig["span_doc"], np.int64)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def _near_duplicates(
    work: Path, n_tasks: int, n: int, alive: np.ndarray, cfg: Any
) -> tuple[np.ndarray, dict]:
    """MinHash clusters over every document, one band column in memory at a time.

    Band keys and signatures stay on disk (memory-mapped); documents already dropped get
    key 0, which never matches, so they remain singletons.
    """
    filt = work / "filter"
    bands = [np.load(filt / f"{i:05d}.bands.npy", mmap_mode="r") for i in range(n_tasks)]

    def columns():
        for j in range(cfg.bands):
            col = np.concatenate([b[j] for b in bands]) if n else np.zeros(0, np.uint64)
            col[~alive] = 0
            yield col

    sigs = None
    (work / "dedup").mkdir(parents=True, exist_ok=True)
    if cfg.verify:  # one on-disk matrix, so pairs are checked without loading it whole
        sigs = np.lib.format.open_memmap(
            work / "dedup" / "minsig.npy", mode="w+", dtype=np.uint32, shape=(n, cfg.num_perm)
        )
        at = 0
        for i in range(n_tasks):
            part = np.load(filt / f"{i:05d}.minsig.npy", mmap_mode="r")
            sigs[at : at + len(part)] = part
            at += len(part)
    return dedup.near_duplicate_clusters(columns(), cfg, signatures=sigs, n_docs=n)


# Drop codes of the global phase, stored as one int8 per document.
_CODES = {1: "dedup_exact:duplicate", 2: "minhash:near_duplicate", 3: "perplexity:above_percentile"}


def phase_dedup(work: Path, n_tasks: int, steps: list[Step], key: str) -> dict:
    """Phase 2: global decisions from the signatures of every task, written per task."""
    out = work / "dedup"
    if is_done(work, "dedup", 0, key):
        return read_json(out / "stats.json")
    t0 = time.perf_counter()
    sigs = [dict(np.load(work / "filter" / f"{i:05d}.sig.npz")) for i in range(n_tasks)]
    counts = [len(s["chars"]) for s in sigs]
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    n = int(offsets[-1])
    code = np.zeros(n, dtype=np.int8)
    dup_of = np.full(n, -1, dtype=np.int64)
    stats: dict[str, Any] = {"documents": n, "steps": []}
    span_docs = np.zeros(0, dtype=np.int64)
    span_hashes = np.zeros(0, dtype=np.uint64)
    chars = np.concatenate([s["chars"] for s in sigs]) if sigs else np.zeros(0, np.int64)
    for step in steps:
        alive = np.flatnonzero(code == 0)
        st = StepStats(step.name, docs_in=len(alive), chars_in=int(chars[alive].sum()))
        t1 = time.perf_counter()
        if step.name == "dedup_exact":
            hashes = np.concatenate([s["exact"] for s in sigs])
            drop, first = dedup.exact_duplicates(hashes[alive], alive)
            code[drop] = 1
            dup_of[drop] = first
            st.dropped["duplicate"] = len(drop)
        elif step.name == "minhash":
            roots, info = _near_duplicates(work, n_tasks, n, code == 0, step.config)
            members = np.flatnonzero(roots != np.arange(n))  # dropped documents stay alone
            code[members] = 2
            dup_of[members] = roots[members]
            st.dropped["near_duplicate"] = len(members)
            stats["minhash"] = {"threshold": step.config.threshold, **info}
        elif step.name == "dedup_spans":
            hashes = np.concatenate([s["span_hash"] for s in sigs])
            docs = np.concatenate([s["span_doc"] + offsets[i] for i, s in enumerate(sigs)])
            keep = code[docs] == 0 if len(docs) else np.zeros(0, bool)
            span_docs, span_hashes = dedup.repeated_spans(hashes[keep], docs[keep])
            st.modified = len(np.unique(span_docs))
            st.extra["spans_removed"] = len(span_docs)
        elif step.name == "perplexity":  # the percentile cut-off needs every score
            ppl = np.concatenate([s["ppl"] for s in sigs])
            cutoff = float(perplexity.percentile_cutoff(ppl[alive], step.config.keep_percentile))
            over = alive[ppl[alive] > cutoff]
            code[over] = 3
            st.dropped["above_percentile"] = len(over)
            st.extra["cutoff"] = cutoff
        st.docs_out = int((code == 0).sum())
        st.chars_out = int(chars[code == 0].sum())
        st.seconds = time.perf_counter() - t1
        stats["steps"].append(st.to_dict())
    for i in range(n_tasks):
        lo, hi = int(offsets[i]), int(offsets[i + 1])
        target = dup_of[lo:hi]
        names = np.full(hi - lo, "", dtype=object)
        for k in np.flatnonzero(target >= 0):
            j = int(np.searchsorted(offsets, target[k], side="right") - 1)
            names[k] = _id_at(sigs[j], int(target[k] - offsets[j]))
        a_, b_ = np.searchsorted(span_docs, [lo, hi])  # span_docs is sorted
        in_task = slice(int(a_), int(b_))
        with atomic_path(out / f"{i:05d}.npz") as tmp, open(tmp, "wb") as f:
            np.savez(
                f,
                code=code[lo:hi],
                dup_of=names.astype(str),
                span_doc=span_docs[in_task] - lo,
                span_hash=span_hashes[in_task],
            )
    stats["seconds"] = round(time.perf_counter() - t0, 3)
    write_json(out / "stats.json", stats)
    mark_done(work, "dedup", 0, key)
    return stats


def split_of(doc_id: str, val_fraction: float) -> str:
    """Deterministic by document id, so a document never moves between splits across runs."""
    h = int.from_bytes(hashlib.sha1(doc_id.encode()).digest()[:8], "big") / 2**64
    return "val" if h < val_fraction else "train"


def phase_apply(job: Job) -> dict:
    """Phase 3 for one task: apply global decisions, post-dedup steps, split."""
    if is_done(job.work, "apply", job.index, job.key):
        return read_json(job.work / "apply" / f"{job.index:05d}.stats.json")
    cfg = job.config
    _, glob, post = _split_steps(cfg.parsed_steps())
    local = _make(post, job.resources)
    step_stats = [StepStats(s.name) for s in post]
    span_cfg = next((s.config for s in glob if s.name == "dedup_spans"), None)
    dec = None
    if _global_steps(cfg.parsed_steps()):
        dec = dict(np.load(job.work / "dedup" / f"{job.index:05d}.npz"))
    spans: dict[int, np.ndarray] = {}
    if dec is not None and len(dec["span_doc"]):  # span_doc is sorted: split at changes
        cuts = np.flatnonzero(np.diff(dec["span_doc"])) + 1
        for docs, hashes in zip(
            np.split(dec["span_doc"], cuts), np.split(dec["span_hash"], cuts), strict=True
        ):
            spans[int(docs[0])] = hashes
    src = job.work / "filter" / f"{job.index:05d}.jsonl"
    base = job.work / "apply" / f"{job.index:05d}"
    split_counts: Counter = Counter()
    split_chars: Counter = Counter()
    lengths: list[int] = []
    ppl_values: list[float] = []
    lang_scores: list[float] = []
    dedup_extra = StepStats("dedup_apply")
    names = {s.name for s in cfg.parsed_steps()}
    has_ppl, has_lang = "perplexity" in names, "language" in names
    with (
        atomic_path(base.with_suffix(".train.jsonl")) as tr,
        atomic_path(base.with_suffix(".val.jsonl")) as va,
        atomic_path(base.with_suffix(".removed.jsonl")) as rm,
        _writer(tr) as f_tr,
        _writer(va) as f_va,
        _writer(rm) as f_rm,
    ):
        sinks = {"train": f_tr, "val": f_va}
        with open(src, encoding="utf-8") as f:
            for i, line in enumerate(f):
                doc = Document.from_json(json.loads(line))
                if dec is not None and dec["code"][i]:
                    d = _drop(doc, _CODES[int(dec["code"][i])])
                    if dec["dup_of"][i]:
                        d.metadata["duplicate_of"] = str(dec["dup_of"][i])
                    _dump(f_rm, d)
                    continue
                if span_cfg is not None and i in spans:
                    text = dedup.remove_spans(doc.text, span_cfg, spans[i])
                    if not text.strip():
                        _dump(f_rm, _drop(doc, "dedup_spans:empty"))
                        dedup_extra.dropped["empty"] += 1
                        continue
                    dedup_extra.modified += 1
                    dedup_extra.chars_in += len(doc.text)
                    dedup_extra.chars_out += len(text)
                    doc.text = text
                res = _run_local(local, doc, step_stats)
                if isinstance(res, str):
                    _dump(f_rm, _drop(doc, res))
                    continue
                split = split_of(doc.id, cfg.val_fraction)
                _dump(sinks[split], res)
                split_counts[split] += 1
                split_chars[split] += len(res.text)
                lengths.append(len(res.text))
                if has_ppl:  # only values our steps wrote, not input metadata of that name
                    ppl_values.append(res.metadata["perplexity"])
                if has_lang:
                    lang_scores.append(res.metadata["language_score"])
    stats = {
        "task": job.index,
        "steps": [s.to_dict() for s in step_stats],
        "span_removal": dedup_extra.to_dict(),
        "kept": {s: {"documents": split_counts[s], "chars": split_chars[s]} for s in sinks},
        "length_hist": _hist(lengths, "length"),
        "perplexity_hist": _hist(ppl_values, "perplexity"),
        "language_score_hist": _hist(lang_scores, "language_score"),
    }
    write_json(base.with_suffix(".stats.json"), stats)
    mark_done(job.work, "apply", job.index, job.key)
    return stats


def _stat(path: str) -> list:
    p = Path(path)
    st = p.stat() if p.exists() else None
    return [str(path), st.st_size if st else None, st.st_mtime_ns if st else None]


def input_fingerprint(tasks: list[tuple[int, Any]], steps: list[Step]) -> list:
    """Size and mtime of every input, and of every file a step names (evaluation sets,
    reference corpora, models, indexes, word lists): a change invalidates finished work."""
    out = [[src, str(t), *_stat(t.source_path)[1:]] for src, t in tasks]
    for step in steps:
        for value in dataclasses.asdict(step.config).values():
            for v in value if isinstance(value, list) else [value]:
                if isinstance(v, str) and v and Path(v).exists():
                    p = Path(v)
                    files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]
                    out.extend(_stat(str(f)) for f in files)
    return out


TASK_FILES = 1024


def group_tasks(tasks: list[tuple[int, Any]], task_mb: float) -> list[tuple[int, list[Any]]]:
    """Pack consecutive small inputs of one source into tasks of ~`task_mb` (≤ 1024 files).

    A directory of a million small files must not become a million tasks (each writes
    its own work files and loads the steps' models). Order is kept, so the output is the
    same however the inputs are packed.
    """
    limit = task_mb * 2**20
    groups: list[tuple[int, list[Any]]] = []
    size = 0.0
    for src, t in tasks:
        p = Path(t.source_path)
        n = p.stat().st_size if t.format != "stdlib" and p.is_file() else limit
        last = groups[-1] if groups else None
        if last and last[0] == src and size + n <= limit and len(last[1]) < TASK_FILES:
            last[1].append(t)
            size += n
        else:
            groups.append((src, [t]))
            size = n
    return groups


def prepare(
    cfg: PipelineConfig,
    out_dir: str | Path,
    tokenizer: str | Path | None = None,
    card: bool = True,
    check_out: bool = True,
) -> dict:
    """Run the whole pipeline into `out_dir`; returns the merged stats.

    `out_dir` must be new, empty, or this function's earlier output (which it resumes);
    `check_out=False` is for a caller that owns the directory (a run's data stage)."""
    from lmlab.data.card import write_card
    from lmlab.data.mixture import write_token_shards

    out = Path(out_dir).resolve()  # absolute: workers (on Ray, elsewhere) get the same paths
    work = out / "work"
    start = time.monotonic()
    steps = cfg.parsed_steps()
    tok = load_tokenizer(tokenizer) if tokenizer is not None else None  # fail before any work
    if check_out:
        claim_output_dir(out_dir, "data-prepare", resume=True)  # its own output resumes
    tasks = [(i, t) for i, s in enumerate(cfg.sources) for t in list_tasks(s)]
    if not tasks:
        raise UsageError("no input files found in the sources' paths")
    resolved = dataclasses.asdict(cfg)
    resolved["steps"] = dump_steps(steps)
    # Where and how it runs does not change the output, so it is not part of the key: a
    # relaunch with more workers, or on Ray, resumes the same work.
    how = {"workers", "executor", "ray_address", "keep_work"}
    what = {k: v for k, v in resolved.items() if k not in how}
    key = hash_obj(
        {"config": what, "inputs": input_fingerprint(tasks, steps), "rules": RULES_VERSION}
    )
    if work.exists():
        try:
            old = read_json(work / "key.json")["key"]
        except (OSError, ValueError, KeyError):
            old = None
        if old != key:
            shutil.rmtree(work)  # a different pipeline or changed inputs: start over
    work.mkdir(parents=True, exist_ok=True)
    if check_out:  # a directory its caller owns (a run's stage) is not ours to mark
        mark_output(out, "data-prepare")
    write_json(work / "config.json", dataclasses.asdict(cfg))
    write_json(work / "key.json", {"key": key})
    resources: dict = {}
    for s in steps:
        if REGISTRY[s.name].setup is not None:
            resources.update(REGISTRY[s.name].setup(s.config, work))
    workers = cfg.workers or default_workers()
    groups = group_tasks(tasks, cfg.task_mb)
    jobs = [Job(i, si, ts, cfg, work, key, resources) for i, (si, ts) in enumerate(groups)]
    log(
        f"data: {len(tasks)} inputs in {len(jobs)} tasks from {len(cfg.sources)} source(s), "
        f"{workers} worker(s)"
    )
    run = dict(workers=workers, executor=cfg.executor, ray_address=cfg.ray_address)
    filt = run_tasks(phase_filter, jobs, desc="filter", **run)
    glob = _global_steps(steps)
    dstats = phase_dedup(work, len(jobs), glob, key) if glob else {"steps": []}
    app = run_tasks(phase_apply, jobs, desc="dedup+privacy", **run)
    stats = _merge(cfg, filt, dstats, app, steps)
    _merge_files(work, out, len(jobs))
    if tok is not None:
        stats["tokens"] = write_token_shards(out / "documents", tok, out / "tokens", cfg)
    stats["seconds"] = round(time.monotonic() - start, 2)
    stats["config"] = resolved
    write_json(out / "stats.json", stats)
    if card:
        write_card(out, stats)
    if not cfg.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    k = stats["kept"]
    log(
        f"data: read {stats['read']['documents']} documents, kept "
        f"{k['train']['documents'] + k['val']['documents']} ({k['train']['documents']} train / "
        f"{k['val']['documents']} val), removed {stats['removed']}"
    )
    return stats


def _merge(
    cfg: PipelineConfig, filt: list[dict], dstats: dict, app: list[dict], steps: list[Step]
) -> dict:
    pre, glob, post = _split_steps(steps)
    read = ReadStats()
    per_step: dict[str, StepStats] = {}
    sources: dict[str, Counter] = {s.name: Counter() for s in cfg.sources}
    hist = {k: np.zeros(len(HIST_BINS[k.split(":")[0]]) - 1, dtype=np.int64) for k in HIST_KEYS}
    for f in filt:
        read.merge(ReadStats.from_dict(f["read"]))
        for sd in f["steps"]:
            per_step.setdefault(sd["name"], StepStats(sd["name"])).merge(StepStats.from_dict(sd))
        sources[f["source"]]["tasks"] += 1
        sources[f["source"]]["read"] += f["read"]["documents"]
        sources[f["source"]]["sampled_out"] += f["sampled_out"]
        hist["length:in"] += f["length_hist"]
    for sd in dstats.get("steps", []):
        if sd["name"] in per_step:  # the perplexity percentile: a second cut of a local step
            st = per_step[sd["name"]]
            st.dropped.update(sd["dropped"])
            st.extra.update(sd["extra"])
            st.docs_out -= sum(sd["dropped"].values())
            st.chars_out -= sd["chars_in"] - sd["chars_out"]
        else:
            per_step[sd["name"]] = StepStats.from_dict(sd)
    kept = {"train": {"documents": 0, "chars": 0}, "val": {"documents": 0, "chars": 0}}
    span = StepStats("dedup_spans")
    for a, f in zip(app, filt, strict=True):
        for sd in a["steps"]:
            per_step.setdefault(sd["name"], StepStats(sd["name"])).merge(StepStats.from_dict(sd))
        span.merge(StepStats.from_dict(a["span_removal"]))
        for s in ("train", "val"):
            kept[s]["documents"] += a["kept"][s]["documents"]
            kept[s]["chars"] += a["kept"][s]["chars"]
            sources[f["source"]][f"{s}_documents"] += a["kept"][s]["documents"]
            sources[f["source"]][f"{s}_chars"] += a["kept"][s]["chars"]
        hist["length:out"] += a["length_hist"]
        hist["perplexity"] += a["perplexity_hist"]
        hist["language_score"] += a["language_score_hist"]
    if "dedup_spans" in per_step:
        st = per_step["dedup_spans"]
        st.dropped.update(span.dropped)  # documents left empty by span removal
        st.docs_out -= sum(span.dropped.values())
        st.chars_out -= span.chars_in - span.chars_out
    order = ["normalize"] + [s.name for s in pre + glob + post]
    step_list = [per_step[n].to_dict() for n in order if n in per_step]
    removed = sum(sum(sd["dropped"].values()) for sd in step_list)
    pii_counts = per_step["pii"].extra if "pii" in per_step else Counter()
    return {
        "read": read.to_dict(),
        "sources": {k: dict(v) for k, v in sources.items()},
        "steps": step_list,
        "removed": removed,
        "kept": kept,
        "pii": dict(pii_counts),
        "languages": dict(per_step["language"].extra) if "language" in per_step else {},
        "minhash": dstats.get("minhash"),
        "contamination": (
            per_step["decontaminate"].findings[:MAX_FINDINGS] if "decontaminate" in per_step else []
        ),
        "histograms": {
            "bins": {k: v.tolist() for k, v in HIST_BINS.items()},
            **{k: v.tolist() for k, v in hist.items()},
        },
    }


def _merge_files(work: Path, out: Path, n_tasks: int) -> None:
    """Concatenate per-task outputs in task order (deterministic whatever finished first)."""
    targets = {
        out / "documents" / "train.jsonl": [
            work / "apply" / f"{i:05d}.train.jsonl" for i in range(n_tasks)
        ],
        out / "documents" / "val.jsonl": [
            work / "apply" / f"{i:05d}.val.jsonl" for i in range(n_tasks)
        ],
        out / "removed" / "removed.jsonl": [
            p
            for i in range(n_tasks)
            for p in (
                work / "filter" / f"{i:05d}.removed.jsonl",
                work / "apply" / f"{i:05d}.removed.jsonl",
            )
        ],
    }
    for target, parts in targets.items():
        with atomic_path(target) as tmp, open(tmp, "wb") as w:
            for p in parts:
                with open(p, "rb") as r:
                    shutil.copyfileobj(r, w, 1 << 20)


def iter_documents(path: str | Path) -> Iterator[Document]:
    """Stream `Document`s back from a JSONL file written by `prepare`."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield Document.from_json(json.loads(line))


def cli_config(
    inputs: list[str],
    config_file: str | Path | None,
    decontaminate: list[str] | None = None,
    contaminated: str = "flag",
    overrides: dict[str, Any] | None = None,
    source_overrides: dict[str, Any] | None = None,
) -> PipelineConfig:
    """The config of `lmlab data prepare`: the YAML file, then INPUTs and options on top."""
    import yaml

    data: dict[str, Any] = {}
    where = str(config_file) if config_file else "options"
    if config_file is not None:
        try:
            data = yaml.safe_load(Path(config_file).read_text(encoding="utf-8")) or {}
        except OSError as e:
            raise UsageError(f"{config_file}: cannot read ({e.strerror})") from None
        except yaml.YAMLError as e:
            raise UsageError(f"{config_file}: not valid YAML ({e})".replace("\n", " ")) from None
        if not isinstance(data, dict):
            raise UsageError(f"{config_file}: expected a mapping of pipeline keys")
    if inputs:
        src = {"name": "input", "paths": list(inputs)}
        src.update({k: v for k, v in (source_overrides or {}).items() if v is not None})
        data["sources"] = list(data.get("sources") or []) + [src]
    elif not data.get("sources"):
        raise UsageError("give INPUT files or directories, or `sources:` in --config")
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    if decontaminate:
        profile = data.get("profile", "web")
        if profile not in DEFAULT_STEPS:
            raise UsageError(f"{where}: profile: {profile!r} is not one of {list(DEFAULT_STEPS)}")
        steps = list(data.get("steps") or DEFAULT_STEPS[profile])
        step = {"decontaminate": {"paths": list(decontaminate), "action": contaminated}}
        names = [s if isinstance(s, str) else next(iter(s), None) if s else None for s in steps]
        if "decontaminate" in names:
            steps[names.index("decontaminate")] = step
        else:
            steps.append(step)
        data["steps"] = steps
    return load_config(data, where)


def build_dedup_index(cfg: PipelineConfig, out: str | Path, overwrite: bool = False) -> int:
    """Index a reference dataset (exact hashes + MinHash band keys) for `dedup_index` steps.

    Documents are read and normalized exactly as `prepare` does, with the MinHash
    settings of the config's `minhash` step (or the defaults), so later runs compare like
    with like. Returns the number of documents indexed. An existing `out` is replaced only
    when it is an index and `overwrite`.
    """
    claim_output_file(out, "de-duplication index", dedup.is_index, overwrite=overwrite)
    steps = {s.name: s.config for s in cfg.parsed_steps()}
    mh = steps.get("minhash") or REGISTRY["minhash"].config()
    exact: list[int] = []
    bands: list[np.ndarray] = []
    read = ReadStats()
    for src in cfg.sources:
        for task in list_tasks(src):
            for doc in read_task(task, src, read):
                text = normalize(doc.text)
                if text:
                    exact.append(dedup.exact_hash(text))
                    bands.append(dedup.band_keys(dedup.minhash_signature(text, mh), mh))
    dedup.build_index(
        np.asarray(exact, dtype=np.uint64),
        np.stack(bands) if bands else np.zeros((0, mh.bands), np.uint64),
        mh,
        out,
    )
    return len(exact)
