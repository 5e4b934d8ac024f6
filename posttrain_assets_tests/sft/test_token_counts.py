"""posttrain_assets.sft.token_counts: silver's token counts for preference and RL rows, from batched renderings."""

from __future__ import annotations

import copy
from typing import Any

from posttrain_assets.sft.token_counts import token_counts


def tokens(tok: Any, messages: list[dict[str, str]], generation: bool = False) -> int:
    return len(tok.apply_chat_template(messages, add_generation_prompt=generation, return_dict=False))


def records() -> list[dict[str, Any]]:
    prompt = [{"role": "user", "content": "What is 6 x 7?"}]
    return [
        {"regime": "preference", "messages": prompt, "chosen": "It is 42.", "rejected": "Perhaps 41, or so."},
        {"regime": "rl", "messages": prompt},
        {"regime": "preference", "messages": [{"role": "odd", "content": "?"}], "chosen": "a", "rejected": "b"},
        {"regime": "rl", "messages": [{"role": "user", "content": "Name a prime."}]},
    ]


def test_counts_are_the_tokens_of_each_rows_own_rendering(smollm2_tokenizer: Any) -> None:
    tok = smollm2_tokenizer
    rows = records()
    expected = [
        tokens(tok, [*rows[0]["messages"], {"role": "assistant", "content": rows[0]["rejected"]}]),  # the longer
        tokens(tok, rows[1]["messages"], generation=True),
        tokens(tok, [*rows[2]["messages"], {"role": "assistant", "content": "a"}]),
        tokens(tok, rows[3]["messages"], generation=True),
    ]
    assert token_counts(tok, rows) == expected


def test_a_row_the_template_refuses_is_none_and_the_batch_still_counts(smollm2_tokenizer: Any) -> None:
    tok = copy.deepcopy(smollm2_tokenizer)
    tok.chat_template = (
        "{% for m in messages %}{% if m.role == 'odd' %}{{ raise_exception('no odd roles') }}{% endif %}"
        "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    counts = token_counts(tok, records())
    assert counts[2] is None
    rows = records()
    assert counts[1] == tokens(tok, rows[1]["messages"], generation=True)
    assert counts[0] == tokens(tok, [*rows[0]["messages"], {"role": "assistant", "content": rows[0]["rejected"]}])
    assert counts[3] == tokens(tok, rows[3]["messages"], generation=True)
