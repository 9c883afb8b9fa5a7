"""Generated reasoning tasks, their prompts and scoring, and the robustness reports."""

from __future__ import annotations

import math
import re
import statistics

import pytest

from lmlab.errors import UsageError
from lmlab.eval.metrics import mean_stderr
from lmlab.eval.perturb import (
    Perturbation,
    change_case,
    evaluate_perturbed,
    evaluate_templates,
    extra_whitespace,
    perturb_items,
    typos,
)
from lmlab.eval.synthetic import (
    NAMES,
    TASKS,
    WORDS,
    answer_budget,
    demo_pool,
    evaluate_synthetic,
    extract_answer,
    make_items,
    score_fn_for,
)
from lmlab.prompt.fewshot import build_prompt
from lmlab.prompt.reasoning import ZERO_SHOT_COT

pytestmark = pytest.mark.usefixtures("one_thread")


def solve(task: str, question: str) -> tuple[str, int]:
    """An independent solver: (answer, size) read back from the question text alone."""
    if task == "coin_flip":
        people = re.findall(r"(\w+) (flips|does not flip) the coin\.", question)
        flips = sum(1 for _, verb in people if verb == "flips")
        return ("yes" if flips % 2 == 0 else "no"), len(people)
    if task in ("addition", "multiplication"):
        a, b = re.fullmatch(r"What is (\d+) [+*] (\d+)\?", question).groups()
        assert len(a) == len(b)
        return str(int(a) + int(b) if task == "addition" else int(a) * int(b)), len(a)
    if task == "last_letter":
        words = re.search(r'"(.*)"', question).group(1).split()
        return "".join(w[-1] for w in words), len(words)
    if task == "reverse_list":
        words = question.split(": ", 1)[1].rstrip(".").split(", ")
        return ", ".join(words[::-1]), len(words)
    words = question.split(": ", 1)[1].split()
    return " ".join(sorted(words)), len(words)


def test_word_lists_are_lower_case_distinct_words():
    assert len(WORDS) >= 200 and len(set(WORDS)) == len(WORDS)
    assert all(re.fullmatch(r"[a-z]+", w) for w in WORDS)
    assert len(set(NAMES)) == len(NAMES) >= 40


@pytest.mark.parametrize("task", TASKS)
def test_items_are_seeded_correct_and_sized_by_difficulty(task):
    a = make_items(task, 20, 4, seed=3)
    assert a == make_items(task, 20, 4, seed=3)
    assert [i.question for i in a] != [i.question for i in make_items(task, 20, 4, seed=4)]
    for d in (1, 2, 5, 9):
        for it in make_items(task, 15, d, seed=0):
            answer, size = solve(task, it.question)
            assert (it.answer, size, it.difficulty, it.task) == (answer, d, d, task)
            # the worked rationale reaches the answer, and the extractor reads it back
            assert it.rationale.endswith(f"So the answer is {it.answer}.")
            assert extract_answer(task, it.rationale) == it.answer
            assert all(p in it.question for p in it.protected)
    assert len({i.id for i in a}) == len(a)


def test_arithmetic_rationales_are_correct_step_by_step():
    for it in make_items("addition", 30, 6, seed=1):
        digits = re.findall(r"write (\d)", it.rationale)
        carry = re.search(r"final carry (\d)", it.rationale)
        assert (carry.group(1) if carry else "") + "".join(reversed(digits)) == it.answer
    for it in make_items("multiplication", 30, 4, seed=1):
        products = re.findall(r"(\d+) \* (\d+) = (\d+)\.", it.rationale)
        assert len(products) == 4
        assert all(int(x) * int(y) == int(z) for x, y, z in products)
        assert sum(int(z) for *_, z in products) == int(it.answer)


def test_demo_split_is_disjoint_and_small_spaces_fail_clearly():
    test = make_items("addition", 60, 1, seed=0)  # one-digit sums: only 100 questions exist
    pool = demo_pool("addition", 1, 0, test, size=16)
    questions = {i.question for i in pool}
    assert len(questions) == 16 and not questions & {i.question for i in test}
    with pytest.raises(UsageError, match="too few distinct questions"):
        demo_pool("addition", 1, 0, make_items("addition", 2000, 1), size=16)


