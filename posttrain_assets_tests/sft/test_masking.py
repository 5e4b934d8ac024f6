"""Tests for ``posttrain_assets.sft.masking``: assistant-only loss masks for any chat template.

Masks are asserted token by token on hand-checked cases with the default SmolLM2 template, and for five template
families (ChatML, Llama-3, Mistral, Gemma, a reasoning template that is not prefix-stable) they are compared
position by position with transformers' own ``{% generation %}`` assistant masks (the oracle).
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from posttrain_assets.sft import masking
from posttrain_assets.sft.masking import (
    IGNORE_INDEX,
    MASK_REASONS,
    MaskConfig,
    MaskError,
    TokenizedConversation,
    fresh_template_ids,
    render_mask,
    tokenize_conversations,
    verify_mask,
)
from posttrain_assets_tests.real_data import REAL_DATA

Messages = list[dict[str, Any]]

# ---------------------------------------------------------------------------------------------------------------
# template families (plain + {% generation %}-tagged copies: the tag wraps exactly assistant content + end marker)
# ---------------------------------------------------------------------------------------------------------------

_SMOL_SYSTEM = (
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
)
CHATML_TAGGED = (
    "{% for message in messages %}" + _SMOL_SYSTEM + "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_LLAMA3_HEAD = (
    "{{ '<|begin_of_text|>' }}"
    "{% if messages[0]['role'] == 'system' %}{% set system_message = messages[0]['content'] | trim %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set system_message = '' %}"
    "{% set loop_messages = messages %}{% endif %}"
    "{% if date_string is not defined %}{% set date_string = '26 Jul 2024' %}{% endif %}"
    "{{ '<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: '"
    " + date_string + '\n\n' + system_message + '<|eot_id|>' }}"
)
_LLAMA3_GEN = "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
LLAMA3 = (
    _LLAMA3_HEAD + "{% for message in loop_messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}" + _LLAMA3_GEN
)
LLAMA3_TAGGED = (
    _LLAMA3_HEAD + "{% for message in loop_messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}"
    "{% endgeneration %}{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}"
    "{% endfor %}" + _LLAMA3_GEN
)

_MISTRAL_HEAD = (
    "{{ '<s>' }}{% if messages[0]['role'] == 'system' %}{% set system_message = messages[0]['content'] %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set system_message = '' %}"
    "{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{% if loop.first and system_message %}"
    "{{ '[INST] ' + system_message + '\n\n' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% endif %}{% else %}"
)
MISTRAL = _MISTRAL_HEAD + "{{ ' ' + message['content'] + '</s>' }}{% endif %}{% endfor %}"
MISTRAL_TAGGED = (
    _MISTRAL_HEAD
    + "{{ ' ' }}{% generation %}{{ message['content'] + '</s>' }}{% endgeneration %}{% endif %}{% endfor %}"
)

_GEMMA_HEAD = (
    "{{ '<bos>' }}{% if messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'] + '\n\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
)
_GEMMA_GEN = "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
GEMMA = (
    _GEMMA_HEAD + "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') "
    "+ message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}" + _GEMMA_GEN
)
GEMMA_TAGGED = (
    _GEMMA_HEAD + "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim + '<end_of_turn>' }}"
    "{% endgeneration %}{% else %}{{ message['content'] | trim + '<end_of_turn>' }}{% endif %}{{ '\n' }}"
    "{% endfor %}" + _GEMMA_GEN
)

_REASONING_HEAD = (
    "{% for message in messages %}{% set content = message['content'] %}"
    "{% if message['role'] == 'assistant' and not loop.last %}"
    "{% set content = content.split('</think>')[-1].lstrip() %}{% endif %}"
)
_CHATML_GEN = "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
REASONING = (
    _REASONING_HEAD
    + "{{ '<|im_start|>' + message['role'] + '\n' + content + '<|im_end|>\n' }}{% endfor %}"
    + _CHATML_GEN
)
REASONING_TAGGED = (
    _REASONING_HEAD + "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ content + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ content + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}" + _CHATML_GEN
)


@dataclass(frozen=True)
class Family:
    """A chat template family over the default vocabulary."""

    name: str
    template: str | None  # None: the tokenizer's own (SmolLM2 ChatML)
    tagged: str
    special_tokens: tuple[str, ...] = ()
    tokens: tuple[str, ...] = ()


FAMILIES = [
    Family("chatml", None, CHATML_TAGGED),
    Family(
        "llama3",
        LLAMA3,
        LLAMA3_TAGGED,
        ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    ),
    Family("mistral", MISTRAL, MISTRAL_TAGGED, ("<s>", "</s>", "[INST]", "[/INST]")),
    Family("gemma", GEMMA, GEMMA_TAGGED, ("<bos>", "<start_of_turn>", "<end_of_turn>")),
    Family("reasoning", REASONING, REASONING_TAGGED, (), ("<think>", "</think>")),
]

CONV_SYSTEM: Messages = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And its population?"},
    {"role": "assistant", "content": "About 2.1 million (2023)."},
]
CONV_SHORT: Messages = [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi!"}]
CONV_MIXED: Messages = [
    {"role": "user", "content": "  Spaces around  "},
    {"role": "assistant", "content": "Café ☕ 42"},
    {"role": "user", "content": "Code?"},
    {"role": "assistant", "content": "def f(x):\n    return x + 1\n"},
]
CONV_THINK: Messages = [
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "<think>\n2 plus 2 is 4.\n</think>\n\nThe answer is 4."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "<think>\n3+3=6\n</think>\nIt is 6."},
]
ALL_CONVS = [CONV_SYSTEM, CONV_SHORT, CONV_MIXED, CONV_THINK]

EXPECTED_RUNS_SYSTEM = {
    "chatml": ["Paris.<|im_end|>", "About 2.1 million (2023).<|im_end|>"],
    "llama3": ["Paris.<|eot_id|>", "About 2.1 million (2023).<|eot_id|>"],
    "mistral": [" Paris.</s>", " About 2.1 million (2023).</s>"],  # "ĠParis": the model emits the space itself
    "gemma": ["Paris.<end_of_turn>", "About 2.1 million (2023).<end_of_turn>"],
    "reasoning": ["Paris.<|im_end|>", "About 2.1 million (2023).<|im_end|>"],
}
EXPECTED_RUNS_MIXED = {
    "chatml": ["Café ☕ 42<|im_end|>", "def f(x):\n    return x + 1\n<|im_end|>"],
    "llama3": ["Café ☕ 42<|eot_id|>", "def f(x):\n    return x + 1<|eot_id|>"],  # trimmed by the template
    "mistral": [" Café ☕ 42</s>", " def f(x):\n    return x + 1\n</s>"],
    "gemma": ["Café ☕ 42<end_of_turn>", "def f(x):\n    return x + 1<end_of_turn>"],
    "reasoning": ["Café ☕ 42<|im_end|>", "def f(x):\n    return x + 1\n<|im_end|>"],
}


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------


def family_tokenizer(family: Family, smollm2_tokenizer: Any, make_tokenizer: Callable[..., Any]) -> Any:
    """The default tokenizer, or a copy with the family's template and tokens."""
    if family.template is None:
        return smollm2_tokenizer
    return make_tokenizer(family.template, family.special_tokens, family.tokens)


