"""The model catalog: its entries against the surveys' tables and figure, the loader's
checks, the filters, the tree file, `lmlab models catalog` and the preset links."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from lmlab.errors import UsageError
from lmlab.guide.catalog import (
    ARCHITECTURES,
    default_path,
    draw_tree,
    filter_entries,
    find,
    load_catalog,
    preset_links,
)
from lmlab.model.presets import CARDS, PRESETS
from tests.conftest import lmlab_here

SEEDS = Path("/work/shared/seeds")
ZHAO_TABLES = SEEDS / "001_5fa909ac4120b4b2.txt"  # the seed article that reprints Table 1 and 3
ZHAO = SEEDS / "003_7766246e4ce1d15e.txt"
YANG = SEEDS / "000_99122f821883e13e.txt"
MONTHS = {m: i + 1 for i, m in enumerate(("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug",
                                          "Sep", "Oct", "Nov", "Dec"))}  # fmt: skip


@pytest.fixture(scope="module")
def cat():
    return load_catalog()


def seed(path: Path) -> str:
    if not path.exists():
        pytest.skip(f"{path} is not on this machine")
    return path.read_text(encoding="utf-8")


# Values read from Zhao et al. Table 1 by eye, kept here so the check runs without the seeds:
# name: (open, release, size (B), base model, adaptation, pre-train data, hardware, time, eval)
ZHAO_TABLE1 = {
    "T5": (True, "2019-10", 11, None, [], "1T tokens", "1024 TPU v3", None, ["ICL"]),
    "GPT-3": (False, "2020-05", 175, None, [], "300B tokens", None, None, ["ICL"]),
    "PaLM": (False, "2022-04", 540, None, [], "780B tokens", "6144 TPU v4", None, ["ICL", "CoT"]),
    "LLaMA": (True, "2023-02", 65, None, [], "1.4T tokens", "2048 80G A100", "21 d", ["ICL"]),
    "OPT": (True, "2022-05", 175, None, [], "180B tokens", "992 80G A100", None, ["ICL"]),
    "BLOOM": (True, "2022-07", 176, None, [], "366B", "384 80G A100", "105 d", ["ICL"]),
    "GLM-130B": (True, "2022-08", 130, None, [], "400B tokens", "768 40G A100", "60 d", ["ICL"]),
    "Gopher": (False, "2021-12", 280, None, [], "300B tokens", "4096 TPU v3", "920 h", ["ICL"]),
    "GLaM": (False, "2021-12", 1200, None, [], "280B tokens", "1024 TPU v4", "574 h", ["ICL"]),
    "LaMDA": (False, "2021-05", 137, None, [], "2.81T tokens", "1024 TPU v3", "57.7 d", []),
    "InstructGPT": (False, "2022-01", 175, "GPT-3", ["IT", "RLHF"], None, None, None, ["ICL"]),
    "Flan-T5": (True, "2022-10", 11, "T5", ["IT"], None, None, None, ["ICL", "CoT"]),
    "GPT-4": (False, "2023-03", None, None, ["IT", "RLHF"], None, None, None, ["ICL", "CoT"]),
    "GPT-NeoX-20B": (True, "2022-02", 20, None, [], "825GB", "96 40G A100", None, ["ICL"]),
    "Galactica": (True, "2022-11", 120, None, [], "106B tokens", None, None, ["ICL", "CoT"]),
    "Sparrow": (False, "2022-09", 70, None, ["RLHF"], None, "64 TPU v3", None, ["ICL"]),
}
ZHAO_FIELDS = ("open", "release", "size_b", "base_model", "adaptation", "pretrain_data",
               "hardware", "training_time", "evaluation")  # fmt: skip


@pytest.mark.parametrize("name", list(ZHAO_TABLE1))
def test_entries_match_zhao_table1_spot_checks(cat, name):
    e = find(cat, name)
    got = tuple(
        list(v) if isinstance(v, tuple) else v for v in (getattr(e, f) for f in ZHAO_FIELDS)
    )
    assert got == ZHAO_TABLE1[name]
    assert "zhao-table1" in e.sources


def _ym(text: str) -> str | None:
    if text == "-":
        return None
    month, year = text.split("-")
    return f"{year}-{MONTHS[month]:02d}"


def test_every_row_of_zhao_table1_as_printed_in_the_seed(cat):
    """Every row of the seed's Table 1, field by field: the catalog holds the table."""
    lines = seed(ZHAO_TABLES).splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("\tModel\tRelease Time"))
    rows, group = [], None
    for line in lines[start + 2 :]:
        if not line.strip():
            break
        cells = line.split("\t")
        group = cells[0] or group
        rows.append((group, cells[1:]))
    assert len(rows) == 43  # 18 open-source, 25 closed-source rows
    renamed = {"GLM": "GLM-130B"}  # Table 3 calls it GLM-130B; GLM is Fig. 1's 2021 model
    seen = set()
    for group, c in rows:
        printed = re.sub(r"\s*\[\d+\]$", "", c[0])
        e = find(cat, renamed.get(printed, printed))
        seen.add(e.name)
        size = None if c[2] == "-" else float(c[2].rstrip("*"))
        assert e.open is (group == "Open Source"), printed
        assert e.release == _ym(c[1]), printed
        assert e.size_b == size, printed
        assert e.base_model == (None if c[3] == "-" else c[3]), printed
        adapted = [a for a, t in zip(("IT", "RLHF"), c[4:6], strict=True) if t == "✓"]
        assert list(e.adaptation or ()) == adapted, printed
        assert e.pretrain_data == (None if c[6] == "-" else c[6]), printed
        assert e.data_timestamp == _ym(c[7]), printed
        assert e.hardware == (None if c[8] == "-" else c[8]), printed
        assert e.training_time == (None if c[9] == "-" else c[9]), printed
        evaluated = [x for x, t in zip(("ICL", "CoT"), c[10:12], strict=True) if t == "✓"]
        assert list(e.evaluation or ()) == evaluated, printed
    assert seen == {e.name for e in cat if "zhao-table1" in e.sources}


