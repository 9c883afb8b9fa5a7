"""The practical guide's core question, measured on the user's own labelled data: a prompted
LLM (zero- and few-shot in-context learning, any backend) against a small model fine-tuned
on the labels (a MiniLM encoder with a classification head), with accuracy and its error,
learning curves over the number of labels, latency and cost per 1,000 items, and what
Yang et al.'s decision flow (Fig. 2) would have recommended (Remark 2: with plentiful
labels the fine-tuned model wins; the report says whether it did here).

Both arms score the same held-out items, so every difference is paired (per item) and its
standard error comes from the items. The LLM scores each label word after the prompt
(`label_probs`: the largest wins), the fine-tuned model its head's largest probability.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from lmlab.console import log
from lmlab.errors import UsageError
from lmlab.guide.flow import decide

FEW_LABELS = 100  # fewer labelled examples than this count as Fig. 2's "just a few"
INSTRUCTION = "Classify each text as one of: {labels}."
CHAT_HINT = "Reply with the label only."
TEMPLATE = "Text: {text}\nLabel:"  # an item; a demonstration adds " LABEL" and a blank line


@dataclass
class CompareConfig:
    text_column: str = "text"
    label_column: str = "label"
    columns: list[str] | None = None  # names of a CSV's columns when it has no header
    label_words: dict[str, str] = field(default_factory=dict)  # label -> word in prompts
    llm: str = "smollm2-135m-instruct"
    url: str | None = None  # an OpenAI-compatible server for the LLM arm
    chat: bool = True  # a local model with a chat template is prompted as a conversation
    instruction: str = INSTRUCTION  # {labels}: the label words, comma-separated ("" for none)
    template: str = TEMPLATE  # {text}: one item, up to where its label goes
    calibrate: bool = True  # also each configuration with contextual calibration
    api_key: str | None = None
    shots: list[int] = field(default_factory=lambda: [0, 4, 16])
    selector: str = "random"  # demonstrations: random, bm25, knn, mmr (lmlab.prompt.demos)
    labels: list[int] = field(default_factory=lambda: [50, 100, 200, 500, 1000, 3000])
    test_size: int = 200
    seeds: int = 1  # fine-tuning repeats on other label subsets (and initialisations)
    tune: str = "full"  # full, head or a PEFT spec (lmlab.adapt.classify)
    epochs: int = 3
    ood: bool = False  # the decision flow's out-of-distribution answer for this data
    price_per_hour: float | None = None  # of the machine, for cost per 1,000 items
    max_minutes: float | None = None  # a budget: later runs are skipped past it
    seed: int = 0

    def check(self) -> None:
        for name, text, key in (("--template", self.template, "text"),
                                ("--instruction", self.instruction, "labels")):  # fmt: skip
            try:
                text.format(**{key: "x"})
            except (KeyError, IndexError, ValueError) as e:
                msg = f"compare: {name} {text!r}: only {{{key}}} may be filled ({e})"
                raise UsageError(msg) from None
        if "{text}" not in self.template:
            raise UsageError(f"compare: --template {self.template!r} has no {{text}}")
        if self.test_size < 2:
            raise UsageError(f"compare: --test-size must be >= 2, got {self.test_size}")
        if any(k < 0 for k in self.shots) or any(n < 2 for n in self.labels):
            raise UsageError("compare: shots must be >= 0 and label counts >= 2")
        if self.seeds < 1 or self.epochs < 1:
            raise UsageError("compare: --seeds and --epochs must be >= 1")
        if not self.shots and not self.labels:
            raise UsageError("compare: nothing to run (no --shots and no --labels)")


# --- data -----------------------------------------------------------------------------------


def read_labelled(path: str | Path, cfg: CompareConfig) -> list[tuple[str, str]]:
    """(text, label) rows of a CSV/TSV (header row, or `cfg.columns`) or JSONL file; every
    problem is one error naming the file, the line and what is wrong."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{p}: no such file")
    tc, lc = cfg.text_column, cfg.label_column
    rows: list[tuple[str, str]] = []
    if p.suffix in (".jsonl", ".ndjson", ".json"):
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"{p}:{n}: not JSON ({e.msg})") from None
            if not isinstance(obj, dict) or tc not in obj or lc not in obj:
                have = ", ".join(obj) if isinstance(obj, dict) else type(obj).__name__
                raise UsageError(f"{p}:{n}: needs {tc!r} and {lc!r} (has: {have})")
            rows.append(_row(p, n, obj[tc], obj[lc]))
    elif p.suffix in (".csv", ".tsv"):
        delim = "\t" if p.suffix == ".tsv" else ","
        with open(p, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, delimiter=delim)
            header = cfg.columns or next(reader, None)
            if not header:
                raise UsageError(f"{p}: empty file")
            for col in (tc, lc):
                if col not in header:
                    hint = "" if cfg.columns else " (a file without a header: give --columns)"
                    raise UsageError(f"{p}: no column {col!r} (columns: {', '.join(header)}){hint}")
            ti, li = header.index(tc), header.index(lc)
            for rec in reader:
                n = reader.line_num  # the record's last line (a quoted field may span lines)
                if not rec:
                    continue
                if len(rec) != len(header):
                    raise UsageError(f"{p}:{n}: {len(rec)} fields, the header has {len(header)}")
                rows.append(_row(p, n, rec[ti], rec[li]))
    else:
        raise UsageError(f"{p}: a labelled set is .csv, .tsv or .jsonl")
    classes = sorted({y for _, y in rows})
    if len(classes) < 2:
        raise UsageError(f"{p}: one class only ({classes[0] if classes else 'no rows'})")
    for c in classes:
        if sum(y == c for _, y in rows) < 2:
            raise UsageError(f"{p}: label {c!r} has one example; each class needs at least 2")
    return rows


