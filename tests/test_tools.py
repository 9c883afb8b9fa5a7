"""Tools and the ReAct agent: the calculator, the registry's limits, the sandboxed Python
tool stopping code that loops, connects or writes outside its folder (and the agent
reporting it instead of crashing), tool calls read in OpenAI's shape and ReAct's text,
and tool calls through lmlab's server in the OpenAI shape, with the official client."""

from __future__ import annotations

import json
import time

import pytest

from lmlab.errors import UsageError
from lmlab.prompt.agent import run_agent
from lmlab.prompt.tools import (
    ToolCall,
    ToolRegistry,
    calculate,
    default_registry,
    parse_tool_calls,
    schema_of,
)
from tests.conftest import lmlab_here


def test_the_calculator_computes_and_refuses_what_is_not_arithmetic():
    assert calculate("(3 + 4) * 2 ** 10 / 7") == "1024"
    assert calculate("-7 // 2 + 10 % 3") == "-3"
    assert calculate("1 / 3")[:6] == "0.3333"
    for bad, words in [("2 ** 100000", "power too large"), ("__import__('os')", "only numbers"),
                       ("x + 1", "only numbers"), ("1 +", "not an arithmetic")]:  # fmt: skip
        with pytest.raises(ValueError, match=words):
            calculate(bad)


def test_registry_schemas_and_limits():
    reg = ToolRegistry()

    def weather(city: str, days: int = 1) -> str:
        """The forecast for a city."""
        return f"{city}: sunny for {days} day(s)"

    def slow(x: str) -> str:
        """Sleeps."""
        time.sleep(2)
        return x

    def broken(x: str) -> str:
        """Fails."""
        raise KeyError(x)

    tool = reg.register(weather)
    props = {"city": {"type": "string"}, "days": {"type": "integer"}}
    assert tool.spec() == {"type": "function", "function": {
        "name": "weather", "description": "The forecast for a city.",
        "parameters": {"type": "object", "required": ["city"], "properties": props}}}  # fmt: skip
    reg.register(slow, timeout_s=0.2)
    reg.register(broken)
    assert (
        reg.run(ToolCall("weather", {"city": "Oslo", "days": 2})).output
        == "Oslo: sunny for 2 day(s)"
    )
    for call, words in [
        (ToolCall("weather", {}), "missing argument"),
        (ToolCall("weather", {"city": "Oslo", "days": "two"}), "must be a integer"),
        (ToolCall("weather", {"city": "Oslo", "when": 1}), "unknown argument"),
        (ToolCall("nope", {}), "unknown tool"),
        (ToolCall("slow", {"x": "a"}), "no result within"),
        (ToolCall("broken", {"x": "a"}), "KeyError"),
    ]:
        res = reg.run(call)
        assert not res.ok and words in res.output, (call, res.output)

    def listed(xs: list) -> str:
        """Takes a list."""
        return str(xs)

    with pytest.raises(UsageError, match="must be str"):
        schema_of(listed)


def test_tool_calls_are_read_in_openais_shape_and_reacts_text():
    reg = default_registry(["calculator"])
    tagged = 'ok <tool_call>{"name": "calculator", "arguments": {"expression": "1+1"}}</tool_call>'
    inner = json.dumps({"expression": "2*3"})  # OpenAI sends arguments as a JSON string
    nested = json.dumps({"function": {"name": "calculator", "arguments": inner}})
    fenced = f"```json\n{nested}\n```"
    bare = 'Sure. {"name": "calculator", "arguments": {"expression": "4-1"}} done'
    react = 'Thought: add\nAction: calculator\nAction Input: {"expression": "5+5"}\nObservation: x'
    plain = "Thought: add\nAction: calculator\nAction Input: 6 + 6"
    got = [parse_tool_calls(t, reg)[0] for t in (tagged, fenced, bare, react, plain)]
    assert [c.name for c in got] == ["calculator"] * 5
    assert [c.arguments["expression"] for c in got] == ["1+1", "2*3", "4-1", "5+5", "6 + 6"]
    assert parse_tool_calls("The answer is 4.") == []
    shape = got[0].openai()
    assert shape["type"] == "function" and json.loads(shape["function"]["arguments"]) == {
        "expression": "1+1"}  # fmt: skip


class Scripted:
    name = "scripted"

    def __init__(self, replies: list[str]) -> None:
        self.replies, self.seen = list(replies), []

    def chat(self, conversations, cfg):
        self.seen.append(conversations[0])
        return [[self.replies.pop(0) if self.replies else "Thought: hmm"]]


