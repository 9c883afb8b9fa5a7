"""lmlab as an lm-evaluation-harness model: the three request types, scored through
`lm_eval.simple_evaluate` on local tasks, agree with a direct computation on the model and
with lm-eval's own `HFLM` on the exported Hugging Face copy of the same checkpoint."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

import torch  # noqa: E402
import yaml  # noqa: E402
from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from lmlab import load_model, load_tokenizer  # noqa: E402
from lmlab.errors import UsageError  # noqa: E402
from lmlab.eval.lmeval import LmlabLM  # noqa: E402
from tests.conftest import lmlab_cmd  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent
TASKS = ROOT / "tests" / "data" / "lmeval_tasks"
ALL = ["lmlab_python_mc", "lmlab_python_lm", "lmlab_python_gen"]
TOL = 1e-4


def rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (TASKS / name).read_text().splitlines() if line]


@pytest.fixture(scope="module")
def ckpt(smoke_run) -> Path:
    return smoke_run / "pretrain" / "model"


@pytest.fixture(scope="module")
def direct(ckpt):
    return load_model(ckpt), load_tokenizer(ckpt)


@pytest.fixture(scope="module")
def lmlab_lm(ckpt) -> LmlabLM:
    return get_model("lmlab").create_from_arg_string(f"path={ckpt},batch_size=3")


@pytest.fixture(scope="module")
def hf_lm(ckpt, tmp_path_factory):
    from lm_eval.models.huggingface import HFLM

    out = tmp_path_factory.mktemp("hf")
    lmlab_cmd("export", str(ckpt), "--out", str(out), cwd=out, check=True)
    return HFLM(pretrained=str(out), batch_size=4, device="cpu")


def evaluate(lm, tasks: list[str], include: Path = TASKS) -> dict:
    """simple_evaluate from the repo root (the YAMLs' data_files are relative to it)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        return simple_evaluate(
            model=lm,
            tasks=tasks,
            task_manager=TaskManager(include_path=str(include), include_defaults=False),
            log_samples=True,
            bootstrap_iters=0,
        )


@pytest.fixture(scope="module")
def ours(lmlab_lm) -> dict:
    return evaluate(lmlab_lm, ALL)