def _row(p: Path, n: int, text, label) -> tuple[str, str]:
    if not isinstance(text, str) or not text.strip():
        raise UsageError(f"{p}:{n}: the text is empty or not a string")
    if label is None or (isinstance(label, str) and not label.strip()):
        raise UsageError(f"{p}:{n}: the label is empty")
    return text.strip(), str(label).strip()


def stratified(labels: list[int], n: int, rng: np.random.Generator) -> list[int]:
    """n indices with every class in proportion (each class at least one)."""
    by: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by.setdefault(y, []).append(i)
    total = len(labels)
    take = {c: max(1, round(n * len(ix) / total)) for c, ix in by.items()}
    while sum(take.values()) > n:  # rounding: trim the largest class
        take[max(take, key=take.get)] -= 1
    picked = [i for c, ix in by.items() for i in rng.permutation(ix)[: take[c]].tolist()]
    return sorted(picked)


# --- arms -----------------------------------------------------------------------------------


def llm_arm(cfg: CompareConfig, pool, test, names, words, deadline) -> list[dict]:
    """Accuracy of the prompted LLM at each number of shots."""
    from lmlab.prompt.backend import open_backend
    from lmlab.prompt.demos import (
        CONTENT_FREE,
        contextual_calibration,
        label_probs,
        select_demos,
    )

    backend = open_backend(cfg.llm, cfg.url, cfg.api_key)
    head = cfg.instruction.format(labels=", ".join(words))
    render = chat_renderer(backend, cfg.template) if cfg.chat else None
    pool_texts = tuple(t for t, _ in pool)
    gold = np.array([y for _, y in test])
    out = []
    for k in cfg.shots:
        if k > len(pool):
            log(f"compare: {k} shots skipped: only {len(pool)} labelled items outside the test")
            continue
        if time.monotonic() > deadline:
            out.append({"shots": k, "skipped": "budget"})
            continue
        t = time.perf_counter()
        prompts, free = [], []
        for i, (text, _) in enumerate(test):
            seed = cfg.seed * 100_003 + i
            demos = select_demos(text, pool_texts, k, cfg.selector, seed) if k else []
            if cfg.selector != "random":  # best first from the selector: nearest the text
                demos = demos[::-1]
            shots = [(pool[d][0], words[pool[d][1]]) for d in demos]
            for x, into in ((text, prompts), (CONTENT_FREE, free)):
                if render is not None:
                    into.append(render(head, shots, x))
                else:
                    item = cfg.template.format
                    shown = "".join(f"{item(text=t)} {w}\n\n" for t, w in shots)
                    into.append((f"{head}\n\n" if head else "") + shown + item(text=x))
        label_words = [("" if render else " ") + w for w in words]
        probs = label_probs(backend, prompts, label_words)
        secs = time.perf_counter() - t
        fmt = "chat" if render is not None else "plain"
        runs = [(False, probs, secs)]
        if cfg.calibrate:  # each item's own prompt with "N/A" for its text (Zhao et al. 2021)
            t = time.perf_counter()
            q = contextual_calibration(probs, label_probs(backend, free, label_words))
            runs.append((True, q, secs + time.perf_counter() - t))
        for calibrated, p, took in runs:
            pred = p.argmax(-1)
            out.append({
                "shots": k,
                "format": fmt,
                "calibrated": calibrated,
                "correct": (pred == gold).astype(int).tolist(),
                "predicted_share": np.bincount(pred, minlength=len(names)).tolist(),
                "seconds": took,
                "s_per_item": took / len(test),
            })  # fmt: skip
            acc = np.mean(out[-1]["correct"])
            what = " calibrated" if calibrated else ""
            log(f"compare: LLM {k}-shot{what}: accuracy {acc:.3f} ({took:.0f} s)")
    return out


