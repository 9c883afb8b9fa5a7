"""The HTTP API: OpenAI's shapes (vLLM's server is the reference for what they mean) on
lmlab's engines, plus the web chat page at `/`.

Every error leaves as OpenAI's `{"error": {"message", "type", "param", "code"}}` with its
status: 400 bad request, 401 bad key, 404 unknown model or route, 413 body too large, 429
at capacity, 504 past the request timeout, 500 anything unexpected, whose details go to the
server's log, never to the client.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib import resources

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from lmlab.errors import UsageError
from lmlab.infer.options import GenerationConfig
from lmlab.infer.scheduler import Event
from lmlab.serve.engine import Busy, Engine, Handle
from lmlab.serve.metrics import Metrics
from lmlab.serve.protocol import (
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    Message,
    TokenizeRequest,
    refused,
)
from lmlab.serve.text import TextStream
from lmlab.serve.tooling import ToolStream, tool_message, tool_turn, with_tools
from lmlab.tokenizer.chat import encode_chat, stop_ids_of

log = logging.getLogger("lmlab.serve")


@dataclass
class Settings:
    api_key: str | None = None
    max_body_bytes: int = 4 * 2**20
    request_timeout: float = 600.0


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type,
            param,
            code,
        )

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


STATUS_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


class BodyGuard:
    """Refuse request bodies over `limit` bytes (413), by their declared length or, for a
    chunked body, as soon as the bytes read pass it. Every body is read as JSON whatever
    its declared type (`curl -d` says form-encoded), so a malformed one is named as such."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope["method"] == "POST":
            headers = [(k, v) for k, v in scope.get("headers") or [] if k != b"content-type"]
            scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_big = APIError(413, f"request body over {self.limit} bytes", code="request_too_large")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await too_big.response()(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise HTTPException(413, too_big.message)
            return message

        return await self.app(scope, limited, send)


def create_app(engines: dict[str, Engine], settings: Settings | None = None) -> FastAPI:
    """The server's ASGI app; the engines start with it and stop with it."""
    from contextlib import asynccontextmanager

    settings = settings or Settings()
    metrics = next(iter(engines.values())).metrics if engines else Metrics()
    _register_gauges(metrics, engines)

    @asynccontextmanager
    async def lifespan(_app):
        for engine in engines.values():
            engine.start()
        yield
        for engine in engines.values():
            engine.stop()

    app = FastAPI(title="lmlab", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.add_middleware(BodyGuard, limit=settings.max_body_bytes)
    _errors(app)

    def auth(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), settings.api_key.encode()
        )
        if not ok:
            raise APIError(401, "Incorrect or missing API key.", code="invalid_api_key")

    def engine_of(name: str) -> Engine:
        if name not in engines:
            raise APIError(
                404, f"The model `{name}` does not exist.", param="model", code="model_not_found"
            )
        return engines[name]

    keyed = [Depends(auth)]

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        html, csp = _page()
        return HTMLResponse(html, headers={"Content-Security-Policy": csp})

    @app.get("/health")
    async def health() -> JSONResponse:
        dead = [n for n, e in engines.items() if not e.thread.is_alive()]
        if dead:
            return JSONResponse({"status": "error", "dead": dead}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=keyed)
    async def models() -> dict:
        return {"object": "list", "data": [_card(n, e) for n, e in engines.items()]}

    @app.get("/v1/models/{name:path}", dependencies=keyed)
    async def model(name: str) -> dict:
        return _card(name, engine_of(name))

    @app.post("/v1/chat/completions", dependencies=keyed)
    async def chat(body: ChatRequest, request: Request):
        engine = engine_of(body.model)
        _refuse(body)
        turns = with_tools([_turn(m) for m in body.messages], body.tools, body.tool_choice)
        prompt = encode_chat(engine.tok, turns)
        want = body.max_completion_tokens or body.max_tokens
        param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        cfg = _config(body, engine, len(prompt), want, param, chat=True)
        cfg.logprobs = (body.top_logprobs or 0) if body.logprobs else None
        handle = _submit(engine, prompt, cfg)
        run = Generation(engine, handle, cfg, settings.request_timeout)
        tools = body.tools if body.tool_choice != "none" else None
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return _sse(_chat_chunks(run, body.model, usage, tools), run)
        await run.wait(request)
        choices = []
        for i, c in enumerate(run.choices):
            message, called = tool_message(c.text.text, tools)
            choices.append(
                {
                    "index": i,
                    "message": message,
                    "logprobs": {"content": c.chat_logprobs(c.logprobs)}
                    if cfg.logprobs is not None
                    else None,
                    "finish_reason": "tool_calls" if called else c.finish_reason,
                }
            )
        return {
            **_head("chatcmpl", "chat.completion", body.model),
            "choices": choices,
            "usage": run.usage(),
        }

    @app.post("/v1/completions", dependencies=keyed)
    async def completions(body: CompletionRequest, request: Request):
        engine = engine_of(body.model)
        _refuse(body)
        prompts = _prompts(body.prompt, engine, "prompt")
        cfgs = []
        for ids in prompts:  # every prompt checked before any is queued
            cfg = _config(body, engine, len(ids), body.max_tokens, "max_tokens", chat=False)
            cfg.logprobs = body.logprobs
            cfgs.append(cfg)
        echoed = [None] * len(prompts)
        if body.echo and body.logprobs is not None:
            echoed = [
                await asyncio.to_thread(_prompt_logprobs, engine, ids, body.logprobs)
                for ids in prompts
            ]
        runs = []
        try:
            for ids, cfg, lps in zip(prompts, cfgs, echoed, strict=True):
                handle = _submit(engine, ids, cfg)
                runs.append(Generation(engine, handle, cfg, settings.request_timeout, ids))
                runs[-1].prompt_logprobs = lps
        except BaseException:
            for run in runs:
                engine.abort(run.handle)
            raise
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return _sse(_completion_chunks(runs, body, usage), *runs)
        await asyncio.gather(*(run.wait(request) for run in runs))
        choices = []
        for p, run in enumerate(runs):
            for j, c in enumerate(run.choices):
                prefix = engine.tok.decode(run.prompt) if body.echo else ""
                choices.append(
                    {
                        "index": p * body.n + j,
                        "text": prefix + c.text.text,
                        "logprobs": _legacy_logprobs(run, c, body.echo, len(prefix))
                        if body.logprobs is not None
                        else None,
                        "finish_reason": c.finish_reason,
                    }
                )
        return {
            **_head("cmpl", "text_completion", body.model),
            "choices": choices,
            "usage": _sum_usage([r.usage() for r in runs]),
        }

    @app.post("/v1/embeddings", dependencies=keyed)
    async def embeddings(body: EmbeddingRequest):
        engine = engine_of(body.model)
        _refuse(body)
        inputs = _prompts(body.input, engine, "input")
        vectors = await asyncio.to_thread(_embed, engine, inputs)
        data = []
        for i, v in enumerate(vectors):
            if body.encoding_format == "base64":
                value = base64.b64encode(v.numpy().astype("<f4").tobytes()).decode()
            else:
                value = v.tolist()
            data.append({"object": "embedding", "index": i, "embedding": value})
        n = sum(len(x) for x in inputs)
        return {
            "object": "list",
            "data": data,
            "model": body.model,
            "usage": {"prompt_tokens": n, "total_tokens": n},
        }

    @app.post("/tokenize", dependencies=keyed)
    async def tokenize(body: TokenizeRequest) -> dict:
        engine = engine_of(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt and messages", param="prompt")
        if body.messages is not None:
            turns = [_turn(m) for m in body.messages]
            ids = encode_chat(engine.tok, turns, body.add_generation_prompt)
        else:
            ids = engine.tok.encode(body.prompt, add_special_tokens=body.add_special_tokens).ids
        return {"count": len(ids), "max_model_len": engine.max_len, "tokens": ids}

    @app.post("/detokenize", dependencies=keyed)
    async def detokenize(body: DetokenizeRequest) -> dict:
        engine = engine_of(body.model)
        _check_ids(body.tokens, engine, "tokens")
        return {"prompt": engine.tok.decode(body.tokens, skip_special_tokens=False)}

    return app


# --- generation: one request's samples as they come ---------------------------------------


class Choice:
    """One sample's text, tokens, log-probs and end."""

    def __init__(self, tok, cfg: GenerationConfig) -> None:
        self.tok, self.cfg = tok, cfg
        self.text = TextStream(tok, cfg.stop_strings)
        self.tokens: list[int] = []
        self.logprobs: list[tuple[int, float, list[tuple[int, float]]]] = []
        self.generated = 0  # usage: every token the model produced, a stop id included
        self.finish_reason: str | None = None

    def absorb(self, ev: Event) -> tuple[str, list]:
        """The text this event releases, and its (token, logprob, top) items."""
        self.generated += 1
        delta, items = "", []
        stop_id = ev.finish_reason == "stop" and ev.token in self.cfg.stop_ids
        if not stop_id:
            self.tokens.append(ev.token)
            delta = self.text.push(ev.token)
            if ev.logprob is not None:
                items.append((ev.token, ev.logprob, ev.top_logprobs or []))
        if ev.finished:
            self.finish_reason = ev.finish_reason
            delta += self.text.finish()
        self.logprobs += items
        return delta, items

    def chat_logprobs(self, items: list) -> list[dict]:
        """OpenAI chat log-prob entries: token text, log-prob, UTF-8 bytes, the top ones."""

        def one(t: int, x: float) -> dict:
            s = self.tok.decode([t], skip_special_tokens=False)
            return {"token": s, "logprob": x, "bytes": list(s.encode())}

        return [
            {**one(t, lp), "top_logprobs": [one(u, x) for u, x in tops]} for t, lp, tops in items
        ]


class Generation:
    """A submitted request: its samples' choices, filled as events arrive."""

    def __init__(
        self, engine: Engine, handle: Handle, cfg: GenerationConfig, timeout: float, prompt=None
    ) -> None:
        self.engine, self.handle, self.cfg = engine, handle, cfg
        self.deadline = time.monotonic() + timeout
        self.timeout = timeout
        self.choices = [Choice(engine.tok, cfg) for _ in range(handle.n)]
        self.prompt: list[int] = list(prompt or [])
        self.prompt_logprobs: list[tuple[float | None, dict | None]] | None = None
        self.left = handle.n

    async def events(self, request: Request | None = None) -> AsyncIterator[tuple[int, Event]]:
        """(choice index, event) until every sample ended. Past the deadline, or when the
        client of a non-streamed request disconnects, the request is aborted (a streamed
        one is aborted by the cancellation its disconnect raises here)."""
        try:
            while self.left:
                remaining = self.deadline - time.monotonic()
                if remaining <= 0:
                    raise APIError(
                        504,
                        f"request timed out after {self.timeout:g} s",
                        type="timeout_error",
                        code="timeout",
                    )
                try:  # what has arrived needs no timer (`wait_for` makes a task per call)
                    item = self.handle.queue.get_nowait()
                except asyncio.QueueEmpty:
                    try:
                        item = await asyncio.wait_for(self.handle.queue.get(), min(remaining, 0.5))
                    except TimeoutError:
                        if request is not None and await request.is_disconnected():
                            return
                        continue
                if isinstance(item, BaseException):
                    raise APIError(500, "generation failed; see the server log", "server_error")
                for ev in item:
                    index = self.handle.ids.index(ev.request_id)
                    if ev.finished:
                        self.left -= 1
                    yield index, ev
        finally:
            self.engine.abort(self.handle)  # a no-op when it finished

    async def wait(self, request: Request | None) -> None:
        async for index, ev in self.events(request):
            self.choices[index].absorb(ev)
        if self.left:
            raise APIError(499, "client closed the request")

    def usage(self) -> dict:
        out = sum(c.generated for c in self.choices)
        n_in = self.handle.prompt_tokens
        return {"prompt_tokens": n_in, "completion_tokens": out, "total_tokens": n_in + out}


def _sum_usage(usages: list[dict]) -> dict:
    return {
        k: sum(u[k] for u in usages) for k in ("prompt_tokens", "completion_tokens", "total_tokens")
    }


def _head(prefix: str, obj: str, model: str) -> dict:
    return {
        "id": f"{prefix}-{uuid.uuid4().hex}",
        "object": obj,
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": None,
    }


def _sse(chunks: AsyncIterator[dict], *runs: Generation) -> StreamingResponse:
    async def body():
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
        except APIError as e:
            yield f"data: {json.dumps(e.body())}\n\n"
        finally:
            for run in runs:
                run.engine.abort(run.handle)
        yield "data: [DONE]\n\n"

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(body(), media_type="text/event-stream", headers=headers)


async def _chat_chunks(
    run: Generation, model: str, include_usage: bool, tools: list[dict] | None = None
) -> AsyncIterator[dict]:
    """Chat chunks as the samples grow. With tools, what could be a tool call is held
    back (`ToolStream`), and log-probs go out with the text they belong to."""
    head = _head("chatcmpl", "chat.completion.chunk", model)
    extra = {"usage": None} if include_usage else {}

    def chunk(index: int, delta: dict, finish=None, logprobs=None) -> dict:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return {**head, "choices": [choice], **extra}

    def lps(c: Choice, items: list) -> dict | None:
        return {"content": c.chat_logprobs(items)} if run.cfg.logprobs is not None else None

    streams = [ToolStream(tools) if tools else None for _ in range(run.handle.n)]
    pending: list[list] = [[] for _ in range(run.handle.n)]
    for i in range(run.handle.n):
        yield chunk(i, {"role": "assistant", "content": ""})
    async for index, ev in run.events():
        c, ts = run.choices[index], streams[index]
        delta, items = c.absorb(ev)
        finish = c.finish_reason
        if ts is not None:
            pending[index] += items
            delta = ts.release(c.text.text) if not ev.finished else ""
            items = pending[index] if delta else []
            if ev.finished:
                rest, calls = ts.finish(c.text.text)
                if calls:
                    yield chunk(index, {"tool_calls": calls}, logprobs=lps(c, pending[index]))
                    pending[index], finish = [], "tool_calls"
                else:
                    delta, items = rest, pending[index]
            if delta:
                pending[index] = []
        if delta or items:
            yield chunk(index, {"content": delta}, logprobs=lps(c, items))
        if ev.finished:
            yield chunk(index, {}, finish=finish)
    if include_usage:
        yield {**head, "choices": [], "usage": run.usage()}


async def _completion_chunks(
    runs: list[Generation], body: CompletionRequest, include_usage: bool
) -> AsyncIterator[dict]:
    head = _head("cmpl", "text_completion", body.model)
    extra = {"usage": None} if include_usage else {}
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(p: int, run: Generation) -> None:
        try:
            async for index, ev in run.events():
                await queue.put((p, index, ev))
        except APIError as e:
            await queue.put(e)
        finally:
            await queue.put(None)

    tasks = [asyncio.create_task(pump(p, run)) for p, run in enumerate(runs)]
    try:
        if body.echo:
            for p, run in enumerate(runs):
                text = runs[p].engine.tok.decode(run.prompt)
                for j in range(body.n):
                    yield {**head, "choices": [_ctext(p * body.n + j, text)], **extra}
        open_ = len(runs)
        while open_:
            item = await queue.get()
            if item is None:
                open_ -= 1
                continue
            if isinstance(item, APIError):
                raise item
            p, index, ev = item
            c = runs[p].choices[index]
            delta, items = c.absorb(ev)
            lps = _legacy_entry(c.tok, items) if body.logprobs is not None and items else None
            if delta or lps:
                yield {**head, "choices": [_ctext(p * body.n + index, delta, lps)], **extra}
            if ev.finished:
                yield {
                    **head,
                    "choices": [_ctext(p * body.n + index, "", None, c.finish_reason)],
                    **extra,
                }
        if include_usage:
            yield {**head, "choices": [], "usage": _sum_usage([r.usage() for r in runs])}
    finally:
        for t in tasks:
            t.cancel()


def _ctext(index: int, text: str, logprobs=None, finish=None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}


def _legacy_entry(tok, items: list[tuple[int, float | None, list]], offset: int = 0) -> dict:
    """The completions API's log-probs: parallel lists of tokens, their log-probs, a dict of
    the top ones per position, and each token's character offset."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token, lp, tops in items:
        s = tok.decode([token], skip_special_tokens=False)
        out["tokens"].append(s)
        out["token_logprobs"].append(lp)
        out["top_logprobs"].append(
            None if lp is None else {tok.decode([t], skip_special_tokens=False): x for t, x in tops}
        )
        out["text_offset"].append(offset)
        offset += len(s)
    return out


def _legacy_logprobs(run: Generation, c: Choice, echo: bool, start: int) -> dict:
    """A choice's log-probs for the completions API; with echo, the prompt's first (the
    first token has no log-prob: nothing predicts it)."""
    items: list = []
    if echo and run.prompt_logprobs is not None:
        items += [
            (t, lp, tops) for t, (lp, tops) in zip(run.prompt, run.prompt_logprobs, strict=True)
        ]
    return _legacy_entry(c.tok, items + c.logprobs, 0 if echo else start)


# --- requests to prompts and configs -------------------------------------------------------


def _refuse(body) -> None:
    bad = refused(body)
    if bad is not None:
        raise APIError(400, bad[1], param=bad[0], code="unsupported_parameter")


def _turn(m: Message) -> dict:
    """A message as the chat template takes it: text only; OpenAI's `developer` role is the
    system prompt of older models."""
    if m.content is None or isinstance(m.content, str):
        text = m.content or ""
    else:
        kinds = {p.type for p in m.content} - {"text"}
        if kinds:
            raise APIError(
                400, f"only text content is supported, got {sorted(kinds)}", param="messages"
            )
        text = "".join(p.text or "" for p in m.content)
    if m.role == "tool" or (m.role == "assistant" and (m.model_extra or {}).get("tool_calls")):
        return tool_turn(m.role, text, m.model_extra or {})
    role = "system" if m.role == "developer" else m.role
    return {"role": role, "content": text}


def _config(body, engine: Engine, prompt_len: int, want: int | None, param: str, chat: bool):
    """The request's `GenerationConfig`; prompt + max tokens must fit the model's length
    (refused here, as OpenAI does, rather than cut short later)."""
    room = engine.max_len - prompt_len
    if room < 1 or (want is not None and want > room):
        asked = prompt_len + (want or 1)
        raise APIError(
            400,
            f"This model's maximum context length is {engine.max_len} tokens. However, you "
            f"requested {asked} tokens ({prompt_len} in the "
            f"{'messages' if chat else 'prompt'}, {want or 1} for the completion). Please "
            "reduce the length of the messages or completion.",
            param=param if room >= 1 else ("messages" if chat else "prompt"),
            code="context_length_exceeded",
        )
    stop_ids = [] if body.ignore_eos else stop_ids_of(engine.tok, chat=chat)
    try:
        return body.generation(room if want is None else want, stop_ids, None).validate()
    except (ValueError, UsageError) as e:
        raise APIError(400, str(e)) from None


def _submit(engine: Engine, prompt: list[int], cfg: GenerationConfig) -> Handle:
    try:
        return engine.submit(prompt, cfg)
    except Busy as e:
        raise APIError(429, str(e), type="rate_limit_error", code="server_busy") from None


def _check_ids(ids: list[int], engine: Engine, param: str) -> None:
    vocab = engine.model.cfg.vocab_size
    if any(not 0 <= t < vocab for t in ids):
        raise APIError(400, f"token ids must be in [0, {vocab})", param=param)


def _prompts(value, engine: Engine, param: str) -> list[list[int]]:
    """A prompt (or embedding input) as OpenAI allows it: text, texts, ids, lists of ids."""
    if isinstance(value, str):
        value = [value]
    if not value:
        raise APIError(400, f"{param} is empty", param=param)
    if all(isinstance(x, int) for x in value):
        value = [value]
    out = []
    for x in value:
        ids = engine.tok.encode(x).ids if isinstance(x, str) else list(x)
        if not ids:
            raise APIError(400, f"{param}: an empty prompt has nothing to continue", param=param)
        _check_ids(ids, engine, param)
        if len(ids) > engine.max_len:
            raise APIError(
                400,
                f"{param} of {len(ids)} tokens exceeds the model's maximum context length "
                f"({engine.max_len})",
                param=param,
                code="context_length_exceeded",
            )
        out.append(ids)
    return out


# --- forwards outside the scheduler ---------------------------------------------------------


@torch.no_grad()
def _embed(engine: Engine, inputs: list[list[int]]) -> list[torch.Tensor]:
    """Mean of the final hidden states over the input's tokens (after the final norm): a
    decoder's embedding, not a trained sentence encoder's."""
    device = next(engine.model.parameters()).device
    out = []
    for ids in inputs:
        h = engine.model(torch.tensor([ids], device=device), hidden=True)
        out.append(h[0].float().mean(0).cpu())
    return out


@torch.no_grad()
def _prompt_logprobs(engine: Engine, ids: list[int], k: int) -> list:
    """Each prompt token's log-prob under the model given the tokens before it, and the
    top k there; the first token has none."""
    device = next(engine.model.parameters()).device
    logits = engine.model(torch.tensor([ids], device=device))[0].float().log_softmax(-1).cpu()
    out: list = [(None, [])]
    for i in range(1, len(ids)):
        row = logits[i - 1]
        tops = []
        if k:
            vals, idx = row.topk(k)
            tops = list(zip(idx.tolist(), vals.tolist(), strict=True))
        out.append((float(row[ids[i]]), tops))
    return out


# --- the rest ---------------------------------------------------------------------------------


def _card(name: str, engine: Engine) -> dict:
    return {
        "id": name,
        "object": "model",
        "created": int(engine.created),
        "owned_by": "lmlab",
        "root": engine.path,
        "max_model_len": engine.max_len,
    }


def _register_gauges(metrics: Metrics, engines: dict[str, Engine]) -> None:
    def each(f):
        return lambda: {n: f(e) for n, e in engines.items()}

    metrics.gauge(
        "lmlab_requests_running", "Sequences in the running batch.", each(lambda e: e.running)
    )
    metrics.gauge(
        "lmlab_requests_waiting", "Sequences waiting for a place.", each(lambda e: e.waiting)
    )
    metrics.gauge(
        "lmlab_kv_blocks_used",
        "Paged KV-cache blocks in use.",
        each(lambda e: e.sched.cache.alloc.used),
    )
    metrics.gauge(
        "lmlab_kv_blocks_total",
        "Paged KV-cache blocks in all.",
        each(lambda e: e.sched.cache.n_blocks),
    )


def _errors(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            return APIError(
                400, "the request body is not valid JSON", code="invalid_json"
            ).response()
        where = ".".join(loc)
        message = (
            f"{where}: {first.get('msg', 'invalid')}" if where else first.get("msg", "invalid")
        )
        return APIError(400, message, param=where or None).response()

    @app.exception_handler(HTTPException)
    async def http_error(_request, exc: HTTPException):
        kind = STATUS_TYPES.get(exc.status_code, "invalid_request_error")
        return APIError(exc.status_code, str(exc.detail), type=kind).response()

    @app.exception_handler(UsageError)
    async def usage(_request, exc: UsageError):
        return APIError(400, str(exc)).response()

    @app.exception_handler(Exception)
    async def unexpected(_request, exc: Exception):
        log.exception("unexpected error", exc_info=exc)
        return APIError(500, "internal server error; see the server log", "server_error").response()


def _page() -> tuple[str, str]:
    """The chat page and a Content-Security-Policy that lets only its own inline scripts run
    (by their hashes) and lets it talk to this server alone: a second line of defence, should
    model output ever reach the page as markup."""
    html = resources.files("lmlab.serve").joinpath("page.html").read_text(encoding="utf-8")
    scripts = re.findall(r"<script>(.*?)</script>", html, flags=re.S)
    hashes = " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'"
        for s in scripts
    )
    csp = (
        f"default-src 'none'; script-src {hashes}; style-src 'unsafe-inline'; "
        "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'"
    )
    return html, csp
