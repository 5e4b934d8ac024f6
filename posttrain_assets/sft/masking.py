"""Chat-template tokenisation with assistant-only loss masks, for any Hugging Face chat template.

What is trained (label = token id): the rendered content of every assistant turn (or only the last one) plus
the template's end-of-turn marker that closes it (``<|im_end|>``, ``<|eot_id|>``, ``</s>``, ``<end_of_turn>``...),
so the model learns to stop. Everything else is -100: system/user/tool turns, role headers, text the template
injects (default system prompt, dates), the whitespace after the marker.

How spans are found without assuming the template is prefix-stable:

1. Render the real conversation ``R = apply_chat_template(messages, tokenize=False)``.
2. Render a *skeleton*: the same messages with every ``content`` replaced by a unique sentinel. Splitting the
   skeleton on the sentinels gives the template's literal chunks ``c0, c1, ..., cK`` between contents.
3. Walk ``R`` with the chunks (backtracking search, preferring verbatim content, then substrings of the content,
   so templates that strip ``<think>`` blocks or trim content still parse) to locate each content's span. The
   candidates are generated lazily and the first one almost always holds, so this is linear in ``R``.
4. The end-of-turn marker is the chunk after the last assistant content (trailing whitespace stripped) of a
   conversation ending with that assistant turn; ``MaskConfig.end_of_turn`` overrides it. It must directly follow
   every trained assistant content.
5. Tokenise every ``R`` once, in batched calls, with character offsets (a long ``R`` is first counted a piece at
   a time, so a huge row is ``too_long`` without being encoded whole), and label each token by whether it lies
   inside a trained span (decided from the tokens at the span edges when those are clean). A token that straddles
   a trained/untrained boundary makes the row an error (``mask_boundary_straddle``), with one exception: a token
   whose only outside part is whitespace just before an assistant content (``[/INST] answer`` -> ``Ġanswer``) is
   trained, because the model emits that whitespace itself after the generation prompt; this is the same
   token-level mask transformers' ``{% generation %}`` tracking produces.

:func:`verify_mask` is an independent proof used by a blocking asset check: it re-renders with the template, checks
that the ids decode to exactly that rendering and that decoded trained runs are the message contents, without
reusing the span search above; and that the ids are the tokenizer's canonical encoding (a fresh
``apply_chat_template(tokenize=True)``), on every row or, in the batched check, on a sample (``sft.batches``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from posttrain_assets.records.tools import has_structure, template_message, template_tools

if TYPE_CHECKING:
    from tokenizers import Encoding, Tokenizer
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100

# A conversation's tool definitions as passed to ``apply_chat_template(tools=...)`` (None: it declares none).
Tools = list[dict[str, Any]] | None

MASK_REASONS: dict[str, str] = {
    "too_long": "the tokenised row is longer than max_seq_len (and no turn-boundary truncation fits)",
    "no_trainable_tokens": "the row has no trained (assistant) token",
    "template_error": "the chat template raised, or its rendering could not be parsed into turns",
    "mask_boundary_straddle": "a token spans both trained and untrained text, so its mask cannot be exact",
    "unsupported_message": "a message has non-string content, assistant fields other than content, tool_calls and "
    "reasoning_content, or tool-call arguments that are not a JSON object",
    "special_token_in_content": "a message's content, reasoning or tool call contains a special token of the tokenizer",
}

_SENTINEL_OPEN = "\ue000"
_SENTINEL_CLOSE = "\ue001"
_SENTINEL_RE = re.compile(f"{_SENTINEL_OPEN}(\\d+){_SENTINEL_CLOSE}")
# Non-canonical assistant fields that a template may render outside ``content``. Their rendering would land in
# untrained skeleton text, silently, so such messages are rejected instead (the adapters store reasoning as
# ``reasoning_content`` and calls as ``tool_calls``, which are masked).
_ASSISTANT_EXTRA_FIELDS = ("thinking", "reasoning", "function_call")


@dataclass(frozen=True)
class MaskConfig:
    """How to build labels.

    ``end_of_turn=None`` auto-detects the marker from the template; ``""`` explicitly trains no marker.
    ``train_reasoning``: whether the reasoning (``reasoning_content``) of a trained assistant turn is trained: in
    every trained turn (``all``), only in the conversation's last assistant turn (``last``), or never (``none``); an
    untrained reasoning is masked from the start of the turn through the end of its text, and what the model writes
    after it (the block's closing, the answer, the tool calls, the end of turn) stays trained.
    """

    train_on: Literal["all_assistant", "last_assistant"] = "all_assistant"
    train_reasoning: Literal["all", "last", "none"] = "all"
    max_seq_len: int = 4096
    overflow: Literal["quarantine", "truncate"] = "quarantine"
    end_of_turn: str | None = None


@dataclass
class TokenizedConversation:
    """One tokenised conversation. ``labels`` is -100 where untrained, else the token id (unshifted).

    ``num_messages`` is how many leading messages were rendered (fewer than the input when ``truncated``).
    """

    input_ids: list[int]
    labels: list[int]
    num_tokens: int
    num_trainable_tokens: int
    truncated: bool
    num_messages: int = 0


class MaskError(Exception):
    """A conversation that cannot be tokenised with an exact mask. ``reason`` is a key of :data:`MASK_REASONS`."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MaskError) and (self.reason, self.message) == (other.reason, other.message)

    def __hash__(self) -> int:
        return hash((self.reason, self.message))


@dataclass
class _Rendered:
    """A rendered conversation prefix with its character spans to train."""

    text: str
    trained_spans: list[tuple[int, int]]  # (start, end) in ``text``; content start .. end of marker
    content_starts: set[int]  # starts of assistant contents (for the leading-whitespace rule)
    num_messages: int


# ----------------------------------------------------------------------------------------------------------------
# rendering and span search
# ----------------------------------------------------------------------------------------------------------------


def _sentinel(index: int) -> str:
    return f"{_SENTINEL_OPEN}{index}{_SENTINEL_CLOSE}"


def _render(tok: PreTrainedTokenizerBase, messages: list[dict[str, Any]], tools: Tools = None) -> str:
    try:
        text = tok.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=False)
    except Exception as exc:  # any template exception is a template_error for this row
        raise MaskError("template_error", f"chat template raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(text, str):
        raise MaskError("template_error", f"chat template rendered {type(text).__name__}, not str")
    return text


def special_tokens(tok: PreTrainedTokenizerBase) -> tuple[str, ...]:
    """The tokenizer's special tokens (added tokens marked special: ``<|im_start|>``, ``<|im_end|>``, ...), longest
    first, sorted. Text containing one renders as a control token, so no content may (here for SFT messages, and in
    the quality gate for every text field of every regime)."""
    specials = {str(t.content) for t in tok.added_tokens_decoder.values() if getattr(t, "special", False)}
    return tuple(sorted((s for s in specials if s), key=lambda s: (-len(s), s)))


def _special_token_pattern(tok: PreTrainedTokenizerBase) -> re.Pattern[str] | None:
    specials = special_tokens(tok)  # longest first: the longest one present is named
    return re.compile("|".join(re.escape(s) for s in specials)) if specials else None


def template_conversation(messages: Sequence[Any]) -> list[Any]:
    """A stored conversation as the chat template takes it (``records.tools.template_message`` of every message that
    is a dict; anything else is left for :func:`_check_messages` to refuse)."""
    return [template_message(m) if isinstance(m, dict) else m for m in messages]


def _check_messages(messages: list[dict[str, Any]], special_re: re.Pattern[str] | None) -> None:
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise MaskError("unsupported_message", f"message {index} is not a dict with a string role")
        content = message.get("content")
        if not isinstance(content, str):
            raise MaskError("unsupported_message", f"message {index} content is {type(content).__name__}, not str")
        if message["role"] == "assistant":
            extra = [key for key in _ASSISTANT_EXTRA_FIELDS if message.get(key) is not None]
            if extra:
                raise MaskError(
                    "unsupported_message",
                    f"assistant message {index} has fields {extra} besides content, tool_calls and reasoning_content",
                )
        texts = [("content", content)]
        reasoning = message.get("reasoning_content")
        if reasoning is not None:
            if not isinstance(reasoning, str):
                raise MaskError("unsupported_message", f"message {index} reasoning_content is not str")
            texts.append(("reasoning_content", reasoning))
        for j, call in enumerate(message.get("tool_calls") or []):
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                raise MaskError("unsupported_message", f"message {index} tool call {j} has no function name")
            if not isinstance(function.get("arguments"), dict):
                raise MaskError("unsupported_message", f"message {index} tool call {j} arguments are not a JSON object")
            texts.append((f"tool call {j}", json.dumps(function, ensure_ascii=False)))
        for what, text in texts:
            if special_re is not None and (found := special_re.search(text)):
                raise MaskError(
                    "special_token_in_content", f"message {index} {what} contains special token {found.group(0)!r}"
                )


def _has_content_field(message: dict[str, Any]) -> bool:
    """Whether the content is a field of the skeleton: always, except the empty content of a turn that only calls
    tools (templates render it conditionally, ``{% if message.content %}``, so a sentinel would change the text)."""
    return not (message.get("tool_calls") and message["content"] == "")


def _skeleton(
    tok: PreTrainedTokenizerBase, messages: list[dict[str, Any]], tools: Tools = None
) -> tuple[list[str], list[int]]:
    """Literal template chunks and the field id of each sentinel, in rendering order: a message's content is field
    ``i`` (its index), its reasoning field ``len(messages) + i``; tool calls stay literal (arguments are rendered
    through ``tojson`` or item by item, so a sentinel could not stand for them)."""
    count = len(messages)
    masked = []
    for index, message in enumerate(messages):
        copy = {**message}
        if _has_content_field(message):
            copy["content"] = _sentinel(index)
        if message.get("reasoning_content"):
            copy["reasoning_content"] = _sentinel(count + index)
        masked.append(copy)
    text = _render(tok, masked, tools)
    parts = _SENTINEL_RE.split(text)
    chunks = parts[0::2]
    order = [int(p) for p in parts[1::2]]
    if len(set(order)) != len(order):
        raise MaskError("template_error", "the template renders a message's content more than once")
    if any(not 0 <= i < 2 * count for i in order):
        raise MaskError("template_error", "the template renders a content that is not a message")
    for k in range(1, len(chunks) - 1):
        if chunks[k] == "":
            raise MaskError(
                "template_error",
                f"messages {order[k - 1]} and {order[k]} are rendered with nothing between them; cannot split turns",
            )
    return chunks, order


_SkeletonKey = tuple[tuple[tuple[str, str | None], ...], ...]


class _Skeletons:
    """Memoised :func:`_skeleton` for one tokenisation call.

    A skeleton replaces every content with a sentinel, so it is a function of the other message fields (role, name,
    ...) and their order only; conversations of the same shape share it. The key keeps each message's keys in order
    (a template may iterate over them) with the content left out. Messages whose other fields are not all strings
    (or None) are rendered uncached, as are templates that may call ``strftime_now`` or jinja's ``random`` filter:
    their text depends on more than the messages.
    """

    def __init__(self, tok: PreTrainedTokenizerBase) -> None:
        self.tok = tok
        template = str(tok.chat_template)
        self.enabled = "strftime_now" not in template and "random" not in template
        self._cache: dict[_SkeletonKey, tuple[list[str], list[int]] | MaskError] = {}
        self._probes: dict[str, str | None] = {}

    def probe(self, name: str) -> str | None:
        """A fact about the template, rendered once per tokenisation call (:data:`_PROBES`); None when the template
        does not show it."""
        if name not in self._probes:
            self._probes[name] = _PROBES[name](self.tok)
        return self._probes[name]

    def get(self, messages: list[dict[str, Any]], tools: Tools = None) -> tuple[list[str], list[int]]:
        """``_skeleton(tok, messages, tools)``; the returned lists are shared between calls and must not be mutated.
        Rows with tools are rendered uncached (their definitions are part of the text)."""
        if tools:
            return _skeleton(self.tok, messages, tools)
        key = self._key(messages) if self.enabled else None
        if key is None:
            return _skeleton(self.tok, messages)
        found = self._cache.get(key)
        if found is None:
            try:
                found = _skeleton(self.tok, messages)
            except MaskError as err:
                found = err
            self._cache[key] = found
        if isinstance(found, MaskError):
            raise MaskError(found.reason, found.message)
        return found

    @staticmethod
    def _key(messages: list[dict[str, Any]]) -> _SkeletonKey | None:
        key = []
        for message in messages:
            fields = []
            for name, value in message.items():
                if name == "content":
                    value = None
                elif name == "reasoning_content":
                    value = "\x00" if value else None  # a sentinel either way: only its presence shapes the text
                elif value is not None and type(value) is not str:  # e.g. 1 == True would share a key
                    return None
                fields.append((name, value))
            key.append(tuple(fields))
        return tuple(key)


def _candidate_ends(text: str, start: int, chunk: str, content: str, is_last: bool, assistant: bool) -> Iterator[int]:
    """Possible end positions of the content that starts at ``start`` and is followed by ``chunk``, best first:
    where the content renders verbatim, then where a part of it renders (longest first), then (not for an
    assistant content, which must render verbatim or as a part of itself: trimmed, thinking stripped) every other
    occurrence of ``chunk``, in text order.

    Lazy, and the first candidate costs time linear in the content: the walk almost always takes it, so aligning
    a conversation is linear in its rendering. (Listing every later occurrence of ``chunk`` for every turn, and
    slicing the text up to each, made it cubic in the number of turns: 10,000 turns took minutes.)
    """
    if is_last:
        end = len(text) - len(chunk)
        if end >= start and text.endswith(chunk) and (not assistant or text[start:end] in content):
            yield end
        return
    verbatim = start + len(content)
    if text.startswith(content, start) and text.startswith(chunk, verbatim):
        yield verbatim
    # Longer than the content, text[start:end] cannot be a part of it, so the parts end at occurrences of ``chunk``
    # within len(content) of ``start``; and a prefix of a part is a part, so they are the occurrences up to the last
    # one that ends a part, found by bisection.
    window_end = start + len(content) + len(chunk)
    window: list[int] = []
    position = text.find(chunk, start, window_end)
    while position != -1:
        window.append(position)
        position = text.find(chunk, position + 1, window_end)
    low, high = 0, len(window)
    while low < high:
        middle = (low + high) // 2
        if text[start : window[middle]] in content:
            low = middle + 1
        else:
            high = middle
    yield from (end for end in reversed(window[:low]) if end != verbatim)
    if assistant:
        return
    yield from window[low:]
    position = text.find(chunk, start + len(content) + 1)
    while position != -1:
        yield position
        position = text.find(chunk, position + 1)


# How many candidate content ends the alignment of one conversation may try, per message and in all. A regular
# rendering takes the first candidate of every message; backtracking is for templates that transform content, and
# a rendering that cannot be aligned within this many tries is a template_error rather than a stalled batch.
_ALIGNMENT_TRIES_PER_MESSAGE = 64
_ALIGNMENT_TRIES_MIN = 10_000


def _locate_contents(
    text: str, chunks: list[str], order: list[int], messages: list[dict[str, Any]]
) -> dict[int, tuple[int, int]]:
    """Find each rendered content's (start, end) in ``text`` by walking the skeleton chunks, depth first with
    backtracking (an explicit stack: a conversation may have more turns than Python's recursion limit); a state
    ``(k, start)`` that failed once is not walked again."""
    if not text.startswith(chunks[0]):
        raise MaskError("template_error", "the rendering does not start with the template's skeleton prefix")
    count = len(order)
    budget = max(_ALIGNMENT_TRIES_MIN, _ALIGNMENT_TRIES_PER_MESSAGE * count)
    spans: dict[int, tuple[int, int]] = {}
    failed: set[tuple[int, int]] = set()
    frames: list[tuple[int, int, Iterator[int]]] = []  # (k, start, the untried ends of content k)
    k, start, tries = 0, len(chunks[0]), 0
    while True:
        if k == count:
            if start == len(text):
                return spans
        elif (k, start) not in failed:
            message = messages[order[k] % len(messages)]
            content = message["content"] if order[k] < len(messages) else message["reasoning_content"]
            ends = _candidate_ends(
                text, start, chunks[k + 1], content, k + 1 == count, message.get("role") == "assistant"
            )
            frames.append((k, start, ends))
        while frames:  # the next untried end of the deepest content that has one
            k, start, ends = frames[-1]
            end = next(ends, None)
            if end is not None:
                break
            failed.add((k, start))
            frames.pop()
        else:
            raise MaskError(
                "template_error",
                "could not align the rendering with the template skeleton (the template's text depends on message "
                "content, or transforms assistant content beyond trimming/stripping)",
            )
        tries += 1
        if tries > budget:
            raise MaskError(
                "template_error",
                f"could not align the rendering with the template skeleton within {budget} tries (the template's "
                "text depends on message content, or transforms assistant content beyond trimming/stripping)",
            )
        spans[order[k]] = (start, end)
        k, start = k + 1, end + len(chunks[k + 1])


def _trained_indices(messages: list[dict[str, Any]], cfg: MaskConfig) -> list[int]:
    assistants = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    if cfg.train_on == "last_assistant":
        return assistants[-1:]
    if cfg.train_on == "all_assistant":
        return assistants
    raise ValueError(f"unknown train_on {cfg.train_on!r}")


def _detect_marker(skeletons: _Skeletons, messages: list[dict[str, Any]], chunks: list[str], order: list[int]) -> str:
    """The end-of-turn marker: the skeleton chunk after the last assistant content, trailing whitespace stripped,
    rendered for a conversation that ends with that assistant turn (for a last assistant turn with tool calls or
    reasoning, of a probe conversation ending with a plain one). ``""`` for a template that closes no turn but opens
    every message with a special token (GLM: the next message's opening token is the stop, see
    :func:`_stop_after`)."""
    last = max(i for i, m in enumerate(messages) if m.get("role") == "assistant")
    if has_structure(messages[last]):
        marker = skeletons.probe("plain_marker")
        if marker is None:
            raise MaskError(
                "template_error", "no end-of-turn marker follows an assistant content; set MaskConfig.end_of_turn"
            )
        return marker
    if last != len(messages) - 1:
        chunks, order = skeletons.get(messages[: last + 1])
    if last not in order:
        raise MaskError("template_error", f"the template does not render assistant message {last}")
    marker = chunks[order.index(last) + 1].rstrip()
    if not marker and skeletons.probe("opening_stop") is None:
        raise MaskError(
            "template_error", "no end-of-turn marker follows the last assistant content; set MaskConfig.end_of_turn"
        )
    return marker


_PROBE_USER = {"role": "user", "content": _sentinel(0)}


def _probe_plain_marker(tok: PreTrainedTokenizerBase) -> str | None:
    """The end-of-turn marker of a plain user/assistant probe ("" when the template writes none)."""
    try:
        text = _render(tok, [_PROBE_USER, {"role": "assistant", "content": _sentinel(1)}])
    except MaskError:
        return None
    position = text.find(_sentinel(1))
    return None if position == -1 else text[position + len(_sentinel(1)) :].rstrip()


def _probe_opening_stop(tok: PreTrainedTokenizerBase) -> str | None:
    """The special token that opens the message after an assistant turn, when the template writes nothing between
    the assistant content and it (GLM: ``<|user|>``, ``<|observation|>``): the token the model emits to stop."""
    specials = special_tokens(tok)
    try:
        probe = [_PROBE_USER, {"role": "assistant", "content": _sentinel(1)}, {"role": "user", "content": _sentinel(2)}]
        text = _render(tok, probe)
    except MaskError:
        return None
    position = text.find(_sentinel(1))
    if position == -1:
        return None
    after = text[position + len(_sentinel(1)) :]
    return next((s for s in specials if after.startswith(s)), None)


def _probe_tool_marker(tok: PreTrainedTokenizerBase) -> str | None:
    """The special token that ends a turn which only calls tools, when the template writes one (Harmony's
    ``<|call|>``, ChatML's ``<|im_end|>``): the end of a conversation ending on such a turn, if a special token."""
    call = {"id": "call_0", "type": "function", "function": {"name": "probe", "arguments": {}}}
    try:
        text = _render(tok, [_PROBE_USER, {"role": "assistant", "content": "", "tool_calls": [call]}]).rstrip()
    except MaskError:
        return None
    return next((s for s in special_tokens(tok) if text.endswith(s)), None)


def _probe_generation_prompt(tok: PreTrainedTokenizerBase) -> str | None:
    """What ``add_generation_prompt=True`` appends after a user turn (``<|im_start|>assistant\n``): the text before
    everything the model writes in its turn."""
    try:
        bare = tok.apply_chat_template([_PROBE_USER], tokenize=False, add_generation_prompt=False)
        prompted = tok.apply_chat_template([_PROBE_USER], tokenize=False, add_generation_prompt=True)
    except Exception:
        return None
    if not isinstance(bare, str) or not isinstance(prompted, str) or not prompted.startswith(bare):
        return None
    return prompted[len(bare) :] or None


_PROBES = {
    "plain_marker": _probe_plain_marker,
    "opening_stop": _probe_opening_stop,
    "tool_marker": _probe_tool_marker,
    "generation_prompt": _probe_generation_prompt,
}


def _reasoning_trained(messages: list[dict[str, Any]], index: int, cfg: MaskConfig) -> bool:
    if cfg.train_reasoning == "all":
        return True
    if cfg.train_reasoning == "none":
        return False
    if cfg.train_reasoning == "last":
        return index == max(i for i, m in enumerate(messages) if m.get("role") == "assistant")
    raise ValueError(f"unknown train_reasoning {cfg.train_reasoning!r}")


def _stop_after(
    skeletons: _Skeletons, text: str, position: int, limit: int, marker: str, auto: bool
) -> tuple[int, str] | None:
    """Where the end of a turn is, searching ``text[position:limit]`` (the turn's last field up to the next
    message's first): the earliest end-of-turn marker (the plain one, or the tool-call turn's one), else, for a
    template that closes no turn (GLM), the first special token, which opens the next message; None when neither."""
    markers = [m for m in (marker, skeletons.probe("tool_marker") if auto else None) if m]
    found = [(text.find(m, position, limit), m) for m in markers]
    found = [(at, m) for at, m in found if at != -1]
    if found:
        at, m = min(found)
        return at, m
    if auto and not marker and skeletons.probe("opening_stop") is not None:
        window = text[position:limit]
        best = None
        for special in special_tokens(skeletons.tok):
            at = window.find(special)
            if at != -1 and (best is None or at < best[0]):
                best = (at, special)
        if best is not None:
            return position + best[0], best[1]
    return None


def _structured_span(
    skeletons: _Skeletons,
    messages: list[dict[str, Any]],
    index: int,
    text: str,
    spans: dict[int, tuple[int, int]],
    cfg: MaskConfig,
    marker: str,
) -> tuple[int, int]:
    """The trained span of an assistant turn with tool calls or reasoning: from the end of the generation prompt
    before it (or from the end of its reasoning text, when the reasoning is not trained) through its end-of-turn
    marker, which may open the next message (GLM). The tool-call text the template writes between is trained."""
    count = len(messages)
    own = [spans[f] for f in (index, count + index) if f in spans]
    before = [end for f, (_, end) in spans.items() if f % count < index]
    after = [start for f, (start, _) in spans.items() if f % count > index]
    low, high = max(before, default=0), min(after, default=len(text))
    prompt = skeletons.probe("generation_prompt")
    if prompt is None:
        raise MaskError("template_error", "the template has no generation prompt to find where the turn starts")
    if own:
        first = min(start for start, _ in own)
        head = text.rfind(prompt, low, first)
    else:
        head = text.find(prompt, low, high)
    if head == -1:
        raise MaskError("template_error", f"no generation prompt {prompt!r} before assistant message {index}")
    start = head + len(prompt)
    tail = max([end for _, end in own], default=start)
    auto = cfg.end_of_turn is None
    stop = _stop_after(skeletons, text, tail, high, marker, auto)
    if stop is not None:
        end = stop[0] + len(stop[1])
    elif high == len(text) and (auto and not marker):
        end = tail + len(text[tail:high].rstrip())  # the last turn of a template that closes none: nothing to stop
    else:
        raise MaskError("template_error", f"no end-of-turn marker {marker!r} after assistant message {index}")
    written = text[start:end]
    for call in messages[index].get("tool_calls") or []:
        if call["function"]["name"] not in written:  # e.g. SmolLM2's template: calls dropped, nothing to train
            raise MaskError(
                "template_error",
                f"the chat template does not render the tool call {call['function']['name']!r} of assistant "
                f"message {index}; use a tokenizer whose template writes tool calls",
            )
    reasoning = spans.get(count + index)
    if reasoning is not None and not _reasoning_trained(messages, index, cfg):
        start = reasoning[1]
    return start, end


def _render_with_spans(
    skeletons: _Skeletons,
    messages: list[dict[str, Any]],
    cfg: MaskConfig,
    special_re: re.Pattern[str] | None,
    text: str | None = None,
    tools: Tools = None,
) -> _Rendered:
    """Render ``messages`` (unless ``text`` is their rendering already) and find the character spans to train;
    raises :class:`MaskError`."""
    _check_messages(messages, special_re)
    trained = _trained_indices(messages, cfg)
    if not trained:
        raise MaskError("no_trainable_tokens", "the conversation has no assistant turn")
    if text is None:
        text = _render(skeletons.tok, messages, tools)
    chunks, order = skeletons.get(messages, tools)
    rendered = set(order)
    missing = [i for i in trained if i not in rendered and _has_content_field(messages[i])]
    if missing:
        raise MaskError("template_error", f"the template does not render assistant message(s) {missing}")
    marker = cfg.end_of_turn if cfg.end_of_turn is not None else _detect_marker(skeletons, messages, chunks, order)
    spans = _locate_contents(text, chunks, order, messages)
    trained_spans: list[tuple[int, int]] = []
    starts: set[int] = set()
    for index in trained:
        if has_structure(messages[index]):
            start, stop = _structured_span(skeletons, messages, index, text, spans, cfg, marker)
            if stop > start:
                trained_spans.append((start, stop))
                starts.add(start)
            continue
        start, end = spans[index]
        if not marker and cfg.end_of_turn is None:  # a template that closes no turn: the next message's opening
            stop_token = next((t for t in special_tokens(skeletons.tok) if text.startswith(t, end)), "")
            trained_spans.append((start, end + len(stop_token)))
            starts.add(start)
            continue
        if not text.startswith(marker, end):
            raise MaskError(
                "template_error",
                f"end-of-turn marker {marker!r} does not follow assistant message {index} "
                f"(found {text[end : end + len(marker) + 8]!r})",
            )
        trained_spans.append((start, end + len(marker)))
        starts.add(start)
    trained_spans.sort()
    return _Rendered(text=text, trained_spans=trained_spans, content_starts=starts, num_messages=len(messages))


# ----------------------------------------------------------------------------------------------------------------
# tokenisation
# ----------------------------------------------------------------------------------------------------------------

_BACKENDS: dict[int, tuple[Tokenizer, int, Tokenizer]] = {}
# Rows per encode_batch call: small enough that rendering overlaps most of the encoding, large enough that each
# call keeps every core busy.
_CHUNK_ROWS = 256


def _offset_backend(tok: PreTrainedTokenizerBase) -> Tokenizer:
    """A copy of ``tok``'s backend without post-processor, padding or truncation: its offsets are never trimmed
    (a ByteLevel post-processor with ``trim_offsets=True`` would hide whitespace at span boundaries)."""
    from tokenizers import Tokenizer

    backend = tok.backend_tokenizer
    size = backend.get_vocab_size(with_added_tokens=True)  # changes when tokens are added in place
    cached = _BACKENDS.get(id(tok))
    if cached is not None and cached[0] is backend and cached[1] == size:
        return cached[2]
    copy = Tokenizer.from_str(backend.to_str())
    copy.post_processor = None
    copy.no_padding()
    copy.no_truncation()
    _BACKENDS[id(tok)] = (backend, size, copy)
    return copy


# A rendering longer than this many characters per allowed token is first counted in pieces of that many characters
# per allowed token (at least _MIN_PIECE_CHARS): text runs about 4 characters a token, so the first piece or two
# usually prove a long row too long, and a huge one is never encoded whole (the Rust encoding of one character with
# offsets costs about 130 bytes: a 50 MB row took 7 GB). A row below the size of a piece is simply encoded.
_PIECE_CHARS_PER_TOKEN = 8
_MIN_PIECE_CHARS = 4096
# Tokens a cut between two pieces may add to their sum, for tokenizers that do not split text at whitespace.
_TOKENS_PER_CUT = 16
# Where a piece may end: before whitespace that follows other text, so no word is cut.
_WORD_END = re.compile(r"\S(?=\s)")


def _too_long_in_pieces(backend: Tokenizer, text: str, max_seq_len: int) -> str | None:
    """Why ``text`` has more than ``max_seq_len`` tokens, found by counting it a piece at a time; None when that
    is not certain (then the caller encodes it whole, as it does every text of at most one piece).

    The pieces end before a whitespace character that follows other text. Tokenizers split text at whitespace
    and at special tokens before they merge (byte-level and Metaspace pre-tokenizers both do), so the pieces'
    tokens are the whole text's tokens and their sum is its exact count; :data:`_TOKENS_PER_CUT` tokens per cut
    are taken off the sum all the same, for a cut inside a very long word. A row that fits is therefore never
    called too long here, and its mask is built exactly as before.
    """
    piece = max(_PIECE_CHARS_PER_TOKEN * max_seq_len, _MIN_PIECE_CHARS)
    if len(text) <= piece:
        return None
    counted, begin, cuts = 0, 0, 0
    while begin < len(text):
        stop = min(begin + piece, len(text))
        if stop < len(text):
            stop = _last_word_end(text, begin + piece // 2, stop)
            cuts += 1
        (encoding,) = backend.encode_batch_fast([text[begin:stop]], add_special_tokens=False)
        counted += len(encoding)
        begin = stop
        at_least = counted - _TOKENS_PER_CUT * cuts
        if at_least > max_seq_len:
            return (
                f"at least {at_least} tokens > max_seq_len {max_seq_len} "
                f"(counted in the first {begin} of {len(text)} characters)"
            )
    return None


def _last_word_end(text: str, low: int, high: int) -> int:
    """The last position in ``(low, high]`` that ends a word (whitespace follows); ``high`` when there is none."""
    found = None
    for found in _WORD_END.finditer(text, low, high + 1):  # noqa: B007 (the last match is wanted)
        pass
    return found.start() + 1 if found is not None else high


def _fits(backend: Tokenizer, text: str, max_seq_len: int) -> bool:
    """Whether ``text`` has at most ``max_seq_len`` tokens (never encoding more than one piece of a long text)."""
    if _too_long_in_pieces(backend, text, max_seq_len) is not None:
        return False
    (encoding,) = backend.encode_batch_fast([text], add_special_tokens=False)
    return len(encoding) <= max_seq_len


def _labels_from_offsets(
    text: str, ids: list[int], offsets: list[tuple[int, int]], rendered: _Rendered
) -> list[int] | MaskError:
    """Label each token by its character offsets; both lists are in text order, so one pass suffices.

    This is the labelling rule itself; :func:`_trained_token_runs` reaches the same labels from span edges only.
    """
    labels = [IGNORE_INDEX] * len(ids)
    spans = rendered.trained_spans
    k = 0
    for pos, (start, end) in enumerate(offsets):
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        if k == len(spans):
            break
        span_start, span_end = spans[k]
        if end <= span_start:
            continue  # entirely before the span (a zero-width token at its start included)
        if start == end or (span_start <= start and end <= span_end):
            labels[pos] = ids[pos]  # inside (a zero-width token here is strictly inside)
            continue
        if (
            start < span_start < end <= span_end
            and span_start in rendered.content_starts
            and text[start:span_start].isspace()
        ):
            labels[pos] = ids[pos]  # e.g. "[/INST]" + " answer" -> "Ġanswer": the model emits the space itself
            continue
        return MaskError(
            "mask_boundary_straddle",
            f"token {pos} covers characters {start}:{end} ({text[start:end]!r}) across the boundary of the "
            f"trained span {span_start}:{span_end}",
        )
    return labels


def _trained_token_runs(rendered: _Rendered, enc: Encoding) -> list[tuple[int, int]] | None:
    """The token ranges ``[first, stop)`` that :func:`_labels_from_offsets` trains, one per trained span, found by
    asking the encoding only about the tokens at each span's edges; None when an edge is not clean (empty or
    overlapping spans, a token across a boundary, a zero-width token at one), so the caller runs the per-token pass.

    Why: pulling every token's offsets into Python costs more than the rest of the labelling. Why it is the same
    labelling: token start offsets never decrease (the per-token pass relies on it too). For a span ``[s, e)`` let
    ``first`` be the first token containing character ``s`` and ``stop`` the first containing ``e`` (or the end).
    Every token before ``first`` ends at or before ``s``, since it does not contain ``s`` and starts no later than
    ``first``; likewise every token before ``stop`` ends at or before ``e``. If ``first`` starts at ``s`` (or is
    whitespace-then-content, the one allowed straddle) and ``stop`` starts at ``e``, the tokens in between lie
    inside the span, those from ``stop`` on lie after it, and the per-token pass trains exactly ``[first, stop)``;
    the remaining zero-width tokens at ``s`` or ``e`` that it would leave untrained are sent to the per-token pass.
    """
    text = rendered.text
    count = len(enc)
    runs: list[tuple[int, int]] = []
    previous_end = 0
    for span_start, span_end in rendered.trained_spans:
        if not previous_end <= span_start < span_end:
            return None
        first = enc.char_to_token(span_start)
        if first is None:
            return None
        start, end = enc.token_to_chars(first)
        if start != span_start and not (
            span_start in rendered.content_starts and text[start:span_start].isspace() and end <= span_end
        ):
            return None
        # tokens after `first` that still start at or before `s`: a zero-width one at `s` is untrained there
        following = first + 1
        while following < count:
            start, end = enc.token_to_chars(following)
            if start > span_start:
                break
            if start < span_start or start == end:
                return None
            following += 1
        if span_end < len(text):
            stop = enc.char_to_token(span_end)
            if stop is None or enc.token_to_chars(stop)[0] != span_end:
                return None
        else:
            stop = count
        if stop <= first or enc.token_to_chars(stop - 1)[0] >= span_end:  # a zero-width token at `e`
            return None
        runs.append((first, stop))
        previous_end = span_end
    return runs


def tokenize_conversations(
    tok: PreTrainedTokenizerBase,
    conversations: Sequence[list[dict[str, Any]]],
    cfg: MaskConfig,
    tools: Sequence[str | list[dict[str, Any]] | None] | None = None,
) -> list[TokenizedConversation | MaskError]:
    """Tokenise conversations with the tokenizer's chat template and assistant-only labels.

    ``tools`` (optional, one per conversation): its tool definitions (the ``tools`` column's JSON text, or a list),
    passed to the template as ``tools=``. Messages may be stored rows (null fields, arguments as JSON text): they are
    rendered as :func:`posttrain_assets.records.tools.template_message` makes them.

    Returns one entry per conversation, in order: a :class:`TokenizedConversation` or a :class:`MaskError`.
    """
    return [result for chunk in tokenized_chunks(tok, conversations, cfg, tools) for result in chunk]


def tokenized_chunks(
    tok: PreTrainedTokenizerBase,
    conversations: Sequence[list[dict[str, Any]]],
    cfg: MaskConfig,
    tools: Sequence[str | list[dict[str, Any]] | None] | None = None,
) -> Iterator[list[TokenizedConversation | MaskError]]:
    """:func:`tokenize_conversations` in consecutive chunks of at most :data:`_CHUNK_ROWS` conversations, each
    yielded as soon as it is done, so a caller that packs each chunk (``sft.batches``) holds one chunk's token lists
    as Python ints at a time, and at most two chunks' encodings (with their offsets and token strings, about 100
    bytes a token) are alive: a worker's memory is bounded by the chunk, not by its batch."""
    if cfg.overflow not in ("quarantine", "truncate"):
        raise ValueError(f"unknown overflow {cfg.overflow!r}")
    if cfg.max_seq_len <= 0:
        raise ValueError("max_seq_len must be positive")
    if cfg.train_reasoning not in ("all", "last", "none"):
        raise ValueError(f"unknown train_reasoning {cfg.train_reasoning!r}")
    if tools is not None and len(tools) != len(conversations):
        raise ValueError(f"{len(tools)} tool lists for {len(conversations)} conversations")
    row_tools = [template_tools(t) for t in tools] if tools is not None else [None] * len(conversations)
    special_re = _special_token_pattern(tok)
    backend = _offset_backend(tok)
    skeletons = _Skeletons(tok)

    def finish(chunk: _Chunk) -> list[TokenizedConversation | MaskError]:
        """The chunk's rows in order, once its encodings are back (and its too long rows truncated if asked)."""
        encodings = chunk.encoded.result() if chunk.encoded is not None else []
        for (row, rendered), enc in zip(chunk.pending, encodings, strict=True):
            if len(enc) > cfg.max_seq_len:
                chunk.too_long.append(row)
                chunk.results[row] = MaskError("too_long", f"{len(enc)} tokens > max_seq_len {cfg.max_seq_len}")
                continue
            chunk.results[row] = _finish(rendered, enc, truncated=False)
        if cfg.overflow == "truncate":
            for row in chunk.too_long:
                messages = template_conversation(conversations[row])
                original = chunk.results[row]
                chunk.results[row] = _truncate(skeletons, messages, cfg, special_re, backend, original, row_tools[row])
        chunk.pending, chunk.encoded = [], None  # the renderings and encodings are done with
        return [chunk.results[row] for row in chunk.rows]

    # Rendering is Python and encoding is Rust, which releases the GIL and spreads a batch over all cores (unless
    # TOKENIZERS_PARALLELISM=false), so one thread encodes a chunk while this one renders the next, then labels the
    # encoded one while the next encodes.
    with ThreadPoolExecutor(max_workers=1) as encoder:
        previous: _Chunk | None = None
        for begin in range(0, len(conversations), _CHUNK_ROWS):
            chunk = _Chunk(range(begin, min(begin + _CHUNK_ROWS, len(conversations))))
            for row in chunk.rows:
                try:
                    messages = template_conversation(conversations[row])
                    rendered = _render_with_spans(skeletons, messages, cfg, special_re, tools=row_tools[row])
                except MaskError as err:
                    chunk.results[row] = err
                    continue
                overflow = _too_long_in_pieces(backend, rendered.text, cfg.max_seq_len)
                if overflow is not None:  # not encoded whole: bounded memory for a huge row
                    chunk.too_long.append(row)
                    chunk.results[row] = MaskError("too_long", overflow)
                    continue
                chunk.pending.append((row, rendered))
            if chunk.pending:
                texts = [rendered.text for _, rendered in chunk.pending]
                chunk.encoded = encoder.submit(backend.encode_batch, texts, add_special_tokens=False)
            if previous is not None:
                yield finish(previous)
            previous = chunk
        if previous is not None:
            yield finish(previous)


@dataclass
class _Chunk:
    """Consecutive rows of one :func:`tokenized_chunks` call: results known so far by row, the rows rendered for
    encoding (with their encodings once submitted), and the rows too long for ``max_seq_len``."""

    rows: range
    results: dict[int, TokenizedConversation | MaskError] = field(default_factory=dict)
    pending: list[tuple[int, _Rendered]] = field(default_factory=list)
    encoded: Future[list[Encoding]] | None = None
    too_long: list[int] = field(default_factory=list)


def _finish(rendered: _Rendered, enc: Encoding, truncated: bool) -> TokenizedConversation | MaskError:
    """The row for an encoded rendering, or the error that keeps its mask from being exact."""
    ids: list[int] = enc.ids
    runs = _trained_token_runs(rendered, enc)
    if runs is None:
        labels = _labels_from_offsets(rendered.text, ids, enc.offsets, rendered)
        if isinstance(labels, MaskError):
            return labels
        trainable = sum(1 for label in labels if label != IGNORE_INDEX)
    else:
        labels = [IGNORE_INDEX] * len(ids)
        for first, stop in runs:
            labels[first:stop] = ids[first:stop]
        trainable = sum(stop - first for first, stop in runs)
    if trainable == 0:
        return MaskError("no_trainable_tokens", "no token falls inside an assistant span")
    return TokenizedConversation(
        input_ids=ids,
        labels=labels,
        num_tokens=len(ids),
        num_trainable_tokens=trainable,
        truncated=truncated,
        num_messages=rendered.num_messages,
    )


# Truncation checks this many candidate prefixes beyond the longest that a search assuming "more turns, more tokens"
# finds, longest first, so a prefix that renders shorter than a shorter one (a reasoning template strips the thinking
# of every assistant turn but the last) is still found; a conversation of up to 2 * 64 + 1 messages has every
# candidate checked, as before the search existed.
_TRUNCATION_LOOKAHEAD = 64


def _truncate(
    skeletons: _Skeletons,
    messages: list[dict[str, Any]],
    cfg: MaskConfig,
    special_re: re.Pattern[str] | None,
    backend: Tokenizer,
    original: Any,
    tools: Tools = None,
) -> TokenizedConversation | MaskError:
    """Longest prefix of whole messages ending with an assistant turn that fits ``max_seq_len``.

    Candidates are tried longest first, each rendered, counted, and if it fits aligned and encoded. Trying them all
    costs time quadratic in the turns (every one renders a prefix), so with more than :data:`_TRUNCATION_LOOKAHEAD`
    candidates the scan starts that many above the longest one that fits by a galloping search over the rendered
    lengths (:func:`_longest_fitting`). This finds the longest prefix that fits unless a prefix longer by more than
    that many assistant turns renders to fewer tokens.
    """
    ends = [i + 1 for i, m in enumerate(messages) if m.get("role") == "assistant" and i + 1 < len(messages)]
    top = len(ends) - 1
    if len(ends) > _TRUNCATION_LOOKAHEAD:  # with fewer, the scan checks every candidate anyway
        found = _longest_fitting(skeletons.tok, backend, messages, ends, cfg.max_seq_len, tools)
        top = min(top, found + _TRUNCATION_LOOKAHEAD)
    for count in reversed(ends[: top + 1]):
        # A prefix that is too long or that the template cannot render or align is skipped either way, so the
        # cheap length count comes before the alignment and the encoding with offsets.
        try:
            text = _render(skeletons.tok, messages[:count], tools)
            if not _fits(backend, text, cfg.max_seq_len):
                continue
            rendered = _render_with_spans(skeletons, messages[:count], cfg, special_re, text, tools)
        except MaskError as err:
            if err.reason == "template_error":  # e.g. a template that needs a final user turn: try shorter
                continue
            return err
        return _finish(rendered, backend.encode(rendered.text, add_special_tokens=False), truncated=True)
    if isinstance(original, MaskError):
        return MaskError("too_long", f"{original.message}, and no prefix of whole turns ending with an assistant fits")
    return MaskError("too_long", "no prefix of whole turns ending with an assistant turn fits")


def _longest_fitting(
    tok: PreTrainedTokenizerBase,
    backend: Tokenizer,
    messages: list[dict[str, Any]],
    ends: list[int],
    max_seq_len: int,
    tools: Tools = None,
) -> int:
    """The index in ``ends`` of the longest prefix ``messages[:ends[i]]`` that fits ``max_seq_len``, if fitting is
    monotone (a prefix fits when a longer one does); -1 when none does. Galloping from the shortest prefix, then
    bisecting, renders O(log n) prefixes no longer than about twice the answer. A prefix the template refuses
    counts as fitting here (the scan that follows skips it)."""

    def fits(index: int) -> bool:
        try:
            text = _render(tok, messages[: ends[index]], tools)
        except MaskError:
            return True
        return _fits(backend, text, max_seq_len)

    low, high = -1, 0  # ends[low] fits (-1: none known); ends[high] is the next to probe
    while high < len(ends) and fits(high):
        low, high = high, 2 * high + 1
    high = min(high, len(ends))  # ends[high] does not fit (or is past the end)
    while high - low > 1:
        middle = (low + high) // 2
        if fits(middle):
            low = middle
        else:
            high = middle
    return low


# ----------------------------------------------------------------------------------------------------------------
# independent verification and display
# ----------------------------------------------------------------------------------------------------------------


def _decode(tok: PreTrainedTokenizerBase, ids: list[int]) -> str:
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:  # what tok.decode calls, without its per-element type check of the id list
        return backend.decode(ids, skip_special_tokens=False)
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _rendered_content_forms(content: str) -> list[str]:
    """Forms an assistant content may take in a rendering: verbatim, trimmed, or with its thinking stripped."""
    forms = [content, content.strip(), content.lstrip(), content.rstrip()]
    if "</think>" in content:
        answer = content.split("</think>")[-1]
        forms += [answer, answer.strip(), answer.lstrip(), answer.lstrip("\n")]
    return list(dict.fromkeys(forms))


def _matches_piece(run_text: str, forms: list[str], marker: str) -> bool:
    if not run_text.endswith(marker):
        return False
    body = run_text[: len(run_text) - len(marker)]
    for form in forms:
        if body == form:
            return True
        lead = len(body) - len(form)
        if lead > 0 and body.endswith(form) and body[:lead].isspace():
            return True
    return False


def _consistent(decoded: str, expected: str) -> bool:
    """Whether ``decoded`` can be the beginning of ``expected`` (leading whitespace glued to text is allowed)."""
    if expected.startswith(decoded):
        return True
    stripped = decoded.lstrip()
    return bool(stripped) and expected.startswith(stripped)


def _first_wrong_position(
    tok: PreTrainedTokenizerBase, input_ids: list[int], run: tuple[int, int], expected: str
) -> int:
    """Best-effort first wrong label position for a trained run that does not decode to ``expected``."""
    start, end = run
    if not _consistent(_decode(tok, input_ids[start : start + 1]), expected):
        for back in range(1, min(start, 64) + 1):  # the run may start too late: expected text begins earlier
            if _consistent(_decode(tok, input_ids[start - back : start + 1]), expected):
                return start - back
        return start  # trained, but not the beginning of the expected text
    for pos in range(start + 1, end):
        if not _consistent(_decode(tok, input_ids[start : pos + 1]), expected):
            return pos  # trained beyond the expected text
    return end  # the run stops early: this position should be trained


def _untrained_occurrence(
    tok: PreTrainedTokenizerBase, input_ids: list[int], gap: tuple[int, int], texts: list[str]
) -> int | None:
    """First position in the untrained ``gap`` where one of ``texts`` starts (it should have been trained)."""
    start, end = gap
    if end <= start:
        return None
    gap_text = _decode(tok, input_ids[start:end])
    found = [i for i in (gap_text.find(t) for t in texts if t) if i != -1]
    if not found:
        return None
    char = min(found)
    lo, hi = start, end  # smallest p with len(decode(ids[start:p + 1])) > char
    while lo < hi:
        mid = (lo + hi) // 2
        if len(_decode(tok, input_ids[start : mid + 1])) > char:
            hi = mid
        else:
            lo = mid + 1
    return lo


@dataclass(frozen=True)
class TemplateRaised:
    """The chat template raised for a conversation; ``message`` says what it raised."""

    message: str


def template_renderings(
    tok: PreTrainedTokenizerBase,
    conversations: Sequence[list[dict[str, Any]]],
    tools: Sequence[str | list[dict[str, Any]] | None] | None = None,
    add_generation_prompt: bool = False,
) -> list[str | TemplateRaised]:
    """``apply_chat_template(conversation, tools=..., tokenize=False)`` of each conversation (in template form:
    ``records.tools.template_message``; ``tools`` one per conversation, as :func:`tokenize_conversations` takes
    them), or what it raised; ``add_generation_prompt`` as the template takes it (silver's token counts of RL prompts).

    One batched call for the conversations without tools; when the template raises for any conversation of the
    batch, each is rendered on its own so only that one carries the error. Conversations with tools are rendered on
    their own (``apply_chat_template`` takes one tools list per call).
    """
    if not conversations:
        return []
    conversations = [template_conversation(c) for c in conversations]
    row_tools = [template_tools(t) for t in tools] if tools is not None else [None] * len(conversations)
    if any(row_tools):
        plain = [i for i, t in enumerate(row_tools) if not t]
        out_all: list[str | TemplateRaised] = [TemplateRaised("not rendered")] * len(conversations)
        rendered = template_renderings(tok, [conversations[i] for i in plain], None, add_generation_prompt)
        for i, text in zip(plain, rendered, strict=True):
            out_all[i] = text
        for i, t in enumerate(row_tools):
            if t:
                try:
                    text = tok.apply_chat_template(
                        conversations[i], tools=t, tokenize=False, add_generation_prompt=add_generation_prompt
                    )
                except Exception as exc:
                    out_all[i] = TemplateRaised(f"chat template raised {type(exc).__name__}: {exc}")
                    continue
                out_all[i] = text if isinstance(text, str) else TemplateRaised("chat template rendered no text")
        return out_all
    try:
        texts = tok.apply_chat_template(
            list(conversations), tokenize=False, add_generation_prompt=add_generation_prompt
        )
        if all(isinstance(text, str) for text in texts):
            return list(texts)
    except Exception:
        pass
    out: list[str | TemplateRaised] = []
    for conversation in conversations:
        try:
            text = tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt)
        except Exception as exc:
            out.append(TemplateRaised(f"chat template raised {type(exc).__name__}: {exc}"))
            continue
        out.append(text if isinstance(text, str) else TemplateRaised(f"chat template rendered {type(text).__name__}"))
    return out


def canonical_ids(tok: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    """The tokenizer's own encoding of each rendering, as ``apply_chat_template(tokenize=True)`` makes it (render,
    then encode without special tokens): one batched call, through the Rust backend (no offsets) when there is one.
    """
    if not texts:
        return []
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return [list(ids) for ids in tok(list(texts), add_special_tokens=False)["input_ids"]]
    return [encoding.ids for encoding in backend.encode_batch_fast(list(texts), add_special_tokens=False)]


def fresh_template_ids(
    tok: PreTrainedTokenizerBase,
    conversations: Sequence[list[dict[str, Any]]],
    tools: Sequence[str | list[dict[str, Any]] | None] | None = None,
) -> list[list[int] | str]:
    """``apply_chat_template(conversation, tokenize=True)`` of each conversation, or the error it raised."""
    renderings = template_renderings(tok, conversations, tools)
    texts = [r for r in renderings if isinstance(r, str)]
    encoded = iter(canonical_ids(tok, texts))
    return [next(encoded) if isinstance(r, str) else r.message for r in renderings]


def independent_markers(
    tok: PreTrainedTokenizerBase, conversations: Sequence[list[dict[str, Any]]]
) -> list[str | None]:
    """End-of-turn marker of each conversation from a plain rendering, independent of the skeleton: the text the
    template writes after the last assistant content (replaced by a sentinel) up to trailing whitespace. One batched
    render; None where there is no assistant turn or the template raises."""
    probes: list[list[dict[str, Any]] | None] = []
    for messages in conversations:
        messages = template_conversation(messages)
        last = max(
            (i for i, m in enumerate(messages) if m.get("role") == "assistant" and not has_structure(m)), default=None
        )
        if last is None and any(m.get("role") == "assistant" for m in messages):  # every turn calls or reasons
            probes.append([{"role": "user", "content": "\ue003"}, {"role": "assistant", "content": "\ue002"}])
            continue
        probes.append(None if last is None else [*messages[:last], {**messages[last], "content": "\ue002"}])
    rendered = iter(template_renderings(tok, [p for p in probes if p is not None]))
    markers: list[str | None] = []
    for probe in probes:
        text = None if probe is None else next(rendered)
        if not isinstance(text, str) or (position := text.rfind("\ue002")) == -1:
            markers.append(None)
            continue
        # "": the template closes no turn (GLM); the proof then takes the special token that opens the next message
        markers.append(text[position + 1 :].rstrip())
    return markers


def _runs(labels: Sequence[int] | np.ndarray) -> list[tuple[int, int]]:
    """``(start, end)`` of each maximal run of trained (not -100) labels."""
    trained = np.asarray(labels) != IGNORE_INDEX
    edges = np.diff(trained.astype(np.int8), prepend=0, append=0)
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist(), strict=True))