def chat_renderer(backend, template: str):
    """For a local model with a chat template: the prompt as a conversation (the
    instruction as the system turn, each text a user turn, each demonstration's label the
    assistant's reply), rendered up to the assistant's turn, where the label word is
    scored. None for a model without a template or a remote backend (plain text then)."""
    from lmlab.prompt.backend import LocalBackend
    from lmlab.tokenizer.chat import apply_chat_template, chat_template_of

    if not isinstance(backend, LocalBackend) or chat_template_of(backend.tokenizer) is None:
        return None

    def render(head: str, shots: list[tuple[str, str]], text: str) -> str:
        turns: list[dict] = [{"role": "system", "content": f"{head} {CHAT_HINT}".strip()}]
        for t, w in shots + [(text, None)]:
            turns.append({"role": "user", "content": template.format(text=t)})
            if w is not None:
                turns.append({"role": "assistant", "content": w})
        return apply_chat_template(backend.tokenizer, turns, add_generation_prompt=True)

    return render


def fine_tuned_arm(cfg: CompareConfig, pool, test, names, deadline) -> list[dict]:
    """Accuracy of the fine-tuned classifier at each number of labels (and seed)."""
    from lmlab.adapt.classify import fine_tune_classifier

    ys = [y for _, y in pool]
    gold = np.array([y for _, y in test])
    out = []
    for n in label_counts(cfg.labels, len(pool)):
        for s in range(cfg.seeds):
            if time.monotonic() > deadline:
                out.append({"labels": n, "seed": s, "skipped": "budget"})
                continue
            rng = np.random.default_rng((cfg.seed, n, s))
            idx = stratified(ys, n, rng)
            if len({ys[i] for i in idx}) < 2:
                idx = stratified(ys, max(n, len(names)), rng)
            t = time.perf_counter()
            model = fine_tune_classifier(
                [pool[i][0] for i in idx], [ys[i] for i in idx], names, cfg.tune,
                epochs=cfg.epochs, seed=cfg.seed * 1000 + s,
            )  # fmt: skip
            train_s = time.perf_counter() - t
            t = time.perf_counter()
            pred = model.predict_proba([x for x, _ in test]).argmax(-1).numpy()
            infer_s = time.perf_counter() - t
            out.append({
                "labels": n,
                "seed": s,
                "correct": (pred == gold).astype(int).tolist(),
                "predicted_share": np.bincount(pred, minlength=len(names)).tolist(),
                "train_s": train_s,
                "s_per_item": infer_s / len(test),
            })  # fmt: skip
            acc = np.mean(out[-1]["correct"])
            log(f"compare: fine-tuned on {n} labels (seed {s}): {acc:.3f} ({train_s:.0f} s)")
    return out


def label_counts(asked: list[int], available: int) -> list[int]:
    """The label counts to train on: those asked for that the data has, and all of them
    in place of the larger ones (so the curve ends at everything the user labelled)."""
    counts = sorted({n for n in asked if n < available})
    if any(n >= available for n in asked):
        counts.append(available)
    return counts


# --- the comparison -------------------------------------------------------------------------


def _se(x: np.ndarray) -> float:
    return float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")


