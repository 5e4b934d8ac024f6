"""posttrain_assets.sft.batches: a batch of conversations tokenised into rows, and those rows' masks proven, as the
silver_sft_tokenized asset and loss_mask_check run them in worker processes."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from posttrain_assets.sft import masking
from posttrain_assets.sft.batches import (
    CANONICAL_SAMPLE_EVERY,
    ProofJob,
    TokenizeJob,
    TokenizerIdentity,
    in_canonical_sample,
    int32_lists,
    prove_batch,
    tokenize_batch,
)
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
    proof = prove_batch(ProofJob(identity, canonical_every=1), proved)
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
    proof = prove_batch(ProofJob(identity, canonical_every=1), chunked)
    assert proof.checked == 3
    expected = [("r3", "tokenised with another tokenizer or template"), ("r1", f"position {position}")]
    assert [(record_id, problem.split(":")[0]) for record_id, _, problem in proof.failures] == expected
    # one chunk that is a slice (an offset into its buffers)
    proof = prove_batch(ProofJob(identity, canonical_every=1), table.slice(1, 2))
    assert [(record_id, problem.split(":")[0]) for record_id, _, problem in proof.failures] == expected


def test_canonical_sample_is_one_row_in_n_by_id_whatever_the_batches() -> None:
    ids = [f"row-{i}" for i in range(16_000)]
    sampled = [i for i in ids if in_canonical_sample(i, CANONICAL_SAMPLE_EVERY)]
    assert 900 < len(sampled) < 1100  # one in 16 (binomial: 1000 +- 3 sd)
    assert sampled == [i for i in reversed(ids) if in_canonical_sample(i, CANONICAL_SAMPLE_EVERY)][::-1]
    assert all(in_canonical_sample(i, 1) for i in ids[:100])


def test_ids_that_spell_another_text_fail_on_every_row_and_a_non_canonical_split_fails_in_the_sample(
    smollm2_tokenizer: Any,
) -> None:
    tok = smollm2_tokenizer
    identity, _, proved = tokenised(tok)
    row = proved.to_pylist()[0]  # r0: "2 + 2 = 4." trained
    # 1. an untrained id replaced by another token: the ids no longer spell the rendering. Caught with no
    # canonical sample at all (a row outside the sample).
    other = dict(row, input_ids=list(row["input_ids"]), labels=list(row["labels"]))
    other["input_ids"][1] = tok.convert_tokens_to_ids("Ġthe")
    no_sample = ProofJob(identity, canonical_every=10**9)
    table = pa.Table.from_pylist([other], schema=proved.schema)
    assert not in_canonical_sample("r0", 10**9)
    proof = prove_batch(no_sample, table)
    assert proof.canonical_checked == 0
    assert [p for _, _, p in proof.failures] == [
        "position 1: input_ids do not decode to the chat template's rendering (they differ at character "
        f"{len(tok.decode(row['input_ids'][:1]))} of {len(tok.decode(row['input_ids']))})"
    ]
    # 2. the first trained token split in two tokens that decode to the same text: the ids still spell the
    # rendering and the mask still trains exactly the answer, but they are not the tokenizer's encoding. Only the
    # canonical-encoding claim sees it, so it is caught when the row is in the sample, not otherwise.
    vocab = tok.get_vocab()
    trained_at, token = next(
        (position, token)
        for position, token in enumerate(tok.convert_ids_to_tokens(row["input_ids"]))
        if row["labels"][position] != IGNORE_INDEX and len(token) >= 2 and {token[:1], token[1:]} <= vocab.keys()
    )
    halves = [vocab[token[:1]], vocab[token[1:]]]
    split = dict(row)
    split["input_ids"] = row["input_ids"][:trained_at] + halves + row["input_ids"][trained_at + 1 :]
    split["labels"] = row["labels"][:trained_at] + halves + row["labels"][trained_at + 1 :]
    table = pa.Table.from_pylist([split], schema=proved.schema)
    assert prove_batch(no_sample, table).failures == []
    proof = prove_batch(ProofJob(identity, canonical_every=1), table)
    assert proof.canonical_checked == 1
    assert [p for _, _, p in proof.failures] == [
        f"position {trained_at}: input_ids differ from apply_chat_template "
        f"({len(row['input_ids']) + 1} vs {len(row['input_ids'])} ids)"
    ]


def test_int32_lists_match_arrows_own_conversion() -> None:
    lists = [[1, 2, 3], [], [-100, 70_000, 2**31 - 1], [5]]
    converted = int32_lists(lists)
    assert converted.type == pa.list_(pa.int32())
    assert converted.equals(pa.array(lists, type=pa.list_(pa.int32())))
    assert converted.to_pylist() == lists
    assert int32_lists([]).to_pylist() == []


def test_tokenize_batch_is_the_same_whatever_the_chunk_size(smollm2_tokenizer: Any, monkeypatch: Any) -> None:
    # Chunks of 1, 2 and 3 rows split the batch across a rejected row and a truncated one (overflow="truncate"
    # truncates a too long row within its chunk): the same rows, in the same order, as one chunk of all of them.
    long_chat = [*chat("Short question?", "Short answer."), *chat("Long question?", "word " * 300)]
    conversations = [*CONVERSATIONS, long_chat, chat("Last?", "Yes.")]
    batch = pa.Table.from_pylist(
        [{"id": f"r{i}", "source": "chats", "messages": m} for i, m in enumerate(conversations)]
    )
    job = TokenizeJob(
        TokenizerIdentity(smollm2_tokenizer, "tok-hash", "template-hash"),
        MaskConfig(max_seq_len=120, overflow="truncate"),
    )
    results = {}
    for chunk_rows in (1, 2, 3, 256):
        monkeypatch.setattr(masking, "_CHUNK_ROWS", chunk_rows)
        result = tokenize_batch(job, batch)
        tokenized, rejected = result.tokenized.to_pylist(), result.rejected.to_pylist()
        results[chunk_rows] = (tokenized, rejected, result.tokens, result.truncated)
    tokenized, rejected, tokens, truncated = results[256]
    assert [r["id"] for r in tokenized] == ["r0", "r1", "r3", "r4", "r5"] and [r["id"] for r in rejected] == ["r2"]
    assert truncated == 1 and tokenized[3]["truncated"] and tokenized[3]["num_messages"] == 2
    assert tokens == sum(r["num_tokens"] for r in tokenized)
    assert results[1] == results[2] == results[3] == results[256]
