"""Symbolic and arithmetic reasoning generated with a seed at any difficulty (Zhao et al.
§7.1.3; the chain-of-thought tasks of Wei et al. 2022), and their evaluation.

Generated tasks cannot leak into the training data ahead of time and have no ceiling:
raise `difficulty` and the items get harder. Every item carries a worked rationale that
reaches its answer, so chain-of-thought demonstrations come with the task.

| task | difficulty | question | answer |
|---|---|---|---|
| `coin_flip` | people who flip or do not flip | is the coin still heads up? | `yes` / `no` |
| `last_letter` | words | concatenate the last letters | `ene` |
| `reverse_list` | items | reverse the list | `key, gum, alarm` |
| `addition` | digits per operand | `a + b` | `8283` |
| `multiplication` | digits per operand | `a * b` | `1924` |
| `sort_words` | words | sort alphabetically | `ant bee cat` |

```python
from lmlab.eval.synthetic import evaluate_synthetic
res = evaluate_synthetic(model, tok, "addition", n_items=50, difficulty=3, shots=4, cot=True)
print(res["accuracy"], res["accuracy_se"])
```
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from lmlab.errors import UsageError
from lmlab.eval.metrics import mean_stderr
from lmlab.prompt.answers import read_answer
from lmlab.prompt.complete import GenerateFn, model_generate_fn
from lmlab.prompt.fewshot import build_prompt, demo_answer
from lmlab.prompt.reasoning import majority_vote
from lmlab.prompt.templates import default_template

TASKS = ("coin_flip", "last_letter", "reverse_list", "addition", "multiplication", "sort_words")

# Common English words: lower-case letters only, all distinct (a test checks both).
_WORD_TEXT = """
    apple river stone house water light table chair bread music paper green happy
    money night plant horse smile dream heart ocean cloud tiger piano lemon grape bottle
    garden window pencil rabbit orange silver market doctor summer winter spring autumn
    island forest desert valley bridge castle candle basket button camera dinner dragon
    engine family finger flower guitar hammer helmet jacket jungle kitten ladder letter
    magnet marble meadow mirror monkey needle number office parrot pepper pillow planet
    pocket puzzle rocket saddle school shadow shovel singer spider square street sugar
    ticket tomato tunnel turtle velvet violin wallet wizard yellow zebra anchor barrel
    bucket cactus carpet cherry cotton crayon danger eagle fabric feather fossil glove
    honey igloo jelly kettle koala lantern meteor napkin noodle onion oyster panda
    pirate quartz radio salmon scarf sketch snail spoon statue sunset thunder toast
    umbrella vanilla walnut whale yogurt acorn bamboo beach berry blanket breeze cabin
    canyon cereal circle comet copper crown daisy dolphin echo falcon fiddle galaxy
    ginger harbor hazel iris ivory jasmine kayak lagoon lizard maple mango melon moose
    nectar nickel olive opal otter pearl pebble penguin plum poem prism pumpkin quilt
    raven reef ribbon robin ruby sand season shell sparrow spice storm sapphire tulip
    tower trumpet velour vessel village violet wagon willow wind zipper
"""
WORDS = tuple(_WORD_TEXT.split())
_NAME_TEXT = """
    Ava Ben Cleo Dara Eli Fay Gus Hana Ivan Jade Kai Lena Milo Nia Omar Pia Quinn Rosa
    Sami Tess Uma Vik Wren Xena Yuri Zoe Abel Bea Cruz Dina Ezra Finn Gia Hugo Ines Joel
    Kira Leo Maya Noor Otto Pam Raj Sage Tomas Una Vera Wade Yara Zane
