"""`lmlab serve`: an OpenAI-compatible server and web chat page for a model."""

from __future__ import annotations

from typing import Annotated

import typer

from lmlab.cli.app import app
from lmlab.console import log


@app.command()
def serve(
    model: Annotated[
        str,
        typer.Argument(
            help="A run or checkpoint directory, an HF directory, a GGUF file or a store name."
        ),
    ],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(help="Require this key (Bearer) on /v1/*; default: env LMLAB_API_KEY."),
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="The model's name in the API (default: MODEL as given).")
    ] = None,
    adapter: Annotated[
        list[str] | None,
        typer.Option(help="NAME=DIR: also serve DIR under NAME (repeatable)."),
    ] = None,
    max_concurrency: Annotated[
        int, typer.Option(help="Sequences decoded together; more wait in the queue.")
    ] = 32,
    max_waiting: Annotated[
        int, typer.Option(help="Sequences queued beyond those; more get HTTP 429.")
    ] = 256,
    max_model_len: Annotated[
        int | None, typer.Option(help="Longest prompt + output (default: the model's context).")
    ] = None,
    kv_cache_gb: Annotated[float, typer.Option(help="Memory for the paged KV cache.")] = 1.0,
    max_prefill_tokens: Annotated[
        int,
        typer.Option(help="Prompt tokens run per step: a burst of arrivals is spread out."),
    ] = 512,
    max_body_mb: Annotated[float, typer.Option(help="Largest request body.")] = 4.0,
    request_timeout: Annotated[
        float, typer.Option(help="Seconds a request may take before it is aborted (504).")
    ] = 600.0,
    threads: Annotated[
        str, typer.Option(help="torch threads: a number, or auto (the fastest measured now).")
    ] = "auto",
) -> None:
    """Serve a model over the OpenAI API (chat, completions, embeddings) with a web chat
    page at /, on the continuous-batching engine."""
    from lmlab.serve.engine import EngineLimits
    from lmlab.serve.server import serve as run_server

    limits = EngineLimits(
        max_concurrency=max_concurrency,
        max_waiting=max_waiting,
        max_model_len=max_model_len,
        kv_cache_gb=kv_cache_gb,
        max_prefill_tokens=max_prefill_tokens,
    )
    run_server(
        model,
        host=host,
        port=port,
        api_key=api_key,
        name=name,
        adapters=adapter or [],
        limits=limits,
        max_body_mb=max_body_mb,
        request_timeout=request_timeout,
        progress=log,
        threads=threads,
    )
