"""Loss masks of agentic and reasoning conversations: tool calls, tool results, tool definitions and reasoning.

For four tool-calling template families written here in the style of real ones (Qwen/Hermes ChatML with
``<tool_call>`` JSON and ``<tool_response>`` in a user turn, Llama-3.1 JSON calls with the ``ipython`` role, a
Harmony-style template with analysis/commentary/final channels, and a GLM-style template whose stop token opens the
next message), our labels are compared position by position with transformers' ``return_assistant_tokens_mask`` on
``{% generation %}``-tagged copies that render the same text. The rules (docs/sft-masks.md):

- trained: what the model writes after the generation prompt of an assistant turn that calls tools or reasons, i.e.
  its reasoning (per ``MaskConfig.train_reasoning``), content, tool-call text and the token that ends the turn; for
  a plain turn, its content and end-of-turn marker as before;
- never trained: tool results, tool definitions, system and user text, role headers and generation prompts.

Where the tagged copy's convention is ours rather than an upstream template's (GLM: the stop token the template
writes at the start of the next message is trained, because the model must emit it to stop calling tools), the test
says so and asserts it token by token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from posttrain_assets.records.tools import template_messages
from posttrain_assets.sft.masking import (
    IGNORE_INDEX,
    MaskConfig,
    MaskError,
    TokenizedConversation,
    render_mask,
    tokenize_conversations,
    verify_mask,
)

Messages = list[dict[str, Any]]

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TOOLS = [WEATHER]


def call(ident: str, city: str) -> dict[str, Any]:
    return {"id": ident, "type": "function", "function": {"name": "get_weather", "arguments": f'{{"city": "{city}"}}'}}


# One tool round trip with reasoning, then a plain follow-up turn.
AGENT: Messages = [
    {"role": "system", "content": "You answer weather questions."},
    {"role": "user", "content": "Weather in Oslo?"},
    {
        "role": "assistant",
        "content": "",
        "reasoning_content": "I should call the tool.",
        "tool_calls": [call("a", "Oslo")],
    },
    {"role": "tool", "tool_call_id": "a", "name": "get_weather", "content": "4 C, cloudy"},
    {"role": "assistant", "content": "It is 4 C and cloudy.", "reasoning_content": "The tool answered."},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You're welcome."},
]
# Two parallel calls with text before them, no reasoning.
PARALLEL: Messages = [
    {"role": "user", "content": "Oslo and Rome?"},
    {"role": "assistant", "content": "Checking both.", "tool_calls": [call("a", "Oslo"), call("b", "Rome")]},
    {"role": "tool", "tool_call_id": "a", "name": "get_weather", "content": "4 C"},
    {"role": "tool", "tool_call_id": "b", "name": "get_weather", "content": "21 C"},
    {"role": "assistant", "content": "Oslo 4 C, Rome 21 C."},
]
# The same conversation as stored in silver.records (DuckDB fills every struct field; arguments are JSON text).
STORED_NULLS = {"reasoning_content": None, "tool_calls": None, "tool_call_id": None, "name": None}

# ---------------------------------------------------------------------------------------------------------------
# templates: plain and {% generation %}-tagged copies (the tagged copy takes train_reasoning as a template variable,
# which the plain one ignores)
# ---------------------------------------------------------------------------------------------------------------

# Which assistant turns train their reasoning, for the tagged copies.
_LAST_ASSISTANT = (
    "{% set ns = namespace(last=-1) %}{% for m in messages %}{% if m.role == 'assistant' %}"
    "{% set ns.last = loop.index0 %}{% endif %}{% endfor %}"
    "{% set mode = train_reasoning if train_reasoning is defined else 'all' %}"
)
_THINKS = "{% set thinks = mode == 'all' or (mode == 'last' and loop.index0 == ns.last) %}"

_QWEN_HEAD = (
    "{% if tools %}{{ '<|im_start|>system\\n' }}{% if messages[0].role == 'system' %}"
    "{{ messages[0].content + '\\n\\n' }}{% endif %}"
    "{{ '# Tools\\n\\nYou may call one or more functions.\\n<tools>' }}"
    "{% for t in tools %}{{ '\\n' + (t | tojson) }}{% endfor %}"
    "{{ '\\n</tools>\\n\\nReturn each call as JSON within <tool_call></tool_call> tags.<|im_end|>\\n' }}"
    "{% elif messages[0].role == 'system' %}{{ '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{% endif %}"
)
_QWEN_CALLS = (
    "{% for tc in message.tool_calls %}{% if (loop.first and message.content) or not loop.first %}{{ '\\n' }}"
    '{% endif %}{{ \'<tool_call>\\n{"name": "\' + tc.function.name + \'", "arguments": \' }}'
    "{{ tc.function.arguments | tojson }}{{ '}\\n</tool_call>' }}{% endfor %}"
)
_QWEN_TOOL = (
    "{% elif message.role == 'tool' %}"
    "{% if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{ '<|im_start|>user' }}{% endif %}"
    "{{ '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{% if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{ '<|im_end|>\\n' }}{% endif %}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_QWEN_LOOP = (
    "{% for message in messages %}{% if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{ '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{% elif message.role == 'assistant' %}"
)
QWEN = (
    _QWEN_HEAD + _QWEN_LOOP + "{{ '<|im_start|>assistant\\n' }}"
    "{% if message.reasoning_content %}"
    "{{ '<think>\\n' + message.reasoning_content.strip('\\n') + '\\n</think>\\n\\n' }}{% endif %}"
    "{{ message.content }}" + _QWEN_CALLS + "{{ '<|im_end|>\\n' }}" + _QWEN_TOOL
)
QWEN_TAGGED = (
    _LAST_ASSISTANT + _QWEN_HEAD + _QWEN_LOOP + _THINKS + "{{ '<|im_start|>assistant\\n' }}"
    "{% if message.reasoning_content and not thinks %}"
    "{{ '<think>\\n' + message.reasoning_content.strip('\\n') }}{% endif %}"
    "{% generation %}{% if message.reasoning_content %}{% if thinks %}"
    "{{ '<think>\\n' + message.reasoning_content.strip('\\n') }}{% endif %}{{ '\\n</think>\\n\\n' }}{% endif %}"
    "{{ message.content }}" + _QWEN_CALLS + "{{ '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}" + _QWEN_TOOL
)

_LLAMA_HEAD = (
    "{{ '<|begin_of_text|>' }}{% if messages[0].role == 'system' %}{% set system = messages[0].content %}"
    "{% set rest = messages[1:] %}{% else %}{% set system = '' %}{% set rest = messages %}{% endif %}"
    "{{ '<|start_header_id|>system<|end_header_id|>\\n\\n' }}{% if tools %}{{ 'Environment: ipython\\n' }}"
    "{% endif %}{{ 'Cutting Knowledge Date: December 2023\\n\\n' }}{% if tools %}"
    '{{ \'You have access to the following functions. Reply with JSON {"name": ..., "parameters": ...}.\\n\\n\' }}'
    "{% for t in tools %}{{ (t | tojson) + '\\n\\n' }}{% endfor %}{% endif %}{{ system + '<|eot_id|>' }}"
    "{% for message in rest %}"
    "{% if message.role == 'assistant' and message.tool_calls %}{% set tc = message.tool_calls[0].function %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
)
_LLAMA_CALL = "{{ '{\"name\": \"' + tc.name + '\", \"parameters\": ' + (tc.arguments | tojson) + '}<|eot_id|>' }}"
_LLAMA_REST = (
    "{% elif message.role == 'tool' %}"
    "{{ '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + message.content + '<|eot_id|>' }}"
    "{% else %}{{ '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' }}"
)
_LLAMA_GEN = (
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
LLAMA = _LLAMA_HEAD + _LLAMA_CALL + _LLAMA_REST + "{{ message.content | trim + '<|eot_id|>' }}" + _LLAMA_GEN
LLAMA_TAGGED = (
    _LLAMA_HEAD
    + "{% generation %}"
    + _LLAMA_CALL
    + "{% endgeneration %}"
    + _LLAMA_REST
    + "{% if message.role == 'assistant' %}{% generation %}{{ message.content | trim + '<|eot_id|>' }}"
    "{% endgeneration %}{% else %}{{ message.content | trim + '<|eot_id|>' }}{% endif %}" + _LLAMA_GEN
)

_HARMONY_HEAD = (
    "{{ '<|start|>system<|message|>You are a helpful assistant.\\nValid channels: analysis, commentary, final.' }}"
    "{% if messages[0].role == 'system' %}{{ '\\n\\n' + messages[0].content }}{% endif %}{{ '<|end|>' }}"
    "{% if tools %}{{ '<|start|>developer<|message|># Tools\\n\\nnamespace functions {\\n' }}{% for t in tools %}"
    "{{ '// ' + t.function.description + '\\ntype ' + t.function.name + ' = (_: ' }}"
    "{{ (t.function.parameters | tojson) + ') => any;\\n' }}{% endfor %}{{ '} // namespace functions<|end|>' }}"
    "{% endif %}{% for message in messages %}{% if message.role == 'user' %}"
    "{{ '<|start|>user<|message|>' + message.content + '<|end|>' }}"
    "{% elif message.role == 'tool' %}"
    "{{ '<|start|>functions.' + message.name + ' to=assistant<|channel|>commentary<|message|>' }}"
    "{{ message.content + '<|end|>' }}{% elif message.role == 'assistant' %}{{ '<|start|>assistant' }}"
)
_HARMONY_ANALYSIS = "{{ '<|channel|>analysis<|message|>' + message.reasoning_content + '<|end|><|start|>assistant' }}"
_HARMONY_CALLS = (
    "{% if message.tool_calls %}{% set tc = message.tool_calls[0].function %}"
    "{{ '<|channel|>commentary to=functions.' + tc.name + ' <|constrain|>json<|message|>' }}"
    "{{ (tc.arguments | tojson) + '<|call|>' }}{% else %}"
)
_HARMONY_GEN = "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|start|>assistant' }}{% endif %}"
HARMONY = (
    _HARMONY_HEAD
    + "{% if message.reasoning_content %}"
    + _HARMONY_ANALYSIS
    + "{% endif %}"
    + _HARMONY_CALLS
    + "{{ '<|channel|>final<|message|>' + message.content + '<|return|>' }}{% endif %}"
    + _HARMONY_GEN
)
HARMONY_TAGGED = (
    _LAST_ASSISTANT
    + _HARMONY_HEAD
    + _THINKS
    + "{% if message.reasoning_content %}{% if thinks %}{% generation %}{{ '<|channel|>analysis<|message|>' }}"
    "{{ message.reasoning_content }}{% endgeneration %}{% else %}{{ '<|channel|>analysis<|message|>' }}"
    "{{ message.reasoning_content }}{% endif %}{% generation %}{{ '<|end|><|start|>assistant' }}"
    + _HARMONY_CALLS
    + "{{ '<|channel|>final<|message|>' + message.content + '<|return|>' }}{% endif %}{% endgeneration %}"
    "{% elif message.tool_calls %}{% set tc = message.tool_calls[0].function %}{% generation %}"
    "{{ '<|channel|>commentary to=functions.' + tc.name + ' <|constrain|>json<|message|>' }}"
    "{{ (tc.arguments | tojson) + '<|call|>' }}{% endgeneration %}"
    "{% else %}{{ '<|channel|>final<|message|>' }}{% generation %}{{ message.content + '<|return|>' }}"
    "{% endgeneration %}{% endif %}" + _HARMONY_GEN
)

_GLM_HEAD = (
    "{{ '[gMASK]<sop>' }}{% if tools %}{{ '<|system|>\\n# Tools\\n' }}{% for t in tools %}"
    "{{ '\\n' + (t | tojson) }}{% endfor %}{% endif %}{% for message in messages %}"
    "{% if message.role == 'user' or message.role == 'system' %}"
)
_GLM_REASONING = (
    "{% if message.reasoning_content %}{{ '\\n<think>' + message.reasoning_content + '</think>' }}{% endif %}"
)
_GLM_ASSISTANT = (
    _GLM_REASONING + "{% if message.content %}{{ '\\n' + message.content }}{% endif %}"
    "{% for tc in message.tool_calls %}{{ '\\n<tool_call>' + tc.function.name }}"
    "{% for k, v in tc.function.arguments.items() %}"
    "{{ '\\n<arg_key>' + k + '</arg_key>\\n<arg_value>' + (v if v is string else v | tojson) + '</arg_value>' }}"
    "{% endfor %}{{ '\\n</tool_call>' }}{% endfor %}"
)
_GLM_TOOL = "{{ '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
_GLM_GEN = "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
GLM = (
    _GLM_HEAD + "{{ '<|' + message.role + '|>\\n' + message.content }}{% elif message.role == 'assistant' %}"
    "{{ '<|assistant|>' }}" + _GLM_ASSISTANT + "{% elif message.role == 'tool' %}"
    "{% if messages[loop.index0 - 1].role != 'tool' %}{{ '<|observation|>' }}{% endif %}" + _GLM_TOOL + _GLM_GEN
)
# Our convention, not an upstream tag placement: the token that opens the message after an assistant turn
# (<|user|>, <|observation|>) is the one the model emits to stop, so it is trained (prime-rl #2644: dropping it
# taught GLM never to stop calling tools). A plain turn trains its content, a turn with tool calls or reasoning
# everything after <|assistant|>.
GLM_TAGGED = (
    _LAST_ASSISTANT + _GLM_HEAD + "{% if loop.index0 > 0 and messages[loop.index0 - 1].role == 'assistant' %}"
    "{% generation %}{{ '<|' + message.role + '|>' }}{% endgeneration %}{% else %}{{ '<|' + message.role + '|>' }}"
    "{% endif %}{{ '\\n' + message.content }}{% elif message.role == 'assistant' %}{{ '<|assistant|>' }}"
    + _THINKS
    + "{% if message.reasoning_content and not thinks %}{{ '\\n<think>' + message.reasoning_content }}"
    "{% generation %}{{ '</think>' }}" + _GLM_ASSISTANT.removeprefix(_GLM_REASONING) + "{% endgeneration %}"
    "{% elif message.reasoning_content or message.tool_calls %}{% generation %}"
    + _GLM_ASSISTANT
    + "{% endgeneration %}"
    "{% else %}{{ '\\n' }}{% generation %}{{ message.content }}{% endgeneration %}{% endif %}"
    "{% elif message.role == 'tool' %}{% if messages[loop.index0 - 1].role != 'tool' %}"
    "{% generation %}{{ '<|observation|>' }}{% endgeneration %}{% endif %}" + _GLM_TOOL + _GLM_GEN
)


@dataclass(frozen=True)
class Family:
    name: str
    template: str
    tagged: str
    special_tokens: tuple[str, ...]
    tokens: tuple[str, ...] = ()


FAMILIES = [
    Family(
        "qwen",
        QWEN,
        QWEN_TAGGED,
        (),
        ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"),
    ),
    Family(
        "llama31",
        LLAMA,
        LLAMA_TAGGED,
        ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    ),
    Family(
        "harmony",
        HARMONY,
        HARMONY_TAGGED,
        ("<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|constrain|>", "<|return|>", "<|call|>"),
    ),
    Family(
        "glm",
        GLM,
        GLM_TAGGED,
        ("[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"),
        (
            "<think>",
            "</think>",
            "<tool_call>",
            "</tool_call>",
            "<arg_key>",
            "</arg_key>",
            "<arg_value>",
            "</arg_value>",
            "<tool_response>",
            "</tool_response>",
        ),
    ),
]
BY_NAME = {f.name: f for f in FAMILIES}


def family_tokenizer(family: Family, make_tokenizer: Callable[..., Any]) -> Any:
    return make_tokenizer(family.template, family.special_tokens, family.tokens)


def ok(result: TokenizedConversation | MaskError) -> TokenizedConversation:
    assert isinstance(result, TokenizedConversation), result
    return result


def trained_runs(tok: Any, row: TokenizedConversation) -> list[str]:
    runs, current = [], []
    for token, label in zip(row.input_ids, row.labels, strict=True):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs.append(tok.decode(current, skip_special_tokens=False))
            current = []
    if current:
        runs.append(tok.decode(current, skip_special_tokens=False))
    return runs


def assert_matches_oracle(
    tok: Any, family: Family, messages: Messages, cfg: MaskConfig, tools: list[dict[str, Any]] | None = TOOLS
) -> TokenizedConversation:
    """Our row equals the oracle position by position: same ids as apply_chat_template, same mask as the tagged
    copy's return_assistant_tokens_mask (the tagged copy renders exactly the same text)."""
    [result] = tokenize_conversations(tok, [messages], cfg, [tools])
    row = ok(result)
    stored = messages
    messages = template_messages(messages)  # as the template takes them: arguments as objects
    plain = tok.apply_chat_template(messages, tools=tools, tokenize=False)
    tagged_text = tok.apply_chat_template(
        messages, tools=tools, chat_template=family.tagged, tokenize=False, train_reasoning=cfg.train_reasoning
    )
    assert tagged_text == plain
    oracle = tok.apply_chat_template(
        messages,
        tools=tools,
        chat_template=family.tagged,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
        train_reasoning=cfg.train_reasoning,
    )
    assert row.input_ids == list(oracle["input_ids"])
    ours = [int(label != IGNORE_INDEX) for label in row.labels]
    assert ours == list(oracle["assistant_masks"]), (family.name, trained_runs(tok, row))
    assert sum(ours) == row.num_trainable_tokens > 0
    assert verify_mask(tok, stored, row.input_ids, row.labels, cfg, tools=tools) is None  # the independent proof
    return row


