"""Speculative decoding (Leviathan et al. 2023; Chen et al. 2023): a small draft model
proposes `gamma` tokens one by one, the target scores them all in one forward pass, and
rejection sampling keeps a prefix of them. Draft token x is accepted with probability
min(1, p(x) / q(x)); at the first rejection a token is drawn from max(0, p - q), renormalised;
if all are accepted, one more comes from p. The output is distributed exactly as the
target's alone (greedy: token-identical), while the target runs about once per accepted
run instead of once per token: the remedy for high inference latency in Kaddour et al.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lmlab.errors import UsageError
from lmlab.infer.engine import Completion, Runner, StopStrings, fit_prompts
from lmlab.infer.options import GenerationConfig
from lmlab.infer.sampling import make_generator, warp


@dataclass
class SpeculativeStats:
    drafted: int = 0
    accepted: int = 0
    target_calls: int = 0
    tokens: int = 0
    accepted_per_round: list[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def as_dict(self) -> dict:
        return {
            "drafted": self.drafted,
            "accepted": self.accepted,
            "acceptance_rate": round(self.acceptance_rate, 4),
            "target_calls": self.target_calls,
            "tokens": self.tokens,
            "tokens_per_target_call": round(self.tokens / max(self.target_calls, 1), 3),
        }


def _probs(logits: torch.Tensor, cfg: GenerationConfig) -> torch.Tensor:
    return warp(logits.float(), cfg).softmax(-1)


def check_pair(target, draft, cfg: GenerationConfig, gamma: int) -> None:
    if gamma < 1:
        raise UsageError("speculative decoding: gamma (draft tokens per round) must be >= 1")
    if draft.cfg.vocab_size != target.cfg.vocab_size:
        raise UsageError(
            f"speculative decoding: the draft's vocabulary ({draft.cfg.vocab_size}) differs "
            f"from the target's ({target.cfg.vocab_size})"
        )
    for m, who in ((target, "target"), (draft, "draft")):
        if m.cfg.family != "decoder":
            raise UsageError(f"speculative decoding: the {who} must be a causal decoder")
    if cfg.has_penalties or cfg.num_beams > 1 or cfg.n > 1:
        raise UsageError(
            "speculative decoding: penalties, beams and n > 1 are not supported "
            "(the acceptance test needs a fixed distribution per position)"
        )


@torch.no_grad()
def speculative_generate(
    target,
    draft,
    prompt: list[int],
    cfg: GenerationConfig,
    gamma: int = 4,
    tokenizer=None,
    on_token=None,
) -> tuple[Completion, SpeculativeStats]:
    """Generate for one prompt with `draft` proposing and `target` verifying."""
    cfg.validate()
    check_pair(target, draft, cfg, gamma)
    (prompt,), budget = fit_prompts(target, [prompt], cfg.max_new_tokens)
    budget = min(budget, target.cfg.max_seq_len - len(prompt), draft.cfg.max_seq_len - len(prompt))
    if budget < 1:
        raise UsageError("speculative decoding: the prompt fills the draft's context")
    room = budget + gamma + 1
    t_run, d_run = Runner(target, room), Runner(draft, room)
    gen = make_generator(cfg.seed, "cpu")
    stops, stop_strings = set(cfg.stop_ids), StopStrings(tokenizer, cfg.stop_strings)
    stats = SpeculativeStats()
    seq = list(prompt)  # committed tokens; each cache holds all of them but the last
    if len(prompt) > 1:
        t_run.prefill([prompt[:-1]])
        d_run.prefill([prompt[:-1]])
    else:  # nothing to cache yet: empty caches
        t_run.prefill([prompt])
        d_run.prefill([prompt])
        t_run.rollback(0)
        d_run.rollback(0)
    comp = Completion(prompt_index=0)
    finished = False
    while not finished:
        left = budget - len(comp.tokens)
        g = min(gamma, left)
        # 1. the draft proposes g tokens, one forward each
        d_pos = d_run.cache.pos
        logits = d_run.forward_all(torch.tensor([seq[d_pos:]]))[:, -1]
        drafts, qs = [], []
        for j in range(g):
            q = _probs(logits, cfg)[0]
            x = int(q.argmax()) if cfg.greedy else int(torch.multinomial(q, 1, generator=gen))
            drafts.append(x)
            qs.append(q)
            if j < g - 1:
                logits = d_run.step(torch.tensor([x]))
        # 2. the target scores them all at once
        t_pos = t_run.cache.pos
        pending = seq[t_pos:]
        t_logits = t_run.forward_all(torch.tensor([pending + drafts]))[0]
        ps = _probs(t_logits[len(pending) - 1 :], cfg)  # [g + 1, V]
        stats.target_calls += 1
        # 3. accept a prefix
        n_acc = 0
        nxt = None
        for j, x in enumerate(drafts):
            p, q = ps[j], qs[j]
            if cfg.greedy:
                ok = x == int(p.argmax())
            else:
                ok = float(torch.rand(1, generator=gen)) < min(1.0, float(p[x] / q[x]))
            if not ok:
                if cfg.greedy:
                    nxt = int(p.argmax())
                else:
                    resid = (p - q).clamp(min=0)
                    resid = resid / resid.sum() if resid.sum() > 0 else p
                    nxt = int(torch.multinomial(resid, 1, generator=gen))
                break
            n_acc += 1
        if nxt is None:  # every draft accepted: the target's next token comes free
            p = ps[g]
            nxt = int(p.argmax()) if cfg.greedy else int(torch.multinomial(p, 1, generator=gen))
        stats.drafted += g
        stats.accepted += n_acc
        stats.accepted_per_round.append(n_acc)
        old = len(seq)
        for x in drafts[:n_acc] + [nxt]:
            if x in stops:
                comp.finish_reason, finished = "stop", True
                break
            seq.append(x)
            comp.tokens.append(x)
            if on_token is not None:
                on_token(x)
            if stop_strings.hit(comp.tokens):
                comp.finish_reason, finished = "stop", True
                break
            if len(comp.tokens) >= budget:
                finished = True
                break
        # 4. both caches drop what was not accepted (each holds all committed but the last)
        t_run.rollback(min(len(seq) - 1, old + n_acc))
        d_run.rollback(min(len(seq) - 1, old + n_acc, old + g - 1))
    stats.tokens = len(comp.tokens)
    if tokenizer is not None:
        comp.text = stop_strings.cut(tokenizer.decode(comp.tokens, skip_special_tokens=True))
    return comp, stats