"""
NAMES = tuple(_NAME_TEXT.split())
_SINGLE = ("ones", "tens", "hundreds", "thousands")


@dataclass(frozen=True)
class Item:
    """One generated question. `rationale` is a worked chain of thought ending in "So the
    answer is <answer>."; `protected` lists the substrings of `question` that carry the
    answer (operands, words, "does not flip"), which input perturbations leave intact."""

    id: str
    task: str
    question: str
    answer: str
    difficulty: int
    rationale: str
    protected: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        d = asdict(self)
        d["protected"] = list(self.protected)
        return d


# --- generators: one function per task, (rng, difficulty) -> question, answer, rationale ---


def _coin_flip(rng: random.Random, n: int) -> tuple[str, str, str, tuple[str, ...]]:
    people = [rng.choice(NAMES) for _ in range(n)]
    flips = [rng.random() < 0.5 for _ in range(n)]
    parts = ["A coin is heads up."]
    steps, heads = ["The coin starts heads up."], True
    for name, flip in zip(people, flips, strict=True):
        if flip:
            heads = not heads
            parts.append(f"{name} flips the coin.")
            steps.append(f"{name} flips it, so it is {'heads' if heads else 'tails'} up.")
        else:
            parts.append(f"{name} does not flip the coin.")
            steps.append(
                f"{name} does not flip it, so it stays {'heads' if heads else 'tails'} up."
            )
    parts.append("Is the coin still heads up?")
    answer = "yes" if heads else "no"
    rationale = " ".join(steps) + f" So the answer is {answer}."
    q = " ".join(parts)
    return q, answer, rationale, tuple(k for k in ("flips the coin", "does not flip") if k in q)


def _last_letter(rng: random.Random, n: int) -> tuple[str, str, str, tuple[str, ...]]:
    words = rng.sample(WORDS, n)
    answer = "".join(w[-1] for w in words)
    q = f'Take the last letters of the words in "{" ".join(words)}" and concatenate them.'
    steps = [f'The last letter of "{w}" is "{w[-1]}".' for w in words]
    rationale = (
        " ".join(steps) + f' Concatenating them gives "{answer}". So the answer is {answer}.'
    )
    return q, answer, rationale, tuple(words)


def _reverse_list(rng: random.Random, n: int) -> tuple[str, str, str, tuple[str, ...]]:
    words = rng.sample(WORDS, n)
    answer = ", ".join(reversed(words))
    q = f"Reverse the sequence: {', '.join(words)}."
    steps = [f"Item {n - i} from the start is {w}." for i, w in enumerate(reversed(words))]
    rationale = (
        f"The sequence has {n} items; reading it from the last to the first: "
        + " ".join(steps)
        + f" So the answer is {answer}."
    )
    return q, answer, rationale, tuple(words)


def _operands(rng: random.Random, digits: int) -> tuple[int, int]:
    lo = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(lo, 10**digits - 1), rng.randint(lo, 10**digits - 1)


def _column(i: int) -> str:
    return _SINGLE[i] if i < len(_SINGLE) else f"column {i + 1} from the right"


def _addition(rng: random.Random, d: int) -> tuple[str, str, str, tuple[str, ...]]:
    a, b = _operands(rng, d)
    da, db = str(a).zfill(d)[::-1], str(b).zfill(d)[::-1]
    steps, carry = [], 0
    for i in range(d):
        x, y = int(da[i]), int(db[i])
        s = x + y + carry
        terms = f"{x} + {y}" + (f" + {carry}" if carry else "")
        carry, digit = divmod(s, 10)
        note = f", carry {carry}" if carry else ""
        steps.append(f"{_column(i).capitalize()}: {terms} = {s}, write {digit}{note}.")
    if carry:
        steps.append(f"The final carry {carry} is the leading digit.")
    answer = str(a + b)
    rationale = f"Add {a} and {b} column by column. " + " ".join(steps)
    rationale += f" So the answer is {answer}."
    return f"What is {a} + {b}?", answer, rationale, (str(a), str(b))


def _multiplication(rng: random.Random, d: int) -> tuple[str, str, str, tuple[str, ...]]:
    a, b = _operands(rng, d)
    partials, steps = [], []
    for i, ch in enumerate(str(b)[::-1]):
        place = int(ch) * 10**i
        partials.append(a * place)
        steps.append(f"{a} * {place} = {a * place}.")
    answer = str(a * b)
    total = " + ".join(str(p) for p in partials)
    rationale = f"Multiply {a} by each digit of {b} with its place value. " + " ".join(steps)
    if len(partials) > 1:
        rationale += f" Adding the partial products: {total} = {answer}."
    rationale += f" So the answer is {answer}."
    return f"What is {a} * {b}?", answer, rationale, (str(a), str(b))


def _sort_words(rng: random.Random, n: int) -> tuple[str, str, str, tuple[str, ...]]:
    words = rng.sample(WORDS, n)
    ordered = sorted(words)
    answer = " ".join(ordered)
    q = f"Sort the following words alphabetically: {' '.join(words)}"
    steps = [f"{i + 1}. {w}" for i, w in enumerate(ordered)]
    rationale = (
        "Compare the words letter by letter from the first letter on. In alphabetical order: "
        + ", ".join(steps)
        + f". So the answer is {answer}."
    )
    return q, answer, rationale, tuple(words)


_GENERATORS: dict[str, Callable] = {
    "coin_flip": _coin_flip,
    "last_letter": _last_letter,
    "reverse_list": _reverse_list,
    "addition": _addition,
    "multiplication": _multiplication,
    "sort_words": _sort_words,
}
_MAX_DIFFICULTY = {"last_letter": len(WORDS), "reverse_list": len(WORDS), "sort_words": len(WORDS)}


# the shape of each task's answer, for reading it out of a generation
ANSWER_FORMS = {
    "coin_flip": "yes_no",
    "last_letter": "word",
    "reverse_list": "comma_list",
    "addition": "integer",
    "multiplication": "integer",
    "sort_words": "word_list",
}


def _check_name(task: str) -> None:
    if task not in _GENERATORS:
        raise UsageError(f"synthetic: unknown task {task!r}; allowed: {', '.join(TASKS)}")


def check_task(task: str, difficulty: int) -> None:
    _check_name(task)
    top = _MAX_DIFFICULTY.get(task, 1000)
    if not isinstance(difficulty, int) or not 1 <= difficulty <= top:
        raise UsageError(f"synthetic: difficulty for {task} must be an integer in [1, {top}]")


def make_items(
    task: str,
    n: int,
    difficulty: int,
    seed: int = 0,
    split: str = "test",
    exclude: Sequence[str] = (),
    unique: bool = False,
) -> list[Item]:
    """`n` items of `task`; the same (task, difficulty, seed, split) gives the same items.

    Items are drawn independently (a small difficulty may repeat a question unless
    `unique`); questions in `exclude` are never drawn, which keeps a demonstration split
    disjoint from a test split."""
    check_task(task, difficulty)
    if n < 0:
        raise UsageError("synthetic: n_items must be >= 0")
    # a string seed is hashed with SHA-512 by `random`: stable across runs and platforms
    rng = random.Random(f"{task}|{difficulty}|{seed}|{split}")
    banned, items, tries = set(exclude), [], 0
    while len(items) < n:
        tries += 1
        if tries > 100 * n + 1000:
            raise UsageError(
                f"synthetic: {task} at difficulty {difficulty} has too few distinct questions "
                f"for {n} {split} items; raise the difficulty or ask for fewer items"
            )
        q, a, r, keep = _GENERATORS[task](rng, difficulty)
        if q in banned:
            continue
        if unique:
            banned.add(q)
        item_id = f"{task}-d{difficulty}-s{seed}-{split}-{len(items)}"
        items.append(Item(item_id, task, q, a, difficulty, r, keep))
    return items


def demo_pool(
    task: str, difficulty: int, seed: int, test_items: Sequence[Item], size: int = 16
) -> list[Item]:
    """Demonstrations from the "demo" split, distinct from each other and from every test
    question, so a few-shot prompt never shows the answer to the question it asks."""
    exclude = [it.question for it in test_items]
    return make_items(task, size, difficulty, seed, "demo", exclude, unique=True)


# --- answers --------------------------------------------------------------------------------


def extract_answer(task: str, text: str) -> str | None:
    """The answer in `text` in the task's canonical form, or None: the text after the first
    "answer is" first, else the last number, yes/no, word or line (`read_answer` with the
    task's answer form)."""
    _check_name(task)
    return read_answer(text, ANSWER_FORMS[task])


# --- evaluation -------------------------------------------------------------------------


def answer_budget(items: Sequence[Item], cot: bool, tokenizer=None) -> int:
    """Room for the longest worked answer (rationale with `cot`) plus a quarter and 16
    tokens; counted in characters when there is no tokenizer."""

    def size(text: str) -> int:
        return len(tokenizer.encode(text).ids) if tokenizer is not None else len(text)

    longest = max((size(demo_answer(it, cot)) for it in items), default=16)
    return min(2048, longest * 5 // 4 + 16)


def evaluate_synthetic(
    model,
    tokenizer,
    task: str,
    n_items: int = 50,
    difficulty: int = 2,
    shots: int = 0,
    cot: bool = False,
    self_consistency: int = 1,
    temperature: float | None = None,
    seed: int = 0,
    chat: bool = False,
    template: str | None = None,
    items: Sequence[Item] | None = None,
    max_new_tokens: int | None = None,
    batch_size: int = 16,
    generate_fn: GenerateFn | None = None,
) -> dict:
    """Accuracy (with its standard error) of a model on a generated task, and per-item logs.

    `shots` demonstrations per item are sampled (seeded by `seed` and the item) from a demo
    split disjoint from the test items; with `cot` they show their rationales, or, with no
    shots, the prompt ends in "Let's think step by step.". `self_consistency` > 1 samples
    that many generations per item (temperature defaults to 0.7 then, greedy otherwise) and
    scores the majority answer. `items` replaces the generated test items (perturbed ones,
    say); `generate_fn(prompts, cfg)` replaces the model (tests pass canned outputs)."""
    from lmlab.infer import GenerationConfig

    check_task(task, difficulty)
    template = template or default_template(chat)
    if shots < 0:
        raise UsageError("synthetic: shots must be >= 0")
    if self_consistency < 1:
        raise UsageError("synthetic: self_consistency must be >= 1")
    if temperature is None:
        temperature = 0.7 if self_consistency > 1 else 0.0
    if self_consistency > 1 and temperature <= 0:
        raise UsageError("synthetic: self_consistency > 1 needs temperature > 0 (greedy repeats)")
    test = list(items) if items is not None else make_items(task, n_items, difficulty, seed)
    if any(it.task != task for it in test):
        raise UsageError(f"synthetic: every item passed in `items` must be a {task} item")
    pool = demo_pool(task, difficulty, seed, test, size=max(16, 4 * shots)) if shots else []
    prompts = []
    for it in test:
        demos = random.Random(f"{seed}|{it.id}").sample(pool, shots) if shots else []
        prompts.append(build_prompt(it, demos, cot, template, chat))
    if max_new_tokens is None:
        max_new_tokens = answer_budget(test, cot, tokenizer)
    cfg = GenerationConfig(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        n=self_consistency,
        seed=seed,
        stop_strings=[] if chat else ["\n\n"],
    ).validate()
    if generate_fn is None:
        if model is None or tokenizer is None:
            raise UsageError("synthetic: evaluate_synthetic needs a model and its tokenizer")
        generate_fn = model_generate_fn(model, tokenizer, chat, batch_size)
    generations = generate_fn(prompts, cfg) if prompts else []
    if len(generations) != len(prompts):
        raise ValueError("synthetic: generate_fn must return one list of texts per prompt")
    records = []
    for it, prompt, gens in zip(test, prompts, generations, strict=True):
        extracted = [extract_answer(task, g) for g in gens]
        pred = majority_vote(extracted) if extracted else None
        records.append(
            {
                "id": it.id,
                "question": it.question,
                "answer": it.answer,
                "prompt": prompt,
                "generations": list(gens),
                "extracted": extracted,
                "prediction": pred,
                "correct": pred == it.answer,
            }
        )
    acc, se = mean_stderr([float(r["correct"]) for r in records])
    return {
        "task": task,
        "difficulty": difficulty,
        "n": len(records),
        "shots": shots,
        "cot": cot,
        "self_consistency": self_consistency,
        "temperature": temperature,
        "seed": seed,
        "chat": chat,
        "template": template,
        "max_new_tokens": max_new_tokens,
        "accuracy": acc,
        "accuracy_se": se,
        "items": records,
    }


def score_fn_for(model, tokenizer, task: str, difficulty: int, **kwargs) -> Callable:
    """`score(items, template=None)` -> 1.0/0.0 per item, for `lmlab.eval.perturb`'s
    template-spread and perturbation-drop reports; `kwargs` go to `evaluate_synthetic`."""

    def score(items: Sequence[Item], template: str | None = None) -> list[float]:
        res = evaluate_synthetic(
            model, tokenizer, task, difficulty=difficulty, items=items, template=template, **kwargs
        )
        return [float(r["correct"]) for r in res["items"]]

    return score
