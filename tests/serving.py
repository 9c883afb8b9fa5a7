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


def scripted_checkpoint(root: Path, pieces: list[str], max_seq_len: int = 256) -> Path:
    """A real checkpoint whose greedy chat reply is exactly `pieces` joined, then its end of
    turn: each piece is a token of its own, and the weights make every token predict the
    next (attention and MLP outputs zeroed, so each position sees only its own token; the
    output head maps that token's normed embedding to its successor). For the browser test,
    which needs a model that says precisely what it is asked to render."""
    from lmlab.model.checkpoint import save_checkpoint
    from lmlab.model.config import ModelConfig
    from lmlab.model.transformer import Transformer
    from lmlab.tokenizer import save_tokenizer
    from lmlab.tokenizer.chat import encode_chat, stop_ids_of
    from lmlab.tokenizer.train import train_bpe

    tok = train_bpe(TEXTS, vocab_size=320, min_frequency=1)
    tok.add_tokens(pieces)
    chain = [tok.token_to_id(p) for p in pieces]
    if len(set(chain)) != len(chain) or None in chain:
        raise ValueError("the pieces must be distinct")
    save_tokenizer(tok, root / "tok")
    header = encode_chat(tok, [{"role": "user", "content": "x"}])[-1]  # ends every prompt
    end = stop_ids_of(tok, chat=True)[-1]
    cfg = ModelConfig(
        vocab_size=tok.get_vocab_size(),
        n_layers=1,
        d_model=64,
        n_heads=4,
        ffn_hidden=64,
        max_seq_len=max_seq_len,
        tie_embeddings=False,
    )
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()
            elif p.dim() == 1:
                p.fill_(1.0)
        emb = model.embed_tokens.weight
        model.lm_head.weight.zero_()
        steps = [header, *chain]
        for a, b in zip(steps, [*chain, end], strict=True):
            x = emb[a] / emb[a].pow(2).mean().sqrt()
            model.lm_head.weight[b] += 0.5 * x
    return save_checkpoint(model, root / "ckpt", tokenizer_dir=root / "tok")
