"""The SFT stages' per-batch work, without Dagster or DuckDB: tokenise a batch of conversations into
silver.sft_tokenized rows, and prove a batch of tokenised rows' masks.

Both take an Arrow batch and return Arrow tables or plain figures, so they run in worker processes
(``posttrain_assets.parallel``): the token lists are built, checked and packed into Arrow in the worker, and
only Arrow buffers cross back to the process that writes DuckDB.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from posttrain_assets.sft.masking import (
    IGNORE_INDEX,
    MaskConfig,
    MaskError,
    fresh_template_ids,
    tokenize_conversations,
    verify_mask,
)


@dataclass(frozen=True)
class TokenizerIdentity:
    """The tokenizer and the hashes every tokenised row records (so a row made by another one is caught)."""

    tokenizer: Any
    tokenizer_sha256: str
    chat_template_sha256: str

    def hashes(self) -> dict[str, str]:
        return {"tokenizer_sha256": self.tokenizer_sha256, "chat_template_sha256": self.chat_template_sha256}


@dataclass(frozen=True)
class TokenizeJob:
    identity: TokenizerIdentity
    mask: MaskConfig


@dataclass
class TokenizedBatch:
    """silver.sft_tokenized and silver.sft_quarantine rows of one batch (Arrow; None when empty), and totals."""

    tokenized: pa.Table | None
    rejected: pa.Table | None
    rows: int
    tokens: int
    trained: int
    truncated: int


# Token lists as Arrow int32, the INTEGER[] of silver.sft_tokenized: half the bytes of Python ints' default int64
# through the pipe from a worker, and nothing for DuckDB to cast on insert.
_INT32_LISTS = frozenset({"input_ids", "labels"})


def _arrow(rows: list[dict[str, Any]]) -> pa.Table | None:
    if not rows:
        return None
    return pa.table(
        {
            name: pa.array([r[name] for r in rows], type=pa.list_(pa.int32()) if name in _INT32_LISTS else None)
            for name in rows[0]
        }
    )


def tokenize_batch(job: TokenizeJob, batch: pa.Table) -> TokenizedBatch:
    """Tokenise a batch of SFT rows (``id, source, messages``), in order: a tokenised row with assistant-only
    labels each, or a quarantine row saying why its mask cannot be exact."""
    rows = batch.to_pylist()
    cfg, hashes = job.mask, job.identity.hashes()
    results = tokenize_conversations(job.identity.tokenizer, [r["messages"] for r in rows], cfg)
    tokenized, rejected = [], []
    for row, result in zip(rows, results, strict=True):
        if isinstance(result, MaskError):
            rejected.append(
                {"id": row["id"], "source": row["source"], "reason": result.reason, "message": result.message, **hashes}
            )
            continue
        tokenized.append(
            {
                "id": row["id"],
                "source": row["source"],
                "input_ids": result.input_ids,
                "labels": result.labels,
                "num_tokens": result.num_tokens,
                "num_trainable_tokens": result.num_trainable_tokens,
                "num_messages": result.num_messages,
                "truncated": result.truncated,
                "train_on": cfg.train_on,
                "end_of_turn": cfg.end_of_turn,
                **hashes,
                "max_seq_len": cfg.max_seq_len,
            }
        )
    return TokenizedBatch(
        tokenized=_arrow(tokenized),
        rejected=_arrow(rejected),
        rows=len(rows),
        tokens=sum(r["num_tokens"] for r in tokenized),
        trained=sum(r["num_trainable_tokens"] for r in tokenized),
        truncated=sum(r["truncated"] for r in tokenized),
    )


@dataclass
class MaskProof:
    """What proving tokenised rows found: rows checked, failures ``(id, source, problem)`` in row order, and
    ``[tokens, trained tokens]`` per source."""

    checked: int = 0
    failures: list[tuple[str, str, str]] = field(default_factory=list)
    tokens_by_source: dict[str, list[int]] = field(default_factory=dict)

    def add(self, other: MaskProof) -> None:
        self.checked += other.checked
        self.failures += other.failures
        for source, (tokens, trained) in other.tokens_by_source.items():
            counts = self.tokens_by_source.setdefault(source, [0, 0])
            counts[0] += tokens
            counts[1] += trained


# The columns prove_batch reads, in this order.
PROVED_COLUMNS = (
    "id",
    "source",
    "messages",
    "input_ids",
    "labels",
    "num_messages",
    "train_on",
    "end_of_turn",
    "tokenizer_sha256",
    "chat_template_sha256",
)


def _list_views(column: pa.ChunkedArray) -> list[Any]:
    """Each row of a list column as a numpy view of the column's values (no Python int per element)."""
    lists = column.combine_chunks()
    values, offsets = lists.values.to_numpy(zero_copy_only=False), lists.offsets.to_numpy()
    return [values[offsets[i] : offsets[i + 1]] for i in range(len(lists))]


def prove_batch(identity: TokenizerIdentity, batch: pa.Table) -> MaskProof:
    """Prove each row's labels (``masking.verify_mask``) against one batched re-render and re-tokenisation of
    its conversation; a row tokenised with another tokenizer or template fails without being re-tokenised."""
    tok, hashes = identity.tokenizer, (identity.tokenizer_sha256, identity.chat_template_sha256)
    proof = MaskProof()
    batch = batch.select(list(PROVED_COLUMNS))
    rows = batch.drop_columns(["input_ids", "labels"]).to_pylist()
    token_lists = (_list_views(batch.column("input_ids")), _list_views(batch.column("labels")))
    current: list[tuple[dict[str, Any], Any, Any]] = []
    for row, input_ids, labels in zip(rows, *token_lists, strict=True):
        if (row["tokenizer_sha256"], row["chat_template_sha256"]) == hashes:
            current.append((row, input_ids, labels))
        else:
            problem = "tokenised with another tokenizer or template: rematerialise"
            proof.failures.append((row["id"], row["source"], problem))
    fresh = fresh_template_ids(tok, [row["messages"][: row["num_messages"]] for row, _, _ in current])
    for (row, input_ids, labels), expected in zip(current, fresh, strict=True):
        cfg = MaskConfig(train_on=row["train_on"], end_of_turn=row["end_of_turn"])
        problem = verify_mask(tok, row["messages"], input_ids, labels, cfg, row["num_messages"], expected)
        if problem:
            proof.failures.append((row["id"], row["source"], problem))
        counts = proof.tokens_by_source.setdefault(row["source"], [0, 0])
        counts[0] += len(input_ids)
        counts[1] += int(np.count_nonzero(labels != IGNORE_INDEX))
    proof.checked = batch.num_rows
    return proof
