"""posttrain_assets.sft.batches: a batch of conversations tokenised into rows, and those rows' masks proven, as the
silver_sft_tokenized asset and loss_mask_check run them in worker processes."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from posttrain_assets.sft.batches import TokenizeJob, TokenizerIdentity, prove_batch, tokenize_batch
from posttrain_assets.sft.masking import IGNORE_INDEX, MaskConfig


def chat(user: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


CONVERSATIONS = [
    chat("What is 2 + 2?", "2 + 2 = 4."),
    chat("Name a prime.", "7 is prime."),
    chat("Say the end token.", "Here it is: <|im_end|>"),  # a special token in content: no exact mask
    [*chat("Hi!", "Hello."), *chat("And a colour?", "Blue.")],
]


def tokenised(tok: Any) -> tuple[TokenizerIdentity, pa.Table, pa.Table]:
    identity = TokenizerIdentity(tok, "tok-hash", "template-hash")
    batch = pa.Table.from_pylist(
        [{"id": f"r{i}", "source": "chats", "messages": m} for i, m in enumerate(CONVERSATIONS)]
    )
    result = tokenize_batch(TokenizeJob(identity, MaskConfig()), batch)
    assert result.rows == 4 and result.tokenized is not None and result.rejected is not None
    # what loss_mask_check reads: the tokenised rows with their conversations
    messages = dict(zip(batch.column("id").to_pylist(), batch.column("messages").to_pylist(), strict=True))
    proved = result.tokenized.append_column(
        "messages", pa.array([messages[i] for i in result.tokenized.column("id").to_pylist()])
    )
    return identity, result.tokenized, proved


def test_tokenize_batch_rows_and_rejections(smollm2_tokenizer: Any) -> None:
    identity, rows, _ = tokenised(smollm2_tokenizer)
    assert rows.column("id").to_pylist() == ["r0", "r1", "r3"]
    # token lists cross from the workers as int32, the INTEGER[] of silver.sft_tokenized
    assert rows.schema.field("input_ids").type == pa.list_(pa.int32())
    assert rows.schema.field("labels").type == pa.list_(pa.int32())
    first = rows.slice(0, 1).to_pylist()[0]
    trained = [t for t, label in zip(first["input_ids"], first["labels"], strict=True) if label != IGNORE_INDEX]
    assert smollm2_tokenizer.decode(trained) == "2 + 2 = 4.<|im_end|>"
    assert first["num_tokens"] == len(first["input_ids"]) and first["num_trainable_tokens"] == len(trained)
    assert first["tokenizer_sha256"] == "tok-hash" and first["chat_template_sha256"] == "template-hash"
    (rejected,) = tokenize_batch(
        TokenizeJob(identity, MaskConfig()),
        pa.Table.from_pylist([{"id": "r2", "source": "chats", "messages": CONVERSATIONS[2]}]),
    ).rejected.to_pylist()
    assert (rejected["id"], rejected["reason"]) == ("r2", "special_token_in_content")


def test_prove_batch_passes_good_rows_and_names_each_bad_one(smollm2_tokenizer: Any) -> None:
    identity, rows, proved = tokenised(smollm2_tokenizer)
    proof = prove_batch(identity, proved)
    assert (proof.checked, proof.failures) == (3, [])
    tokens = sum(len(ids) for ids in rows.column("input_ids").to_pylist())
    trained = sum(n for n in rows.column("num_trainable_tokens").to_pylist())
    assert proof.tokens_by_source == {"chats": [tokens, trained]}

    # Row r1 gets its first untrained position trained; row r3 claims another tokenizer. The batch arrives in
    # several chunks, one of them a slice, as DuckDB hands Arrow over.
    bad = proved.to_pylist()
    position = bad[1]["labels"].index(IGNORE_INDEX)
    bad[1]["labels"][position] = bad[1]["input_ids"][position]
    bad[2]["tokenizer_sha256"] = "another"
    table = pa.Table.from_pylist(bad, schema=proved.schema)
    chunked = pa.concat_tables([table.slice(0, 1), table.slice(1, 2)])
    assert chunked.column("labels").num_chunks == 2
    proof = prove_batch(identity, chunked)
    assert proof.checked == 3
    expected = [("r3", "tokenised with another tokenizer or template"), ("r1", f"position {position}")]
    assert [(record_id, problem.split(":")[0]) for record_id, _, problem in proof.failures] == expected
    # one chunk that is a slice (an offset into its buffers)
    proof = prove_batch(identity, table.slice(1, 2))
    assert [(record_id, problem.split(":")[0]) for record_id, _, problem in proof.failures] == expected
