"""`lmlab generate` with every strategy and `lmlab bench infer`, as a user runs them."""

from __future__ import annotations

import json

import pytest

from .conftest import lmlab_cmd


def gen(smoke_run, tmp_path, *args):
    return lmlab_cmd(
        "generate", str(smoke_run), "--max-new-tokens", "8", *args, cwd=tmp_path, check=True
    )


def rows(proc) -> list[dict]:
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_generate_strategies_from_the_command_line(smoke_run, tmp_path):
    greedy = rows(gen(smoke_run, tmp_path, "--prompt", "def ", "--json", "--logprobs", "2"))
    assert len(greedy) == 1 and greedy[0]["finish_reason"] in ("stop", "length")
    assert len(greedy[0]["logprobs"]) == len(greedy[0]["tokens"])
    assert all(len(t) == 2 for t in greedy[0]["top_logprobs"])
    # a batch of two prompts, three samples each, seeded
    args = ["--prompt", "def ", "--prompt", "import", "-n", "3", "--temperature", "1", "--json"]
    a = rows(gen(smoke_run, tmp_path, *args, "--seed", "3"))
    b = rows(gen(smoke_run, tmp_path, *args, "--seed", "3"))
    assert [r["prompt"] for r in a] == ["def "] * 3 + ["import"] * 3
    assert a == b
    # beam search: n-best with scores, best first
    beams = rows(
        gen(
            smoke_run,
            tmp_path,
            "--prompt",
            "def ",
            "--num-beams",
            "3",
            "--num-return-sequences",
            "2",
            "--json",
        )
    )
    assert len(beams) == 2 and beams[0]["score"] >= beams[1]["score"]
    # speculative decoding with the model as its own draft equals plain greedy
    spec = gen(smoke_run, tmp_path, "--prompt", "def ", "--draft", str(smoke_run), "--json")
    assert rows(spec)[0]["tokens"] == greedy[0]["tokens"]
    assert "acceptance_rate 1.0" in spec.stderr
    # contrastive decoding runs (expert = amateur is legal, if pointless)
    cd = rows(gen(smoke_run, tmp_path, "--prompt", "def ", "--amateur", str(smoke_run), "--json"))
    assert len(cd) == 1


def test_generate_bad_strategy_settings_exit_2(smoke_run, tmp_path):
    for args in (
        ["--num-beams", "2", "--num-return-sequences", "3"],
        ["--early-stopping", "maybe"],
        ["--min-p", "1.5"],
        ["--draft", str(smoke_run), "--amateur", str(smoke_run)],
    ):
        p = lmlab_cmd("generate", str(smoke_run), "--prompt", "x", *args, cwd=tmp_path)
        assert p.returncode == 2, (args, p.stderr)
        assert "Traceback" not in p.stderr


def test_bench_infer_reports_prefill_decode_latency_and_memory(smoke_run, tmp_path):
    out = tmp_path / "bench.json"
    p = lmlab_cmd(
        "bench",
        "infer",
        str(smoke_run),
        "--batch",
        "1",
        "--batch",
        "3",
        "--prompt-len",
        "16",
        "--new-tokens",
        "8",
        "--repeats",
        "1",
        "--threads",
        "1",
        "--json",
        str(out),
        cwd=tmp_path,
        check=True,
    )
    assert "decode tok/s" in p.stdout
    report = json.loads(out.read_text())
    assert [r["batch"] for r in report["results"]] == [1, 3]
    for r in report["results"]:
        assert r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0
        assert r["latency_ms_p90"] >= r["latency_ms_p50"] > 0
    assert report["peak_memory_mb"] > report["weights_mb"] > 0
    bad = lmlab_cmd("bench", "infer", str(smoke_run), "--new-tokens", "100000", cwd=tmp_path)
    assert bad.returncode == 2 and "max_seq_len" in bad.stderr


def test_export_gguf_from_the_command_line(smoke_run, tmp_path):
    gguf = pytest.importorskip("gguf")
    out = tmp_path / "smoke-q8_0.gguf"
    p = lmlab_cmd(
        "export",
        str(smoke_run),
        "--format",
        "gguf",
        "--qtype",
        "q8_0",
        "--out",
        str(out),
        cwd=tmp_path,
        check=True,
    )
    assert str(out) in p.stdout
    reader = gguf.GGUFReader(out)
    assert "token_embd.weight" in {t.name for t in reader.tensors}
    bad = lmlab_cmd(
        "export",
        str(smoke_run),
        "--format",
        "gguf",
        "--qtype",
        "q3_k",
        "--out",
        str(out),
        cwd=tmp_path,
    )
    assert bad.returncode == 2 and "q3_k" in bad.stderr


def test_quantize_from_the_command_line(smoke_run, tmp_path):
    out = tmp_path / "smoke-int4"
    p = lmlab_cmd(
        "quantize",
        str(smoke_run),
        "--method",
        "int4",
        "--group-size",
        "32",
        "--out",
        str(out),
        "--eval-tokens",
        "4000",
        "--quiet",
        cwd=tmp_path,
        check=True,
    )
    report = json.loads((out / "quantization.json").read_text())
    assert report["method"] == "int4" and "perplexity" in p.stdout.lower()
    # the quantized checkpoint generates through the same command
    g = lmlab_cmd("generate", str(out), "--prompt", "def ", "--max-new-tokens", "4", cwd=tmp_path)
    assert g.returncode == 0, g.stderr
    bad = lmlab_cmd(
        "quantize", str(smoke_run), "--method", "int3", "--out", str(tmp_path / "x"), cwd=tmp_path
    )
    assert bad.returncode == 2 and "int3" in bad.stderr and not (tmp_path / "x").exists()


def test_generation_flags_are_read_from_generation_config():
    """One definition: each flag's default and help text are those of its dataclass field."""
    import dataclasses

    import typer.main

    from lmlab.cli import app
    from lmlab.infer.options import GenerationConfig

    group = typer.main.get_command(app)
    fields = [f for f in dataclasses.fields(GenerationConfig) if f.metadata.get("cli", True)]
    params = {p.name: p for p in group.commands["generate"].params}
    for f in fields:
        p = params[f.name]
        default = None if f.default is dataclasses.MISSING else f.default
        want = str(default).lower() if "parse" in f.metadata else default
        assert p.default == want, f.name  # a list field: None, no stop string given
        assert p.help == f.metadata["help"], f.name
    assert params["stop_strings"].opts == ["--stop"]
    assert set(params["n"].opts) == {"-n", "--n"}
    for verb in ("chat", "judge"):
        (p,) = [p for p in group.commands[verb].params if p.name == "max_new_tokens"]
        assert p.default == GenerationConfig().max_new_tokens == 100


def test_chat_loop_keeps_the_conversation_and_resets_it(smoke_run):
    import io

    from lmlab.infer.options import GenerationConfig
    from lmlab.infer.session import Chat, chat_loop, load_for_generation

    model, tok, cfg, _ = load_for_generation(
        str(smoke_run), GenerationConfig(max_new_tokens=4), stop_at_end_of_turn=True
    )
    assert len(cfg.stop_ids) == 2  # EOS and the end of a turn
    out = io.StringIO()
    stdin = io.StringIO("hello\n/history\n/reset\n\nagain\n/history\n/exit\nnever read\n")
    chat = chat_loop(Chat(model, tok, cfg), stdin, out)
    text = out.getvalue()
    assert text.count("model> ") == 2 and "you> " not in text  # not a terminal: no prompt
    assert text.count("[user] hello") == 1 and "[user] again" in text
    assert [t["role"] for t in chat.history] == ["user", "assistant"]
    assert chat.history[0]["content"] == "again"