def ok(result: TokenizedConversation | MaskError) -> TokenizedConversation:
    """Assert a result is a row, not an error."""
    assert isinstance(result, TokenizedConversation), result
    return result


def trained_runs(tok: Any, row: TokenizedConversation) -> list[str]:
    """Decoded contiguous trained runs."""
    runs: list[str] = []
    current: list[int] = []
    for token, label in zip(row.input_ids, row.labels, strict=True):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs.append(tok.decode(current, skip_special_tokens=False))
            current = []
    if current:
        runs.append(tok.decode(current, skip_special_tokens=False))
    return runs


def token_pairs(tok: Any, row: TokenizedConversation) -> list[tuple[str, bool]]:
    """(token string, trained) for every position."""
    tokens = tok.convert_ids_to_tokens(row.input_ids)
    return [(t, label != IGNORE_INDEX) for t, label in zip(tokens, row.labels, strict=True)]


def fresh_ids(tok: Any, messages: Messages) -> list[int]:
    """Token ids as transformers' apply_chat_template produces them."""
    return list(tok.apply_chat_template(messages, tokenize=True, return_dict=False))


# ---------------------------------------------------------------------------------------------------------------
# hand-checked masks with the default SmolLM2 template
# ---------------------------------------------------------------------------------------------------------------

DEFAULT_SYSTEM_TOKENS = [
    ("<|im_start|>", False),
    ("system", False),
    ("Ċ", False),
    ("You", False),
    ("Ġare", False),
    ("Ġa", False),
    ("Ġhelpful", False),
    ("ĠAI", False),
    ("Ġassistant", False),
    ("Ġnamed", False),
    ("ĠSm", False),
    ("ol", False),
    ("LM", False),
    (",", False),
    ("Ġtrained", False),
    ("Ġby", False),
    ("ĠH", False),
    ("ugging", False),
    ("ĠFace", False),
    ("<|im_end|>", False),
    ("Ċ", False),
]


def test_default_template_single_turn_token_by_token(smollm2_tokenizer: Any) -> None:
    tok = smollm2_tokenizer
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    row = ok(tokenize_conversations(tok, [messages], MaskConfig())[0])
    assert token_pairs(tok, row) == DEFAULT_SYSTEM_TOKENS + [  # injected default system prompt: untrained
        ("<|im_start|>", False),
        ("user", False),
        ("Ċ", False),
        ("Hi", False),
        ("<|im_end|>", False),
        ("Ċ", False),
        ("<|im_start|>", False),  # header untrained
        ("ass", False),
        ("istant", False),
        ("Ċ", False),
        ("Hello", True),  # content trained
        ("!", True),
        ("<|im_end|>", True),  # end-of-turn marker trained
        ("Ċ", False),  # the newline after it is not
    ]
    assert row.input_ids == fresh_ids(tok, messages)
    assert row.labels[-4:] == [19556, 17, 2, IGNORE_INDEX]
    assert (row.num_tokens, row.num_trainable_tokens, row.truncated, row.num_messages) == (35, 3, False, 2)
    assert verify_mask(tok, messages, row.input_ids, row.labels, MaskConfig()) is None


SYSTEM_MULTI: Messages = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "and 3+3?"},
    {"role": "assistant", "content": "6"},
]
SYSTEM_MULTI_PAIRS = [
    ("<|im_start|>", False),
    ("system", False),
    ("Ċ", False),
    ("Be", False),
    ("Ġbrief", False),
    (".", False),
    ("<|im_end|>", False),
    ("Ċ", False),
    ("<|im_start|>", False),
    ("user", False),
    ("Ċ", False),
    ("2", False),
    ("+", False),
    ("2", False),
    ("?", False),
    ("<|im_end|>", False),
    ("Ċ", False),
    ("<|im_start|>", False),
    ("ass", False),
    ("istant", False),
    ("Ċ", False),
    ("4", True),
    ("<|im_end|>", True),
    ("Ċ", False),
    ("<|im_start|>", False),
    ("user", False),
    ("Ċ", False),
    ("and", False),
    ("Ġ", False),
    ("3", False),
    ("+", False),
    ("3", False),
    ("?", False),
    ("<|im_end|>", False),
    ("Ċ", False),
    ("<|im_start|>", False),
    ("ass", False),
    ("istant", False),
    ("Ċ", False),
    ("6", True),
    ("<|im_end|>", True),
    ("Ċ", False),
]