def summarise(llm: list[dict], ft: list[dict], cfg: CompareConfig, n_labelled: int) -> dict:
    """Accuracy ± SE per configuration, the paired comparison of the fine-tuned model at
    each label count with the best prompted configuration, the crossover, and the flow."""
    llm_rows = []
    for r in llm:
        if "correct" not in r:
            continue
        c = np.array(r["correct"], float)
        llm_rows.append({"shots": r["shots"], "accuracy": c.mean(), "se": _se(c),
                         "s_per_item": r["s_per_item"], "format": r["format"],
                         "calibrated": r["calibrated"]})  # fmt: skip
    ft_rows = []
    for n in sorted({r["labels"] for r in ft if "correct" in r}):
        runs = [r for r in ft if r["labels"] == n and "correct" in r]
        per_item = np.mean([r["correct"] for r in runs], axis=0)  # mean over seeds, per item
        accs = [float(np.mean(r["correct"])) for r in runs]
        ft_rows.append({
            "labels": n,
            "accuracy": float(per_item.mean()),
            "se": _se(per_item),
            "seed_sd": float(np.std(accs, ddof=1)) if len(accs) > 1 else None,
            "seeds": len(runs),
            "train_s": float(np.mean([r["train_s"] for r in runs])),
            "s_per_item": float(np.mean([r["s_per_item"] for r in runs])),
            "per_item": per_item.tolist(),
        })  # fmt: skip
    best = max(llm, key=lambda r: np.mean(r["correct"]) if "correct" in r else -1, default=None)
    paired, crossover = [], None
    if best is not None and "correct" in best:
        b = np.array(best["correct"], float)
        for row in ft_rows:
            d = np.array(row["per_item"]) - b
            diff, se = float(d.mean()), _se(d)
            winner = "fine-tuned" if diff - 2 * se > 0 else "llm" if diff + 2 * se < 0 else "tie"
            paired.append({"labels": row["labels"], "diff": diff, "se": se, "winner": winner,
                           "flow": _flow(row["labels"], cfg.ood)})  # fmt: skip
            if crossover is None and winner == "fine-tuned":
                crossover = row["labels"]
    flow = decide(_answers(n_labelled, cfg.ood))
    largest = paired[-1] if paired else None
    holds = None
    if flow.recommendation == "fine-tuned" and largest is not None:
        holds = largest["winner"] == "fine-tuned"
    return {
        "llm": llm_rows,
        "fine_tuned": [{k: v for k, v in r.items() if k != "per_item"} for r in ft_rows],
        "best_llm_shots": best["shots"] if best is not None and "correct" in best else None,
        "best_llm_calibrated": bool(best.get("calibrated")) if best is not None else None,
        "paired": paired,
        "crossover_labels": crossover,
        "flow": {"labelled": n_labelled, **flow.to_dict()},
        "remark_2_holds": holds,
    }


def _answers(n_labels: int, ood: bool) -> dict:
    """A labelled classification task in the flow's terms: not a chatbot, no emergent
    abilities needed, one task, close to language modelling, not generation, not
    knowledge-intensive; "few labels" below `FEW_LABELS`."""
    return {
        "mimic_human": False, "emergent": False, "multiple_tasks": False,
        "far_from_lm": False, "few_labels": n_labels < FEW_LABELS, "ood": ood,
        "creative": False, "knowledge": False,
    }  # fmt: skip


def _flow(n_labels: int, ood: bool) -> str:
    return decide(_answers(n_labels, ood)).recommendation


def run_compare(data: str | Path, out: Path, cfg: CompareConfig) -> dict:
    """Both arms on `data`, the report written to `out` (compare.json, compare.md and
    learning_curve.png). Returns the summary."""
    cfg.check()
    rows = read_labelled(data, cfg)
    names = sorted({y for _, y in rows})
    unknown = sorted(set(cfg.label_words) - set(names))
    if unknown:
        raise UsageError(f"compare: --label-words names {unknown[0]!r}, not a label of {data}")
    words = [cfg.label_words.get(c, c) for c in names]
    ys = [names.index(y) for _, y in rows]
    if cfg.test_size >= len(rows) - 1:
        raise UsageError(
            f"compare: --test-size {cfg.test_size} leaves nothing to learn from ({len(rows)} rows)"
        )
    rng = np.random.default_rng(cfg.seed)
    test_idx = set(stratified(ys, cfg.test_size, rng))
    test = [(rows[i][0], ys[i]) for i in sorted(test_idx)]
    rest = [i for i in range(len(rows)) if i not in test_idx]
    pool = [(rows[i][0], ys[i]) for i in rng.permutation(rest).tolist()]
    deadline = time.monotonic() + (cfg.max_minutes * 60 if cfg.max_minutes else float("inf"))
    log(f"compare: {len(rows)} labelled items, {len(names)} classes, {len(test)} held out")
    t = time.perf_counter()
    llm = llm_arm(cfg, pool, test, names, words, deadline) if cfg.shots else []
    ft = fine_tuned_arm(cfg, pool, test, names, deadline) if cfg.labels else []
    summary = summarise(llm, ft, cfg, len(pool))
    result = {
        "data": str(data),
        "config": asdict(cfg),
        "classes": names,
        "label_words": words,
        "test_size": len(test),
        "pool_size": len(pool),
        "test_class_share": np.bincount([y for _, y in test], minlength=len(names)).tolist(),
        "summary": summary,
        "runs": {"llm": llm, "fine_tuned": ft},
        "wall_s": time.perf_counter() - t,
    }
    write_report(out, result)
    return result


# --- the report -----------------------------------------------------------------------------


def _cost(s_per_item: float, price: float | None) -> str:
    per_k = s_per_item * 1000
    money = f" (${per_k / 3600 * price:.4f})" if price is not None else ""
    return f"{per_k:.1f} s{money}"