# ---------------------------------------------------------------------------------------------------------------
# oracle tests
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["all", "last", "none"])
@pytest.mark.parametrize("family", FAMILIES, ids=[f.name for f in FAMILIES])
def test_agentic_masks_match_generation_oracle(family: Family, mode: str, make_tokenizer: Callable[..., Any]) -> None:
    tok = family_tokenizer(family, make_tokenizer)
    cfg = MaskConfig(train_reasoning=mode)  # type: ignore[arg-type]
    conversations = [AGENT] if family.name in ("llama31", "harmony") else [AGENT, PARALLEL]  # one call per turn
    for messages in conversations:
        assert_matches_oracle(tok, family, messages, cfg)


def test_qwen_runs_token_by_token(make_tokenizer: Callable[..., Any]) -> None:
    """What is trained, spelled out: reasoning, tool-call text and <|im_end|> of the calling turn; never the tool
    result (in a user-side turn), the tool definitions, the system or user text or the headers."""
    tok = family_tokenizer(BY_NAME["qwen"], make_tokenizer)
    row = assert_matches_oracle(tok, BY_NAME["qwen"], AGENT, MaskConfig())
    assert trained_runs(tok, row) == [
        '<think>\nI should call the tool.\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": '
        '{"city": "Oslo"}}\n</tool_call><|im_end|>',
        "<think>\nThe tool answered.\n</think>\n\nIt is 4 C and cloudy.<|im_end|>",
        "You're welcome.<|im_end|>",
    ]
    off = assert_matches_oracle(tok, BY_NAME["qwen"], AGENT, MaskConfig(train_reasoning="none"))
    assert trained_runs(tok, off) == [
        '\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>',
        "\n</think>\n\nIt is 4 C and cloudy.<|im_end|>",
        "You're welcome.<|im_end|>",
    ]
    text = tok.decode(row.input_ids, skip_special_tokens=False)
    for untrained in ("4 C, cloudy", 'get_weather", "description', "You answer weather questions.", "Thanks!"):
        assert untrained in text and not any(untrained in run for run in trained_runs(tok, row))


