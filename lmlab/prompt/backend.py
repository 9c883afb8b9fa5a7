"""One small interface between prompting methods and whatever runs the model: `chat`
(conversations of messages), `complete` (plain text) and `logprobs` (the log-probability
of a continuation given its context, where the backend has them).

- `LocalBackend`: a model lmlab loads (an lmlab checkpoint or run, a Hugging Face
  directory, a GGUF file, an adapter directory, a store name), through lmlab's engine;
- `OpenAIBackend`: any OpenAI-compatible server (`lmlab serve`, vLLM, llama.cpp's server,
  a hosted API), through the official `openai` client. Log-probabilities come from the
  completions endpoint's `echo` + `logprobs`, which lmlab's server and vLLM implement;
  a server without them is refused with one line.

`open_backend(model, url)` picks one. Prompting methods (retrieval-augmented answers,
few-shot classification, reasoning strategies) take a backend, so a test passes a scripted
one and a user points the same code at a local file or an endpoint."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Protocol

from lmlab.errors import UsageError
from lmlab.infer.options import GenerationConfig
from lmlab.prompt.complete import model_generate_fn
from lmlab.prompt.remote import connect, sampling_body, server_error


class Backend(Protocol):
    name: str

    def chat(self, conversations: list[list[dict]], cfg: GenerationConfig) -> list[list[str]]:
        """`cfg.n` replies to each conversation (a list of {"role", "content"})."""
        ...

    def complete(self, prompts: list[str], cfg: GenerationConfig) -> list[list[str]]:
        """`cfg.n` continuations of each plain-text prompt."""
        ...

    def logprobs(self, pairs: list[tuple[str, str]]) -> list[float]:
        """log p(continuation | context), summed over its tokens, for (context,
        continuation) pairs."""
        ...


@dataclass
class LocalBackend:
    """A loaded model and its tokenizer."""

    model: object
    tokenizer: object
    name: str = "local"
    batch_size: int = 16

    def chat(self, conversations, cfg):
        return model_generate_fn(self.model, self.tokenizer, True, self.batch_size)(
            conversations, cfg
        )

    def complete(self, prompts, cfg):
        return model_generate_fn(self.model, self.tokenizer, False, self.batch_size)(prompts, cfg)

    def logprobs(self, pairs):
        from lmlab.prompt.likelihood import loglikelihoods

        return [ll for ll, _ in loglikelihoods(self.model, self.tokenizer, pairs)]


@dataclass
class OpenAIBackend:
    """A model served behind an OpenAI-compatible API."""

    client: object
    name: str

    @classmethod
    def open(cls, url: str, model: str | None = None, api_key: str | None = None):
        """Connect and check the model is served (the first one listed when none is named)."""
        client = connect(url, api_key)
        try:
            served = [m.id for m in client.models.list().data]
        except Exception as e:  # the client's own errors: connection, status
            raise server_error(e) from None
        if not served:
            raise UsageError(f"{url} serves no model")
        if model is not None and model not in served:
            raise UsageError(f"{url} does not serve {model!r}; it serves {served}")
        return cls(client, model or served[0])

    def _call(self, create, **body):
        try:
            return create(model=self.name, **body)
        except Exception as e:  # refused, unreachable: one line with the server's message
            raise server_error(e) from None

    def chat(self, conversations, cfg):
        body = sampling_body(cfg)
        out = []
        for messages in conversations:
            r = self._call(self.client.chat.completions.create, messages=messages, **body)
            out.append([c.message.content or "" for c in r.choices])
        return out

    def complete(self, prompts, cfg):
        body = sampling_body(cfg)
        out = []
        for prompt in prompts:
            r = self._call(self.client.completions.create, prompt=prompt, **body)
            out.append([c.text for c in r.choices])
        return out

    def logprobs(self, pairs):
        out = []
        for ctx, cont in pairs:
            r = self._call(
                self.client.completions.create,
                prompt=ctx + cont,
                max_tokens=1,
                echo=True,
                logprobs=1,
                temperature=0.0,
            )
            lp = r.choices[0].logprobs
            n_prompt = getattr(r.usage, "prompt_tokens", None)
            if lp is None or not lp.token_logprobs or not lp.text_offset or n_prompt is None:
                raise UsageError(
                    f"{self.name}: the server gives no prompt log-probabilities "
                    "(completions with echo and logprobs); use a local model or lmlab serve"
                )
            # the echoed prompt's tokens whose text starts inside the continuation
            echoed = zip(lp.token_logprobs[:n_prompt], lp.text_offset[:n_prompt], strict=True)
            picked = [x for x, at in echoed if at >= len(ctx) and x is not None]
            if not picked:
                raise UsageError(f"continuation {cont!r}: no token of its own after the context")
            out.append(float(sum(picked)))
        return out


def open_backend(
    model: str | None = None, url: str | None = None, api_key: str | None = None
) -> Backend:
    """A backend for `model` (any form lmlab loads), or for the server at `url` (then
    `model` names one of its models; default: the first it lists)."""
    if url is not None:
        return OpenAIBackend.open(url, model, api_key)
    if model is None:
        raise UsageError("give --model (a checkpoint, HF directory, GGUF file) or --url")
    from lmlab.model.loading import load_model
    from lmlab.tokenizer import load_tokenizer

    return LocalBackend(load_model(model), load_tokenizer(model), name=str(model))


def greedy(max_new_tokens: int = 256, **kw) -> GenerationConfig:
    """A greedy decoding config (what answering and tool use default to)."""
    return dataclasses.replace(GenerationConfig(), max_new_tokens=max_new_tokens, **kw).validate()
