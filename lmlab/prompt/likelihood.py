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
    prefix = model.cfg.family == "prefix"
    # pairs whose model input is the same (one context, several one-token continuations:
    # label words, single-letter choices) share one forward; their targets are read from
    # it. A prefix decoder's input also includes where its bidirectional prefix ends.
    keys = [(tuple((c + k)[-(max_len + 1) :][:-1]), len(k) if prefix else 0) for c, k in pairs]
    unique = list(dict.fromkeys(keys))
    where = {key: u for u, key in enumerate(unique)}
    wanted: list[list[int]] = [[] for _ in unique]
    for i, key in enumerate(keys):
        wanted[where[key]].append(i)
    unique = [row for row, _ in unique]
    device = next(model.parameters()).device
    out: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
    order = sorted(range(len(unique)), key=lambda u: -len(unique[u]))
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        ids = torch.zeros(len(idx), max(len(unique[u]) for u in idx), dtype=torch.long)
        for r, u in enumerate(idx):
            ids[r, : len(unique[u])] = torch.tensor(unique[u])
        kwargs = {}
        if model.cfg.family == "prefix":
            n_ctx = [len(unique[u]) - len(pairs[wanted[u][0]][1]) + 1 for u in idx]
            kwargs["prefix_len"] = torch.tensor(n_ctx, device=device)
        res = model(ids.to(device), **kwargs)
        logits = res.logits if hasattr(res, "logits") else res
        for r, u in enumerate(idx):
            n = len(unique[u])
            for i in wanted[u]:
                tgt = torch.tensor(pairs[i][1])
                # only the continuation's positions go through the softmax over the vocabulary
                lp = logits[r, n - len(tgt) : n].float().log_softmax(-1).cpu()
                out[i] = (
                    float(lp.gather(-1, tgt[:, None]).sum()),
                    bool((lp.argmax(-1) == tgt).all()),
                )
    return out


def loglikelihoods(
    model, tok, requests: list[tuple[str, str]], batch_size: int = 8
) -> list[tuple[float, bool]]:
    """`score_continuations` of (context, continuation) strings, tokenized as HFLM does."""
    return score_continuations(model, [_tokens(tok, c, k) for c, k in requests], batch_size)
