"""The canonical record: one schema for SFT, preference and RL rows.

Format adapters (``posttrain_assets.records.formats``) map one raw input row to a
:class:`CanonicalRecord`, or raise :class:`RecordError` with a reason code. The
silver layer adds provenance (source, license, origin, created_at) and the
content-hash ``id``. Nothing here imports Dagster.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from posttrain_assets.records.annotations import PairAnnotations

REGIMES = ("sft", "preference", "rl")
ROLES = ("system", "user", "assistant", "tool")
SOURCE_KINDS = ("human", "ai", "synthetic")

# Rows longer than this (UTF-8 bytes) are quarantined as ``too_large`` before they are parsed; the silver pass's
# ``max_row_bytes`` (CleaningConfig, and the silver_canonical asset's config) overrides it.
DEFAULT_MAX_ROW_BYTES = 16 * 1024 * 1024
# Rows nesting JSON arrays/objects deeper than this are quarantined as ``too_deep`` before they are parsed: a fixed
# limit, so the verdict does not depend on how deep the Python stack already is where the row is parsed (the
# standard library's decoder and the adapters recurse once per level), and far above any real chat, pair or prompt.
MAX_JSON_DEPTH = 100

# Reason codes a row can be quarantined with. Every code has a one-line meaning,
# listed in docs/tables.md; adapters and the silver stage use only these.
REASONS: dict[str, str] = {
    "broken_file": "the landing file stops decoding at this row (truncated or corrupt gzip, unreadable Parquet data); "
    "its rows before are kept, the rest of the file is unread",
    "too_large": f"the row is longer than the silver pass's max_row_bytes ({DEFAULT_MAX_ROW_BYTES >> 20} MiB by "
    "default); it is not parsed",
    "bad_json": "the row is not valid JSON",
    "too_deep": f"the row's JSON nests arrays/objects more than {MAX_JSON_DEPTH} levels deep; it is not parsed",
    "invalid_utf8": "the row's bytes are not valid UTF-8",
    "not_an_object": "the row is valid JSON but not an object",
    "missing_field": "a required field is absent or null",
    "wrong_type": "a field has the wrong type",
    "unknown_role": "a message role is not one of system/user/assistant/tool",
    "empty_content": "a message, prompt or response is empty or whitespace only",
    "not_ending_with_assistant": "an SFT conversation does not end with an assistant turn",
    "no_assistant_turn": "a conversation has no assistant turn",
    "unparseable_transcript": "an HH-RLHF transcript has no Human/Assistant turns",
    "pair_prefix_mismatch": "chosen and rejected do not share their prompt",
    "pair_not_single_response": "chosen/rejected is not exactly one final assistant turn",
    "missing_gold_answer": "an RL row has no extractable gold answer",
    "not_ending_with_user": "a preference or RL prompt conversation does not end with a user turn",
    "unknown_verifier": "an RL row names a verifier that is not one of exact_match/numeric/math/python_eval",
}


class RecordError(ValueError):
    """A row that cannot be mapped to the canonical schema.

    ``reason`` is a code from :data:`REASONS`; ``field`` names the offending
    field (dotted path, e.g. ``conversations[2].from``); ``message`` is for humans.
    """

    def __init__(self, reason: str, field: str | None, message: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown reason code {reason!r}")
        self.reason = reason
        self.field = field
        self.message = message
        super().__init__(f"{reason} at {field or '<row>'}: {message}")


# A canonical message: ``{"role", "content"}`` plus, only where present, the structured fields of
# :mod:`posttrain_assets.records.tools` (reasoning_content, tool_calls, tool_call_id, name).
Message = dict[str, Any]

_BIGINT = range(-(2**63), 2**63)


@dataclass(frozen=True)
class SourceRef:
    """Where a row sits in the dataset it comes from, as far as the landing row says (None where it does not):
    ``data_source`` names the dataset (a verl row's own ``data_source``; the GSM8K and MATH formats name theirs),
    ``split`` and ``index`` are the row's split and position in it (a verl row's ``extra_info``). Carried to
    silver and gold (the ``source_ref`` column) so the verl export hands them back unchanged."""

    data_source: str | None = None
    split: str | None = None
    index: int | None = None

    @classmethod
    def from_verl(cls, data_source: str, extra_info: Any) -> SourceRef:
        """A verl row's reference: its ``data_source``, and ``extra_info.split`` / ``extra_info.index`` when they
        are a string / an integer (verl leaves ``extra_info`` free-form; anything else is not a split or index)."""
        info = extra_info if isinstance(extra_info, dict) else {}
        split, index = info.get("split"), info.get("index")
        return cls(
            data_source,
            split if isinstance(split, str) else None,
            index if isinstance(index, int) and not isinstance(index, bool) and index in _BIGINT else None,
        )

    def as_row(self) -> dict[str, Any]:
        """The ``source_ref`` column's value."""
        return {"data_source": self.data_source, "split": self.split, "index": self.index}


