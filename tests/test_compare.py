"""Controlled comparisons (`variants` in a recipe): same data, seed and budget per variant."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lmlab.console import set_quiet
from lmlab.errors import UsageError
from lmlab.model.config import ModelConfig
from lmlab.run.compare import changed_fields, comparisons, find_spikes
from lmlab.run.recipe import builtin_recipes, load_recipe
from lmlab.run.runner import run_recipe
from lmlab.utils import read_json, read_jsonl

from .conftest import lmlab_cmd, lmlab_in

here = lmlab_in  # `lmlab ARGS` in this process, from a directory


FAST = [
    "pretrain.max_steps=10",
    "pretrain.log_every=1",
    "pretrain.eval_every=5",
    "pretrain.checkpoint_every=5",
]
VARIANTS = "variants={baseline: , twin: {}, gelu: {activation: gelu}}"


def _run(root: Path, variants: str = VARIANTS) -> Path:
    set_quiet(True)
    try:
        return run_recipe(load_recipe("smoke", [*FAST, variants]), root / "runs")
    finally:
        set_quiet(False)


@pytest.fixture(scope="module")
def compare_run(tmp_path_factory) -> Path:
    return _run(tmp_path_factory.mktemp("compare"))


def _train_rows(run_dir: Path, variant: str) -> list[dict]:
    rows = read_jsonl(run_dir / "compare" / variant / "metrics.jsonl")
    return [{k: r[k] for k in ("step", "tokens", "loss", "grad_norm") if k in r} for r in rows]


def test_variants_train_distinct_models_on_the_same_data_seed_and_budget(compare_run):
    res = read_json(compare_run / "compare.json")
    v = res["variants"]
    assert list(v) == ["baseline", "twin", "gelu"]
    assert v["baseline"]["model"]["activation"] == "swiglu"
    assert v["gelu"]["model"]["activation"] == "gelu"
    assert v["gelu"]["parameters"] != v["baseline"]["parameters"]
    assert {(x["steps"], x["tokens"]) for x in v.values()} == {(10, 10 * 8 * 64)}
    assert v["gelu"]["final_val_loss"] != v["baseline"]["final_val_loss"]
    # the same batches: step 1's loss differs only by the model (both start near ln V)
    steps = {n: [r["step"] for r in _train_rows(compare_run, n) if "loss" in r] for n in v}
    assert steps["gelu"] == steps["baseline"] == list(range(1, 11))
    # one data and tokenizer stage shared by all; no sft/eval for a comparison
    assert (compare_run / "tokenizer" / "tokens").is_dir()
    assert not (compare_run / "pretrain").exists() and not (compare_run / "sft").exists()


def test_identical_variants_give_identical_losses(compare_run):
    assert _train_rows(compare_run, "twin") == _train_rows(compare_run, "baseline")
    a = read_json(compare_run / "compare" / "twin" / "val_windows.json")
    assert a == read_json(compare_run / "compare" / "baseline" / "val_windows.json")
    res = read_json(compare_run / "compare.json")
    assert res["variants"]["twin"]["delta_vs_reference"] == 0.0
    # a replicate adds no survey comparison; baseline vs gelu is the one there is
    assert [c["pair"] for c in res["comparisons"]] == [["baseline", "gelu"]]


def test_report_files_name_every_variant(compare_run):
    md = (compare_run / "compare.md").read_text()
    html = (compare_run / "compare.html").read_text()
    res = read_json(compare_run / "compare.json")
    for name in ("baseline", "twin", "gelu"):
        assert f"| {name} |" in md and f"<td>{name}</td>" in html
    assert "SwiGLU/GeGLU vs GeLU" in md and "## Verdict" in md
    assert "data:image/png;base64," in html and (compare_run / "compare/curves.png").is_file()
    c = res["comparisons"][0]
    assert c["recommended"] == "baseline" and c["outcome"] in ("held", "tie", "reversed")
    assert res["verdict"].startswith("At this scale") and "SwiGLU/GeGLU vs GeLU" in res["verdict"]
    for key in ("spike_steps", "grad_norm_median", "grad_norm_max", "tokens_per_s"):
        assert key in res["variants"]["gelu"]
    # the mean of the per-window losses is the final validation loss
    w = read_json(compare_run / "compare" / "gelu" / "val_windows.json")
    assert sum(w) / len(w) == pytest.approx(res["variants"]["gelu"]["final_val_loss"], abs=1e-4)


def test_rerun_is_cached_and_a_changed_variant_alone_retrains(compare_run, tmp_path):
    shutil.copytree(compare_run.parent, tmp_path / "runs")  # leave the shared run alone
    run_dir = tmp_path / "runs" / compare_run.name
    mtime = (run_dir / "compare/baseline/metrics.jsonl").stat().st_mtime_ns
    _run(tmp_path)
    st = read_json(run_dir / "manifest.json")["stages"]["compare"]["variants"]
    assert {s["status"] for s in st.values()} == {"cached"} and len(st) == 3
    _run(tmp_path, VARIANTS.replace("gelu}", "relu}"))
    st = read_json(run_dir / "manifest.json")["stages"]["compare"]["variants"]
    assert {n: s["status"] for n, s in st.items()} == {
        "baseline": "cached",
        "twin": "cached",
        "gelu": "done",
    }
    assert (run_dir / "compare/baseline/metrics.jsonl").stat().st_mtime_ns == mtime
    assert read_json(run_dir / "compare.json")["variants"]["gelu"]["model"]["activation"] == "relu"


def test_report_lists_the_spike_events_training_logged(compare_run, tmp_path):
    """A `loss_spike` event line has a `loss` but no `grad_norm`: the report must count it
    as an event of its variant, not read it as a training step."""
    shutil.copytree(compare_run.parent, tmp_path / "runs")  # leave the shared run alone
    run_dir = tmp_path / "runs" / compare_run.name
    event = {  # the line the loop writes after rolling back from step 7 to step 5
        "step": 7,
        "event": "loss_spike",
        "loss": 9.1,
        "running_median": 5.2,
        "running_deviation": 0.1,
        "rolled_back_to": 5,
        "skipped_rows": [40, 56],
        "action": "rollback",
    }
    with open(run_dir / "compare/gelu/metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(event) + "\n")
    before = read_json(run_dir / "compare.json")["variants"]["gelu"]
    _run(tmp_path)  # every variant cached: the report alone is rewritten
    res = read_json(run_dir / "compare.json")
    gelu = res["variants"]["gelu"]
    assert gelu["spike_events"] == {
        "count": 1,
        "steps": [7],
        "rollbacks": 1,
        "rolled_back_to": [5],
        "skipped_rows": [[40, 56]],
        "skipped_batches": 0,
    }
    assert res["variants"]["baseline"]["spike_events"]["count"] == 0
    for key in ("spike_steps", "grad_norm_median", "grad_norm_max", "tokens_per_s"):
        assert gelu[key] == before[key], key  # the event is not a training step
    md = (run_dir / "compare.md").read_text()
    row = next(ln for ln in md.splitlines() if ln.startswith("| gelu |"))
    assert "1 at step 7, 1 rolled back (rows 40–56 skipped)" in row
    assert "| spike events |" in md
    assert "gelu did not train on the same batches" in res["verdict"]
    html = (run_dir / "compare.html").read_text()
    assert "1 at step 7, 1 rolled back (rows 40–56 skipped)" in html


@pytest.mark.parametrize(
    "variants, needle",
    [
        ("{post-ln: {norm_position: x}}", "variants.post-ln.norm_position: Input should be 'pre'"),
        ("{a: {bogus: 1}}", "unknown key 'variants.a.bogus' (allowed: activation,"),
        ("{a: {vocab_size: 10}}", "variants.a.vocab_size: set by the tokenizer"),
        ("{a: {n_heads: 3}}", "variants.a: d_model=64 is not divisible by n_heads=3"),
        ("{a: {preset: nope}}", "variants.a: model.preset: unknown preset 'nope'"),
        ("{'a b': {}}", "variants.a b: a variant name uses only letters"),
        ("{a: 3}", "variants.a: expected a mapping"),
    ],
)
def test_bad_variants_name_the_key(variants, needle):
    with pytest.raises(UsageError) as e:
        load_recipe("smoke", [f"variants={variants}"])
    assert needle in str(e.value)


def test_cli_bad_variant_exits_2_with_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    # a real process: its exit status and its whole stderr are the contract
    p = lmlab_cmd("run", "smoke", "--set", "variants={post-ln: {norm_position: x}}", cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "variants.post-ln.norm_position" in lines[0]
    assert not (tmp_path / "runs").exists()
    code, out, err = here(monkeypatch, capsys, tmp_path, "recipes")  # in this process: quicker
    assert code == 0, err
    assert "compare" in out.split()


def test_variant_keys_merge_onto_the_recipes_model():
    r = load_recipe(
        "tiny",
        ["model.layers=3", "variants={deep: {n_layers: 6}, gpt2: {preset: gpt2}, s: {size: 1M}}"],
    )
    m = r.variant_models()
    assert r.model.n_layers == 3
    assert (m["deep"].n_layers, m["deep"].d_model) == (6, 256)  # n_layers replaces layers
    assert (m["gpt2"].norm, m["gpt2"].position, m["gpt2"].d_model) == ("layernorm", "learned", 256)
    assert m["gpt2"].n_layers == 3
    # `size` re-fits the width as it does in `model:` (the recipe's `layers` pins the depth)
    assert (m["s"].n_layers, m["s"].d_model) == (3, 192)


def test_dumped_comparison_recipe_loads_back(tmp_path):
    from lmlab.run.recipe import dump_recipe

    f = tmp_path / "dump.yaml"
    f.write_text(dump_recipe(load_recipe("compare")))
    back = load_recipe(str(f))
    assert back == load_recipe("compare")
    assert back.variant_models()["gelu"].ffn_hidden == 4 * back.model.d_model


def test_shipped_compare_recipe_changes_one_thing_per_variant():
    assert "compare" in builtin_recipes()
    r = load_recipe("compare")
    m = r.variant_models()
    base = m["baseline"]
    assert (base.norm, base.norm_position, base.position, base.activation) == (
        "rmsnorm",
        "pre",
        "rope",
        "swiglu",
    )
    assert r.pretrain.max_minutes is None and r.pretrain.step_limit is not None
    changes = {n: changed_fields(base, cfg) for n, cfg in m.items() if n != "baseline"}
    assert changes == {
        "post-ln": {"norm_position"},
        "layernorm": {"norm"},
        "learned": {"position"},
        "alibi": {"position"},
        "gelu": {"activation"},
    }


def test_spike_detector_finds_a_planted_spike_and_none_in_a_smooth_curve():
    import numpy as np

    rng = np.random.default_rng(0)
    steps = np.arange(400)
    smooth = 3 + 5 * np.exp(-steps / 60) + rng.normal(0, 0.03, len(steps))
    assert find_spikes(list(smooth)) == []
    spiked = smooth.copy()
    spiked[250:253] += 0.8  # three steps high: one spike
    spiked[320] += 0.5
    assert find_spikes(list(spiked)) == [250, 320]
    # a rise within the noise of a noisy stretch is not a spike
    noisy = 4 + rng.normal(0, 0.3, 200)
    assert find_spikes(list(noisy)) == []


def test_verdict_calls_small_differences_ties():
    base = ModelConfig(vocab_size=512, n_layers=2, d_model=64, n_heads=2)
    models = {
        "baseline": base,
        "post-ln": ModelConfig.from_dict({**base.to_dict(), "norm_position": "post"}),
        "gelu": ModelConfig.from_dict({**base.to_dict(), "activation": "gelu", "ffn_hidden": None}),
        "layernorm": ModelConfig.from_dict({**base.to_dict(), "norm": "layernorm"}),
    }
    losses = {"baseline": 4.0, "post-ln": 4.2, "gelu": 4.005, "layernorm": 3.9}
    stats = {n: {"final_val_loss": v} for n, v in losses.items()}
    noise = [0.01, -0.01] * 50
    windows = {n: [v + e for e in noise] for n, v in losses.items()}
    outcome = {c["other"]: c["outcome"] for c in comparisons(models, stats, windows)}
    assert outcome == {"post-ln": "held", "gelu": "tie", "layernorm": "reversed"}
    assert json.dumps(outcome)  # plain data for compare.json