def test_bad_arguments_name_what_is_allowed():
    with pytest.raises(UsageError, match="unknown task 'chess'.*coin_flip"):
        make_items("chess", 3, 1)
    with pytest.raises(UsageError, match=r"difficulty for sort_words must be .*\[1, "):
        make_items("sort_words", 3, len(WORDS) + 1)
    with pytest.raises(UsageError, match="difficulty"):
        make_items("addition", 3, 0)
    it = make_items("addition", 1, 2)[0]
    with pytest.raises(UsageError, match=r"\{question\}"):
        build_prompt(it, template="Q: A:")
    with pytest.raises(UsageError, match="temperature > 0"):
        evaluate_synthetic(None, None, "addition", 2, 2, self_consistency=3, temperature=0.0)


@pytest.mark.parametrize(
    ("task", "text", "expected"),
    [
        ("addition", "12 + 5 ... The answer is 1,234. Then 99", "1234"),
        ("addition", "so 12 + 5 = 17", "17"),
        ("multiplication", "The answer is: 0042", "42"),
        ("addition", "I do not know", None),
        ("coin_flip", "The coin is tails. So the answer is No.", "no"),
        ("coin_flip", "Yes, it was flipped... I noted it, yes", "yes"),
        ("coin_flip", "perhaps", None),
        ("last_letter", 'So the answer is "tmr". Next: abc', "tmr"),
        ("last_letter", "Concatenating them gives tmr", "tmr"),
        ("reverse_list", "The answer is Cactus, ginger,  lemon.", "cactus, ginger, lemon"),
        ("reverse_list", "Sure:\ncactus ginger lemon\n\n", "cactus, ginger, lemon"),
        ("sort_words", "The answer is: reef, summer, tower.\nQ: next", "reef summer tower"),
        ("sort_words", "", None),
    ],
)
def test_extract_answer(task, text, expected):
    assert extract_answer(task, text) == expected


def test_prompts_zero_few_shot_cot_and_chat():
    it, d1, d2 = make_items("coin_flip", 3, 3, seed=5)
    plain = build_prompt(it)
    assert plain == f"Q: {it.question}\nA:"
    assert build_prompt(it, cot=True) == f"Q: {it.question}\nA: {ZERO_SHOT_COT}"
    few = build_prompt(it, [d1, d2])
    assert few.endswith(plain) and few.count("Q: ") == 3
    assert f"The answer is {d1.answer}." in few and d1.rationale not in few
    cot = build_prompt(it, [d1, d2], cot=True)
    assert d1.rationale in cot and d2.rationale in cot and ZERO_SHOT_COT not in cot
    msgs = build_prompt(it, [d1], chat=True)
    assert [m["role"] for m in msgs] == ["user", "assistant", "user"]
    assert (
        msgs[-1]["content"] == it.question and msgs[1]["content"] == f"The answer is {d1.answer}."
    )