def test_parallel_calls_with_text_train_every_call(make_tokenizer: Callable[..., Any]) -> None:
    tok = family_tokenizer(BY_NAME["qwen"], make_tokenizer)
    row = assert_matches_oracle(tok, BY_NAME["qwen"], PARALLEL, MaskConfig())
    assert trained_runs(tok, row)[0] == (
        'Checking both.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call><|im_end|>'
    )


def test_llama31_ipython_result_untrained(make_tokenizer: Callable[..., Any]) -> None:
    tok = family_tokenizer(BY_NAME["llama31"], make_tokenizer)
    row = assert_matches_oracle(tok, BY_NAME["llama31"], AGENT, MaskConfig())
    assert trained_runs(tok, row) == [
        '{"name": "get_weather", "parameters": {"city": "Oslo"}}<|eot_id|>',
        "It is 4 C and cloudy.<|eot_id|>",
        "You're welcome.<|eot_id|>",
    ]


def test_harmony_channels(make_tokenizer: Callable[..., Any]) -> None:
    """Analysis is the reasoning; the commentary call ends with <|call|>, the final answer with <|return|>; the
    tool's commentary message is never trained."""
    tok = family_tokenizer(BY_NAME["harmony"], make_tokenizer)
    row = assert_matches_oracle(tok, BY_NAME["harmony"], AGENT, MaskConfig())
    assert trained_runs(tok, row) == [
        "<|channel|>analysis<|message|>I should call the tool.<|end|><|start|>assistant<|channel|>commentary "
        'to=functions.get_weather <|constrain|>json<|message|>{"city": "Oslo"}<|call|>',
        "<|channel|>analysis<|message|>The tool answered.<|end|><|start|>assistant<|channel|>final<|message|>"
        "It is 4 C and cloudy.<|return|>",
        "You're welcome.<|return|>",
    ]
    last = assert_matches_oracle(tok, BY_NAME["harmony"], AGENT, MaskConfig(train_reasoning="last"))
    assert trained_runs(tok, last)[0] == (
        "<|end|><|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"
        '{"city": "Oslo"}<|call|>'
    )


