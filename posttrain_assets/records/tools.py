"""Structured message fields of agentic and reasoning conversations: tool calls, tool results, reasoning, and the
conversation's tool definitions, in one canonical form whatever the source layout.

A canonical message is a dict with ``role`` and ``content`` (a string; ``""`` for an assistant turn that only calls
tools) and, only where present:

- ``reasoning_content`` (assistant): the reasoning / thinking text, rendered by the chat template where it puts it;
- ``tool_calls`` (assistant): ``[{"id", "type": "function", "function": {"name", "arguments"}}]``, ``arguments``
  a JSON string (see :func:`normalise_arguments`);
- ``tool_call_id`` and ``name`` (tool): the call a tool result answers, and the tool's name.

A message without them is exactly ``{"role", "content"}``, as before these fields existed, so plain rows and their
content ids are unchanged. The conversation's tool definitions (OpenAI ``tools``: ``[{"type": "function",
"function": {"name", "description", "parameters": JSON Schema}}]``) travel next to the messages (the ``tools``
column, JSON text). :func:`template_messages` and :func:`template_tools` turn the stored form into what Hugging Face
chat templates take (``arguments`` as an object, no null fields).

Parsing helpers for the source layouts live here too: ShareGPT ``function_call`` values, Hermes ``<tool_call>`` /
``<tool_response>`` / ``<tools>`` blocks. No Dagster imports.
"""

from __future__ import annotations

import ast
import contextlib
import json
import re
from collections.abc import Sequence
from typing import Any

from posttrain_assets.records.schema import RecordError

# Optional message fields, in the order they are stored.
MESSAGE_FIELDS = ("reasoning_content", "tool_calls", "tool_call_id", "name")
# Source spellings of the assistant's reasoning, first present wins.
REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")

_TOOL_CALL_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
_TOOL_RESPONSE_BLOCK = re.compile(r"<tool_response>\s*(.*?)\s*</tool_response>", re.DOTALL)
_TOOLS_BLOCK = re.compile(r"<tools>\s*(.*?)\s*</tools>", re.DOTALL)


def call_id(message_index: int, call_index: int) -> str:
    """The id given to a tool call whose source gives none: its place in the conversation, so it is stable."""
    return f"call_{message_index}_{call_index}"


def normalise_arguments(value: Any) -> str:
    """Tool-call arguments as one JSON text, however the source gives them.

    An object (or any JSON value) is serialised with ``json.dumps(..., ensure_ascii=False)``, keys in their order;
    a string that is JSON is parsed and serialised the same way (and a JSON string that itself holds a JSON object,
    double-encoded arguments, is unwrapped once), so ``{"a": 1}`` and ``'{"a":1}'`` store the same text and the same
    content id. A string that is not JSON is kept verbatim: the quality gate quarantines it
    (``tool_arguments_not_json``) rather than the row being lost here. Missing arguments are ``{}``.
    """
    if value is None:
        return "{}"
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except ValueError:
            return value
        if isinstance(parsed, str):
            try:
                inner = json.loads(parsed)
            except ValueError:
                inner = None
            if isinstance(inner, dict):
                parsed = inner
        value = parsed
    return json.dumps(value, ensure_ascii=False)


def parse_tool_calls(value: Any, where: str, message_index: int) -> list[dict[str, Any]]:
    """OpenAI ``tool_calls`` (``[{id?, type?, function: {name, arguments}}]``, or flat ``{name, arguments}`` items)
    in canonical form; ``wrong_type`` / ``missing_field`` / ``empty_content`` naming the offending call."""
    if not isinstance(value, list):
        raise RecordError("wrong_type", where, f"{where} must be a list of tool calls")
    calls = []
    for j, item in enumerate(value):
        at = f"{where}[{j}]"
        if not isinstance(item, dict):
            raise RecordError("wrong_type", at, f"{at} must be an object")
        function = item.get("function", item)
        fat = f"{at}.function" if "function" in item else at
        if not isinstance(function, dict):
            raise RecordError("wrong_type", fat, f"{fat} must be an object with name and arguments")
        calls.append(_call(function, fat, item.get("id"), call_id(message_index, j)))
    if not calls:
        raise RecordError("empty_content", where, f"{where} is an empty list")
    return calls


def _call(function: dict[str, Any], where: str, given_id: Any, default_id: str) -> dict[str, Any]:
    name = function.get("name")
    if name is None:
        raise RecordError("missing_field", f"{where}.name", f"tool call {where} has no function name")
    if not isinstance(name, str):
        raise RecordError("wrong_type", f"{where}.name", f"{where}.name must be str, got {type(name).__name__}")
    if not name.strip():
        raise RecordError("empty_content", f"{where}.name", f"{where}.name is empty")
    arguments = function.get("arguments", function.get("parameters"))
    ident = given_id if isinstance(given_id, str) and given_id.strip() else default_id
    if isinstance(given_id, int) and not isinstance(given_id, bool):
        ident = str(given_id)
    return {"id": ident, "type": "function", "function": {"name": name, "arguments": normalise_arguments(arguments)}}