def report_markdown(result: dict) -> str:
    s, cfg = result["summary"], result["config"]
    price = cfg["price_per_hour"]
    lines = [
        f"# lmlab compare: {result['data']}",
        "",
        f"{result['test_size']} held-out items (classes {', '.join(result['classes'])}, "
        f"{result['test_class_share']}), {result['pool_size']} labelled items to learn from. "
        f"LLM: {cfg['llm']}{' at ' + cfg['url'] if cfg['url'] else ''}, demonstrations "
        f"{cfg['selector']}. Fine-tuned: MiniLM-L6 + a classification head ({cfg['tune']}), "
        f"{cfg['epochs']} epochs, {cfg['seeds']} seed(s).",
        "",
        "| arm | labels used | accuracy ± SE | time per 1,000 items"
        + (" (cost)" if price is not None else "")
        + " | training s |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in s["llm"]:
        acc = f"{r['accuracy']:.3f} ± {r['se']:.3f}"
        how = r["format"] + (", calibrated" if r["calibrated"] else "")
        lines.append(f"| LLM, {r['shots']}-shot ({how}) | {r['shots']} | {acc} "
                     f"| {_cost(r['s_per_item'], price)} | – |")  # fmt: skip
    for r in s["fine_tuned"]:
        sd = f" (seed sd {r['seed_sd']:.3f})" if r["seed_sd"] is not None else ""
        lines.append(f"| fine-tuned | {r['labels']} | {r['accuracy']:.3f} ± {r['se']:.3f}{sd} "
                     f"| {_cost(r['s_per_item'], price)} | {r['train_s']:.0f} |")  # fmt: skip
    if s["paired"]:
        lines += [
            "",
            f"Fine-tuned minus the best prompted configuration ({s['best_llm_shots']}-shot"
            f"{', calibrated' if s['best_llm_calibrated'] else ''}), "
            "paired over the same items (± SE; a winner needs the difference beyond 2 SE):",
            "",
            "| labels | difference | winner | the decision flow says |",
            "|---:|---:|---|---|",
        ]
        for p in s["paired"]:
            lines.append(f"| {p['labels']} | {p['diff']:+.3f} ± {p['se']:.3f} | {p['winner']} "
                         f"| {p['flow']} |")  # fmt: skip
    f = s["flow"]
    lines += ["", "## The decision flow (Yang et al. Fig. 2)", ""]
    lines.append(
        f'With {f["labelled"]} labelled items ("just a few" is fewer than {FEW_LABELS}) the '
        f"flow recommends **{f['recommendation']}** (Remark {f['remark']}: {f['remark_text']})"
    )
    if s["crossover_labels"] is not None:
        lines.append(f"\nThe fine-tuned model is better from {s['crossover_labels']} labels on.")
    elif s["paired"]:
        lines.append("\nThe fine-tuned model was not better at any label count measured.")
    if s["remark_2_holds"] is not None:
        verdict = "holds" if s["remark_2_holds"] else "does not hold"
        lines.append(f"\nRemark 2 (plentiful labels: fine-tuned wins) {verdict} on this data.")
    lines += ["", "![learning curve](learning_curve.png)", ""]
    return "\n".join(lines)


def plot_curve(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["summary"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ft = s["fine_tuned"]
    if ft:
        x = [r["labels"] for r in ft]
        ax.errorbar(x, [r["accuracy"] for r in ft], yerr=[2 * r["se"] for r in ft],
                    marker="o", capsize=3, label="fine-tuned (± 2 SE)")  # fmt: skip
    for r in s["llm"]:
        ax.axhline(r["accuracy"], lw=1, color=f"C{1 + s['llm'].index(r)}",
                   ls="--" if not r["calibrated"] else ":",
                   label=f"LLM {r['shots']}-shot{' cal.' if r['calibrated'] else ''} "
                         f"{r['accuracy']:.3f}")  # fmt: skip
    ax.axvline(FEW_LABELS, color="grey", lw=0.8, ls=":", label='Fig. 2\'s "few labels"')
    ax.set_xscale("log")
    ax.set_xlabel("labelled examples")
    ax.set_ylabel("held-out accuracy")
    ax.set_title("prompted LLM vs fine-tuned model")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out: Path, result: dict) -> None:
    from lmlab.utils import atomic_dir, write_json

    with atomic_dir(out, kind="compare-report") as tmp:
        write_json(tmp / "compare.json", result)
        (tmp / "compare.md").write_text(report_markdown(result) + "\n", encoding="utf-8")
        plot_curve(result, tmp / "learning_curve.png")