def test_glm_stop_token_opens_the_next_message_and_is_trained(make_tokenizer: Callable[..., Any]) -> None:
    """GLM writes nothing to close an assistant turn: the model stops by emitting <|observation|> (after calls) or
    <|user|>, which the template writes as the opening of the next message. Our rule trains that token, position by
    position; the final turn of the conversation has no stop token in the rendering, so only its content is
    trained."""
    family = BY_NAME["glm"]
    tok = family_tokenizer(family, make_tokenizer)
    row = assert_matches_oracle(tok, family, AGENT, MaskConfig())
    assert trained_runs(tok, row) == [
        "\n<think>I should call the tool.</think>\n<tool_call>get_weather\n<arg_key>city</arg_key>\n"
        "<arg_value>Oslo</arg_value>\n</tool_call><|observation|>",
        "\n<think>The tool answered.</think>\nIt is 4 C and cloudy.<|user|>",
        "You're welcome.",
    ]
    tokens = tok.convert_ids_to_tokens(row.input_ids)
    pairs = list(zip(tokens, [label != IGNORE_INDEX for label in row.labels], strict=True))
    observation = tokens.index("<|observation|>")
    assert pairs[observation - 2 : observation + 3] == [
        ("Ċ", True),
        ("</tool_call>", True),
        ("<|observation|>", True),  # the stop token, written as the tool message's opening: trained
        ("Ċ", False),
        ("<tool_response>", False),
    ]
    user = [i for i, t in enumerate(tokens) if t == "<|user|>"]
    assert [pairs[i] for i in user] == [("<|user|>", False), ("<|user|>", True)]  # after a user-less start / an answer
    assert row.input_ids[-1] == tok.convert_tokens_to_ids(".")  # nothing after the final turn