@dataclass(frozen=True)
class DecodedRow:
    """A tokenised row's ids decoded: whole, each trained run and each untrained gap between them, in order."""

    text: str
    trained: list[str]
    untrained: list[str]


def decode_rows(
    tok: PreTrainedTokenizerBase, token_lists: Sequence[list[int]], label_lists: Sequence[Sequence[int] | np.ndarray]
) -> list[DecodedRow]:
    """:class:`DecodedRow` of each row, from one batched decode of every row, run and gap (the Rust backend decodes
    a batch on all cores; the same text as decoding each piece on its own)."""
    pieces: list[list[int]] = []
    shapes: list[tuple[int, int]] = []
    for tokens, labels in zip(token_lists, label_lists, strict=True):
        runs = _runs(labels)
        gaps = _untrained_runs(runs, len(tokens))
        pieces.append(tokens)
        pieces += [tokens[s:e] for s, e in runs]
        pieces += [tokens[s:e] for s, e in gaps]
        shapes.append((len(runs), len(gaps)))
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        texts = backend.decode_batch(pieces, skip_special_tokens=False)
    else:
        texts = [_decode(tok, piece) for piece in pieces]
    out: list[DecodedRow] = []
    at = 0
    for trained, untrained in shapes:
        out.append(
            DecodedRow(
                texts[at], texts[at + 1 : at + 1 + trained], texts[at + 1 + trained : at + 1 + trained + untrained]
            )
        )
        at += 1 + trained + untrained
    return out