def test_default_template_multi_turn_with_system_token_by_token(smollm2_tokenizer: Any) -> None:
    tok = smollm2_tokenizer
    row = ok(tokenize_conversations(tok, [SYSTEM_MULTI], MaskConfig())[0])
    assert token_pairs(tok, row) == SYSTEM_MULTI_PAIRS  # no default system prompt when a system turn exists
    assert row.num_trainable_tokens == 4
    assert [i for i, label in enumerate(row.labels) if label != IGNORE_INDEX] == [21, 22, 39, 40]


def test_last_assistant_mode(smollm2_tokenizer: Any) -> None:
    tok = smollm2_tokenizer
    cfg = MaskConfig(train_on="last_assistant")
    row = ok(tokenize_conversations(tok, [SYSTEM_MULTI], cfg)[0])
    expected = [(t, trained and i >= 39) for i, (t, trained) in enumerate(SYSTEM_MULTI_PAIRS)]
    assert token_pairs(tok, row) == expected
    assert row.num_trainable_tokens == 2
    assert verify_mask(tok, SYSTEM_MULTI, row.input_ids, row.labels, cfg) is None
    # the all-assistant mask is wrong under last_assistant, and vice versa
    full = ok(tokenize_conversations(tok, [SYSTEM_MULTI], MaskConfig())[0])
    assert verify_mask(tok, SYSTEM_MULTI, full.input_ids, full.labels, cfg) == (
        "position 21: trained run 21:23 decodes to '4<|im_end|>', expected assistant message 4 content '6' "
        "followed by '<|im_end|>'"
    )
    assert verify_mask(tok, SYSTEM_MULTI, row.input_ids, row.labels, MaskConfig()) == (
        "position 21: trained run 39:41 decodes to '6<|im_end|>', expected assistant message 2 content '4' "
        "followed by '<|im_end|>'"
    )


def test_render_mask(smollm2_tokenizer: Any) -> None:
    tok = smollm2_tokenizer
    row = ok(tokenize_conversations(tok, [SYSTEM_MULTI], MaskConfig())[0])
    assert render_mask(tok, row.input_ids, row.labels) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
        "⟦4<|im_end|>⟧\n<|im_start|>user\nand 3+3?<|im_end|>\n<|im_start|>assistant\n⟦6<|im_end|>⟧\n"
    )
    colored = render_mask(tok, row.input_ids, row.labels, color=True)
    assert colored.endswith("assistant\n\x1b[32m6<|im_end|>\x1b[0m\n")


def test_batch_keeps_order_and_mixes_rows_and_errors(smollm2_tokenizer: Any) -> None:
    tok = smollm2_tokenizer
    batch = [SYSTEM_MULTI, [{"role": "user", "content": "alone"}], CONV_SHORT]
    results = tokenize_conversations(tok, batch, MaskConfig())
    assert len(results) == 3
    assert ok(results[0]).num_trainable_tokens == 4
    assert results[1] == MaskError("no_trainable_tokens", "the conversation has no assistant turn")
    assert trained_runs(tok, ok(results[2])) == ["Hi!<|im_end|>"]


# ---------------------------------------------------------------------------------------------------------------
# template families vs the transformers {% generation %} oracle
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES, ids=[f.name for f in FAMILIES])
def test_family_matches_generation_oracle(
    family: Family, smollm2_tokenizer: Any, make_tokenizer: Callable[..., Any]
) -> None:
    tok = family_tokenizer(family, smollm2_tokenizer, make_tokenizer)
    cfg = MaskConfig()
    results = tokenize_conversations(tok, ALL_CONVS, cfg)
    for messages, result in zip(ALL_CONVS, results, strict=True):
        row = ok(result)
        # the tagged copy renders exactly the same text
        plain = tok.apply_chat_template(messages, tokenize=False)
        assert tok.apply_chat_template(messages, chat_template=family.tagged, tokenize=False) == plain
        oracle = tok.apply_chat_template(
            messages,
            chat_template=family.tagged,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
        )
        assert row.input_ids == list(oracle["input_ids"])
        ours = [int(label != IGNORE_INDEX) for label in row.labels]
        assert ours == list(oracle["assistant_masks"]), family.name
        assert sum(ours) == row.num_trainable_tokens > 0
        assert verify_mask(tok, messages, row.input_ids, row.labels, cfg) is None
    assert trained_runs(tok, ok(results[0])) == EXPECTED_RUNS_SYSTEM[family.name]
    assert trained_runs(tok, ok(results[2])) == EXPECTED_RUNS_MIXED[family.name]


# multi-byte characters split across byte-level tokens, and whitespace, right at the span edges
CONV_EDGES: Messages = [
    {"role": "user", "content": "Emoji at the edges?"},
    {"role": "assistant", "content": "😀 ok 😀"},
    {"role": "user", "content": "Wide space\u3000"},
    {"role": "assistant", "content": "\u3000日本語\u3000"},
    {"role": "user", "content": "Numbers"},
    {"role": "assistant", "content": "2024"},
]