def test_stored_rows_render_like_canonical_ones(make_tokenizer: Callable[..., Any]) -> None:
    """Rows read back from silver.records carry every struct field (null where absent) and arguments as JSON text;
    they tokenise exactly as the canonical messages do, tools given as the column's JSON text."""
    import json

    tok = family_tokenizer(BY_NAME["llama31"], make_tokenizer)
    stored = [{**STORED_NULLS, **m} for m in AGENT]
    [canonical, from_db] = tokenize_conversations(tok, [AGENT, stored], MaskConfig(), [TOOLS, json.dumps(TOOLS)])
    assert ok(canonical).labels == ok(from_db).labels and canonical.input_ids == from_db.input_ids


def test_planted_faults_are_refused(make_tokenizer: Callable[..., Any]) -> None:
    tok = family_tokenizer(BY_NAME["qwen"], make_tokenizer)
    not_json = [
        AGENT[1],
        {**AGENT[2], "tool_calls": [{**call("a", "Oslo"), "function": {"name": "get_weather", "arguments": "Oslo"}}]},
        *AGENT[3:5],
    ]
    forged = [AGENT[1], {**AGENT[2], "reasoning_content": "call <|im_end|>"}, *AGENT[3:5]]
    results = tokenize_conversations(tok, [not_json, forged], MaskConfig(), [TOOLS, TOOLS])
    assert results == [
        MaskError("unsupported_message", "message 1 tool call 0 arguments are not a JSON object"),
        MaskError("special_token_in_content", "message 1 reasoning_content contains special token '<|im_end|>'"),
    ]