def test_scoring_with_canned_generations():
    items = make_items("addition", 6, 3, seed=2)
    seen = {}

    def canned(prompts, cfg):
        seen["cfg"] = cfg
        outs = []
        for i, (p, it) in enumerate(zip(prompts, items, strict=True)):
            assert p.endswith(f"Q: {it.question}\nA:") and p.count(it.question) == 1
            wrong = str(int(it.answer) + 1)
            if i % 3 == 0:  # majority right
                outs.append([f"The answer is {it.answer}.", wrong, f"... = {it.answer}"])
            elif i % 3 == 1:  # majority wrong
                outs.append([wrong, f"The answer is {wrong}", it.answer])
            else:  # only one sample has an answer at all
                outs.append(["no idea", f"It is {it.answer}", "hmm"])
        return outs

    res = evaluate_synthetic(
        None, None, "addition", 6, 3, shots=2, self_consistency=3, seed=2, generate_fn=canned
    )
    assert seen["cfg"].n == 3 and seen["cfg"].temperature == 0.7 and seen["cfg"].seed == 2
    assert [r["correct"] for r in res["items"]] == [True, False, True] * 2
    assert (res["accuracy"], res["accuracy_se"]) == mean_stderr([1, 0, 1] * 2)
    r = res["items"][2]
    assert r["extracted"] == [None, items[2].answer, None] and r["prediction"] == items[2].answer
    assert res["n"] == 6 and res["shots"] == 2 and len(r["generations"]) == 3
    # demonstrations are sampled with the seed: the same seed gives the same prompts
    again = evaluate_synthetic(
        None, None, "addition", 6, 3, shots=2, self_consistency=3, seed=2, generate_fn=canned
    )
    assert [r["prompt"] for r in again["items"]] == [r["prompt"] for r in res["items"]]
    # a prompt with no generations at all has no prediction (and is not an error)
    empty = evaluate_synthetic(None, None, "addition", 2, 3, generate_fn=lambda p, c: [[], []])
    assert [r["prediction"] for r in empty["items"]] == [None, None] and empty["accuracy"] == 0


def test_smoke_model_runs_every_mode(smoke_run):
    from lmlab import load_model, load_tokenizer

    path = smoke_run / "sft" / "model"
    model, tok = load_model(path), load_tokenizer(path)
    for kw in (
        {"shots": 2, "cot": True},
        {"self_consistency": 2, "temperature": 0.9, "cot": True},
        {"chat": True, "shots": 1},
    ):
        res = evaluate_synthetic(model, tok, "sort_words", 3, 2, max_new_tokens=8, **kw)
        assert res["n"] == 3 and 0.0 <= res["accuracy"] <= 1.0
        for r in res["items"]:
            n = kw.get("self_consistency", 1)
            assert len(r["generations"]) == n and len(r["extracted"]) == n
            assert all(isinstance(g, str) for g in r["generations"])
    assert res["items"][0]["prompt"][-1]["content"] == res["items"][0]["question"]
    # the default budget holds the longest worked answer in this tokenizer's tokens
    items = make_items("multiplication", 10, 4)
    longest = max(len(tok.encode(it.rationale).ids) for it in items)
    assert longest < answer_budget(items, True, tok) < 2 * longest


# --- perturbations ------------------------------------------------------------------------

TEXT = " ".join(WORDS) + " 12345 and 678 plus 9"


def test_typos_are_seeded_keep_numbers_and_hit_the_requested_rate():
    assert typos(TEXT, 0.1, seed=1) == typos(TEXT, 0.1, seed=1) != typos(TEXT, 0.1, seed=2)
    assert typos(TEXT, 0.0, seed=1) == TEXT
    letters = sum(c.isalpha() for c in TEXT)
    for rate in (0.05, 0.2):
        sd = math.sqrt(letters * rate * (1 - rate))
        dropped = len(TEXT) - len(typos(TEXT, rate, seed=0, ops=("drop",)))
        doubled = len(typos(TEXT, rate, seed=0, ops=("duplicate",))) - len(TEXT)
        for n in (dropped, doubled):
            assert abs(n - rate * letters) < 4 * sd
        noisy = typos(TEXT, rate, seed=7)
        assert re.findall(r"\d+", noisy) == ["12345", "678", "9"]
    swapped = typos(TEXT, 0.2, seed=0, ops=("swap",))
    assert sorted(swapped) == sorted(TEXT) and swapped != TEXT
    # numbers are fair game only when asked
    assert re.findall(r"\d+", typos(TEXT, 1.0, 0, protect_numbers=False, ops=("drop",))) == []


def test_case_and_whitespace_keep_protected_spans():
    assert change_case("Reverse: Lemon, Kiwi", "upper", protect=["Kiwi"]) == "REVERSE: LEMON, Kiwi"
    assert change_case("ABC def", "lower") == "abc def"
    flipped = change_case(TEXT, "random_case", seed=4, rate=0.5)
    n_up = sum(c.isupper() for c in flipped)
    letters = sum(c.isalpha() for c in TEXT)
    assert abs(n_up - letters / 2) < 4 * math.sqrt(letters / 4)
    assert flipped.lower() == TEXT and flipped == change_case(TEXT, "random_case", 4, 0.5)
    wide = extra_whitespace(TEXT, 0.5, seed=3)
    assert " ".join(wide.split()) == TEXT and wide != TEXT
    assert extra_whitespace("a b c", 1.0, 0, protect=["a b"]).startswith("a b ")