def test_values_from_the_survey_texts(cat):
    """Sizes the texts state, checked against the literal passages where the seeds are here."""
    assert find(cat, "GPT-1").size_b == 0.117 and find(cat, "GPT-2").size_b == 1.5
    assert find(cat, "GPT-J").size_b == 6 and find(cat, "GPT-3").size_b == 175
    assert find(cat, "Flan-T5").size_b == 11 and find(cat, "mT0").size_b == 13
    assert "499 billion tokens" in find(cat, "GPT-3").notes  # Yang disagrees with Zhao's 300B
    yang, zhao = seed(YANG), seed(ZHAO)
    assert "GPT-1, GPT-2, and GPT-3 featuring 117 million, 1.5 billion, and 175 billion" in yang
    assert "the 11B parameter variant of T5" in yang
    assert "GPT-3 175B trained on 499 billion tokens" in yang
    assert "FlanT5 (11B version)" in zhao and "mT0 (13B version)" in zhao
    assert "1.4T tokens are used for LLaMA (32B) and LLaMA (65B)" in zhao


def test_zhao_table3_categories(cat):
    assert find(cat, "GLM-130B").category == "prefix decoder"
    assert find(cat, "T5").category == "encoder-decoder"
    assert find(cat, "PaLM").category == "causal decoder"
    assert find(cat, "PanGu-α").size_b == 13  # Table 1's 13*; Table 3's 207B is in the notes
    assert "207B" in find(cat, "PanGu-α").notes
    if ZHAO_TABLES.exists():
        assert "PaLM [56]\tCasual decoder\t540B" in seed(ZHAO_TABLES)


YANG_TABLE1 = {
    "BERT-style": "ELMo BERT RoBERTa DistilBERT BioBERT XLM XLNet ALBERT ELECTRA T5 GLM XLM-E "
    "ST-MoE AlexaTM",
    "GPT-style": "GPT-3 OPT PaLM BLOOM MT-NLG GLaM Gopher Chinchilla LaMDA GPT-J LLaMA GPT-4 "
    "BloombergGPT",
}