def test_the_agent_acts_observes_answers_and_writes_its_transcript(tmp_path):
    model = Scripted([
        'Thought: multiply\nAction: calculator\nAction Input: {"expression": "6*7"}',
        "Thought: I know it\nFinal Answer: 42",
    ])  # fmt: skip
    res = run_agent(model, "What is 6 times 7?", default_registry(["calculator"]),
                    transcript=tmp_path / "t.jsonl")  # fmt: skip
    assert (res.answer, res.stopped, res.steps) == ("42", "answer", 2)
    assert model.seen[1][-1] == {"role": "user", "content": "Observation: 42"}
    events = [json.loads(x) for x in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["task", "model", "tool", "model", "answer"]
    assert events[2]["ok"] and events[2]["output"] == "42"
    stuck = run_agent(Scripted([]), "?", default_registry(["calculator"]), max_steps=3)
    assert (stuck.answer, stuck.stopped, stuck.steps) == (None, "steps", 3)


@pytest.fixture
def sandbox():
    from lmlab.prompt.sandbox import isolation_available

    ok, why = isolation_available()
    if not ok:
        pytest.skip(f"no OS sandbox here: {why}")


def test_hostile_tool_code_is_stopped_and_the_agent_reports_it(sandbox, tmp_path):
    reg = default_registry(["python"])
    assert reg.run(ToolCall("python", {"code": "print(sum(range(5)))"})).output.strip() == "10"
    hostile = {
        "loops": "while True:\n    pass",
        "allocates": "x = []\nwhile True:\n    x.append(bytearray(10**7))",
        "connects": "import socket\nsocket.create_connection(('1.1.1.1', 53))",
        "writes outside": f"open({str(tmp_path / 'escape.txt')!r}, 'w').write('x')",
    }
    for what, code in hostile.items():
        res = reg.run(ToolCall("python", {"code": code}))
        assert not res.ok and "the code stopped" in res.output, (what, res.output)
    assert not (tmp_path / "escape.txt").exists()
    model = Scripted([
        'Action: python\nAction Input: {"code": "while True:\\n    pass"}',
        "Final Answer: the code did not finish",
    ])  # fmt: skip
    res = run_agent(model, "Run forever", reg)
    assert res.answer == "the code did not finish"
    tool = next(e for e in res.transcript if e["event"] == "tool")
    assert not tool["ok"] and "timeout" in tool["output"]


def test_tool_calls_round_trip_through_the_server_in_openais_shape(tmp_path):
    openai = pytest.importorskip("openai")
    from lmlab.serve.app import create_app
    from lmlab.serve.engine import EngineLimits, load_engine
    from lmlab.serve.metrics import Metrics
    from tests.serving import running, scripted_checkpoint

    call = '{"name": "calculator", "arguments": {"expression": "6*7"}}'
    ckpt = scripted_checkpoint(tmp_path / "m", ["<tool_call>", call, "</tool_call>"], 1024)
    engine = load_engine("s", str(ckpt), EngineLimits(max_concurrency=2), Metrics())
    tools = default_registry(["calculator"]).specs()
    with running(create_app({"s": engine})) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        messages = [{"role": "user", "content": "What is 6 times 7?"}]
        r = client.chat.completions.create(model="s", messages=messages, tools=tools)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (tc,) = choice.message.tool_calls
        assert tc.function.name == "calculator"
        assert json.loads(tc.function.arguments) == {"expression": "6*7"}
        # the call and its result go back in the conversation, as OpenAI's clients send them
        asked = ToolCall(tc.function.name, json.loads(tc.function.arguments))
        result = default_registry(["calculator"]).run(asked)
        messages += [choice.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": tc.id, "content": result.output}]  # fmt: skip
        r = client.chat.completions.create(model="s", messages=messages, tools=tools)
        assert r.choices[0].finish_reason in ("tool_calls", "stop", "length")
        plain = client.chat.completions.create(model="s", messages=messages[:1])
        assert plain.choices[0].message.tool_calls is None  # no tools offered: plain text
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(
                model="s", messages=messages[:1], tools=tools, tool_choice="required"
            )
        # streamed: the call comes as one tool_calls delta, never as content
        chunks = list(
            client.chat.completions.create(
                model="s", messages=messages[:1], tools=tools, stream=True, logprobs=True
            )
        )
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        assert "".join(d.content or "" for d in deltas) == ""
        ((streamed,),) = [d.tool_calls for d in deltas if d.tool_calls]
        assert streamed.index == 0 and streamed.function.name == "calculator"
        assert json.loads(streamed.function.arguments) == {"expression": "6*7"}
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        lps = [t for c in chunks if c.choices and c.choices[0].logprobs
               for t in c.choices[0].logprobs.content]  # fmt: skip
        assert len(lps) == 3  # the three tokens' log-probs, sent with the call


def test_a_streamed_reply_goes_out_until_a_tool_call_could_begin():
    from lmlab.serve.tooling import ToolStream, held_from

    assert held_from("The answer is 42.") == len("The answer is 42.")
    assert held_from("Let me check <tool") == len("Let me check ")  # a marker's beginning
    assert held_from('So: {"name": "x"}') == len("So: ")
    assert held_from("Action") == 0 and held_from("The Act") == len("The ")
    tools = default_registry(["calculator"]).specs()
    text = 'Checking. <tool_call>{"name": "calculator", "arguments": {"expression": "1+1"}}'
    ts, sent = ToolStream(tools), ""
    for end in range(1, len(text) + 1):  # one character at a time
        sent += ts.release(text[:end])
    assert sent == "Checking. "
    rest, calls = ts.finish(text + "</tool_call>")
    assert rest == "" and calls[0]["function"]["name"] == "calculator" and calls[0]["index"] == 0
    # braces that are not a call are held, then sent as content at the end
    ts = ToolStream(tools)
    first = ts.release("A set {1, 2}")
    assert first == "A set " and ts.finish("A set {1, 2} has two items.") == (
        "{1, 2} has two items.", None)  # fmt: skip
    # a call to a tool the request did not offer is content
    ts = ToolStream(tools)
    other = '<tool_call>{"name": "rm", "arguments": {}}</tool_call>'
    assert ts.release(other) == "" and ts.finish(other) == (other, None)


def test_agent_and_solve_commands_check_their_input(tmp_path, monkeypatch, capsys):
    mine = tmp_path / "notes.txt"
    mine.write_text("keep me")
    for args, words in [
        (["agent", "x", "--tools", "browser", "--model", "m"], "built-in tools"),
        (["agent", "x", "--tools", "search", "--model", "m"], "needs an index"),
        (["agent", "x", "--transcript", str(mine), "--model", "m"], "refusing to replace"),
        (["solve", "x", "--strategy", "guess", "--model", "m"], "--strategy guess"),
    ]:
        code, _, err = lmlab_here(monkeypatch, capsys, *args)
        assert code == 2 and words in err, (args, err)
    assert mine.read_text() == "keep me"
