"""Tools in chat requests (OpenAI's `tools`): the same JSON-schema tool definitions that
`lmlab.prompt.tools` uses. The tools are described to the model in a system turn that
asks for `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`; what the model writes
is read back with `parse_tool_calls` and returned as `message.tool_calls`, with
`finish_reason` "tool_calls". Earlier tool calls and tool results in the conversation
become text turns, so every chat template renders them.

Streamed, a reply's text goes out as it comes while it cannot be a tool call (`ToolStream`):
from the first place one could begin (`<tool_call>`, a code fence, `{`, `Action:`, or the
start of one of these at the end of the text so far) it is held back; at the end the held
text is either read as tool calls (sent as one `tool_calls` delta) or sent as content."""

from __future__ import annotations

import json
from typing import Any

from lmlab.prompt.tools import parse_tool_calls

TOOL_SYSTEM = (
    "You can call these tools (JSON schemas):\n{tools}\n\nTo call one, reply with only:\n"
    '<tool_call>{{"name": "TOOL", "arguments": {{...}}}}</tool_call>\n'
    "Otherwise, answer normally."
)


def check_tools(tools: Any, tool_choice: Any) -> str | None:
    """What is wrong with a request's `tools` / `tool_choice`, or None."""
    if tools is None:
        return None if tool_choice in (None, "none", "auto") else "tool_choice needs tools"
    if not isinstance(tools, list) or not tools:
        return "tools must be a non-empty list"
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(fn, dict):
            return f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}"
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            return f"tools[{i}].function.name must be a non-empty string"
        params = fn.get("parameters", {})
        if not isinstance(params, dict):
            return f"tools[{i}].function.parameters must be a JSON schema object"
    if tool_choice not in (None, "none", "auto"):
        return "tool_choice: only 'auto' and 'none' are supported"
    return None


def with_tools(turns: list[dict], tools: list[dict] | None, tool_choice: Any) -> list[dict]:
    """The turns with the tools described in the system turn (unless tool_choice is none)."""
    if not tools or tool_choice == "none":
        return turns
    specs = "\n".join(json.dumps(t["function"]) for t in tools)
    note = TOOL_SYSTEM.format(tools=specs)
    if turns and turns[0]["role"] == "system":
        return [{"role": "system", "content": f"{turns[0]['content']}\n\n{note}"}, *turns[1:]]
    return [{"role": "system", "content": note}, *turns]


def tool_turn(role: str, text: str, extra: dict) -> dict:
    """An assistant turn that called tools, or a tool's result, as a text turn."""
    if role == "tool":
        return {
            "role": "user",
            "content": f"Tool result ({extra.get('tool_call_id', '?')}): {text}",
        }
    calls = extra.get("tool_calls") or []
    said = [
        json.dumps({"name": c["function"]["name"], "arguments": _args(c)})
        for c in calls
        if isinstance(c, dict) and isinstance(c.get("function"), dict)
    ]
    tagged = "".join(f"<tool_call>{s}</tool_call>" for s in said)
    return {"role": "assistant", "content": (text + tagged) if text else tagged}


def _args(call: dict) -> Any:
    raw = call["function"].get("arguments", "{}")
    try:
        return json.loads(raw) if isinstance(raw, str) else raw
    except json.JSONDecodeError:
        return raw


def tool_message(text: str, tools: list[dict] | None) -> tuple[dict, bool]:
    """The reply's `message`, and whether it calls tools (only tools the request named)."""
    if tools:
        names = {t["function"]["name"] for t in tools}
        calls = [c for c in parse_tool_calls(text) if c.name in names]
        if calls:
            return {"role": "assistant", "content": None,
                    "tool_calls": [c.openai() for c in calls]}, True  # fmt: skip
    return {"role": "assistant", "content": text}, False


# where a tool call could begin in a reply (what `parse_tool_calls` reads)
CALL_MARKERS = ("<tool_call>", "```", "{", "Action:")


def held_from(text: str) -> int:
    """How much of `text` can be streamed now: up to the first marker, or up to a marker's
    beginning that ends the text (the rest of it may be on its way)."""
    cut = len(text)
    for m in CALL_MARKERS:
        i = text.find(m)
        if i >= 0:
            cut = min(cut, i)
        for k in range(len(m) - 1, 0, -1):
            if text.endswith(m[:k]):
                cut = min(cut, len(text) - k)
                break
    return cut


class ToolStream:
    """One streamed choice's text when the request has tools."""

    def __init__(self, tools: list[dict]) -> None:
        self.tools, self.sent = tools, 0

    def release(self, text: str) -> str:
        """The content that can go out now, given the whole text so far."""
        cut = held_from(text)
        out = text[self.sent : cut] if cut > self.sent else ""
        self.sent = max(self.sent, cut)
        return out

    def finish(self, text: str) -> tuple[str, list[dict] | None]:
        """At the end: (content still held, None), or ("", the streamed tool_calls
        entries, each with its index) when the reply calls tools."""
        message, called = tool_message(text, self.tools)
        if called:
            return "", [{"index": i, **c} for i, c in enumerate(message["tool_calls"])]
        rest, self.sent = text[self.sent :], len(text)
        return rest, None