def _loads_lenient(text: str) -> Any:
    """JSON, else a Python literal (Hermes data writes calls as Python dicts: ``{'name': 'f', ...}``); None when it
    is neither."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None


def parse_call_text(text: str, where: str, message_index: int, first: int = 0) -> list[dict[str, Any]]:
    """Tool calls written as text: one JSON object ``{"name", "arguments"}`` or a list of them (a ShareGPT
    ``function_call`` turn, the inside of a Hermes ``<tool_call>`` block); ``wrong_type`` when it is not."""
    parsed = _loads_lenient(text)
    items = parsed if isinstance(parsed, list) else [parsed]
    if not items or not all(isinstance(item, dict) for item in items):
        raise RecordError("wrong_type", where, f"{where} is not a JSON object with a tool name and arguments")
    return [_call(item, where, item.get("id"), call_id(message_index, first + j)) for j, item in enumerate(items)]


def split_hermes_calls(content: str, where: str, message_index: int) -> tuple[str, list[dict[str, Any]]]:
    """An assistant content with Hermes ``<tool_call>{json}</tool_call>`` blocks -> (the text outside the blocks,
    stripped, and the calls in order). No block: ``(content, [])``."""
    blocks = list(_TOOL_CALL_BLOCK.finditer(content))
    if not blocks:
        return content, []
    calls: list[dict[str, Any]] = []
    for block in blocks:
        calls += parse_call_text(block.group(1), where, message_index, len(calls))
    text = _TOOL_CALL_BLOCK.sub("", content).strip()
    return text, calls


def unwrap_hermes_response(content: str) -> tuple[str, str | None]:
    """A Hermes tool turn ``<tool_response>{"name": ..., "content": ...}</tool_response>`` -> (the result text, the
    tool name when the block names one). A turn without the block is returned as it is."""
    match = _TOOL_RESPONSE_BLOCK.fullmatch(content.strip())
    if match is None:
        return content, None
    inner = match.group(1)
    parsed = _loads_lenient(inner)
    if isinstance(parsed, dict) and isinstance(parsed.get("name"), str) and "content" in parsed:
        result = parsed["content"]
        text = result if isinstance(result, str) else json.dumps(result, ensure_ascii=False)
        return text, parsed["name"]
    return inner, None


def hermes_tools(system: str) -> list[Any] | None:
    """The tool definitions inside a Hermes system prompt's ``<tools> ... </tools>`` block (a JSON list, or JSON
    objects one after another); None when there is no block. An empty block (the Hermes preamble mentions
    "<tools></tools> XML tags" before the real one) is skipped."""
    body = next((m.group(1) for m in _TOOLS_BLOCK.finditer(system) if m.group(1)), None)
    if body is None:
        return None
    parsed = _loads_lenient(body)
    if isinstance(parsed, list):
        return parsed
    if isinstance(parsed, dict):
        return [parsed]
    decoder, found, position = json.JSONDecoder(), [], 0
    while position < len(body):
        while position < len(body) and body[position].isspace():
            position += 1
        if position >= len(body):
            break
        try:
            item, position = decoder.raw_decode(body, position)
        except ValueError:
            return [body]  # kept as given: parse_tools names it
        found.append(item)
    return found


def parse_tools(value: Any, where: str = "tools") -> list[dict[str, Any]] | None:
    """Tool definitions in canonical form: ``[{"type": "function", "function": {"name", ...}}]`` (a bare
    ``{name, description, parameters}`` item is wrapped; other keys are kept). ``value`` may be a list or its JSON
    text (LLaMA-Factory stores ``tools`` as a string); None, ``""`` or ``[]`` is no tools."""
    if value is None:
        return None
    if isinstance(value, str):
        if not value.strip():
            return None
        try:
            value = json.loads(value)
        except ValueError:
            raise RecordError("wrong_type", where, f"{where} is not valid JSON") from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise RecordError("wrong_type", where, f"{where} must be a list of tool definitions")
    tools = []
    for i, item in enumerate(value):
        at = f"{where}[{i}]"
        function = item.get("function", item) if isinstance(item, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise RecordError("wrong_type", at, f"{at} must be a tool definition with a function name")
        tools.append({"type": "function", "function": dict(function)})
    return tools or None


def tools_json(tools: Sequence[dict[str, Any]] | None) -> str | None:
    """The ``tools`` column's text: the canonical definitions as JSON, or None."""
    return None if not tools else json.dumps(list(tools), ensure_ascii=False)


def template_tools(tools: str | Sequence[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """What to pass as ``tools=`` to ``apply_chat_template``: the definitions as objects (the column holds JSON)."""
    if tools is None:
        return None
    parsed = json.loads(tools) if isinstance(tools, str) else list(tools)
    return parsed or None


def template_message(message: dict[str, Any]) -> dict[str, Any]:
    """One stored message as chat templates take it: null fields dropped (a template testing ``'tool_calls' in
    message`` must not see a null one; DuckDB returns every struct field) and tool-call arguments as objects (Hugging
    Face templates write ``arguments | tojson``). Arguments that are not JSON stay a string (the gate quarantines such
    rows before they are rendered). A plain message comes back as ``{"role", "content"}``."""
    out = {key: value for key, value in message.items() if value is not None}
    calls = out.get("tool_calls")
    if calls is not None:
        out["tool_calls"] = [_template_call(call) for call in calls]
        if not calls:
            del out["tool_calls"]
    return out


def _template_call(call: dict[str, Any]) -> dict[str, Any]:
    function = dict(call.get("function") or {})
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        with contextlib.suppress(ValueError):  # not JSON: left a string (the gate quarantines such rows)
            function["arguments"] = json.loads(arguments)
    return {**{k: v for k, v in call.items() if v is not None}, "function": function}


def template_messages(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """:func:`template_message` of every message."""
    return [template_message(message) for message in messages]


def has_structure(message: dict[str, Any]) -> bool:
    """Whether a message carries tool calls or reasoning (its mask is more than content + end of turn)."""
    return bool(message.get("tool_calls")) or bool(message.get("reasoning_content"))
