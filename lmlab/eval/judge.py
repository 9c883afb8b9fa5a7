"""Model-based evaluation (Zhao et al. §7.2, LLM-as-a-judge): a judge model compares two
answers to the same question, and ratings over several checkpoints follow from the
pairwise outcomes.

Judges prefer whichever answer comes first (position bias), so every pair is judged in
both orders and the two verdicts are averaged: a judge that always says "A" then calls
every pair a tie. Ratings come two ways: Elo, updated match by match and averaged over
shuffled orders (the order of matches should not matter), and Bradley-Terry, fitted by
maximum likelihood, on the same 400-point scale.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import combinations

import numpy as np

from lmlab.errors import UsageError
from lmlab.infer.options import GenerationConfig

JUDGE_PROMPT = (
    "Which response answers the question better?\n\n"
    "Question: {question}\n\nResponse A: {a}\n\nResponse B: {b}\n\n"
    "The better response is"
)


@dataclass
class Verdict:
    question: str
    model_a: str
    model_b: str
    p_a: float  # probability that A is better, averaged over both presentation orders
    p_a_first: float  # the judge's P(A) with A shown first
    p_a_second: float  # ... with A shown second
    winner: str  # model_a, model_b or "tie"


def model_judge(model, tok, template: str = JUDGE_PROMPT) -> Callable[[str, str, str], float]:
    """P(the first response is better) from a judge model: the softmax over the
    log-likelihoods of " A" and " B" after the prompt."""
    from lmlab.prompt.likelihood import loglikelihoods

    def judge(question: str, first: str, second: str) -> float:
        ctx = template.format(question=question, a=first, b=second)
        (la, _), (lb, _) = loglikelihoods(model, tok, [(ctx, " A"), (ctx, " B")])
        return 1.0 / (1.0 + math.exp(lb - la))

    return judge


def compare(
    judge: Callable[[str, str, str], float],
    question: str,
    answers: dict[str, str],
    a: str,
    b: str,
    margin: float = 0.05,
) -> Verdict:
    """Judge a pair in both orders; a tie when the averaged preference is within margin."""
    first = judge(question, answers[a], answers[b])  # P(a better), a shown first
    second = 1.0 - judge(question, answers[b], answers[a])  # P(a better), a shown second
    p = (first + second) / 2
    winner = a if p > 0.5 + margin else b if p < 0.5 - margin else "tie"
    return Verdict(question, a, b, p, first, second, winner)


def tournament(
    judge: Callable[[str, str, str], float],
    questions: Sequence[str],
    answers: dict[str, Sequence[str]],
    margin: float = 0.05,
) -> list[Verdict]:
    """Every pair of models on every question."""
    names = list(answers)
    if len(names) < 2:
        raise UsageError("judge: need answers from at least two models")
    for n in names:
        if len(answers[n]) != len(questions):
            raise UsageError(
                f"judge: model {n} has {len(answers[n])} answers for {len(questions)} questions"
            )
    out = []
    for qi, q in enumerate(questions):
        row = {n: answers[n][qi] for n in names}
        for a, b in combinations(names, 2):
            out.append(compare(judge, q, row, a, b, margin))
    return out


def outcomes(verdicts: Sequence[Verdict]) -> list[tuple[str, str, float]]:
    """(model_a, model_b, score of a: 1 win, 0.5 tie, 0 loss)."""
    score = {"tie": 0.5}
    return [
        (v.model_a, v.model_b, 1.0 if v.winner == v.model_a else score.get(v.winner, 0.0))
        for v in verdicts
    ]


def elo(
    matches: Sequence[tuple[str, str, float]],
    k: float = 32.0,
    base: float = 1000.0,
    permutations: int = 100,
    seed: int = 0,
) -> dict[str, float]:
    """Elo ratings: the expected score of a is 1 / (1 + 10^((R_b - R_a)/400)), and each
    match moves both ratings by k x (actual - expected). Averaged over `permutations`
    shuffled match orders (1 = the given order)."""
    names = sorted({m for a, b, _ in matches for m in (a, b)})
    rng = np.random.default_rng(seed)
    total = dict.fromkeys(names, 0.0)
    for p in range(permutations):
        order = range(len(matches)) if p == 0 else rng.permutation(len(matches))
        r = dict.fromkeys(names, base)
        for i in order:
            a, b, s = matches[i]
            expected = 1.0 / (1.0 + 10 ** ((r[b] - r[a]) / 400))
            r[a] += k * (s - expected)
            r[b] -= k * (s - expected)
        for n in names:
            total[n] += r[n]
    return {n: total[n] / permutations for n in names}


def bradley_terry(
    matches: Sequence[tuple[str, str, float]], base: float = 1000.0, iters: int = 1000
) -> dict[str, float]:
    """Bradley-Terry strengths by the MM algorithm (Hunter 2004), ties as half a win each,
    on Elo's scale: R = base + 400 log10(strength), centred so the mean rating is base."""
    names = sorted({m for a, b, _ in matches for m in (a, b)})
    ix = {n: i for i, n in enumerate(names)}
    w = np.zeros(len(names))  # wins
    n_ij = np.zeros((len(names), len(names)))  # games between i and j
    for a, b, s in matches:
        w[ix[a]] += s
        w[ix[b]] += 1 - s
        n_ij[ix[a], ix[b]] += 1
        n_ij[ix[b], ix[a]] += 1
    w = w + 0.5  # a small prior: a model that never wins keeps a finite rating
    n_ij = n_ij + 1.0 / max(len(names) - 1, 1) * (1 - np.eye(len(names)))
    p = np.ones(len(names))
    for _ in range(iters):
        denom = (n_ij / (p[:, None] + p[None, :])).sum(1)
        new = w / denom
        new /= np.exp(np.log(new).mean())
        if np.abs(new - p).max() < 1e-12:
            p = new
            break
        p = new
    ratings = 400 * np.log10(p)
    ratings += base - ratings.mean()
    return {n: float(ratings[ix[n]]) for n in names}


