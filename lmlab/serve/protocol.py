"""The request bodies of the OpenAI API that lmlab serves, as pydantic models, and how each
becomes a `GenerationConfig`.

Unknown keys are refused (a typo such as `max_token` would otherwise be ignored silently,
and the user would wonder why the limit does nothing), except the few that OpenAI clients
send for bookkeeping (`user`, `metadata`, `store`, `service_tier`), which change nothing.
Fields OpenAI has but lmlab does not do (tools, structured output, `suffix`) are refused
by name with a 400, never ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from lmlab.infer.options import GenerationConfig, WatermarkConfig

MAX_N = 16  # samples per request; each is a sequence in the batch
MAX_TOP_LOGPROBS = 20  # as OpenAI


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None


class _Sampling(_Body):
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # lmlab's (and vLLM's) extras
    top_k: Annotated[int, Field(ge=0)] = 0
    min_p: Annotated[float, Field(ge=0, lt=1)] = 0.0
    repetition_penalty: Annotated[float, Field(gt=0)] = 1.0
    ignore_eos: bool = False  # run to max_tokens whatever the model says (benchmarks)
    watermark: bool | WatermarkRequest | None = None  # KGW; true = the default settings

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]

    def generation(self, max_tokens: int, stop_ids: list[int], logprobs: int | None):
        bias = {}
        for key, value in (self.logit_bias or {}).items():
            if not key.lstrip("-").isdigit():
                raise ValueError(f"logit_bias: keys are token ids, got {key!r}")
            bias[int(key)] = value
        return GenerationConfig(
            temperature=self.temperature,
            top_p=self.top_p if self.temperature > 0 else 1.0,
            top_k=self.top_k,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logit_bias=bias,
            max_new_tokens=max_tokens,
            stop_ids=stop_ids,
            stop_strings=self.stops(),
            n=self.n,
            logprobs=logprobs,
            seed=self.seed,
            watermark=self.watermark_config(),
        )

    def watermark_config(self) -> WatermarkConfig | None:
        w = self.watermark
        if w is None or w is False:
            return None
        if w is True:
            return WatermarkConfig()
        return WatermarkConfig(
            gamma=w.gamma, delta=w.delta, hashing_key=w.key, seeding_scheme=w.scheme
        )


class WatermarkRequest(BaseModel):
    """lmlab's `watermark` request field: the KGW settings (`lmlab detect-watermark` needs
    the same gamma, key and scheme to find it)."""

    model_config = ConfigDict(extra="forbid")
    gamma: Annotated[float, Field(gt=0, lt=1)] = 0.25
    delta: Annotated[float, Field(ge=0, le=100)] = 2.0
    key: Annotated[int, Field(ge=0, lt=2**63)] = 15485863
    scheme: Literal["lefthash", "selfhash"] = "lefthash"


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatRequest(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    # tools: described to the model, its calls read back (lmlab.serve.tooling); the legacy
    # functions API and structured output are refused by name below
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    parallel_tool_calls: bool | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: Annotated[int, Field(ge=1)] | None = 16  # OpenAI's default for completions
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    suffix: str | None = None
    best_of: int | None = None


class EmbeddingRequest(_Body):
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    prompt: str | None = None
    messages: list[Message] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    tokens: list[int]


def refused(body: BaseModel) -> tuple[str, str] | None:
    """(param, message) for a field lmlab does not do, or None."""
    checks: list[tuple[str, bool, str]] = []
    if isinstance(body, ChatRequest):
        from lmlab.serve.tooling import check_tools

        checks += [
            (
                k,
                getattr(body, k) is not None,
                "the legacy functions API is not supported; use tools",
            )
            for k in ("functions", "function_call")
        ]
        bad_tools = check_tools(body.tools, body.tool_choice)
        checks.append(("tools", bad_tools is not None, bad_tools or ""))
        fmt = body.response_format
        text = fmt is None or (isinstance(fmt, dict) and fmt.get("type") == "text")
        checks.append(
            ("response_format", not text, "only response_format type 'text' is supported")
        )
        checks.append(
            (
                "top_logprobs",
                body.top_logprobs is not None and not body.logprobs,
                "top_logprobs needs logprobs: true",
            )
        )
    if isinstance(body, CompletionRequest):
        checks.append(("suffix", body.suffix is not None, "suffix (insertion) is not supported"))
        checks.append(
            ("best_of", body.best_of not in (None, body.n), "best_of other than n is not supported")
        )
    if isinstance(body, EmbeddingRequest):
        checks.append(("dimensions", body.dimensions is not None, "dimensions is not supported"))
    for param, bad, message in checks:
        if bad:
            return param, message
    return None


_Sampling.model_rebuild()
ChatRequest.model_rebuild()
CompletionRequest.model_rebuild()
