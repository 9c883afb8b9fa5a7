"""Beam search (Zhao et al. §4.2.4), with transformers' semantics so results can be
checked against it: 2 x num_beams candidates per step, a finished hypothesis scored as
sum(log p) / generated_length ** length_penalty (the stop token counted), the n-best kept,
and the same three `early_stopping` modes (True: stop once num_beams hypotheses are
done; False: stop when the best live beam, at its current length, cannot beat the worst
kept one; "never": with a positive length penalty, assume it could grow to max length).
"""

from __future__ import annotations

import torch

from lmlab.infer.engine import Completion, Runner, StopStrings, fit_prompts
from lmlab.infer.options import GenerationConfig
from lmlab.infer.sampling import History, apply_penalties

NEG = -1.0e9  # transformers' "impossible" score: finite, so sums stay ordered


@torch.no_grad()
def beam_search(
    model, prompt: list[int], cfg: GenerationConfig, tokenizer=None
) -> list[Completion]:
    """The `cfg.num_return_sequences` best hypotheses for one prompt, best first."""
    cfg.validate()
    (prompt,), budget = fit_prompts(model, [prompt], cfg.max_new_tokens)
    nb, lp = cfg.num_beams, cfg.length_penalty
    runner = Runner(model, budget)
    logits = runner.prefill([prompt])
    runner.select(torch.zeros(nb, dtype=torch.long))
    logits = logits.expand(nb, -1)
    hist = History([prompt] * nb, logits.shape[-1]) if cfg.has_penalties else None
    stop_strings = StopStrings(tokenizer, cfg.stop_strings)
    stops = torch.tensor(sorted(set(cfg.stop_ids)), dtype=torch.long)
    keep_k = max(2, 1 + len(stops)) * nb  # enough candidates that nb can always go on
    running = torch.full((nb,), NEG)
    running[0] = 0.0  # all beams start identical: expand only the first
    seqs: list[list[int]] = [[] for _ in range(nb)]
    done: list[tuple[float, list[int], bool]] = []  # (score, tokens, ended by a stop)
    improvable = True
    for step in range(budget):
        logp = logits.float().log_softmax(-1)
        if hist is not None:  # as transformers: processors act on the log-probs
            logp = apply_penalties(logp, hist, cfg)
        vocab = logp.shape[-1]
        acc = (logp + running[:, None]).reshape(-1)
        top_scores, top_idx = acc.topk(keep_k)
        beam, tok = top_idx // vocab, top_idx % vocab
        cand = [seqs[b] + [t] for b, t in zip(beam.tolist(), tok.tolist(), strict=True)]
        ended = torch.isin(tok, stops) if len(stops) else torch.zeros(keep_k, dtype=torch.bool)
        if stop_strings.stops:
            ended |= torch.tensor([stop_strings.hit(c) for c in cand])
        last = step == budget - 1
        hits = ended | last
        # the best unfinished continuations go on
        go_scores = top_scores + hits.float() * NEG
        go = go_scores.topk(nb).indices
        # the top nb candidates that just finished may join the kept hypotheses
        full = len(done) == nb
        if improvable and not (full and cfg.early_stopping is True):
            length = step + 1
            for s in range(nb):
                if hits[s]:
                    score = float(top_scores[s]) / length**lp
                    done.append((score, cand[s], bool(ended[s])))
            done.sort(key=lambda d: -d[0])
            done = done[:nb]
        if bool(hits.all()):
            break
        seqs = [cand[s] for s in go.tolist()]
        running = go_scores[go]
        rows = beam[go]
        if hist is not None:
            hist.select(rows.tolist())
            hist.push(tok[go].tolist())
        # can a live beam still beat the worst kept hypothesis?
        if len(done) == nb:
            grow = cfg.early_stopping == "never" and lp > 0
            best_len = budget if grow else step + 1
            improvable = improvable and float(running[0]) / best_len**lp > done[-1][0]
            if not improvable or cfg.early_stopping is True:
                break
        runner.select(rows)
        logits = runner.step(tok[go])
    out = []
    for score, tokens, by_stop in done[: cfg.num_return_sequences]:
        c = Completion(prompt_index=0, score=score, finish_reason="stop" if by_stop else "length")
        c.tokens = tokens[:-1] if by_stop and tokens[-1] in cfg.stop_ids else tokens
        if tokenizer is not None:
            c.text = stop_strings.cut(tokenizer.decode(c.tokens, skip_special_tokens=True))
        out.append(c)
    return out