@dataclass(frozen=True)
class ProofInputs:
    """What :func:`verify_mask` needs beyond the row, computed for a whole batch by its caller
    (``sft.batches.prove_batch``): the template's rendering of the kept messages (or what it raised), the
    tokenizer's canonical ids of that rendering (None: the canonical-encoding claim is not checked for this row),
    the row decoded (:func:`decode_rows`) and the independently found end-of-turn marker (when not configured)."""

    rendering: str | TemplateRaised
    canonical: list[int] | None
    decoded: DecodedRow
    marker: str | None


def _spelling_error(tok: PreTrainedTokenizerBase, tokens: list[int], decoded: str, rendering: str) -> str:
    """Where ``tokens`` stop spelling ``rendering``: the first position whose token takes the decoded text away
    from the rendering."""
    common = next((i for i, (a, b) in enumerate(zip(decoded, rendering, strict=False)) if a != b), None)
    if common is None:
        common = min(len(decoded), len(rendering))
    lo, hi = 0, len(tokens)  # smallest p with decode(tokens[:p + 1]) not a prefix of the rendering
    while lo < hi:
        mid = (lo + hi) // 2
        if rendering.startswith(_decode(tok, tokens[: mid + 1])):
            lo = mid + 1
        else:
            hi = mid
    return (
        f"position {lo}: input_ids do not decode to the chat template's rendering "
        f"(they differ at character {common} of {len(rendering)})"
    )


