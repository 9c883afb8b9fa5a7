"""`lmlab serve`: load the models, build the app, run uvicorn until Ctrl-C."""

from __future__ import annotations

import logging
import os

from lmlab.errors import UsageError
from lmlab.serve.engine import EngineLimits, load_engine
from lmlab.serve.metrics import Metrics

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def parse_adapters(specs: list[str]) -> list[tuple[str, str]]:
    """`NAME=DIR` pairs of `--adapter`."""
    out = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"--adapter {spec!r}: use NAME=DIR")
        out.append((name, path))
    return out


def build(
    model: str,
    name: str | None,
    adapters: list[str],
    limits: EngineLimits,
    progress=print,
):
    """The engines, by served name: the model, then each `--adapter` under its own name:
    an adapter of the model shares the model's weights (each engine keeps only its
    adapter's tensors and its own KV cache); any other model is loaded whole."""
    metrics = Metrics()
    pairs = [(name or model, model), *parse_adapters(adapters)]
    names = [n for n, _ in pairs]
    if len(set(names)) != len(names):
        raise UsageError(f"serve: model names must differ, got {names}")
    engines = {}
    for served, path in pairs:
        progress(f"loading {served} from {path}")
        shared = (model, engines[pairs[0][0]].model) if engines else None
        engines[served] = load_engine(served, path, limits, metrics, shared)
    return engines


def serve(
    model: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    name: str | None = None,
    adapters: list[str] | None = None,
    limits: EngineLimits | None = None,
    max_body_mb: float = 4.0,
    request_timeout: float = 600.0,
    progress=print,
    threads: str | int | None = "auto",
) -> None:
    import uvicorn

    from lmlab.infer.bench import apply_threads
    from lmlab.serve.app import Settings, create_app

    api_key = api_key or os.environ.get("LMLAB_API_KEY") or None
    if not 0 <= port < 65536:
        raise UsageError(f"--port {port}: must be in [0, 65535]")
    if max_body_mb <= 0 or request_timeout <= 0:
        raise UsageError("serve: --max-body-mb and --request-timeout must be > 0")
    engines = build(model, name, adapters or [], limits or EngineLimits(), progress)
    apply_threads(threads, next(iter(engines.values())).model, progress)
    settings = Settings(api_key, int(max_body_mb * 2**20), request_timeout)
    app = create_app(engines, settings)
    if host not in LOCAL_HOSTS and api_key is None:
        progress(
            f"warning: serving on {host} without --api-key: anyone who can reach this port "
            "can use the models"
        )
    for served, e in engines.items():
        progress(
            f"serving {served}: context {e.max_len} tokens, {e.limits.max_concurrency} "
            f"sequences at once, KV cache {e.sched.cache.n_blocks} blocks of "
            f"{e.limits.block_size} tokens"
        )
    shown = f"[{host}]" if ":" in host else host
    progress(
        f"OpenAI-compatible API at http://{shown}:{port}/v1, chat page at http://{shown}:{port}/"
    )
    logging.getLogger("lmlab.serve").setLevel(logging.INFO)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