@pytest.mark.parametrize("family", FAMILIES, ids=[f.name for f in FAMILIES])
def test_multibyte_span_edges_match_generation_oracle(
    family: Family, smollm2_tokenizer: Any, make_tokenizer: Callable[..., Any]
) -> None:
    tok = family_tokenizer(family, smollm2_tokenizer, make_tokenizer)
    [result] = tokenize_conversations(tok, [CONV_EDGES], MaskConfig())
    row = ok(result)
    oracle = tok.apply_chat_template(
        CONV_EDGES, chat_template=family.tagged, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    assert row.input_ids == list(oracle["input_ids"])
    assert [int(label != IGNORE_INDEX) for label in row.labels] == list(oracle["assistant_masks"])
    assert verify_mask(tok, CONV_EDGES, row.input_ids, row.labels, MaskConfig()) is None


def test_skeleton_rendered_once_per_conversation_shape(
    smollm2_tokenizer: Any, make_tokenizer: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    rendered_lengths: list[int] = []  # message count of every skeleton actually rendered
    real_skeleton = masking._skeleton

    def counting_skeleton(tok: Any, messages: Messages) -> tuple[list[str], list[int]]:
        rendered_lengths.append(len(messages))
        return real_skeleton(tok, messages)

    monkeypatch.setattr(masking, "_skeleton", counting_skeleton)
    other_short = [{"role": "user", "content": "Other"}, {"role": "assistant", "content": "Words."}]
    batch = [CONV_SHORT, other_short, SYSTEM_MULTI, CONV_SHORT]
    rows = [ok(r) for r in tokenize_conversations(smollm2_tokenizer, batch, MaskConfig())]
    assert [r.input_ids for r in rows] == [fresh_ids(smollm2_tokenizer, m) for m in batch]
    assert [trained_runs(smollm2_tokenizer, r) for r in rows[:2]] == [["Hi!<|im_end|>"], ["Words.<|im_end|>"]]
    assert rendered_lengths == [2, 5]  # the two-message shape is rendered once and shared

    # a template that reads the clock may render differently from one row to the next: never shared
    plain_chatml = CHATML_TAGGED.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    clock = make_tokenizer("{{ strftime_now('%Y') }}" + plain_chatml)
    rendered_lengths.clear()
    for row in tokenize_conversations(clock, [CONV_SHORT, other_short], MaskConfig()):
        ok(row)
    assert rendered_lengths == [2, 2]


def test_family_headers_and_injected_text_untrained(make_tokenizer: Callable[..., Any]) -> None:
    family = FAMILIES[1]  # llama3: injects a knowledge/today date block
    tok = make_tokenizer(family.template, family.special_tokens)
    row = ok(tokenize_conversations(tok, [CONV_SHORT], MaskConfig())[0])
    assert token_pairs(tok, row)[:4] == [
        ("<|begin_of_text|>", False),
        ("<|start_header_id|>", False),
        ("system", False),
        ("<|end_header_id|>", False),
    ]
    assert render_mask(tok, row.input_ids, row.labels) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
        "Today Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nSay hi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n⟦Hi!<|eot_id|>⟧"
    )


def test_reasoning_template_is_not_prefix_stable_and_still_exact(make_tokenizer: Callable[..., Any]) -> None:
    family = FAMILIES[4]
    tok = make_tokenizer(family.template, family.special_tokens, family.tokens)
    full = tok.apply_chat_template(CONV_THINK, tokenize=False)
    prefix = tok.apply_chat_template(CONV_THINK[:2], tokenize=False)
    assert not full.startswith(prefix)  # the first answer's thinking is stripped once it is not the last turn
    row = ok(tokenize_conversations(tok, [CONV_THINK], MaskConfig())[0])
    assert trained_runs(tok, row) == [
        "The answer is 4.<|im_end|>",
        "<think>\n3+3=6\n</think>\nIt is 6.<|im_end|>",
    ]
    assert "2 plus 2" not in tok.decode(row.input_ids)
    last = ok(tokenize_conversations(tok, [CONV_THINK], MaskConfig(train_on="last_assistant"))[0])
    assert trained_runs(tok, last) == ["<think>\n3+3=6\n</think>\nIt is 6.<|im_end|>"]


def test_tagged_oracle_last_assistant(smollm2_tokenizer: Any) -> None:
    tagged_last = CHATML_TAGGED.replace(
        "{% if message['role'] == 'assistant' %}", "{% if message['role'] == 'assistant' and loop.last %}"
    )
    cfg = MaskConfig(train_on="last_assistant")
    for messages in ALL_CONVS:
        row = ok(tokenize_conversations(smollm2_tokenizer, [messages], cfg)[0])
        oracle = smollm2_tokenizer.apply_chat_template(
            messages, chat_template=tagged_last, return_dict=True, return_assistant_tokens_mask=True
        )
        assert [int(label != IGNORE_INDEX) for label in row.labels] == list(oracle["assistant_masks"])


# ---------------------------------------------------------------------------------------------------------------
# overflow: quarantine and truncation at a turn boundary
# ---------------------------------------------------------------------------------------------------------------

LONG: Messages = [
    {"role": "user", "content": "First question?"},
    {"role": "assistant", "content": "First answer."},
    {"role": "user", "content": "Second question?"},
    {"role": "assistant", "content": "Second answer."},
    {"role": "user", "content": "Third question, with many more words in it than the others?"},
    {"role": "assistant", "content": "Third answer, also rather long so that it does not fit."},
]


def test_too_long_is_quarantined(smollm2_tokenizer: Any) -> None:
    full = len(fresh_ids(smollm2_tokenizer, LONG))
    cfg = MaskConfig(max_seq_len=full - 1)
    assert tokenize_conversations(smollm2_tokenizer, [LONG], cfg) == [
        MaskError("too_long", f"{full} tokens > max_seq_len {full - 1}")
    ]
    exact = ok(tokenize_conversations(smollm2_tokenizer, [LONG], MaskConfig(max_seq_len=full))[0])
    assert exact.num_tokens == full and not exact.truncated


@pytest.mark.parametrize("train_on", ["all_assistant", "last_assistant"])
def test_truncate_keeps_longest_whole_turn_prefix(smollm2_tokenizer: Any, train_on: str) -> None:
    tok = smollm2_tokenizer
    four = len(fresh_ids(tok, LONG[:4]))
    full = len(fresh_ids(tok, LONG))
    assert four < full
    cfg = MaskConfig(max_seq_len=four + 1, overflow="truncate", train_on=train_on)  # type: ignore[arg-type]
    row = ok(tokenize_conversations(tok, [LONG], cfg)[0])
    assert (row.truncated, row.num_messages, row.num_tokens) == (True, 4, four)
    assert row.input_ids == fresh_ids(tok, LONG[:4])
    expected_runs = ["First answer.<|im_end|>", "Second answer.<|im_end|>"]
    assert trained_runs(tok, row) == (expected_runs if train_on == "all_assistant" else expected_runs[1:])
    assert verify_mask(tok, LONG, row.input_ids, row.labels, cfg, num_messages=row.num_messages) is None
    # without the kept-prefix length the proof fails loudly, at the first missing position
    assert verify_mask(tok, LONG, row.input_ids, row.labels, cfg) == (
        f"position {four}: input_ids differ from apply_chat_template ({four} vs {full} ids)"
    )


def test_truncate_with_nothing_that_fits_is_too_long(smollm2_tokenizer: Any) -> None:
    two = len(fresh_ids(smollm2_tokenizer, LONG[:2]))
    full = len(fresh_ids(smollm2_tokenizer, LONG))
    cfg = MaskConfig(max_seq_len=two - 1, overflow="truncate")
    assert tokenize_conversations(smollm2_tokenizer, [LONG], cfg) == [
        MaskError(
            "too_long",
            f"{full} tokens > max_seq_len {two - 1}, and no prefix of whole turns ending with an assistant fits",
        )
    ]


def test_truncate_not_prefix_stable_template(make_tokenizer: Callable[..., Any]) -> None:
    family = FAMILIES[4]
    tok = make_tokenizer(family.template, family.special_tokens, family.tokens)
    two = len(fresh_ids(tok, CONV_THINK[:2]))
    cfg = MaskConfig(max_seq_len=two, overflow="truncate")
    row = ok(tokenize_conversations(tok, [CONV_THINK], cfg)[0])
    # rendered on its own, the kept last turn keeps its thinking, which is then trained
    assert trained_runs(tok, row) == ["<think>\n2 plus 2 is 4.\n</think>\n\nThe answer is 4.<|im_end|>"]
    assert (row.truncated, row.num_messages) == (True, 2)
    assert verify_mask(tok, CONV_THINK, row.input_ids, row.labels, cfg, num_messages=2) is None


# ---------------------------------------------------------------------------------------------------------------
# long conversations: alignment linear in the turns, huge rows counted in pieces, truncating many turns
# ---------------------------------------------------------------------------------------------------------------


def many_turns(count: int) -> Messages:
    """``count`` alternating user/assistant turns, each content distinct."""
    return [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"Turn {i}: a few words about item {i}."}
        for i in range(count)
    ]