@torch.no_grad()
def logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[i+1] | ids[:i+1]) for one unpadded sequence (the model reads ids[:-1])."""
    assert len(ids) <= model.cfg.max_seq_len + 1
    lp = torch.log_softmax(model(torch.tensor([ids[:-1]])).float()[0], dim=-1)
    return lp.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_registered_on_import():
    assert get_model("lmlab") is LmlabLM


def test_multiple_choice_matches_direct_scoring(ours, direct):
    model, tok = direct
    acc, acc_norm = [], []
    samples = sorted(ours["samples"]["lmlab_python_mc"], key=lambda s: s["doc_id"])
    for doc, sample in zip(rows("mc.jsonl"), samples, strict=True):
        ctx = f"Question: {doc['question']}\nAnswer:"
        n_ctx = len(tok.encode(ctx).ids)
        lls = []
        for choice in doc["choices"]:
            ids = tok.encode(f"{ctx} {choice}").ids
            lls.append(float(logprobs(model, ids)[n_ctx - 1 :].sum()))
        got = [r[0][0] for r in sample["resps"]]
        assert got == pytest.approx(lls, abs=TOL)
        acc.append(max(range(4), key=lambda i: lls[i]) == doc["answer"])
        norm = [ll / len(c) for ll, c in zip(lls, doc["choices"], strict=True)]
        acc_norm.append(max(range(4), key=lambda i: norm[i]) == doc["answer"])
    res = ours["results"]["lmlab_python_mc"]
    assert res["acc,none"] == pytest.approx(sum(acc) / len(acc))
    assert res["acc_norm,none"] == pytest.approx(sum(acc_norm) / len(acc_norm))


def test_rolling_matches_direct_windows(ours, direct):
    """Each token scored once: the chunk of up to L tokens ending at e is read with the
    L tokens before e as context, the first chunk conditioned on EOS."""
    model, tok = direct
    L = model.cfg.max_seq_len
    eos = tok.token_to_id("<|endoftext|>")
    total_ll = total_words = total_bytes = 0
    samples = sorted(ours["samples"]["lmlab_python_lm"], key=lambda s: s["doc_id"])
    windows = []
    for doc, sample in zip(rows("docs.jsonl"), samples, strict=True):
        full = [eos, *tok.encode(doc["text"]).ids]
        n = len(full) - 1
        ll = 0.0
        for s in range(0, n, L):
            e = min(s + L, n)
            lp = logprobs(model, full[max(0, e - L) : e + 1])
            ll += float(lp[-(e - s) :].sum())
        windows.append(math.ceil(n / L))
        assert sample["resps"][0][0] == pytest.approx(ll, abs=TOL)
        total_ll += ll
        total_words += len(re.split(r"\s+", doc["text"]))
        total_bytes += len(doc["text"].encode())
    assert max(windows) >= 3  # the documents do span several windows
    res = ours["results"]["lmlab_python_lm"]
    assert res["word_perplexity,none"] == pytest.approx(math.exp(-total_ll / total_words))
    assert res["byte_perplexity,none"] == pytest.approx(math.exp(-total_ll / total_bytes))
    assert res["bits_per_byte,none"] == pytest.approx(-total_ll / total_bytes / math.log(2))


@torch.no_grad()
def greedy(model, tok, prompt: str, budget: int, stop: str) -> str:
    """Greedy decoding by hand, no KV cache: the prompt keeps its last L - budget tokens."""
    ids = tok.encode(prompt).ids[-(model.cfg.max_seq_len - budget) :]
    eos = tok.token_to_id("<|endoftext|>")
    out: list[int] = []
    for _ in range(budget):
        nxt = int(model(torch.tensor([ids + out]))[0, -1].argmax())
        if nxt == eos:
            break
        out.append(nxt)
        if stop in tok.decode(out):
            break
    return tok.decode(out).split(stop)[0]


def test_generation_matches_greedy_loop_and_filter(ours, direct, lmlab_lm, tmp_path):
    model, tok = direct
    texts = [greedy(model, tok, d["prompt"], 8, "\n") for d in rows("gen.jsonl")]
    words = [m[0] if (m := re.findall(r"\S+", t)) else "[invalid]" for t in texts]
    samples = sorted(ours["samples"]["lmlab_python_gen"], key=lambda s: s["doc_id"])
    assert [s["resps"][0][0] for s in samples] == texts
    assert [s["filtered_resps"][0] for s in samples] == words
    # exact match over the filter: answer half the items with what the model says
    data = rows("gen.jsonl")
    for i, d in enumerate(data):
        if i % 2 == 0:
            d["answer"] = words[i]
    (tmp_path / "gen.jsonl").write_text("".join(json.dumps(d) + "\n" for d in data))
    cfg = yaml.safe_load((TASKS / "lmlab_python_gen.yaml").read_text())
    cfg["task"], cfg["tag"] = "lmlab_python_gen_half", "lmlab_tmp"
    cfg["dataset_kwargs"]["data_files"]["test"] = str(tmp_path / "gen.jsonl")
    (tmp_path / "half.yaml").write_text(yaml.safe_dump(cfg))
    res = evaluate(lmlab_lm, ["lmlab_python_gen_half"], include=tmp_path)
    expect = sum(w == d["answer"] for w, d in zip(words, data, strict=True)) / len(data)
    assert expect >= 0.5
    assert res["results"]["lmlab_python_gen_half"]["exact_match,first_word"] == expect


def test_suite_agrees_with_hflm(ours, hf_lm):
    """The same tasks through lm-eval's Hugging Face model on the exported copy."""
    theirs = evaluate(hf_lm, ALL)
    for task in ALL:
        a = sorted(ours["samples"][task], key=lambda s: s["doc_id"])
        b = sorted(theirs["samples"][task], key=lambda s: s["doc_id"])
        for x, y in zip(a, b, strict=True):
            for rx, ry in zip(x["resps"], y["resps"], strict=True):
                if task == "lmlab_python_gen":
                    assert rx == ry
                elif task == "lmlab_python_lm":
                    assert rx[0] == pytest.approx(ry[0], abs=TOL)
                else:  # (log-likelihood, is greedy) per choice
                    assert rx[0][0] == pytest.approx(ry[0][0], abs=TOL)
                    assert rx[0][1] == ry[0][1]
        for key, value in ours["results"][task].items():
            if isinstance(value, float):
                assert theirs["results"][task][key] == pytest.approx(value, rel=TOL), key