@dataclass
class CanonicalRecord:
    """The content part of a silver row, as an adapter produces it.

    Per regime (null elsewhere):
    - sft: ``messages`` (whole conversation), ``prompt`` (last user turn),
      ``response`` (last assistant turn).
    - preference: ``messages`` (the prompt conversation, ending with a user
      turn), ``prompt`` (its last user turn), ``chosen``/``rejected`` (the two
      final assistant responses), optional ``score_chosen``/``score_rejected``.
    - rl: ``messages`` (the prompt as a one-turn conversation), ``prompt``,
      ``answer`` (gold answer for the verifier), ``verifier``, ``domain``,
      optional ``difficulty`` as given by the source, and ``tests``: for
      ``python_eval``, Python source with ``assert`` statements that call the
      solution's functions (what the verifier runs the answer against).

    ``source_ref`` (any regime, optional): the row's place in the dataset it comes from (:class:`SourceRef`).
    ``tools`` (optional): the conversation's tool definitions, canonical (``records.tools.parse_tools``).
    """

    regime: str
    messages: list[Message]
    prompt: str
    response: str | None = None
    chosen: str | None = None
    rejected: str | None = None
    answer: str | None = None
    verifier: str | None = None
    tests: str | None = None
    domain: str | None = None
    difficulty: float | None = None
    score_chosen: float | None = None
    score_rejected: float | None = None
    lang: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    source_ref: SourceRef | None = None
    annotations: PairAnnotations | None = None  # preference: who labelled the pair (records.annotations)
    tools: list[dict[str, Any]] | None = None

    def content_id(self) -> str:
        """Stable id: sha256 over the content fields that define the record.

        Two rows with the same regime and content get the same id wherever they
        come from, so exact duplicates collapse on id.
        """
        payload = {
            "regime": self.regime,
            "messages": self.messages,
            "chosen": self.chosen,
            "rejected": self.rejected,
            "answer": self.answer,
        }
        if self.tools:  # only then: rows without tools keep the ids they always had
            payload["tools"] = self.tools
        text = json.dumps(payload, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def require(row: dict[str, Any], key: str, kind: type | tuple[type, ...] = str, *, path: str | None = None) -> Any:
    """Return ``row[key]``, raising ``missing_field`` / ``wrong_type`` as a RecordError."""
    where = path or key
    if key not in row or row[key] is None:
        raise RecordError("missing_field", where, f"field {where!r} is required")
    value = row[key]
    if not isinstance(value, kind) or (kind is str and isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise RecordError("wrong_type", where, f"field {where!r} must be {names}, got {type(value).__name__}")
    return value


def non_empty(text: str, where: str) -> str:
    """Reject empty or whitespace-only text with ``empty_content``."""
    if not text.strip():
        raise RecordError("empty_content", where, f"{where} is empty or whitespace only")
    return text


def validate_messages(messages: Any, where: str = "messages") -> list[Message]:
    """Check a list of ``{role, content}`` dicts; return normalised copies (:func:`_message`)."""
    if not isinstance(messages, list):
        raise RecordError("wrong_type", where, f"{where} must be a list of messages")
    if not messages:
        raise RecordError("empty_content", where, f"{where} has no messages")
    out: list[Message] = []
    for i, msg in enumerate(messages):
        at = f"{where}[{i}]"
        if not isinstance(msg, dict):
            raise RecordError("wrong_type", at, f"{at} must be an object with role and content")
        role = require(msg, "role", path=f"{at}.role")
        if role not in ROLES:
            raise RecordError("unknown_role", f"{at}.role", f"role {role!r} is not one of {', '.join(ROLES)}")
        out.append(_message(msg, role, at, i))
    return out


def _message(msg: dict[str, Any], role: str, at: str, index: int) -> Message:
    """One canonical message: ``{role, content}``, plus the structured fields the source gives. An assistant turn
    with ``tool_calls`` (or a legacy OpenAI ``function_call``) may have null or empty content (stored ``""``); its
    reasoning comes from ``reasoning_content``, ``reasoning`` or ``thinking``; a tool turn keeps ``tool_call_id`` and
    ``name``. Other keys are dropped, as they always were."""
    from posttrain_assets.records import tools  # imports this module

    calls = None
    if role == "assistant":
        raw = msg.get("tool_calls")
        if raw is None and msg.get("function_call") is not None:
            raw = [{"function": msg["function_call"]}]
        if raw is not None and raw != []:
            calls = tools.parse_tool_calls(raw, f"{at}.tool_calls", index)
    content = "" if calls and msg.get("content") is None else require(msg, "content", path=f"{at}.content")
    if not calls:
        non_empty(content, f"{at}.content")
    message: Message = {"role": role, "content": content}
    if role == "assistant":
        key = next((k for k in tools.REASONING_KEYS if msg.get(k) is not None), None)
        if key is not None:
            reasoning = require(msg, key, path=f"{at}.{key}")
            if reasoning.strip():
                message["reasoning_content"] = reasoning
    if calls:
        message["tool_calls"] = calls
    if role == "tool":
        for key in ("tool_call_id", "name"):
            value = msg.get(key)
            if value is not None:
                message[key] = require(msg, key, path=f"{at}.{key}")
    return message


def last_content(messages: list[Message], role: str) -> str | None:
    """Content of the last message with ``role``, or None."""
    for msg in reversed(messages):
        if msg["role"] == role:
            return msg["content"]
    return None


def sft_record(messages: list[Message], where: str = "messages") -> CanonicalRecord:
    """An SFT record from a validated conversation that must end with the assistant."""
    if not any(m["role"] == "assistant" for m in messages):
        raise RecordError("no_assistant_turn", where, "the conversation has no assistant turn")
    if messages[-1]["role"] != "assistant":
        raise RecordError(
            "not_ending_with_assistant",
            f"{where}[{len(messages) - 1}].role",
            f"the last turn is {messages[-1]['role']!r}, an SFT conversation must end with the assistant",
        )
    return CanonicalRecord(
        regime="sft",
        messages=messages,
        prompt=last_content(messages, "user") or "",
        response=messages[-1]["content"],
    )
