"""The `lmlab` command, one module per group of verbs; importing them registers the verbs on
the app in the order `lmlab --help` lists them."""

from lmlab.cli import (  # noqa: F401
    adapt,
    align,
    data,
    evaluation,
    generation,
    guide,
    guide_cost,
    models,
    pipeline,
    prompting,
    rag,
    scaling,
    serving,
    trust,
    trust_detect,
    trust_hallucination,
    trust_memorization,
)
from lmlab.cli.app import app, main

__all__ = ["app", "main"]