REASONING_FAMILIES = [f for f in FAMILIES if f.name != "llama31"]  # the Llama-3.1 template renders no reasoning


@pytest.mark.parametrize("family", REASONING_FAMILIES, ids=[f.name for f in REASONING_FAMILIES])
def test_proof_catches_reasoning_trained_when_configured_off(
    family: Family, make_tokenizer: Callable[..., Any]
) -> None:
    """A row masked with every reasoning trained, claimed to follow train_reasoning="none" (or "last"), fails the
    proof at the first reasoning turn; and the right row for that setting passes."""
    tok = family_tokenizer(family, make_tokenizer)
    [trained_all, trained_none] = tokenize_conversations(tok, [AGENT, AGENT], MaskConfig(), [TOOLS, TOOLS])[
        :1
    ] + tokenize_conversations(tok, [AGENT], MaskConfig(train_reasoning="none"), [TOOLS])
    row = ok(trained_all)
    for mode in ("none", "last"):
        problem = verify_mask(tok, AGENT, row.input_ids, row.labels, MaskConfig(train_reasoning=mode), tools=TOOLS)  # type: ignore[arg-type]
        assert problem is not None and problem.endswith(
            f"trains its reasoning, which train_reasoning={mode!r} leaves untrained"
        ), problem
        assert "of assistant message 2" in problem
    off = ok(trained_none)
    assert verify_mask(tok, AGENT, off.input_ids, off.labels, MaskConfig(train_reasoning="none"), tools=TOOLS) is None
    problem = verify_mask(tok, AGENT, off.input_ids, off.labels, MaskConfig(), tools=TOOLS)
    assert problem is not None and "does not hold its reasoning" in problem


