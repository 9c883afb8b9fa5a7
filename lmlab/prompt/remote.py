"""A model behind any OpenAI-compatible server (lmlab's own, vLLM, llama.cpp's, a hosted
API), reached through the official `openai` client: the terminal chat of `lmlab chat
--url` speaks the same protocol as `lmlab serve`, so one loop serves both ends.

The client is an optional dependency (`pip install openai`, or the `remote` extra); it is
imported only when a URL is given.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TextIO

from lmlab.errors import UsageError
from lmlab.infer.options import GenerationConfig


def connect(url: str, api_key: str | None = None):
    """An `openai.OpenAI` client for the server at `url` (with or without its /v1). The key
    comes from the argument, else LMLAB_API_KEY, else OPENAI_API_KEY (a server without a
    key accepts any)."""
    try:
        import openai
    except ImportError:
        raise UsageError(
            "--url needs the openai client: pip install openai (or lmlab[remote])"
        ) from None
    if not url.startswith(("http://", "https://")):
        raise UsageError(f"--url {url}: give an http:// or https:// address")
    base = url.rstrip("/")
    base = base if base.endswith("/v1") else base + "/v1"
    key = api_key or os.environ.get("LMLAB_API_KEY") or os.environ.get("OPENAI_API_KEY") or "none"
    return openai.OpenAI(base_url=base, api_key=key, max_retries=1)


def server_error(e: Exception) -> UsageError:
    """A client error as one line: the status and the server's own message."""
    status = getattr(e, "status_code", None)
    body = getattr(e, "body", None)
    message = None
    if isinstance(body, dict):
        inner = body.get("error") if isinstance(body.get("error"), dict) else body
        message = inner.get("message")
    head = f"the server answered {status}" if status else "no answer from the server"
    return UsageError(f"{head}: {message or e}")


def sampling_body(cfg: GenerationConfig) -> dict:
    """The decoding settings of a request in OpenAI's fields (lmlab's and vLLM's extras,
    `top_k`, `min_p`, `repetition_penalty`, only when set)."""
    body: dict = {
        "max_tokens": cfg.max_new_tokens,
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
    }
    if cfg.n != 1:
        body["n"] = cfg.n
    if cfg.seed is not None:
        body["seed"] = cfg.seed
    if cfg.stop_strings:
        body["stop"] = list(cfg.stop_strings)
    extra = {}
    if cfg.top_k:
        extra["top_k"] = cfg.top_k
    if cfg.min_p:
        extra["min_p"] = cfg.min_p
    if cfg.repetition_penalty != 1.0:
        extra["repetition_penalty"] = cfg.repetition_penalty
    if extra:
        body["extra_body"] = extra
    return body


@dataclass
class RemoteChat:
    """A conversation with a served model, streamed as it comes. The served chat template
    renders the turns; `cfg` gives the sampling settings sent with each turn."""

    client: object
    model: str
    cfg: GenerationConfig
    system: str | None = None
    history: list[dict[str, str]] = field(default_factory=list)

    @classmethod
    def open(cls, url: str, model: str | None, cfg: GenerationConfig, api_key=None, system=None):
        """Connect and check the model is served (the first one listed when none is named)."""
        client = connect(url, api_key)
        try:
            served = [m.id for m in client.models.list().data]
        except Exception as e:  # the client's own errors: connection, status
            raise server_error(e) from None
        if not served:
            raise UsageError(f"{url} serves no model")
        if model is None:
            model = served[0]
        elif model not in served:
            raise UsageError(f"{url} does not serve {model!r}; it serves {served}")
        return cls(client, model, cfg.validate(), system)

    def request(self) -> dict:
        """The chat completion request for the conversation so far."""
        turns = ([{"role": "system", "content": self.system}] if self.system else []) + self.history
        return {"model": self.model, "messages": turns, "stream": True, **sampling_body(self.cfg)}

    def reply(self, text: str, stdout: TextIO) -> str:
        """Send the user's turn and stream the answer to `stdout`. The answer joins the
        history even when Ctrl-C or a dropped connection cuts it short; a turn the server
        refused outright leaves the history as it was."""
        self.history.append({"role": "user", "content": text})
        said: list[str] = []
        taken = True
        try:
            stream = self.client.chat.completions.create(**self.request())
            for chunk in stream:
                piece = chunk.choices[0].delta.content if chunk.choices else None
                if piece:
                    said.append(piece)
                    stdout.write(piece)
                    stdout.flush()
            stdout.write("\n")
        except Exception as e:  # the client's errors: refused, unreachable, cut off
            if not said:
                taken = False
                self.history.pop()
                raise server_error(e) from None
            stdout.write(f" [cut short: {server_error(e)}]\n")
        finally:
            if taken:
                self.history.append({"role": "assistant", "content": "".join(said)})
        return self.history[-1]["content"]
