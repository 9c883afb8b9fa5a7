import pytest

from lmlab.errors import UsageError
from lmlab.run.recipe import builtin_recipes, load_recipe

from .conftest import lmlab_cmd, lmlab_in

here = lmlab_in  # `lmlab ARGS` in this process, from a directory


def test_builtin_recipes_validate():
    assert {"tiny", "smoke"} <= set(builtin_recipes())
    r = load_recipe("tiny")
    assert r.pretrain.max_minutes and r.model.n_layers == 4


def test_set_overrides_apply_and_nest():
    r = load_recipe(
        "smoke", ["pretrain.lr=0.01", "sft.train.batch_size=4", "data.val_fraction=0.2"]
    )
    assert r.pretrain.lr == 0.01 and r.sft.train.batch_size == 4 and r.data.val_fraction == 0.2


@pytest.mark.parametrize(
    "override, needle",
    [
        (
            "pretrain.lrr=1",
            "unknown key 'pretrain.lrr' (allowed: activation_checkpointing, batch_size",
        ),
        ("pretrain.lr=-1", "pretrain.lr: Input should be greater than 0"),
        ("model.n_heads=3", "model: d_model=256 is not divisible by n_heads=3"),
        ("tokenizer.vocab_size=abc", "tokenizer.vocab_size: Input should be a valid integer"),
        (
            "pretrain.precision=fp8",
            "pretrain.precision: Input should be 'auto', 'bf16', 'fp16' or 'fp32'",
        ),
        ("data.val_fraction=2", "data.val_fraction: Input should be less than or equal to 1"),
        ("model.vocab_size=10", "set tokenizer.vocab_size instead"),
        ("nonsense", "expected key.path=value"),
    ],
)
def test_bad_recipes_name_the_key(override, needle):
    with pytest.raises(UsageError) as e:
        load_recipe("tiny", [override])
    assert needle in str(e.value)


def test_recipe_file_with_base_and_bad_yaml(tmp_path):
    good = tmp_path / "mine.yaml"
    good.write_text("base: smoke\nname: mine\npretrain:\n  max_steps: 3\n")
    r = load_recipe(str(good))
    assert r.name == "mine" and r.pretrain.max_steps == 3 and r.model.d_model == 64
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\n  pretrain: [\n")
    with pytest.raises(UsageError, match="bad.yaml: line"):
        load_recipe(str(bad))


def test_cli_bad_recipe_exits_2_with_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    # a real process: its exit status and its whole stderr are the contract
    p = lmlab_cmd("run", "smoke", "--set", "pretrain.lr=-1", cwd=tmp_path)
    assert p.returncode == 2
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "pretrain.lr" in lines[0]
    assert not (tmp_path / "runs").exists()
    # the other bad inputs take the same path: in this process (quicker)
    code, _, err = here(monkeypatch, capsys, tmp_path, "run", "no-such-recipe")
    assert code == 2 and "built-in: " in err
    code, _, err = here(monkeypatch, capsys, tmp_path, "run", "smoke", "--force", "nope")
    assert code == 2 and "not a stage" in err


def test_every_recipe_key_is_documented():
    from pathlib import Path

    from lmlab.run.recipe import Recipe

    doc = (Path(__file__).parents[1] / "docs/recipes.md").read_text()

    def leaves(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from leaves(v, f"{prefix}{k}.")
            else:
                yield prefix + k

    missing = [
        k
        for k in leaves(Recipe().resolved())
        if k != "model.vocab_size" and f"`{k.split('.')[-1]}`" not in doc and f"`{k}`" not in doc
    ]
    assert not missing, f"undocumented recipe keys: {missing}"


def test_dumped_recipe_loads_back(tmp_path):
    from lmlab.run.recipe import dump_recipe

    f = tmp_path / "dump.yaml"
    f.write_text(dump_recipe(load_recipe("smoke")))
    assert load_recipe(str(f)) == load_recipe("smoke")


def test_missing_data_path_is_rejected_before_running(tmp_path):
    nope = tmp_path / "nope.jsonl"
    with pytest.raises(UsageError, match=r"data.sources.0: paths: .*nope.jsonl does not exist"):
        load_recipe("smoke", [f"data.sources=[{{name: x, paths: [{nope}]}}]"])
    with pytest.raises(UsageError, match="paths is empty"):
        load_recipe("smoke", ["data.sources=[{name: x, paths: []}]"])