def verify_mask(
    tok: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    input_ids: Sequence[int] | np.ndarray,
    labels: Sequence[int] | np.ndarray,
    cfg: MaskConfig,
    num_messages: int | None = None,
    inputs: ProofInputs | None = None,
    tools: str | list[dict[str, Any]] | None = None,
) -> str | None:
    """Independently prove a mask; return None if correct, else a message naming the first wrong position.

    ``num_messages`` is the number of leading messages that were kept (``TokenizedConversation.num_messages``;
    None means all); ``inputs`` is what a batched caller computed for the row (None: computed here, with the
    canonical-encoding claim checked). Checks, without reusing the span search of :func:`tokenize_conversations`:

    * the rendering is the template's own (``apply_chat_template(messages[:num_messages], tokenize=False)``) and
      ``input_ids`` decode to exactly it;
    * ``input_ids`` are the tokenizer's canonical encoding of it (equal to ``apply_chat_template(tokenize=True)``),
      when ``inputs.canonical`` is given;
    * every label is -100 or its input id, and at least one is trained;
    * the contiguous trained runs decode, in order, to exactly each trained assistant content (as the template
      renders it: verbatim, trimmed, or thinking stripped; optionally preceded by whitespace the template puts
      before it) followed by the end-of-turn marker;
    * every non-assistant content (and every untrained assistant content) that appears in the decoded text
      appears in untrained text, and never inside a trained run;
    * an assistant turn with tool calls or reasoning (``tools``: the row's definitions) has one trained run that
      holds its content and every call's name and string arguments, ends with an end-of-turn token (the marker or a
      special token: Harmony's <|call|>, GLM's <|observation|>), and holds its reasoning exactly when
      ``cfg.train_reasoning`` trains it (an untrained reasoning lies in untrained text); no tool definition's
      description is trained. With a template that closes no turn (marker ``""``, GLM), a plain turn's run is its
      content followed by the special token that opens the next message.
    """
    kept = template_conversation(messages if num_messages is None else messages[:num_messages])
    if not kept:
        return "no messages to verify"
    ids, labs = np.asarray(input_ids), np.asarray(labels)
    tokens = ids.tolist()  # for decoding
    if inputs is None:
        (rendering,) = template_renderings(tok, [kept], [tools])
        canonical = canonical_ids(tok, [rendering])[0] if isinstance(rendering, str) else None
        marker = None if cfg.end_of_turn is not None else independent_markers(tok, [kept])[0]
        inputs = ProofInputs(rendering, canonical, decode_rows(tok, [tokens], [labs])[0], marker)
    if isinstance(inputs.rendering, TemplateRaised):
        return inputs.rendering.message
    # The position-wise checks run over numpy arrays (a row has thousands of tokens); decoding takes lists.
    if inputs.canonical is not None:
        expected_ids = np.asarray(inputs.canonical)
        if len(ids) != len(expected_ids) or not np.array_equal(ids, expected_ids):
            common = min(len(ids), len(expected_ids))
            differ = np.flatnonzero(ids[:common] != expected_ids[:common])
            pos = int(differ[0]) if len(differ) else common
            return f"position {pos}: input_ids differ from apply_chat_template ({len(ids)} vs {len(expected_ids)} ids)"
    decoded = inputs.decoded
    if decoded.text != inputs.rendering:
        return _spelling_error(tok, tokens, decoded.text, inputs.rendering)
    if len(labs) != len(ids):
        return f"position {min(len(labs), len(ids))}: {len(labs)} labels for {len(ids)} input ids"
    wrong = np.flatnonzero((labs != IGNORE_INDEX) & (labs != ids))
    if len(wrong):
        pos = int(wrong[0])
        return f"position {pos}: label {int(labs[pos])} is neither -100 nor the input id {int(ids[pos])}"
    runs = _runs(labs)
    if not runs:
        return "no trained position"

    trained = _trained_indices(kept, cfg)
    if not trained:
        return f"position {runs[0][0]}: trained, but the kept messages have no assistant turn to train"
    if cfg.end_of_turn is not None:
        marker = cfg.end_of_turn
    else:
        # Independent of the skeleton: the marker is what the template writes after a trained content before the
        # next whitespace; taken from a rendering with the last assistant content replaced by a sentinel.
        marker = inputs.marker
        if marker is None:
            return "cannot determine the end-of-turn marker independently; set MaskConfig.end_of_turn"

    trained_texts = decoded.trained
    specials = special_tokens(tok)
    gap_before = {
        end: text for (_, end), text in zip(_untrained_runs(runs, len(tokens)), decoded.untrained, strict=True)
    }
    prompt = _generation_prompt(tok) if any(has_structure(kept[i]) for i in trained) else None
    for number, index in enumerate(trained):
        if has_structure(kept[index]) and number < len(runs):
            problem = _structured_run_problem(
                kept,
                index,
                runs[number],
                trained_texts[number],
                decoded,
                cfg,
                marker,
                specials,
                runs[number][1] == len(tokens),
                gap_before.get(runs[number][0], ""),
                prompt,
            )
            if problem is not None:
                return problem
            continue
        forms = _rendered_content_forms(kept[index]["content"])
        if not marker and number < len(runs):  # a template that closes no turn: the next message's opening
            text = trained_texts[number]
            stop = next((t for t in specials if text.endswith(t)), "")
            if _matches_piece(text, forms, stop) and (stop or runs[number][1] == len(tokens)):
                continue
        if number >= len(runs):
            after = runs[-1][1]
            missing = _untrained_occurrence(tok, tokens, (after, len(tokens)), [f + marker for f in forms])
            after = after if missing is None else missing
            return (
                f"position {after}: assistant message {index} has no trained run "
                f"(expected {forms[0][:60]!r} + {marker!r} to be trained)"
            )
        run, text = runs[number], trained_texts[number]
        if not _matches_piece(text, forms, marker):
            previous_end = runs[number - 1][1] if number else 0
            missing = _untrained_occurrence(tok, tokens, (previous_end, run[0]), [f + marker for f in forms])
            best = (
                missing
                if missing is not None
                else max(_first_wrong_position(tok, tokens, run, form + marker) for form in forms)
            )
            return (
                f"position {best}: trained run {run[0]}:{run[1]} decodes to {text[:80]!r}, expected assistant "
                f"message {index} content {forms[0][:60]!r} followed by {marker!r}"
            )
    if len(runs) > len(trained):
        extra = runs[len(trained)]
        return (
            f"position {extra[0]}: trained run {extra[0]}:{extra[1]} "
            f"({trained_texts[len(trained)][:60]!r}) is not an assistant turn"
        )

    untrained_texts, full_text = decoded.untrained, decoded.text
    trained_set = set(trained)
    for index, message in enumerate(kept):
        if index in trained_set:
            continue
        content = message["content"].strip()
        if not content or content not in full_text:
            continue  # the template does not render it (e.g. thinking stripped); nothing can be trained from it
        if any(content in t for t in trained_texts) and not any(content in t for t in untrained_texts):
            run = next(r for r, t in zip(runs, trained_texts, strict=True) if content in t)
            return f"position {run[0]}: content of {message['role']} message {index} is trained"
        if not any(content in t for t in untrained_texts):
            return f"content of {message['role']} message {index} is not wholly inside untrained text"
    for tool in template_tools(tools) or []:
        description = str((tool.get("function") or {}).get("description") or "").strip()
        if description and description in full_text and not any(description in t for t in untrained_texts):
            run = next((r for r, t in zip(runs, trained_texts, strict=True) if description in t), runs[0])
            return f"position {run[0]}: the definition of tool {tool['function'].get('name')!r} is trained"
    return None