def test_yang_table1(cat):
    want = {n: style for style, names in YANG_TABLE1.items() for n in names.split()}
    got = {e.name: e.yang_table1 for e in cat if e.yang_table1}
    assert got == want
    text = seed(YANG)
    row = next(line for line in text.splitlines() if line.startswith("| Decoder-only (GPT-style)"))
    for name in YANG_TABLE1["GPT-style"].split():
        assert name.lower() in row.lower()


# Read off Fig. 1: (branch, year row, filled = open, the logo's organization).
FIG1 = {
    "BERT": ("encoder-only", 2018, True, "Google"),
    "RoBERTa": ("encoder-only", 2019, True, "Meta"),
    "ELECTRA": ("encoder-only", 2020, True, "Stanford"),
    "ELMo": ("other", 2018, True, "AI2"),
    "T5": ("encoder-decoder", 2019, True, "Google"),
    "Switch": ("encoder-decoder", 2021, True, "Google"),
    "ST-MoE": ("encoder-decoder", 2022, False, "Google"),
    "Flan-UL2": ("encoder-decoder", 2023, True, "Google"),
    "GPT-2": ("decoder-only", 2019, True, "OpenAI"),
    "XLNet": ("decoder-only", 2019, True, "Google"),
    "GPT-3": ("decoder-only", 2020, False, "OpenAI"),
    "GPT-J": ("decoder-only", 2021, True, "EleutherAI"),
    "Codex": ("decoder-only", 2021, False, "OpenAI"),
    "LaMDA": ("decoder-only", 2022, False, "Google"),
    "YaLM": ("decoder-only", 2022, True, "Yandex"),
    "LLaMA": ("decoder-only", 2023, True, "Meta"),
    "Claude": ("decoder-only", 2023, False, "Anthropic"),
}


@pytest.mark.parametrize("name", list(FIG1))
def test_fig1_readings(cat, name):
    e = find(cat, name)
    assert (e.architecture, e.fig1_year, e.open, e.organization) == FIG1[name]


def test_fig1_open_closed_counts_match_its_bar_chart(cat):
    """Fig. 1's inset counts open and closed models per organization; the catalog's Fig. 1
    entries must add up to the same bars."""
    chart = {  # organization: (open, closed)
        "AI2": (2, 0), "AI21 Labs": (0, 2), "Baidu": (1, 1), "DeepMind": (0, 3),
        "Anthropic": (0, 3), "EleutherAI": (3, 0), "Microsoft": (3, 1),
        "BigScience|Hugging Face": (4, 0), "Meta": (6, 0), "OpenAI": (2, 5), "Google": (9, 7),
    }  # fmt: skip
    fig1 = [e for e in cat if "fig1_year" in e.sources.get("yang-fig1", ())]
    for org, want in chart.items():
        names = set(org.split("|"))
        members = [e for e in fig1 if names & set((e.organization or "").split(", "))]
        assert (sum(e.open for e in members), sum(not e.open for e in members)) == want, org


def test_every_value_has_a_source(cat):
    """The loader refuses a value no source gives; every entry names a known source."""
    for e in cat:
        assert e.sources or (e.preset and e.notes), e.name
    assert {s for e in cat for s in e.sources} <= {
        "zhao-table1", "zhao-table3", "zhao-text", "yang-table1", "yang-fig1", "yang-text"
    }  # fmt: skip


def test_every_preset_links_to_exactly_one_entry(cat):
    links = preset_links(cat)
    assert set(links) == set(PRESETS)
    for preset, name in links.items():
        assert [e.name for e in cat if e.preset == preset] == [name]
        card = CARDS[preset].split(" (")[0]  # "GPT-NeoX (2022)" -> "GPT-NeoX"
        assert find(cat, card).name == name


def test_model_presets_shows_the_catalog_column(monkeypatch, capsys):
    import lmlab.console

    monkeypatch.setattr(lmlab.console.console, "_width", 250)
    code, out, err = lmlab_here(monkeypatch, capsys, "model", "presets")
    assert code == 0
    text = out + err
    assert "catalog" in text and "GPT-NeoX-20B" in text and "GLM-130B" in text


def test_catalog_ships_with_the_package():
    assert default_path().is_file()
    assert default_path().parent.parent == Path(__import__("lmlab.guide").guide.__file__).parent
    toml = Path(__file__).parents[1] / "pyproject.toml"
    assert '"lmlab.guide" = ["data/*.yaml"]' in toml.read_text()


