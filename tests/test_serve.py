"""`lmlab serve` through the official `openai` client (sync and async), curl-like raw HTTP
and the Prometheus endpoint, on a small deterministic checkpoint served in this process.

The reference for every greedy answer is `lmlab generate`'s engine (`generate_batch`) on
the same token ids: the server must give the same text, whatever else shares its batch."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time

import httpx
import numpy as np
import pytest
import torch

from lmlab.infer.generate import generate_batch
from lmlab.infer.options import GenerationConfig
from lmlab.serve.app import Settings, create_app
from lmlab.serve.engine import EngineLimits, load_engine
from lmlab.serve.metrics import Metrics
from lmlab.tokenizer.chat import encode_chat, stop_ids_of
from tests.serving import running, tiny_checkpoint

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.usefixtures("one_thread")

KEY = "sk-test-key"
NAME = "tiny"
SMALL = "tiny-small"  # the same weights under another name, with tight limits


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def server(ckpt):
    metrics = Metrics()
    engines = {
        NAME: load_engine(NAME, str(ckpt), EngineLimits(max_concurrency=32), metrics),
        SMALL: load_engine(
            SMALL,
            str(ckpt),
            EngineLimits(max_concurrency=1, max_waiting=0, max_model_len=64),
            metrics,
        ),
    }
    app = create_app(engines, Settings(api_key=KEY, max_body_bytes=64 * 1024))
    with running(app) as url:
        yield url, engines


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0)


def reference(engine, prompt: list[int], chat: bool, **kw) -> tuple[str, list[int], str]:
    """(text, tokens, finish_reason) of greedy `lmlab generate` on these ids."""
    cfg = GenerationConfig(stop_ids=stop_ids_of(engine.tok, chat=chat), **kw)
    c = generate_batch(engine.model, [prompt], cfg, tokenizer=engine.tok)[0]
    return c.text, c.tokens, c.finish_reason


CHAT = [
    {"role": "system", "content": "You are brief."},
    {"role": "user", "content": "Hello world, how are you today?"},
]


# --- the openai client ---------------------------------------------------------------------


def test_models_and_greedy_chat_equal_lmlab_generate(server, client):
    url, engines = server
    ids = [m.id for m in client.models.list().data]
    assert ids == [NAME, SMALL]
    engine = engines[NAME]
    prompt = encode_chat(engine.tok, CHAT)
    text, tokens, finish = reference(engine, prompt, chat=True, max_new_tokens=20)
    assert text.strip()  # the checkpoint says something, so equality means something
    r = client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=20, temperature=0)
    assert r.object == "chat.completion" and r.model == NAME
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == text
    assert r.choices[0].finish_reason == finish
    stopped = finish == "stop"  # the end-of-turn id is generated, and counted, but not shown
    assert r.usage.prompt_tokens == len(prompt)
    assert r.usage.completion_tokens == len(tokens) + stopped
    assert r.usage.total_tokens == len(prompt) + len(tokens) + stopped


def test_streamed_chat_is_the_same_text_with_role_first_and_exact_usage(server, client):
    stream = client.chat.completions.create(
        model=NAME,
        messages=CHAT,
        max_completion_tokens=20,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    full = client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=20, temperature=0)
    assert text == full.choices[0].message.content
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 3  # streamed
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage
    assert all(c.usage is None for c in chunks[:-1])


def test_n_seed_stop_and_logprobs(server, client):
    _, engines = server
    engine = engines[NAME]
    kw = dict(model=NAME, messages=CHAT, max_tokens=16, temperature=1.0, seed=3, n=3)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    texts = [c.message.content for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in b.choices]  # seeded: reproducible
    assert len(set(texts)) > 1  # the samples differ (sample i is seeded seed + i)
    # a stop string: the text ends before it, as in lmlab generate
    greedy, _, _ = reference(engine, encode_chat(engine.tok, CHAT), chat=True, max_new_tokens=30)
    stop = greedy[len(greedy) // 2 : len(greedy) // 2 + 3]
    r = client.chat.completions.create(
        model=NAME, messages=CHAT, max_tokens=30, temperature=0, stop=[stop, "never-there"]
    )
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == greedy[: greedy.index(stop)]
    # log-probs: the model's own, from one forward over the whole sequence
    r = client.chat.completions.create(
        model=NAME, messages=CHAT, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    )
    entries = r.choices[0].logprobs.content
    prompt = encode_chat(engine.tok, CHAT)
    _, tokens, _ = reference(engine, prompt, chat=True, max_new_tokens=6)
    with torch.no_grad():
        full = engine.model(torch.tensor([prompt + tokens]))[0].log_softmax(-1)
    for i, e in enumerate(entries):
        row = full[len(prompt) - 1 + i]
        assert e.logprob == pytest.approx(float(row[tokens[i]]), abs=1e-4)
        assert e.token == engine.tok.decode([tokens[i]], skip_special_tokens=False)
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob >= e.logprob - 1e-6


def test_completions_lists_echo_logprobs_and_streaming(server, client):
    _, engines = server
    engine = engines[NAME]
    prompts = ["The quick brown", "Paris is the"]
    r = client.completions.create(model=NAME, prompt=prompts, max_tokens=8, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    for p, text in enumerate(prompts):
        ids = engine.tok.encode(text).ids
        want, _, _ = reference(engine, ids, chat=False, max_new_tokens=8)
        assert [r.choices[2 * p + j].text for j in range(2)] == [want, want]
    # echo with log-probs: the prompt comes first, its first token has no log-prob
    r = client.completions.create(
        model=NAME, prompt=prompts[0], max_tokens=4, temperature=0, echo=True, logprobs=2
    )
    c = r.choices[0]
    assert c.text.startswith(prompts[0])
    n_prompt = len(engine.tok.encode(prompts[0]).ids)
    assert c.logprobs.token_logprobs[0] is None and c.logprobs.top_logprobs[0] is None
    assert len(c.logprobs.tokens) == n_prompt + r.usage.completion_tokens
    assert all(len(t) <= 2 for t in c.logprobs.top_logprobs[1:])
    # streamed: the same text
    pieces = [
        ch.choices[0].text
        for ch in client.completions.create(
            model=NAME, prompt=prompts[1], max_tokens=8, temperature=0, stream=True
        )
        if ch.choices
    ]
    want, _, _ = reference(engine, engine.tok.encode(prompts[1]).ids, chat=False, max_new_tokens=8)
    assert "".join(pieces) == want


def test_logit_bias_and_ignore_eos(server, client):
    kw = dict(model=NAME, prompt="Hello", max_tokens=5, temperature=0, logit_bias={"0": 100})
    r = client.completions.create(**kw)  # the end of text, made certain, ends it at once
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 1
    r = client.completions.create(**kw, extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5


def test_embeddings_are_mean_pooled_hidden_states(server, client):
    _, engines = server
    engine = engines[NAME]
    texts = ["Hello world", "The quick brown fox"]
    r = client.embeddings.create(model=NAME, input=texts)  # the client asks for base64
    floats = client.embeddings.create(model=NAME, input=texts, encoding_format="float")
    for i, text in enumerate(texts):
        ids = engine.tok.encode(text).ids
        with torch.no_grad():
            want = engine.model(torch.tensor([ids]), hidden=True)[0].mean(0)
        assert np.allclose(r.data[i].embedding, want.numpy(), atol=1e-5)
        assert np.allclose(floats.data[i].embedding, want.numpy(), atol=1e-5)
    assert r.usage.prompt_tokens == sum(len(engine.tok.encode(t).ids) for t in texts)


def test_async_client_32_concurrent_streams_each_equal_its_sequential_result(server):
    _, engines = server
    engine = engines[NAME]
    words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "the",
        "lazy",
        "dog",
        "near",
        "the",
        "river",
        "bank",
    ]
    prompts = [" ".join(words[: 1 + i % len(words)]) + f" {i}" for i in range(32)]
    budgets = [4 + (7 * i) % 29 for i in range(32)]
    want = [
        reference(engine, engine.tok.encode(p).ids, chat=False, max_new_tokens=m)[0]
        for p, m in zip(prompts, budgets, strict=True)
    ]

    async def main():
        aclient = openai.AsyncOpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0)

        async def one(p, m):
            stream = await aclient.completions.create(
                model=NAME, prompt=p, max_tokens=m, temperature=0, stream=True
            )
            return "".join([c.choices[0].text async for c in stream if c.choices])

        try:
            return await asyncio.gather(*(one(p, m) for p, m in zip(prompts, budgets, strict=True)))
        finally:
            await aclient.close()

    before = engine.sched.stats.peak_batch
    assert asyncio.run(main()) == want
    assert engine.sched.stats.peak_batch > max(before, 4)  # they really shared the batch


# --- errors, limits and the state they leave ------------------------------------------------


def error_of(resp: httpx.Response) -> dict:
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in resp.text
    return body["error"]


def test_errors_have_the_right_status_and_openai_shape(server):
    url = server[0]
    auth = {"Authorization": f"Bearer {KEY}"}
    chat = {"model": NAME, "messages": CHAT, "max_tokens": 4}
    post = lambda path, **kw: httpx.post(url + path, timeout=30, **kw)  # noqa: E731
    # key: missing or wrong -> 401; the page and health need none
    assert post("/v1/chat/completions", json=chat).status_code == 401
    r = post("/v1/chat/completions", json=chat, headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401 and error_of(r)["code"] == "invalid_api_key"
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    # malformed JSON, wrong keys, impossible values -> 400
    r = post("/v1/chat/completions", content=b"{bad json", headers=auth)
    assert r.status_code == 400 and error_of(r)["code"] == "invalid_json"
    r = post("/v1/chat/completions", json={**chat, "max_token": 3}, headers=auth)
    assert r.status_code == 400 and error_of(r)["param"] == "max_token"
    for field, value in [("n", 17), ("n", 0), ("temperature", -1), ("top_p", 0)]:
        r = post("/v1/chat/completions", json={**chat, field: value}, headers=auth)
        assert r.status_code == 400 and error_of(r)["param"] == field, (field, value)
    r = post("/v1/chat/completions", json={**chat, "max_tokens": 10_000}, headers=auth)
    e = error_of(r)
    assert r.status_code == 400 and e["code"] == "context_length_exceeded" and "192" in e["message"]
    r = post("/v1/completions", json={"model": NAME, "prompt": "x", "suffix": "y"}, headers=auth)
    assert r.status_code == 400 and error_of(r)["param"] == "suffix"
    r = post("/v1/chat/completions", json={**chat, "tools": [{"type": "function"}]}, headers=auth)
    assert r.status_code == 400 and error_of(r)["param"] == "tools"
    r = post("/v1/chat/completions", json={**chat, "logit_bias": {"99999": 5}}, headers=auth)
    assert r.status_code == 400 and "logit_bias" in error_of(r)["message"]
    # unknown model or route -> 404; too big a body -> 413
    r = post("/v1/chat/completions", json={**chat, "model": "gpt-9"}, headers=auth)
    assert r.status_code == 404 and error_of(r)["code"] == "model_not_found"
    r = httpx.get(url + "/v1/nothing", headers=auth)
    assert r.status_code == 404 and error_of(r)["type"] == "not_found_error"
    big = {**chat, "messages": [{"role": "user", "content": "x" * 70_000}]}
    r = post("/v1/chat/completions", json=big, headers=auth)
    assert r.status_code == 413 and error_of(r)["code"] == "request_too_large"
    # the openai client raises its own typed errors on these
    c = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        c.models.list()


def metric(url: str, name: str, model: str = NAME) -> float:
    text = httpx.get(url + "/metrics").text
    m = re.search(rf'^{name}{{model="{re.escape(model)}"}} (\S+)$', text, flags=re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def test_a_client_that_disconnects_mid_stream_frees_its_blocks(server):
    url, engines = server
    aborted = metric(url, "lmlab_requests_aborted_total")
    body = {
        "model": NAME,
        "prompt": "The quick brown",
        "max_tokens": 150,
        "stream": True,
        "temperature": 0,
        "logit_bias": {"0": -100},
    }  # no early end of text
    with httpx.stream(
        "POST", url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
    ) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: {") for line in got)
        assert metric(url, "lmlab_kv_blocks_used") > 0
    deadline = time.monotonic() + 10
    while metric(url, "lmlab_kv_blocks_used") > 0 or metric(url, "lmlab_requests_running") > 0:
        assert time.monotonic() < deadline, "the blocks of a gone client were not freed"
        time.sleep(0.05)
    assert metric(url, "lmlab_requests_aborted_total") == aborted + 1
    assert engines[NAME].sched.stats.generated_tokens < 10_000


def test_capacity_429_and_metrics(server, client, monkeypatch):
    url, engines = server
    small = engines[SMALL]
    step = small.sched.step

    def slow_step():  # a slow model: the first request is surely still running
        time.sleep(0.02)
        return step()

    monkeypatch.setattr(small.sched, "step", slow_step)
    auth = {"Authorization": f"Bearer {KEY}"}
    body = {
        "model": SMALL,
        "prompt": "The quick",
        "max_tokens": 40,
        "stream": True,
        "logit_bias": {"0": -100},
    }
    with httpx.stream("POST", url + "/v1/completions", json=body, headers=auth) as r:
        lines = r.iter_lines()  # kept: a dropped iterator closes the stream
        next(lines)  # one sequence running: the only place
        r2 = httpx.post(url + "/v1/completions", json={**body, "stream": False}, headers=auth)
        assert r2.status_code == 429, r2.text
        assert error_of(r2)["type"] == "rate_limit_error"
    # max_model_len of the small one is 64
    r = httpx.post(url + "/v1/completions", json={**body, "max_tokens": 63}, headers=auth)
    assert r.status_code == 400 and "64" in error_of(r)["message"]
    assert small.limits.max_model_len == 64
    text = httpx.get(url + "/metrics").text
    for name in ("lmlab_time_to_first_token_seconds", "lmlab_inter_token_latency_seconds"):
        assert f"# TYPE {name} histogram" in text
        count = re.search(rf'^{name}_count{{model="{NAME}"}} (\d+)', text, flags=re.M)
        assert count and int(count.group(1)) > 0
    assert metric(url, "lmlab_generation_tokens_total") > 0
    assert metric(url, "lmlab_prompt_tokens_total") > 0
    assert metric(url, "lmlab_requests_waiting") == 0


def test_timeout_is_504_and_frees_the_request(ckpt):
    engine = load_engine(NAME, str(ckpt), EngineLimits(max_concurrency=2), Metrics())
    # 180 tokens take far longer than 0.05 s here; 0.2 s was within reach of a fast CPU
    with running(create_app({NAME: engine}, Settings(request_timeout=0.05))) as url:
        body = {
            "model": NAME,
            "prompt": "The quick",
            "max_tokens": 180,
            "temperature": 0,
            "ignore_eos": True,
            "repetition_penalty": 1.1,
        }
        r = httpx.post(url + "/v1/completions", json=body, timeout=30)
        assert r.status_code == 504 and error_of(r)["type"] == "timeout_error"
        deadline = time.monotonic() + 10
        while engine.sched.has_work():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert engine.sched.cache.alloc.used == 0


def test_tokenize_detokenize_round_trip(server):
    url, engines = server
    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(url + "/tokenize", json={"model": NAME, "prompt": "Hello world"}, headers=auth)
    body = r.json()
    assert body["tokens"] == engines[NAME].tok.encode("Hello world").ids
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == 192
    r = httpx.post(
        url + "/detokenize", json={"model": NAME, "tokens": body["tokens"]}, headers=auth
    )
    assert r.json() == {"prompt": "Hello world"}
    r = httpx.post(url + "/tokenize", json={"model": NAME, "messages": CHAT}, headers=auth)
    assert r.json()["tokens"] == encode_chat(engines[NAME].tok, CHAT)
    r = httpx.post(url + "/detokenize", json={"model": NAME, "tokens": [10**6]}, headers=auth)
    assert r.status_code == 400


def test_page_is_served_with_a_policy_that_allows_only_its_own_scripts(server):
    r = httpx.get(server[0] + "/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    csp = r.headers["content-security-policy"]
    assert "script-src 'sha256-" in csp and "unsafe-inline" not in csp.split("style-src")[0]
    assert "connect-src 'self'" in csp
    assert not re.search(r"<(script|link)[^>]+(src|href)=[\"']?(https?:)?//", r.text)  # no CDN


def test_prometheus_text_parses(server):
    text = httpx.get(server[0] + "/metrics").text
    for line in text.splitlines():
        assert line.startswith("#") or re.match(r"^[a-z_:]+(\{[^}]*\})? [-+0-9.eInf]+$", line), line
    json.dumps(text)
    base64.b64encode(text.encode())


# --- lmlab chat --url: the terminal chat over the same protocol ----------------------------


def test_chat_url_talks_to_the_server_and_keeps_the_history(server, monkeypatch, capsys):
    import io

    from tests.conftest import lmlab_here

    url, engines = server
    engine = engines[NAME]
    first = "Hello world, how are you today?"
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{first}\nAnd then?\n/history\n"))
    code, out, err = lmlab_here(
        monkeypatch, capsys, "chat", "--url", url, "--api-key", KEY, "--max-new-tokens", "12"
    )
    assert code == 0, err
    turn1 = [{"role": "user", "content": first}]
    want1, _, _ = reference(engine, encode_chat(engine.tok, turn1), chat=True, max_new_tokens=12)
    turn2 = [
        *turn1,
        {"role": "assistant", "content": want1},
        {"role": "user", "content": "And then?"},
    ]
    want2, _, _ = reference(engine, encode_chat(engine.tok, turn2), chat=True, max_new_tokens=12)
    # the second turn was answered with the history
    assert out.startswith(f"model> {want1}\nmodel> {want2}\n")
    assert f"[assistant] {want2}" in out
    # refused and unreachable: one clear line, exit 2
    for args, said in [
        (["--url", url, "--api-key", "wrong"], "401"),
        (["nope", "--url", url, "--api-key", KEY], "does not serve 'nope'"),
        (["--url", "http://127.0.0.1:9"], "no answer from the server"),
        (["--url", "ftp://x"], "http://"),
    ]:
        code, out, err = lmlab_here(monkeypatch, capsys, "chat", *args)
        assert code == 2 and said in err, (args, err)


# --- the command ---------------------------------------------------------------------------


def test_lmlab_serve_command_serves_adapters_and_stops_on_ctrl_c(
    ckpt, tmp_path, monkeypatch, capsys
):
    import os
    import signal
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "lmlab.cli", "serve", str(ckpt), "--port", str(port)]
    proc = subprocess.Popen(
        [*cmd, "--name", "base", "--adapter", f"other={ckpt}", "--max-concurrency", "4"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "LMLAB_API_KEY": "k"},
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.2)
        auth = {"Authorization": "Bearer k"}  # the key came from the environment
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers=auth).json()
        assert [m["id"] for m in models["data"]] == ["base", "other"]
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 401
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "serving base" in err and "serving other" in err
    # bad input: one clear line, exit 2, before anything listens (in this process: quicker)
    from tests.conftest import lmlab_here

    for args, said in [
        ([str(tmp_path / "missing")], "missing"),
        ([str(ckpt), "--adapter", "no-equals-sign"], "NAME=DIR"),
        ([str(ckpt), "--adapter", f"{ckpt}={ckpt}", "--name", str(ckpt)], "must differ"),
        ([str(ckpt), "--max-model-len", "100000"], "--max-model-len"),
        ([str(ckpt), "--port", "70000"], "--port"),
    ]:
        code, _, err = lmlab_here(monkeypatch, capsys, "serve", *args)
        assert code == 2 and said in err, (args, err)


def test_streamed_text_is_the_whole_decode_cut_at_a_stop(ckpt):
    """The incremental decoding (a short window per token) adds up to the whole decode,
    never shows half a character, and never shows a stop string or its beginning."""
    from lmlab.infer.generate import TextStreamer
    from lmlab.serve.text import TextStream
    from lmlab.tokenizer import load_tokenizer

    tok = load_tokenizer(ckpt)
    text = "Héllo wörld 🙂, naïve café; the quick brown fox 日本 jumps.\n\tdone"
    ids = tok.encode(text).ids
    streamer = TextStreamer(tok)
    pieces = [streamer.push(i) for i in ids]
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)
    for stop in ["café", "🙂", "fox 日", "absent"]:
        stream = TextStream(tok, [stop])
        shown = [stream.push(i) for i in ids] + [stream.finish()]
        assert "".join(shown) == text.split(stop)[0]