def _structured_run_problem(
    kept: list[dict[str, Any]],
    index: int,
    run: tuple[int, int],
    text: str,
    decoded: DecodedRow,
    cfg: MaskConfig,
    marker: str,
    specials: tuple[str, ...],
    at_end: bool,
    before: str,
    prompt: str | None,
) -> str | None:
    """Why the trained run of an assistant turn with tool calls or reasoning is wrong (None: it is right); see
    :func:`verify_mask`. ``before`` is the untrained text just before the run, ``prompt`` the template's generation
    prompt (found independently: what ``add_generation_prompt`` appends)."""
    message = kept[index]
    where = f"position {run[0]}: trained run {run[0]}:{run[1]} of assistant message {index}"
    reasoning = (message.get("reasoning_content") or "").strip()
    rendered_reasoning = bool(reasoning) and reasoning in decoded.text
    wanted = _reasoning_trained(kept, index, cfg)
    if rendered_reasoning and not wanted and reasoning in text:
        return f"{where} trains its reasoning, which train_reasoning={cfg.train_reasoning!r} leaves untrained"
    if rendered_reasoning and wanted and reasoning not in text:
        return f"{where} does not hold its reasoning, which train_reasoning={cfg.train_reasoning!r} trains"
    # Where the run starts: right after the generation prompt, or after the reasoning text when that is untrained.
    if rendered_reasoning and not wanted:
        if not before.rstrip().endswith(reasoning):
            return f"{where} does not start right after its untrained reasoning"
    elif prompt is None or not before.endswith(prompt):
        return f"{where} does not start right after the generation prompt {prompt!r} ({before[-40:]!r} before it)"
    ends = (marker and text.endswith(marker)) or any(text.endswith(t) for t in specials)
    if not ends and not at_end:  # only the last turn of a template that closes none may end without one (GLM)
        return f"{where} does not end with an end-of-turn token ({text[-40:]!r})"
    content = message["content"].strip()
    if content and content not in text:
        return f"{where} does not hold its content {content[:60]!r}"
    for call in message.get("tool_calls") or []:
        function = call["function"]
        values = [function["name"], *(v for v in function["arguments"].values() if isinstance(v, str))]
        missing = next((v for v in values if v not in text), None)
        if missing is not None:
            return f"{where} does not hold its tool call {function['name']!r} ({missing[:60]!r} is not trained)"
    if rendered_reasoning and not wanted and not any(reasoning in t for t in decoded.untrained):
        return f"{where}: its untrained reasoning is not wholly inside untrained text"
    return None


