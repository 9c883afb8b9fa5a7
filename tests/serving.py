"""A real lmlab server for tests: uvicorn on a free local port in a thread of this process,
and a small deterministic checkpoint (a trained BPE tokenizer, weights that make greedy
decoding pick varied tokens) to serve."""

from __future__ import annotations

import math
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch

TEXTS = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Hello world, how are you today? I am fine, thank you very much.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "Paris is the capital of France; Rome is the capital of Italy.",
    "Tokens stream to the client one by one, and the batch changes every step.",
] * 20


def tiny_checkpoint(root: Path, max_seq_len: int = 192) -> Path:
    from lmlab.model.checkpoint import save_checkpoint
    from lmlab.model.config import ModelConfig
    from lmlab.model.transformer import Transformer
    from lmlab.tokenizer import save_tokenizer
    from lmlab.tokenizer.train import train_bpe

    tok = train_bpe(TEXTS, vocab_size=320, min_frequency=1)
    save_tokenizer(tok, root / "tok")
    cfg = ModelConfig(
        vocab_size=tok.get_vocab_size(),
        n_layers=2,
        d_model=64,
        n_heads=4,
        n_kv_heads=2,
        ffn_hidden=128,
        max_seq_len=max_seq_len,
    )
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name in ("embed_tokens.weight", "lm_head.weight"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                gain = 3.0 if name.endswith(("o_proj.weight", "down_proj.weight")) else 1.0
                p.copy_(torch.randn(p.shape, generator=g) * gain / math.sqrt(p.shape[1]))
    return save_checkpoint(model, root / "ckpt", tokenizer_dir=root / "tok")


@contextmanager
def running(app):
    """Serve `app` on 127.0.0.1 at a free port; yields the base URL (no trailing slash)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