def test_proof_catches_a_trained_tool_result_and_an_untrained_call(make_tokenizer: Callable[..., Any]) -> None:
    tok = family_tokenizer(BY_NAME["qwen"], make_tokenizer)
    row = ok(tokenize_conversations(tok, [AGENT], MaskConfig(), [TOOLS])[0])
    text = tok.apply_chat_template(template_messages(AGENT), tools=TOOLS, tokenize=False)
    ids = row.input_ids
    # train the tool result's tokens
    result_at = next(i for i in range(len(ids)) if tok.decode(ids[i : i + 3]).startswith("4 C"))
    labels = list(row.labels)
    labels[result_at] = ids[result_at]
    problem = verify_mask(tok, AGENT, ids, labels, MaskConfig(), tools=TOOLS)
    assert problem is not None and problem.startswith(f"position {result_at}:"), problem
    # untrain the call's arguments
    city = next(i for i in range(len(ids)) if tok.decode(ids[i : i + 2]) == "Oslo" and labels[i] != IGNORE_INDEX)
    labels = list(row.labels)
    labels[city] = IGNORE_INDEX
    assert verify_mask(tok, AGENT, ids, labels, MaskConfig(), tools=TOOLS) is not None
    assert "4 C, cloudy" in text


def test_batches_tokenise_and_prove_stored_tool_rows(make_tokenizer: Callable[..., Any]) -> None:
    """The worker path of silver.sft_tokenized and loss_mask_check: rows as DuckDB hands them over (struct fields
    null where absent, arguments and tools as JSON text) are tokenised with their tools and proven."""
    import json

    import pyarrow as pa

    from posttrain_assets.sft.batches import ProofJob, TokenizeJob, TokenizerIdentity, prove_batch, tokenize_batch

    tok = family_tokenizer(BY_NAME["qwen"], make_tokenizer)
    identity = TokenizerIdentity(tok, "tok", "template")
    rows = [
        {"id": "agent", "source": "s", "messages": [{**STORED_NULLS, **m} for m in AGENT], "tools": json.dumps(TOOLS)},
        {"id": "plain", "source": "s", "messages": [{**STORED_NULLS, **m} for m in AGENT[-2:]], "tools": None},
    ]
    batch = pa.Table.from_pylist(rows)
    cfg = MaskConfig(train_reasoning="all")
    result = tokenize_batch(TokenizeJob(identity, cfg), batch)
    assert result.rejected is None and result.tokenized.column("id").to_pylist() == ["agent", "plain"]
    assert result.tokenized.column("train_reasoning").to_pylist() == ["all", "all"]
    proved = result.tokenized.append_column("messages", batch.column("messages")).append_column(
        "tools", batch.column("tools")
    )
    proof = prove_batch(ProofJob(identity, canonical_every=1), proved)
    assert (proof.checked, proof.failures) == (2, [])
    # the same labels claimed under train_reasoning="none" fail on the first reasoning turn
    claimed = proved.set_column(
        proved.column_names.index("train_reasoning"), "train_reasoning", pa.array(["none", "none"])
    )
    proof = prove_batch(ProofJob(identity, canonical_every=1), claimed)
    [(row_id, _, problem)] = proof.failures
    assert row_id == "agent"
    assert problem.endswith(
        "of assistant message 2 trains its reasoning, which train_reasoning='none' leaves untrained"
    )