_GENERATION_PROMPTS: dict[tuple[int, str], str | None] = {}


def _generation_prompt(tok: PreTrainedTokenizerBase) -> str | None:
    """What ``add_generation_prompt=True`` appends after a user turn, per tokenizer and template (cached)."""
    key = (id(tok), str(tok.chat_template))
    if key not in _GENERATION_PROMPTS:
        _GENERATION_PROMPTS[key] = _probe_generation_prompt(tok)
    return _GENERATION_PROMPTS[key]


def _untrained_runs(runs: list[tuple[int, int]], length: int) -> list[tuple[int, int]]:
    gaps: list[tuple[int, int]] = []
    prev = 0
    for start, end in runs:
        if start > prev:
            gaps.append((prev, start))
        prev = end
    if prev < length:
        gaps.append((prev, length))
    return gaps


# Markers of the mask debug view: (open, close) in plain text, and the ANSI colour in colour mode.
_VIEW_MARKS = {
    "trained": (("⟦", "⟧"), "\x1b[32m"),  # green
    "reasoning": (("⟨reasoning⟩", "⟨/reasoning⟩"), "\x1b[35m"),  # magenta
    "call": (("⟨call⟩", "⟨/call⟩"), "\x1b[33m"),  # yellow
    "result": (("⟨result⟩", "⟨/result⟩"), "\x1b[36m"),  # cyan
}
_RESET = "\x1b[0m"