@pytest.mark.parametrize("task", TASKS)
def test_perturbed_items_keep_their_answers(task):
    items = make_items(task, 20, 4, seed=0)
    for p in (Perturbation("typos", 0.3), Perturbation("whitespace", 1.0)):
        changed = perturb_items(items, p, seed=1)
        assert changed == perturb_items(items, p, seed=1)
        assert sum(c.question != i.question for c, i in zip(changed, items, strict=True)) >= 10
        for c, i in zip(changed, items, strict=True):
            assert all(s in c.question for s in i.protected)
            assert (c.id, c.answer) == (i.id, i.answer)
            if task in ("addition", "multiplication"):
                a, b = re.findall(r"\d+", c.question)
                assert str(int(a) + int(b) if task == "addition" else int(a) * int(b)) == c.answer


def test_template_spread_on_canned_scores():
    canned = {"a": [1, 1, 0, 0], "b": [1, 1, 1, 0], "c": [0, 0, 0, 0]}
    res = evaluate_templates(["x"] * 4, list(canned), lambda items, t: canned[t])
    assert [r["accuracy"] for r in res["templates"]] == [0.5, 0.75, 0.0]
    assert res["templates"][0]["stderr"] == pytest.approx(math.sqrt(1 / 12))
    assert res["spread"] == 0.75 and (res["best"], res["worst"]) == ("b", "c")
    assert res["std"] == pytest.approx(0.3818813, abs=1e-7)
    assert res["std"] == pytest.approx(statistics.stdev([0.5, 0.75, 0.0]))
    with pytest.raises(ValueError, match="3 scores for 4 items"):
        evaluate_templates(["x"] * 4, ["a"], lambda items, t: [1, 1, 1])


def test_perturbed_drop_through_a_brittle_stub_solver():
    """A stub "model" that adds correctly only when it sees the exact phrase "What is":
    casing breaks it every time, so the drop is 1 with no noise; a typo rate breaks it on
    the items whose phrase was hit."""

    def brittle(prompts, cfg):
        out = []
        for p in prompts:
            m = re.search(r"\bWhat is (\d+) \+ (\d+)\?\nA:$", p)
            out.append([f"The answer is {int(m[1]) + int(m[2])}." if m else "The answer is 0."])
        return out

    items = make_items("addition", 30, 3, seed=0)
    score = score_fn_for(None, None, "addition", 3, generate_fn=brittle)
    res = evaluate_perturbed(
        items, score, [Perturbation("upper"), Perturbation("typos", 0.2)], seed=0
    )
    assert res["clean"] == {"accuracy": 1.0, "stderr": 0.0}
    upper, typo = res["perturbed"]
    assert (upper["accuracy"], upper["drop"], upper["drop_se"]) == (0.0, 1.0, 0.0)
    assert upper["examples"][0] == items[0].question.upper()
    hit = [
        not re.fullmatch(r"What is \d+ \+ \d+\?", c.question)
        for c in perturb_items(items, Perturbation("typos", 0.2), seed=0)
    ]
    assert 0 < sum(hit) < len(items)
    assert typo["drop"] == pytest.approx(sum(hit) / len(items))
    assert typo["drop_se"] == pytest.approx(mean_stderr([float(h) for h in hit])[1])
    # templates through the same scorer: the solver only understands the default one
    spread = evaluate_templates(items, ["Q: {question}\nA:", "{question}\nA:"], score)
    assert spread["spread"] == 0.0
    other = "Question: {question}\nAnswer:"
    spread = evaluate_templates(items, ["Q: {question}\nA:", other], score)
    assert spread["spread"] == 1.0 and spread["worst"] == other