def answer_questions(model, tok, questions: Sequence[str], chat: bool, max_new_tokens: int):
    """Greedy answers, through the chat template when `chat` (an instruction-tuned model)."""
    from lmlab.infer import generate_batch
    from lmlab.prompt.fewshot import few_shot_prompt
    from lmlab.tokenizer.chat import encode_chat, stop_ids_of

    stops = stop_ids_of(tok, chat)
    ids = [
        encode_chat(tok, [{"role": "user", "content": q}])
        if chat
        else tok.encode(few_shot_prompt(q, [])).ids
        for q in questions
    ]
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, stop_ids=stops, stop_strings=["\n\n"])
    comps = generate_batch(model, ids, cfg, tokenizer=tok)
    return [c.text.strip() for c in comps]


def check_inputs(model_paths: Sequence[str], questions: Sequence[str]) -> None:
    """What a judging needs before any model loads: two models to compare, and questions."""
    if len(set(model_paths)) < 2:
        raise UsageError("judge: give at least two different --model checkpoints")
    if not questions:
        raise UsageError("judge: no questions")


def judge_models(
    judge_path: str,
    model_paths: Sequence[str],
    questions: Sequence[str],
    chat: bool = False,
    max_new_tokens: int = GenerationConfig.max_new_tokens,
    margin: float = 0.05,
    seed: int = 0,
) -> dict:
    """Every model answers every question; the judge compares every pair, both orders;
    returns the verdicts, win/tie/loss counts, and Elo and Bradley-Terry ratings."""
    from lmlab import load_model, load_tokenizer

    check_inputs(model_paths, questions)
    answers = {}
    for path in model_paths:
        m, t = load_model(path), load_tokenizer(path)
        answers[str(path)] = answer_questions(m, t, questions, chat, max_new_tokens)
    judge = model_judge(load_model(judge_path), load_tokenizer(judge_path))
    verdicts = tournament(judge, questions, answers, margin)
    matches = outcomes(verdicts)
    record = {n: {"wins": 0, "ties": 0, "losses": 0} for n in answers}
    for a, b, score in matches:
        key_a = "wins" if score == 1 else "ties" if score == 0.5 else "losses"
        key_b = {"wins": "losses", "losses": "wins", "ties": "ties"}[key_a]
        record[a][key_a] += 1
        record[b][key_b] += 1
    return {
        "judge": str(judge_path),
        "models": list(answers),
        "questions": list(questions),
        "answers": answers,
        "verdicts": [v.__dict__ for v in verdicts],
        "record": record,
        "elo": elo(matches, seed=seed),
        "bradley_terry": bradley_terry(matches),
    }


def format_ratings(res: dict) -> str:
    lines = [
        "| model | Elo | Bradley-Terry | wins | ties | losses |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for n in sorted(res["models"], key=lambda n: -res["bradley_terry"][n]):
        r = res["record"][n]
        lines.append(
            f"| {n} | {res['elo'][n]:.0f} | {res['bradley_terry'][n]:.0f} | {r['wins']} "
            f"| {r['ties']} | {r['losses']} |"
        )
    return "\n".join(lines)
