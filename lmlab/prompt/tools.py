"""Tools for a model to call (Zhao et al. §6.4; Kaddour et al.'s remedy for what a model
cannot compute or know): a registry of functions with JSON-schema descriptions in
OpenAI's `tools` shape, tool calls read from what the model wrote, and their execution
with limits.

Built in:
- `calculator`: arithmetic on numbers (+ − × / // % **, parentheses), evaluated from the
  expression's syntax tree, never by `eval`; large powers and long numbers are refused;
- `python`: the model's code run in lmlab's sandbox (`lmlab.prompt.sandbox`, isolated by
  the operating system), its printed output returned;
- `search`: passages from a retrieval index (`lmlab rag index`).

User functions register with `ToolRegistry.register(fn)`: the schema comes from the type
hints (str, int, float, bool) and the first docstring line. They are the user's own code,
so they run in this process, with a wall-clock limit.

Tool calls are read in OpenAI's shape, a JSON object `{"name": ..., "arguments": {...}}`
(bare, in a ```json block, or between <tool_call> tags, as Hermes-style chat templates
write them), and, for small models that do not manage JSON, in ReAct's plain text:
`Action: NAME` then `Action Input: ...`."""

from __future__ import annotations

import ast
import concurrent.futures
import inspect
import json
import math
import operator
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lmlab.errors import UsageError

MAX_OUTPUT = 2000  # characters of a tool's result fed back to the model
_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean"}


@dataclass
class Tool:
    name: str
    description: str
    parameters: dict  # JSON schema of the arguments object
    fn: Callable[..., Any]
    timeout_s: float = 10.0

    def spec(self) -> dict:
        """The tool in OpenAI's `tools` shape."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            },
        }


@dataclass
class ToolCall:
    name: str
    arguments: dict
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:12]}")

    def openai(self) -> dict:
        """OpenAI's `tool_calls` entry (arguments as a JSON string, as OpenAI sends them)."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": json.dumps(self.arguments)},
        }


@dataclass
class ToolResult:
    call: ToolCall
    ok: bool
    output: str  # the result, or what went wrong (fed back to the model either way)


def schema_of(fn: Callable) -> dict:
    """A JSON schema for `fn`'s parameters from their type hints (str, int, float, bool);
    parameters without a default are required."""
    props, required = {}, []
    for name, p in inspect.signature(fn).parameters.items():
        hint = p.annotation if p.annotation is not inspect.Parameter.empty else str
        if isinstance(hint, str):  # postponed annotations
            hint = {"str": str, "int": int, "float": float, "bool": bool}.get(hint, hint)
        if hint not in _TYPES:
            raise UsageError(
                f"tool {fn.__name__}: parameter {name} must be str, int, float or bool"
            )
        props[name] = {"type": _TYPES[hint]}
        if p.default is inspect.Parameter.empty:
            required.append(name)
    return {"type": "object", "properties": props, "required": required}


class ToolRegistry:
    """Tools by name."""

    def __init__(self) -> None:
        self.tools: dict[str, Tool] = {}

    def add(self, tool: Tool) -> Tool:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]{0,63}", tool.name):
            raise UsageError(f"tool name {tool.name!r}: letters, digits, _ and - only")
        self.tools[tool.name] = tool
        return tool

    def register(self, fn: Callable, name: str | None = None, timeout_s: float = 10.0) -> Tool:
        """A user's Python function as a tool."""
        doc = (inspect.getdoc(fn) or fn.__name__).strip().splitlines()[0]
        return self.add(Tool(name or fn.__name__, doc, schema_of(fn), fn, timeout_s))

    def specs(self) -> list[dict]:
        return [t.spec() for t in self.tools.values()]

    def run(self, call: ToolCall) -> ToolResult:
        """Execute one call: unknown tools and arguments that do not fit the schema are
        reported to the model, as are the tool's own errors and time-outs; nothing here
        raises."""
        tool = self.tools.get(call.name)
        if tool is None:
            return ToolResult(
                call, False, f"unknown tool {call.name!r}; tools: {sorted(self.tools)}"
            )
        problem = check_arguments(call.arguments, tool.parameters)
        if problem:
            return ToolResult(call, False, f"{call.name}: {problem}")
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        try:
            out = pool.submit(tool.fn, **call.arguments).result(timeout=tool.timeout_s)
        except concurrent.futures.TimeoutError:
            return ToolResult(call, False, f"{call.name}: no result within {tool.timeout_s:g} s")
        except Exception as e:  # the tool's failure is an observation, not a crash
            return ToolResult(call, False, f"{call.name}: {type(e).__name__}: {e}")
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        text = out if isinstance(out, str) else json.dumps(out, default=str)
        return ToolResult(call, True, text[:MAX_OUTPUT])


def check_arguments(args: Any, schema: dict) -> str | None:
    """What is wrong with `args` for `schema` (object, required keys, primitive types)."""
    if not isinstance(args, dict):
        return "arguments must be a JSON object"
    props = schema.get("properties", {})
    missing = [k for k in schema.get("required", []) if k not in args]
    if missing:
        return f"missing argument(s) {missing}"
    extra = [k for k in args if k not in props]
    if extra:
        return f"unknown argument(s) {extra}; expected {sorted(props)}"
    checks = {"string": str, "integer": int, "number": (int, float), "boolean": bool}
    for k, v in args.items():
        kind = props[k].get("type")
        want = checks.get(kind)
        # JSON's true is not a number: bool is an int subclass in Python
        if want is not None and (
            not isinstance(v, want) or (isinstance(v, bool) and kind != "boolean")
        ):
            return f"argument {k} must be a {kind}"
    return None