# --- the loader's checks ---

GOOD = """
sources:
  s1: {cite: a table}
models:
  - name: M1
    architecture: decoder-only
    open: true
    size_b: 7
    release: "2023-02"
    sources: {s1: [architecture, open, size_b, release]}
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "catalog.yaml"
    p.write_text(text)
    return p


def test_loader_reads_a_good_file(tmp_path):
    (e,) = load_catalog(write(tmp_path, GOOD))
    assert (e.name, e.size_b, e.year, e.open) == ("M1", 7, 2023, True)
    assert e.when == pytest.approx(2023 + 1.5 / 12)


@pytest.mark.parametrize(
    "old, new, says",
    [
        ("    open: true\n", "    opn: true\n", "(M1): opn: unknown key"),
        ("decoder-only", "decoder_only", "(M1): architecture: expected encoder-only"),
        ("size_b: 7", "size_b: -7", "(M1): size_b: expected a positive number"),
        ("size_b: 7", "size_b: yes", "(M1): size_b"),
        ('"2023-02"', '"2023-13"', "(M1): release: expected YYYY or YYYY-MM"),
        ("open: true", "open: maybe", "(M1): open: expected true or false"),
        ("size_b, release]", "release]", "(M1): size_b: has a value but no source gives it"),
        ("    size_b: 7\n", "", "(M1): size_b: sources.s1 names it but it has no value"),
        ("{s1: [", "{s9: [", "(M1): sources: 's9' is not a source"),
        ("  - name: M1", "  - name: ''", "models[0]: name: expected a non-empty string"),
        ("models:", "modelz:", "expected a mapping with a `models` list"),
        ("    open: true\n", "    open: true\n    adaptation: [SFT]\n", "(M1): adaptation"),
    ],
)
def test_loader_names_the_entry_and_key(tmp_path, old, new, says):
    assert old in GOOD
    with pytest.raises(UsageError, match=re.escape(says)):
        load_catalog(write(tmp_path, GOOD.replace(old, new)))


def test_loader_refuses_duplicates_and_bad_yaml(tmp_path):
    twice = GOOD + GOOD.split("models:\n")[1].replace("M1", "m1")
    with pytest.raises(UsageError, match=r"models\[1\] \(m1\): name 'm1' is also M1"):
        load_catalog(write(tmp_path, twice))
    linked = GOOD.replace("    open: true\n", "    open: true\n    preset: llama\n")
    both = linked + linked.split("models:\n")[1].replace("M1", "M2")
    with pytest.raises(UsageError, match="preset: 'llama' already links to M1"):
        load_catalog(write(tmp_path, both))
    with pytest.raises(UsageError, match="not valid YAML"):
        load_catalog(write(tmp_path, "models: [\n"))
    with pytest.raises(UsageError, match="cannot read the catalog"):
        load_catalog(tmp_path / "missing.yaml")


# --- filters ---


def test_filters(cat):
    enc_dec_open = filter_entries(cat, architecture="encoder-decoder", open_=True)
    assert {"T5", "UL2", "Flan-T5"} <= {e.name for e in enc_dec_open}
    assert all(e.architecture == "encoder-decoder" and e.open for e in enc_dec_open)
    big = filter_entries(cat, min_size=500)
    assert {e.name for e in big} == {
        "PaLM", "U-PaLM", "Flan-PaLM", "Flan-U-PaLM", "MT-NLG", "GShard", "GLaM", "PanGu-Σ"
    }  # fmt: skip
    small = filter_entries(cat, max_size=2)
    assert {e.name for e in small} == {"GPT-1", "GPT-2"}  # unknown sizes never match
    closed_google = filter_entries(cat, open_=False, organization="google", since=2023)
    assert {e.name for e in closed_google} == {"Bard"}
    y2019 = filter_entries(cat, since=2019, until=2019, architecture="encoder-only")
    assert {e.name for e in y2019} == {"RoBERTa", "ALBERT", "DistilBERT", "ERNIE"}
    assert {e.name for e in filter_entries(cat, name="neox")} == {"GPT-NeoX-20B"}
    assert filter_entries(cat) == cat


@pytest.mark.parametrize(
    "kw, says",
    [
        (dict(architecture="rnn"), "--arch rnn: unknown"),
        (dict(min_size=-1.0), "--min-size -1.0"),
        (dict(min_size=10.0, max_size=1.0), "is above --max-size"),
        (dict(since=2023, until=2020), "is after --until"),
    ],
)
def test_filter_errors(cat, kw, says):
    with pytest.raises(UsageError, match=re.escape(says)):
        filter_entries(cat, **kw)


# --- the tree ---


def test_tree_svg_is_valid_and_holds_the_models(cat, tmp_path):
    out = tmp_path / "tree.svg"
    drawn = draw_tree(cat, out)
    assert drawn == sum(e.release is not None for e in cat)
    root = ET.parse(out).getroot()
    assert root.tag.endswith("svg")
    texts = "".join(root.itertext())
    for name in ("GPT-3", "T5", "BERT", "LLaMA", "decoder-only", "encoder-only"):
        assert name in texts
    assert "Qwen2" not in texts  # no release date: left out


def test_tree_png_and_overwrite(cat, tmp_path):
    from PIL import Image

    out = tmp_path / "tree.png"
    few = filter_entries(cat, architecture="encoder-only")
    assert draw_tree(few, out) == len(few)
    with Image.open(out) as im:
        im.verify()
        assert im.format == "PNG" and im.size[0] > 300
    with pytest.raises(UsageError, match="exists; pass --overwrite"):
        draw_tree(few, out)
    draw_tree(cat, out, overwrite=True)
    assert Image.open(out).size[0] > 600
    with pytest.raises(UsageError, match=r"\.svg or \.png, not '\.pdf'"):
        draw_tree(few, tmp_path / "tree.pdf")
    with pytest.raises(UsageError, match="no model to draw"):
        draw_tree([find(cat, "Qwen2")], tmp_path / "t.svg")
    assert not (tmp_path / "tree.pdf").exists() and not (tmp_path / "t.svg").exists()


# --- the command ---


def test_cli_json_filters(monkeypatch, capsys):
    code, out, err = lmlab_here(
        monkeypatch, capsys, "models", "catalog", "--arch", "decoder-only", "--closed",
        "--min-size", "500", "--json",
    )  # fmt: skip
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    # U-PaLM, Flan-U-PaLM and PanGu-Σ are as big, but no survey gives their architecture
    assert {r["name"] for r in rows} == {"PaLM", "Flan-PaLM", "MT-NLG", "GLaM"}
    palm = next(r for r in rows if r["name"] == "PaLM")
    assert palm["hardware"] == "6144 TPU v4" and palm["sources"]["zhao-table1"]


def test_cli_table_and_tree(monkeypatch, capsys, tmp_path):
    import lmlab.console

    monkeypatch.setattr(lmlab.console.console, "_width", 250)
    tree = tmp_path / "t.svg"
    args = ("models", "catalog", "--org", "meta", "--since", "2022", "--tree", str(tree))
    code, out, err = lmlab_here(monkeypatch, capsys, *args)
    assert code == 0, err
    text = out + err
    assert "LLaMA" in text and "OPT-IML" in text and "RoBERTa" not in text
    assert "llama" in text  # the preset column
    assert ET.parse(tree).getroot().tag.endswith("svg")
    code, out, err = lmlab_here(monkeypatch, capsys, *args)
    assert code == 2 and "--overwrite" in err and "Traceback" not in err
    code, out, err = lmlab_here(monkeypatch, capsys, *args, "--overwrite")
    assert code == 0


@pytest.mark.parametrize(
    "args, says",
    [
        (("--arch", "rnn"), "unknown; known: " + ", ".join(ARCHITECTURES)),
        (("--tree", "tree.gif"), ".svg or .png"),
        (("--since", "2024", "--until", "2020"), "after --until"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(monkeypatch, capsys, tmp_path, args, says):
    monkeypatch.chdir(tmp_path)
    code, out, err = lmlab_here(monkeypatch, capsys, "models", "catalog", *args)
    assert code == 2 and says in err
    assert len(err.strip().splitlines()) == 1