def within(seconds: float, work: Callable[[], Any]) -> Any:
    """``work()`` in a thread joined for at most ``seconds``, so a regression to the cubic alignment (10,000 turns
    took over 400 s) fails the test instead of hanging the suite. Not a speed claim: that is the benchmark's."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = work()
        except BaseException as exc:  # handed to the test's thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def oracle_mask(tok: Any, messages: Messages, tagged: str) -> tuple[list[int], list[int]]:
    """input_ids and transformers' ``{% generation %}`` assistant mask."""
    oracle = tok.apply_chat_template(
        messages, chat_template=tagged, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    return list(oracle["input_ids"]), list(oracle["assistant_masks"])


def test_ten_thousand_turns_too_long_are_quarantined(smollm2_tokenizer: Any) -> None:
    messages = many_turns(10_000)
    [result] = within(60, lambda: tokenize_conversations(smollm2_tokenizer, [messages], MaskConfig()))
    assert isinstance(result, MaskError) and result.reason == "too_long"
    text = smollm2_tokenizer.apply_chat_template(messages, tokenize=False)
    found = re.fullmatch(
        rf"at least (\d+) tokens > max_seq_len 4096 \(counted in the first (\d+) of {len(text)} characters\)",
        result.message,
    )
    assert found is not None, result.message
    at_least, counted = int(found.group(1)), int(found.group(2))
    # counted in one piece (no more was needed), cut where a word ends; a lower bound of the real count
    piece = max(masking._PIECE_CHARS_PER_TOKEN * 4096, masking._MIN_PIECE_CHARS)
    assert counted <= piece and text[counted].isspace() and not text[counted - 1].isspace()
    assert 4096 < at_least <= len(smollm2_tokenizer(text[:counted], add_special_tokens=False)["input_ids"])


@pytest.mark.slow  # needs its size (linear time on 10,000 turns): 4-5 s per family
@pytest.mark.parametrize("family", FAMILIES, ids=[f.name for f in FAMILIES])
def test_ten_thousand_turns_that_fit_match_generation_oracle(
    family: Family, smollm2_tokenizer: Any, make_tokenizer: Callable[..., Any]
) -> None:
    tok = family_tokenizer(family, smollm2_tokenizer, make_tokenizer)
    messages = many_turns(10_000)
    cfg = MaskConfig(max_seq_len=1_000_000)
    [result] = within(60, lambda: tokenize_conversations(tok, [messages], cfg))
    row = ok(result)
    input_ids, mask = oracle_mask(tok, messages, family.tagged)
    assert row.input_ids == input_ids
    assert [int(label != IGNORE_INDEX) for label in row.labels] == mask
    assert (row.num_messages, row.truncated, row.num_tokens) == (10_000, False, len(input_ids))


def fastchat_as_one_conversation() -> Messages:
    """Every real FastChat conversation, one after the other: one long row of real text (code, lists, newlines)."""
    rows = json.loads((REAL_DATA / "fastchat" / "dummy_conversation.json").read_text(encoding="utf-8"))
    roles = {"human": "user", "gpt": "assistant"}
    messages = [{"role": roles[t["from"]], "content": t["value"]} for row in rows for t in row["conversations"]]
    assert [m["role"] for m in messages[:2]] == ["user", "assistant"] and messages[-1]["role"] == "assistant"
    return messages


@pytest.mark.parametrize("family", FAMILIES, ids=[f.name for f in FAMILIES])
def test_pieces_count_a_long_rendering_exactly(
    family: Family, smollm2_tokenizer: Any, make_tokenizer: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    tok = family_tokenizer(family, smollm2_tokenizer, make_tokenizer)
    messages = fastchat_as_one_conversation()
    text = tok.apply_chat_template(messages, tokenize=False)
    full = len(fresh_ids(tok, messages))
    # pieces of 2,048 characters, so this row is cut fifty to seventy times
    monkeypatch.setattr(masking, "_MIN_PIECE_CHARS", 2048)
    monkeypatch.setattr(masking, "_PIECE_CHARS_PER_TOKEN", 0)
    assert len(text) > 48 * 2048
    # a row that fits exactly is tokenised as ever, whatever the pieces say
    row = ok(tokenize_conversations(tok, [messages], MaskConfig(max_seq_len=full))[0])
    assert row.input_ids == fresh_ids(tok, messages)
    assert [int(label != IGNORE_INDEX) for label in row.labels] == oracle_mask(tok, messages, family.tagged)[1]
    # one token over: the pieces' margin (16 tokens a cut) leaves it uncertain, so it is encoded whole
    assert tokenize_conversations(tok, [messages], MaskConfig(max_seq_len=full - 1)) == [
        MaskError("too_long", f"{full} tokens > max_seq_len {full - 1}")
    ]
    # without the margin the pieces' tokens sum to the whole text's count exactly: cuts end words
    monkeypatch.setattr(masking, "_TOKENS_PER_CUT", 0)
    assert tokenize_conversations(tok, [messages], MaskConfig(max_seq_len=full - 1)) == [
        MaskError(
            "too_long",
            f"at least {full} tokens > max_seq_len {full - 1} (counted in the first {len(text)} of "
            f"{len(text)} characters)",
        )
    ]


class RecordingBackend:
    """A tokenizers backend that remembers the longest text it was asked to encode."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.longest = 0

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.backend, name)
        if not name.startswith("encode"):
            return method

        def encode(texts: str | list[str], *args: Any, **kwargs: Any) -> Any:
            self.longest = max(self.longest, *(len(t) for t in ([texts] if isinstance(texts, str) else texts)))
            return method(texts, *args, **kwargs)

        return encode


@pytest.mark.parametrize("overflow", ["quarantine", "truncate"])
def test_a_huge_row_is_never_encoded_whole(
    smollm2_tokenizer: Any, monkeypatch: pytest.MonkeyPatch, overflow: str
) -> None:
    real_backend = masking._offset_backend(smollm2_tokenizer)
    recording = RecordingBackend(real_backend)
    monkeypatch.setattr(masking, "_offset_backend", lambda tok: recording)
    huge = "The same long answer goes on and on, line after line.\n" * 100_000  # 5.5 MB
    rows = [[*CONV_SHORT, {"role": "user", "content": "More?"}, {"role": "assistant", "content": huge}], CONV_SHORT]
    cfg = MaskConfig(overflow=overflow)  # type: ignore[arg-type]
    big, small = tokenize_conversations(smollm2_tokenizer, rows, cfg)
    # pieces only: the Rust encoding costs ~130 bytes a character
    assert recording.longest <= max(masking._PIECE_CHARS_PER_TOKEN * cfg.max_seq_len, masking._MIN_PIECE_CHARS)
    if overflow == "truncate":
        assert (ok(big).num_messages, trained_runs(smollm2_tokenizer, ok(big))) == (2, ["Hi!<|im_end|>"])
    else:
        assert isinstance(big, MaskError) and big.reason == "too_long"
        assert big.message.startswith("at least ") and big.message.endswith(" characters)")
    assert ok(small).input_ids == fresh_ids(smollm2_tokenizer, CONV_SHORT)


def prefix_token_counts(tok: Any, messages: Messages, counts: range) -> dict[int, int]:
    """Tokens of ``apply_chat_template(messages[:count])`` for each count: every candidate prefix rendered."""
    texts = tok.apply_chat_template([messages[:count] for count in counts], tokenize=False)
    return dict(zip(counts, (len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]), strict=True))


@pytest.mark.slow  # needs its size (2,000 turns, 200 prefixes rendered for the oracle): about 2 s
def test_truncating_thousands_of_turns_keeps_the_longest_prefix_that_fits(smollm2_tokenizer: Any) -> None:
    tok = smollm2_tokenizer
    messages = many_turns(2_000)
    cfg = MaskConfig(max_seq_len=4096, overflow="truncate")
    [result] = within(60, lambda: tokenize_conversations(tok, [messages], cfg))
    row = ok(result)
    lengths = prefix_token_counts(tok, messages, range(2, 402, 2))
    assert lengths[400] > 4096
    expected = max(count for count, length in lengths.items() if length <= 4096)
    assert (row.truncated, row.num_messages, row.num_tokens) == (True, expected, lengths[expected])
    input_ids, mask = oracle_mask(tok, messages[:expected], CHATML_TAGGED)
    assert row.input_ids == input_ids
    assert [int(label != IGNORE_INDEX) for label in row.labels] == mask


def test_truncation_finds_a_longer_prefix_that_renders_shorter(make_tokenizer: Callable[..., Any]) -> None:
    family = FAMILIES[4]  # the reasoning template strips the thinking of every assistant turn but the last
    tok = make_tokenizer(family.template, family.special_tokens, family.tokens)
    thinking = "<think>\n" + "Let me think this through with care. " * 80 + "\n</think>\n\n"
    messages = many_turns(300)  # 149 candidate prefixes: more than the scan checks without the search
    messages[1] = {"role": "assistant", "content": thinking + messages[1]["content"]}
    lengths = prefix_token_counts(tok, messages, range(2, 300, 2))
    assert lengths[2] > lengths[20]  # keeping only the first answer keeps its thinking: longer than 20 turns
    cfg = MaskConfig(max_seq_len=lengths[20], overflow="truncate")
    row = ok(tokenize_conversations(tok, [messages], cfg)[0])
    assert max(count for count, length in lengths.items() if length <= lengths[20]) == 20
    assert (row.truncated, row.num_messages) == (True, 20)
    input_ids, mask = oracle_mask(tok, messages[:20], family.tagged)
    assert row.input_ids == input_ids
    assert [int(label != IGNORE_INDEX) for label in row.labels] == mask


# ---------------------------------------------------------------------------------------------------------------
# error reasons
# ---------------------------------------------------------------------------------------------------------------


def test_no_trainable_tokens(smollm2_tokenizer: Any) -> None:
    results = tokenize_conversations(
        smollm2_tokenizer,
        [
            [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
            [{"role": "user", "content": "u"}, {"role": "assistant", "content": ""}],
        ],
        MaskConfig(end_of_turn=""),  # explicitly no marker: an empty answer then trains nothing
    )
    assert results == [
        MaskError("no_trainable_tokens", "the conversation has no assistant turn"),
        MaskError("no_trainable_tokens", "no token falls inside an assistant span"),
    ]
    assert set(MASK_REASONS) >= {"too_long", "no_trainable_tokens", "template_error", "mask_boundary_straddle"}


def test_fresh_template_ids_equal_apply_chat_template_and_keep_errors_per_row(
    smollm2_tokenizer: Any, make_tokenizer: Callable[..., Any]
) -> None:
    conversations = [
        CONV_SHORT,
        [{"role": "system", "content": "Be brief."}, *CONV_SHORT, {"role": "user", "content": "Encore ? Ça va ✓"}],
        [{"role": "user", "content": "  spaces\n\n and <|im_start|> text  "}],
    ]
    assert fresh_template_ids(smollm2_tokenizer, conversations) == [
        fresh_ids(smollm2_tokenizer, c) for c in conversations
    ]
    mistral = make_tokenizer(MISTRAL, FAMILIES[2].special_tokens)
    assistant_first = [{"role": "assistant", "content": "Hello."}]  # the template insists on user first
    good, bad = fresh_template_ids(mistral, [CONV_SHORT, assistant_first])
    assert good == fresh_ids(mistral, CONV_SHORT)
    assert bad == (
        "chat template raised TemplateError: Conversation roles must alternate user/assistant/user/assistant/..."
    )
    assert fresh_template_ids(smollm2_tokenizer, []) == []


def test_template_errors(smollm2_tokenizer: Any, make_tokenizer: Callable[..., Any]) -> None:
    mistral = make_tokenizer(MISTRAL, FAMILIES[2].special_tokens)
    tool_conv = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "Checking."},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "Sunny."},
    ]
    [err] = tokenize_conversations(mistral, [tool_conv], MaskConfig())
    assert err == MaskError(
        "template_error",
        "chat template raised TemplateError: Conversation roles must alternate user/assistant/user/assistant/...",
    )

    adjacent = make_tokenizer("{% for m in messages %}{{ m['content'] }}{% endfor %}{{ '<|im_end|>' }}")
    assert tokenize_conversations(adjacent, [CONV_SHORT], MaskConfig()) == [
        MaskError("template_error", "messages 0 and 1 are rendered with nothing between them; cannot split turns")
    ]

    drops_assistant = make_tokenizer(
        "{% for m in messages %}{% if m['role'] != 'assistant' %}"
        "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    )
    assert tokenize_conversations(drops_assistant, [CONV_SHORT], MaskConfig()) == [
        MaskError("template_error", "the template does not render assistant message(s) [1]")
    ]

    no_marker = make_tokenizer("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}")
    [err] = tokenize_conversations(no_marker, [CONV_SHORT], MaskConfig())
    assert err == MaskError(
        "template_error", "no end-of-turn marker follows the last assistant content; set MaskConfig.end_of_turn"
    )
    row = ok(tokenize_conversations(no_marker, [CONV_SHORT], MaskConfig(end_of_turn="\n"))[0])
    assert trained_runs(no_marker, row) == [" Hi!\n"]  # ": " + "Hi" -> "ĠHi": the space is emitted by the model

    # a template whose text depends on the content (moves thinking into its own block) cannot be aligned
    content_dependent = make_tokenizer(
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
        "{% if '</think>' in m['content'] %}{{ '<reasoning>' + m['content'].split('</think>')[0] + '</reasoning>' }}"
        "{% endif %}{{ m['content'].split('</think>')[-1] + '<|im_end|>\n' }}{% endfor %}"
    )
    [err] = tokenize_conversations(content_dependent, [CONV_THINK], MaskConfig())
    assert isinstance(err, MaskError) and err.reason == "template_error"
    assert err.message.startswith("could not align the rendering with the template skeleton")


def test_mask_boundary_straddle(make_tokenizer: Callable[..., Any]) -> None:
    glued = make_tokenizer(
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\nRes' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    )
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "ult: 4"}]
    assert glued.tokenize("Result") == ["Result"]
    text = glued.apply_chat_template(messages, tokenize=False)
    assert text == "<|im_start|>user\nResq<|im_end|>\n<|im_start|>assistant\nResult: 4<|im_end|>\n"
    assert (text[54:60], text[57:73]) == ("Result", "ult: 4<|im_end|>")
    [err] = tokenize_conversations(glued, [messages], MaskConfig())
    assert err == MaskError(
        "mask_boundary_straddle",
        "token 11 covers characters 54:60 ('Result') across the boundary of the trained span 57:73",
    )


def test_unsupported_and_special_token_content(smollm2_tokenizer: Any) -> None:
    results = tokenize_conversations(
        smollm2_tokenizer,
        [
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": [{"x": 1}]}],
            [{"role": "user", "content": [{"type": "text", "text": "hi"}]}, {"role": "assistant", "content": "a"}],
            [{"role": "user", "content": "inject <|im_end|> here"}, {"role": "assistant", "content": "a"}],
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a", "thinking": "hm"}],
        ],
        MaskConfig(),
    )
    assert results == [
        MaskError("unsupported_message", "message 1 tool call 0 has no function name"),
        MaskError("unsupported_message", "message 0 content is list, not str"),
        MaskError("special_token_in_content", "message 0 content contains special token '<|im_end|>'"),
        MaskError(
            "unsupported_message",
            "assistant message 1 has fields ['thinking'] besides content, tool_calls and reasoning_content",
        ),
    ]


# ---------------------------------------------------------------------------------------------------------------
# verify_mask catches corrupted masks, naming the position
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def good_row(smollm2_tokenizer: Any) -> TokenizedConversation:
    """The hand-checked multi-turn row (trained positions 21, 22, 39, 40)."""
    return ok(tokenize_conversations(smollm2_tokenizer, [SYSTEM_MULTI], MaskConfig())[0])


def test_verify_flipped_header_token(smollm2_tokenizer: Any, good_row: TokenizedConversation) -> None:
    labels = list(good_row.labels)
    assert smollm2_tokenizer.convert_ids_to_tokens(good_row.input_ids[37]) == "istant"
    labels[37] = good_row.input_ids[37]
    assert verify_mask(smollm2_tokenizer, SYSTEM_MULTI, good_row.input_ids, labels, MaskConfig()) == (
        "position 37: trained run 37:38 decodes to 'istant', expected assistant message 4 content '6' "
        "followed by '<|im_end|>'"
    )


def test_verify_untrained_content_token(smollm2_tokenizer: Any) -> None:
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there, friend."}]
    row = ok(tokenize_conversations(smollm2_tokenizer, [messages], MaskConfig())[0])
    trained = [i for i, label in enumerate(row.labels) if label != IGNORE_INDEX]
    assert len(trained) == 6
    labels = list(row.labels)
    labels[trained[2]] = IGNORE_INDEX
    message = verify_mask(smollm2_tokenizer, messages, row.input_ids, labels, MaskConfig())
    assert message is not None and message.startswith(f"position {trained[2]}: trained run {trained[0]}:{trained[2]}")
    labels = list(row.labels)
    labels[trained[-1]] = IGNORE_INDEX  # the end-of-turn marker untrained
    message = verify_mask(smollm2_tokenizer, messages, row.input_ids, labels, MaskConfig())
    assert message == (
        f"position {trained[-1]}: trained run {trained[0]}:{trained[-1]} decodes to 'Hello there, friend.', "
        "expected assistant message 1 content 'Hello there, friend.' followed by '<|im_end|>'"
    )


@pytest.mark.parametrize(("shift", "position"), [(1, 21), (-1, 20)])
def test_verify_shifted_mask(
    smollm2_tokenizer: Any, good_row: TokenizedConversation, shift: int, position: int
) -> None:
    ids = good_row.input_ids
    flags = [label != IGNORE_INDEX for label in good_row.labels]
    shifted = [False] * len(flags)
    for i, flag in enumerate(flags):
        if flag and 0 <= i + shift < len(flags):
            shifted[i + shift] = True
    labels = [token if flag else IGNORE_INDEX for token, flag in zip(ids, shifted, strict=True)]
    message = verify_mask(smollm2_tokenizer, SYSTEM_MULTI, ids, labels, MaskConfig())
    assert message is not None and message.startswith(f"position {position}: ")


def test_verify_other_corruptions(smollm2_tokenizer: Any, good_row: TokenizedConversation) -> None:
    tok = smollm2_tokenizer
    ids, labels = good_row.input_ids, good_row.labels
    assert verify_mask(tok, SYSTEM_MULTI, ids, [IGNORE_INDEX] * len(ids), MaskConfig()) == "no trained position"
    wrong_label = list(labels)
    wrong_label[21] = 999
    assert verify_mask(tok, SYSTEM_MULTI, ids, wrong_label, MaskConfig()) == (
        "position 21: label 999 is neither -100 nor the input id 36"
    )
    other_ids = list(ids)
    other_ids[12] = 33
    assert verify_mask(tok, SYSTEM_MULTI, other_ids, labels, MaskConfig()) == (
        "position 12: input_ids differ from apply_chat_template (42 vs 42 ids)"
    )
    user_trained = list(labels)
    for pos in range(11, 15):  # the user's "2+2?"
        user_trained[pos] = ids[pos]
    assert verify_mask(tok, SYSTEM_MULTI, ids, user_trained, MaskConfig()) == (
        "position 11: trained run 11:15 decodes to '2+2?', expected assistant message 2 content '4' "
        "followed by '<|im_end|>'"
    )
    extra_newline = list(labels)
    extra_newline[41] = ids[41]  # the "\n" after the last <|im_end|>
    assert verify_mask(tok, SYSTEM_MULTI, ids, extra_newline, MaskConfig()) == (
        "position 41: trained run 39:42 decodes to '6<|im_end|>\\n', expected assistant message 4 content '6' "
        "followed by '<|im_end|>'"
    )