# --- built-in tools -------------------------------------------------------------------------

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression, e.g. (3 + 4) * 2 ** 10 / 7."""
    if len(expression) > 500:
        raise ValueError("expression longer than 500 characters")
    try:
        tree = ast.parse(expression.replace("^", "**").replace("×", "*"), mode="eval")
    except SyntaxError:
        raise ValueError(f"not an arithmetic expression: {expression!r}") from None

    def ev(node) -> float | int:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](ev(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            a, b = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and (abs(b) > 1000 or abs(a) > 1e6 and b > 10):
                raise ValueError("power too large")
            out = _BINARY[type(node.op)](a, b)
            if isinstance(out, int) and out.bit_length() > 4096:
                raise ValueError("result too large")
            return out
        raise ValueError(f"only numbers and + - * / // % ** are allowed, not {ast.dump(node)[:40]}")

    value = ev(tree)
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        value = int(value)
    return str(value if not isinstance(value, float) or math.isfinite(value) else "undefined")


def run_python(code: str) -> str:
    """Run Python code in a sandbox and return what it prints (stdout)."""
    from lmlab.prompt.sandbox import run_code

    res = run_code(code, "", timeout_s=5, memory_mb=512)
    if res.status != "passed":
        detail = res.stderr_tail.strip().splitlines()[-1:] or [res.status]
        raise RuntimeError(f"the code stopped ({res.status}): {detail[0]}")
    return res.stdout_tail or "(no output)"


def search_tool(index) -> Tool:
    """`search` over a retrieval index: the top passages, each after its id."""

    def search(query: str) -> str:
        hits = index.search(query, k=3)
        return "\n\n".join(f"[{h.id}] {h.text}" for h in hits) or "no passage matches"

    return Tool(
        "search",
        "Search the documents for passages about a query.",
        schema_of(search),
        search,
    )


def default_registry(names: list[str] | None = None, index=None) -> ToolRegistry:
    """The built-in tools by name (`calculator`, `python`, `search`; search needs `index`)."""
    reg = ToolRegistry()
    names = names if names is not None else ["calculator", "python"] + (["search"] if index else [])
    for name in names:
        if name == "calculator":
            reg.add(
                Tool("calculator", inspect.getdoc(calculate) or "", schema_of(calculate), calculate)
            )
        elif name == "python":
            reg.add(
                Tool(
                    "python",
                    inspect.getdoc(run_python) or "",
                    schema_of(run_python),
                    run_python,
                    15,
                )
            )
        elif name == "search":
            if index is None:
                raise UsageError("the search tool needs an index (--index, from lmlab rag index)")
            reg.add(search_tool(index))
        else:
            raise UsageError(f"tool {name!r}: built-in tools are calculator, python, search")
    return reg


# --- reading tool calls ------------------------------------------------------------------------

_TAGGED = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
_FENCED = re.compile(r"```(?:json)?\s*(\{.*?\})\s*```", re.DOTALL)
_ACTION = re.compile(
    r"Action:[ \t]*([A-Za-z_][\w-]*)[ \t]*(?:\n\s*Action Input:\s*(.*))?", re.DOTALL
)


def _call_from(obj: Any) -> ToolCall | None:
    if not isinstance(obj, dict):
        return None
    fn = obj.get("function") if isinstance(obj.get("function"), dict) else obj
    name, args = fn.get("name"), fn.get("arguments", fn.get("parameters", {}))
    if not isinstance(name, str):
        return None
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    return ToolCall(name, args) if isinstance(args, dict) else None


def _json_objects(text: str) -> list[Any]:
    """Every top-level JSON object in `text` (a decoder scan, so braces inside strings
    do not confuse it)."""
    out, i, dec = [], 0, json.JSONDecoder()
    while (i := text.find("{", i)) >= 0:
        try:
            obj, end = dec.raw_decode(text, i)
            out.append(obj)
            i = end
        except json.JSONDecodeError:
            i += 1
    return out


def parse_tool_calls(text: str, registry: ToolRegistry | None = None) -> list[ToolCall]:
    """The tool calls in a model's output: tagged or fenced or bare JSON objects in
    OpenAI's shape, else ReAct's `Action:` / `Action Input:` lines. With a registry, a
    plain-text input is given to the tool's one parameter when it has one."""
    blobs = _TAGGED.findall(text) or _FENCED.findall(text)
    objs = [o for b in blobs for o in _json_objects(b)] if blobs else _json_objects(text)
    calls = [c for c in map(_call_from, objs) if c is not None]
    if calls:
        return calls
    m = _ACTION.search(text)
    if not m:
        return []
    name, raw = m.group(1), (m.group(2) or "").strip()
    raw = raw.split("\nObservation:")[0].strip().strip("`")
    found = _json_objects(raw)
    if found and isinstance(found[0], dict):
        return [ToolCall(name, found[0])]
    tool = registry.tools.get(name) if registry else None
    params = list(tool.parameters.get("properties", {})) if tool else []
    if len(params) == 1:
        return [ToolCall(name, {params[0]: raw.strip("\"'")})]
    return [ToolCall(name, {"input": raw})]