def test_a_template_that_drops_tool_calls_is_refused(smollm2_tokenizer: Any) -> None:
    """SmolLM2's template writes no tool calls: training its rendering would teach the turn to end without the
    call, so such rows are a template_error rather than a silently wrong mask."""
    [err] = tokenize_conversations(smollm2_tokenizer, [AGENT], MaskConfig(), [TOOLS])
    assert err == MaskError(
        "template_error",
        "the chat template does not render the tool call 'get_weather' of assistant message 2; use a tokenizer "
        "whose template writes tool calls",
    )


def test_mask_view_shows_reasoning_calls_and_results_distinctly(make_tokenizer: Callable[..., Any]) -> None:
    tok = family_tokenizer(BY_NAME["qwen"], make_tokenizer)
    row = ok(tokenize_conversations(tok, [AGENT], MaskConfig(train_reasoning="none"), [TOOLS])[0])
    view = render_mask(tok, row.input_ids, row.labels, messages=AGENT)
    assert (
        "<|im_start|>assistant\n<think>\n⟨reasoning⟩I should call the tool.⟨/reasoning⟩⟦\n</think>\n\n<tool_call>\n"
        '{"name": "⟨call⟩get_weather⟨/call⟩", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>⟧\n'
        "<|im_start|>user\n<tool_response>\n⟨result⟩4 C, cloudy⟨/result⟩\n</tool_response><|im_end|>" in view
    )
    assert render_mask(tok, row.input_ids, row.labels) == view.replace("⟨reasoning⟩", "").replace(
        "⟨/reasoning⟩", ""
    ).replace("⟨call⟩", "").replace("⟨/call⟩", "").replace("⟨result⟩", "").replace("⟨/result⟩", "")
    colored = render_mask(tok, row.input_ids, row.labels, color=True, messages=AGENT)
    assert '{"name": "\x1b[33mget_weather\x1b[0m\x1b[32m", "arguments"' in colored  # call name inside a trained run


def test_proof_catches_a_trained_generation_prompt(make_tokenizer: Callable[..., Any]) -> None:
    """The calling turn's run must start right after the generation prompt: training the header's last token
    fails the proof at that position."""
    tok = family_tokenizer(BY_NAME["qwen"], make_tokenizer)
    row = ok(tokenize_conversations(tok, [AGENT], MaskConfig(), [TOOLS])[0])
    first = row.labels.index(next(label for label in row.labels if label != IGNORE_INDEX))
    labels = list(row.labels)
    labels[first - 1] = row.input_ids[first - 1]  # the "\n" of "<|im_start|>assistant\n"
    problem = verify_mask(tok, AGENT, row.input_ids, labels, MaskConfig(), tools=TOOLS)
    assert problem is not None and problem.startswith(f"position {first - 1}: trained run {first - 1}:"), problem
    assert "does not start right after the generation prompt '<|im_start|>assistant\\n'" in problem
