"""Log-likelihoods of continuations (lm-evaluation-harness's `loglikelihood` request):
the sum of a continuation's token log-probs given its context, tokenized as HFLM does.
Multiple-choice tasks, label-word scoring and the backends' `logprobs` use it."""

from __future__ import annotations

import torch

from lmlab.errors import UsageError


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """HFLM's split: trailing spaces move to the continuation; encode whole, then split."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tok.encode(context + continuation).ids
    ctx = tok.encode(context).ids
    return ctx, whole[len(ctx) :]


def prefix_token(tok) -> int:
    """What an empty context is conditioned on: the end-of-text token (as HFLM's EOT)."""
    from lmlab.tokenizer import EOS, special_id

    return special_id(tok, EOS)


def _tokens(tok, ctx: str, cont: str) -> tuple[list[int], list[int]]:
    if ctx:
        c, k = encode_pair(tok, ctx, cont)
    else:
        c, k = [prefix_token(tok)], tok.encode(cont).ids
    if not k:
        raise UsageError(f"empty continuation after tokenization: {cont!r}")
    return c, k


@torch.no_grad()
def score_continuations(
    model, pairs: list[tuple[list[int], list[int]]], batch_size: int = 8, max_len: int = 0
) -> list[tuple[float, bool]]:
    """For each (context ids, continuation ids): the sum of the continuation's log-probs
    and whether every continuation token is the greedy choice. Rows keep their last
    max_len tokens (lm-eval's left truncation), run longest first in right-padded batches
    (causal rows never see the padding); a prefix decoder reads the context as its
    bidirectional prefix. Shared by the task runner and lm-eval's `LmlabLM`."""
    max_len = max_len or model.cfg.max_seq_len
    for ctx, cont in pairs:
        if not ctx or not 1 <= len(cont) <= max_len:
            raise UsageError(
                f"scoring: needs a non-empty context and a continuation of 1 to {max_len} "
                f"tokens (has {len(ctx)} and {len(cont)})"
            )
    rows = [(c + k)[-(max_len + 1) :][:-1] for c, k in pairs]
    device = next(model.parameters()).device
    out: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
    order = sorted(range(len(pairs)), key=lambda i: -len(rows[i]))
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        ids = torch.zeros(len(idx), max(len(rows[i]) for i in idx), dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, : len(rows[i])] = torch.tensor(rows[i])
        kwargs = {}
        if model.cfg.family == "prefix":
            n_ctx = [len(rows[i]) - len(pairs[i][1]) + 1 for i in idx]
            kwargs["prefix_len"] = torch.tensor(n_ctx, device=device)
        res = model(ids.to(device), **kwargs)
        logp = (res.logits if hasattr(res, "logits") else res).float().log_softmax(-1).cpu()
        for r, i in enumerate(idx):
            n, tgt = len(rows[i]), torch.tensor(pairs[i][1])
            lp = logp[r, n - len(tgt) : n]
            out[i] = (float(lp.gather(-1, tgt[:, None]).sum()), bool((lp.argmax(-1) == tgt).all()))
    return out


def loglikelihoods(
    model, tok, requests: list[tuple[str, str]], batch_size: int = 8
) -> list[tuple[float, bool]]:
    """`score_continuations` of (context, continuation) strings, tokenized as HFLM does."""
    return score_continuations(model, [_tokens(tok, c, k) for c, k in requests], batch_size)