def test_loglikelihood_edge_cases_agree_with_hflm(lmlab_lm, hf_lm, direct):
    """Context truncation, a context ending in whitespace, an empty context, a long
    continuation, and a greedy continuation, on the same requests."""
    model, tok = direct
    long_ctx = "def helper(value):\n    return value\n\n" * 12
    first = tok.decode([int(model(torch.tensor([tok.encode("import").ids]))[0, -1].argmax())])
    pairs = [
        (long_ctx, "def main():\n    pass\n"),
        ("import os\n  ", "import sys"),
        ("", "def f(x):\n    return x\n"),
        ("class A:\n", "    def __init__(self):\n        self.x = 1\n" * 3),
        ("import", first),
    ]
    assert len(tok.encode(long_ctx).ids) > 2 * model.cfg.max_seq_len
    reqs = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
    got, want = lmlab_lm.loglikelihood(reqs), hf_lm.loglikelihood(reqs)
    for (a, ga), (b, gb) in zip(got, want, strict=True):
        assert a == pytest.approx(b, abs=TOL)
        assert ga == gb
    assert got[-1][1] is True  # the model's own next token is its greedy continuation
    rolling = [Instance("loglikelihood_rolling", {}, (long_ctx,), 0)]
    assert lmlab_lm.loglikelihood_rolling(rolling) == pytest.approx(
        hf_lm.loglikelihood_rolling(rolling), abs=TOL
    )


def test_generation_options_and_errors(lmlab_lm, ckpt):
    def gen(**kw):
        return lmlab_lm.generate_until([Instance("generate_until", {}, ("def ", kw), 0)])[0]

    sampled = dict(until=["\n\n"], max_gen_toks=12, do_sample=True, temperature=1.0, seed=3)
    assert gen(**sampled) == gen(**sampled)  # seeded
    assert len({gen(**{**sampled, "seed": s}) for s in range(4)}) > 1
    with pytest.raises(UsageError, match="unsupported num_beams"):
        gen(until=["\n"], num_beams=2)
    with pytest.raises(UsageError, match="max_gen_toks=64"):
        gen(until=["\n"], max_gen_toks=64)
    with pytest.raises(UsageError, match="path=CHECKPOINT is required"):
        LmlabLM()
    with pytest.raises(UsageError, match="unknown dtype"):
        get_model("lmlab").create_from_arg_string(f"path={ckpt},dtype=bfloat16")
    # lm-eval's CLI passes batch_size=1 beside model_args: model_args wins, no clash
    lm = LmlabLM.create_from_arg_string(f"path={ckpt},batch_size=5", {"batch_size": 1})
    assert lm.batch_size == 5 and lm.max_gen_toks == 32 and lm.max_length == 64


def test_command_line(ckpt, tmp_path, ours):
    """`python -m lmlab.eval.lmeval` is lm-eval's CLI with the model registered."""
    proc = subprocess.run(
        [
            sys.executable, "-m", "lmlab.eval.lmeval",
            "--model", "lmlab", "--model_args", f"path={ckpt}",
            "--include_path", str(TASKS), "--tasks", "lmlab_python_mc",
            "--batch_size", "4", "--output_path", str(tmp_path),
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    (result,) = tmp_path.rglob("results_*.json")
    got = json.loads(result.read_text())["results"]["lmlab_python_mc"]
    assert got["acc,none"] == ours["results"]["lmlab_python_mc"]["acc,none"]
    assert got["acc_norm,none"] == ours["results"]["lmlab_python_mc"]["acc_norm,none"]


def test_command_line_bad_usage(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "lmlab.eval.lmeval", "--model", "lmlab",
         "--model_args", f"path={tmp_path / 'missing'}", "--tasks", "lmlab_python_mc",
         "--include_path", str(TASKS)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "missing: no such checkpoint" in proc.stderr.strip().splitlines()[-1]