def render_mask(
    tok: PreTrainedTokenizerBase,
    input_ids: list[int],
    labels: list[int],
    color: bool = False,
    messages: Sequence[dict[str, Any]] | None = None,
) -> str:
    """Human-readable mask: trained spans wrapped in ``⟦ ⟧`` (or shown in green with ``color=True``).

    With the row's ``messages``, agentic parts are shown distinctly too, trained or not: each reasoning text in
    ``⟨reasoning⟩ ⟨/reasoning⟩`` (magenta), each tool call's name in ``⟨call⟩ ⟨/call⟩`` (yellow) and each tool result
    in ``⟨result⟩ ⟨/result⟩`` (cyan), found in the rendering in message order."""
    pieces: list[str] = []
    trained: list[tuple[int, int]] = []
    prev, at = 0, 0
    for start, end in _runs(labels):
        if start > prev:
            pieces.append(_decode(tok, input_ids[prev:start]))
            at += len(pieces[-1])
        pieces.append(_decode(tok, input_ids[start:end]))
        trained.append((at, at + len(pieces[-1])))
        at += len(pieces[-1])
        prev = end
    if prev < len(input_ids):
        pieces.append(_decode(tok, input_ids[prev:]))
    text = "".join(pieces)
    spans = [("trained", start, end) for start, end in trained]
    if messages is not None:
        spans += _agentic_view_spans(text, template_conversation(messages))
    # Closing marks before opening marks at the same place, outer spans (longer) opened first and closed last.
    events = sorted(
        [(start, 1, -(end - start), kind, True) for kind, start, end in spans]
        + [(end, 0, end - start, kind, False) for kind, start, end in spans]
    )
    out, position, active = [], 0, []
    for place, _, _, kind, opening in events:
        out.append(text[position:place])
        position = place
        (open_mark, close_mark), ansi = _VIEW_MARKS[kind]
        if opening:
            active.append(kind)
            out.append(ansi if color else open_mark)
        else:
            active.remove(kind)
            out.append((_RESET + "".join(_VIEW_MARKS[k][1] for k in active)) if color else close_mark)
    out.append(text[position:])
    return "".join(out)


def _agentic_view_spans(text: str, messages: list[dict[str, Any]]) -> list[tuple[str, int, int]]:
    """(kind, start, end) in the rendered ``text`` of each reasoning, tool-call name and tool result, each searched
    after the previous one found (so repeated texts land on their own turn)."""
    spans: list[tuple[str, int, int]] = []
    cursor = 0
    for message in messages:
        wanted: list[tuple[str, str]] = []
        if message.get("reasoning_content"):
            wanted.append(("reasoning", message["reasoning_content"].strip()))
        wanted += [("call", call["function"]["name"]) for call in message.get("tool_calls") or []]
        if message.get("role") == "tool" and message.get("content", "").strip():
            wanted.append(("result", message["content"].strip()))
        for kind, needle in wanted:
            found = text.find(needle, cursor)
            if found != -1:
                spans.append((kind, found, found + len(needle)))
                cursor = found + len(needle)
    return spans
