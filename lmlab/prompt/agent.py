"""A ReAct agent (Yao et al. 2023; Zhao et al. §6.4): the model alternates a thought, an
action (a tool call) and the tool's observation, until it gives a final answer or its
budget runs out. Every step goes to a transcript (JSONL: one event per line), so a run
can be read, replayed in a report, or compared.

The prompt lists the tools by their JSON-schema descriptions and asks for ReAct's plain
text (`Thought:`, `Action:`, `Action Input:` as JSON, `Final Answer:`); tool calls in
OpenAI's JSON shape are read too (`lmlab.prompt.tools.parse_tool_calls`). A tool that
fails, loops or is refused by the sandbox becomes an observation that says so: the agent
goes on, and a run never crashes on a tool."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from lmlab.errors import UsageError
from lmlab.infer.options import GenerationConfig
from lmlab.prompt.tools import ToolRegistry, parse_tool_calls

SYSTEM = """You answer questions by reasoning step by step and using tools.

Tools:
{tools}

Use this format:
Thought: what to do next
Action: the tool's name
Action Input: the arguments as a JSON object
Observation: the tool's result (given to you)
... (Thought/Action/Action Input/Observation can repeat)
Thought: I know the answer
Final Answer: the answer"""
_FINAL = re.compile(r"Final Answer:\s*(.*)", re.DOTALL)


@dataclass
class AgentResult:
    answer: str | None  # None: the budget ran out first
    stopped: str  # "answer", "steps", "tokens"
    steps: int
    transcript: list[dict] = field(default_factory=list)


def tool_lines(registry: ToolRegistry) -> str:
    return "\n".join(
        f"- {t.name}: {t.description} Arguments: {json.dumps(t.parameters['properties'])}"
        for t in registry.tools.values()
    )


def run_agent(
    backend,
    task: str,
    registry: ToolRegistry,
    max_steps: int = 6,
    max_tokens: int = 2048,
    cfg: GenerationConfig | None = None,
    transcript: str | Path | None = None,
) -> AgentResult:
    """Solve `task` with the tools of `registry`. `max_steps` bounds the model's turns,
    `max_tokens` the characters/4 it may write in all (a budget that needs no tokenizer,
    so it works on any backend); `transcript` is a JSONL file written as the run goes."""
    if max_steps < 1 or max_tokens < 1:
        raise UsageError("agent: max_steps and max_tokens must be >= 1")
    cfg = dataclasses.replace(
        cfg or GenerationConfig(max_new_tokens=256), stop_strings=["\nObservation:"], n=1
    ).validate()
    messages = [
        {"role": "system", "content": SYSTEM.format(tools=tool_lines(registry))},
        {"role": "user", "content": task},
    ]
    events: list[dict] = []
    sink = open(transcript, "w") if transcript is not None else None  # noqa: SIM115

    def log(event: dict) -> None:
        events.append(event)
        if sink is not None:
            sink.write(json.dumps(event) + "\n")
            sink.flush()

    log({"event": "task", "task": task, "tools": registry.specs()})
    spent = 0
    try:
        for step in range(1, max_steps + 1):
            text = backend.chat([messages], cfg)[0][0].split("\nObservation:")[0].strip()
            spent += len(text) // 4 + 1
            log({"event": "model", "step": step, "text": text})
            final = _FINAL.search(text)
            calls = parse_tool_calls(text, registry)
            if final and not calls:
                answer = final.group(1).strip()
                log({"event": "answer", "step": step, "answer": answer})
                return AgentResult(answer, "answer", step, events)
            if not calls:
                observation = (
                    "No action found. Use 'Action:' and 'Action Input:', or give 'Final Answer:'."
                )
            else:
                res = registry.run(calls[0])
                observation = res.output
                log({"event": "tool", "step": step, "call": calls[0].openai(), "ok": res.ok,
                     "output": res.output})  # fmt: skip
            messages.append({"role": "assistant", "content": text})
            messages.append({"role": "user", "content": f"Observation: {observation}"})
            if spent >= max_tokens:
                log({"event": "stop", "why": "tokens", "spent": spent})
                return AgentResult(None, "tokens", step, events)
        log({"event": "stop", "why": "steps"})
        return AgentResult(None, "steps", max_steps, events)
    finally:
        if sink is not None:
            sink.close()
