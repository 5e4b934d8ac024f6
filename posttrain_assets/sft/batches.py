"""The SFT stages' per-batch work, without Dagster or DuckDB: tokenise a batch of conversations into
silver.sft_tokenized rows, and prove a batch of tokenised rows' masks.

Both take an Arrow batch and return Arrow tables or plain figures, so they run in worker processes
(``posttrain_assets.parallel``): the token lists are built, checked and packed into Arrow in the worker, and
only Arrow buffers cross back to the process that writes DuckDB.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from posttrain_assets.sft.masking import (
    IGNORE_INDEX,
    MaskConfig,
    MaskError,
    ProofInputs,
    canonical_ids,
    decode_rows,
    independent_markers,
    template_renderings,
    tokenized_chunks,
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


def int32_lists(lists: list[list[int]]) -> pa.ListArray:
    """Lists of Python ints as an Arrow ``list<int32>`` array, through one flat numpy buffer: about 5 times faster
    than ``pa.array`` converting element by element (a batch of SFT rows holds millions of token ids)."""
    offsets = np.zeros(len(lists) + 1, dtype=np.int32)
    np.cumsum(np.fromiter(map(len, lists), dtype=np.int64, count=len(lists)), out=offsets[1:])
    values = np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int32, count=int(offsets[-1]))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def _arrow(rows: list[dict[str, Any]]) -> pa.Table | None:
    if not rows:
        return None
    return pa.table(
        {
            name: int32_lists([r[name] for r in rows]) if name in _INT32_LISTS else pa.array([r[name] for r in rows])
            for name in rows[0]
        }
    )


def tokenize_batch(job: TokenizeJob, batch: pa.Table) -> TokenizedBatch:
    """Tokenise a batch of SFT rows (``id, source, messages``), in order: a tokenised row with assistant-only
    labels each, or a quarantine row saying why its mask cannot be exact.

    The rows are packed into Arrow chunk by chunk as ``masking.tokenized_chunks`` yields them, so a worker holds
    one chunk's token lists as Python ints (about 70 bytes a token) at a time, not its whole batch's."""
    rows = batch.to_pylist()
    cfg, hashes = job.mask, job.identity.hashes()
    tools = [r.get("tools") for r in rows]
    chunks = tokenized_chunks(job.identity.tokenizer, [r["messages"] for r in rows], cfg, tools)
    tokenized_parts, rejected_parts = [], []
    tokens = trained = truncated = 0
    done = 0
    for results in chunks:
        tokenized, rejected = [], []
        for row, result in zip(rows[done : done + len(results)], results, strict=True):
            if isinstance(result, MaskError):
                rejected.append(
                    {"id": row["id"], "source": row["source"], "reason": result.reason, "message": result.message}
                    | hashes
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
                    "train_reasoning": cfg.train_reasoning,
                    "end_of_turn": cfg.end_of_turn,
                    **hashes,
                    "max_seq_len": cfg.max_seq_len,
                }
            )
            tokens += result.num_tokens
            trained += result.num_trainable_tokens
            truncated += result.truncated
        done += len(results)
        for parts, packed in ((tokenized_parts, _arrow(tokenized)), (rejected_parts, _arrow(rejected))):
            if packed is not None:
                parts.append(packed)
    if done != len(rows):
        raise RuntimeError(f"tokenised {done} of {len(rows)} rows")
    return TokenizedBatch(
        tokenized=pa.concat_tables(tokenized_parts, promote_options="default") if tokenized_parts else None,
        rejected=pa.concat_tables(rejected_parts, promote_options="default") if rejected_parts else None,
        rows=len(rows),
        tokens=tokens,
        trained=trained,
        truncated=truncated,
    )


# The canonical-encoding claim (input_ids equal a fresh encode of the rendering) is checked on one row in this many,
# chosen by a hash of the row id (the same rows whatever the batches or processes). Every other claim is checked on
# every row, among them that the ids decode to exactly the template's rendering. Why a sample suffices: each row's
# ids come from one encode call of the same Rust tokenizer over the whole rendering (the row records that
# tokenizer's hash, compared on every row), so ids that spell the rendering yet are not its canonical encoding can
# only come from a defect in how the builder assembles ids (encoding pieces apart, cutting ids instead of
# re-encoding), which would show on the rows of every source; a defect in a share p of n rows is missed with
# probability (1 - 1/16)^(p n), under 1e-6 at p n = 215. Re-encoding is the most expensive part of the proof.
CANONICAL_SAMPLE_EVERY = 16


def in_canonical_sample(row_id: str, every: int) -> bool:
    """Whether the canonical-encoding claim is checked for ``row_id`` (one row in ``every``; all with 1)."""
    if every <= 1:
        return True
    digest = hashlib.blake2b(row_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % every == 0


@dataclass(frozen=True)
class ProofJob:
    """What proving a batch needs: the tokenizer with its hashes, and one row in how many gets the canonical-encoding
    claim checked (:data:`CANONICAL_SAMPLE_EVERY`; 1: every row)."""

    identity: TokenizerIdentity
    canonical_every: int = CANONICAL_SAMPLE_EVERY


@dataclass
class MaskProof:
    """What proving tokenised rows found: rows checked, failures ``(id, source, problem)`` in row order, and
    ``[tokens, trained tokens]`` per source."""

    checked: int = 0
    canonical_checked: int = 0  # rows whose ids were also compared with a fresh encode
    failures: list[tuple[str, str, str]] = field(default_factory=list)
    tokens_by_source: dict[str, list[int]] = field(default_factory=dict)

    def add(self, other: MaskProof) -> None:
        self.checked += other.checked
        self.canonical_checked += other.canonical_checked
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
    "tools",
    "input_ids",
    "labels",
    "num_messages",
    "train_on",
    "train_reasoning",
    "end_of_turn",
    "tokenizer_sha256",
    "chat_template_sha256",
)


def _list_views(column: pa.ChunkedArray) -> list[Any]:
    """Each row of a list column as a numpy view of the column's values (no Python int per element)."""
    lists = column.combine_chunks()
    values, offsets = lists.values.to_numpy(zero_copy_only=False), lists.offsets.to_numpy()
    return [values[offsets[i] : offsets[i + 1]] for i in range(len(lists))]


def prove_batch(job: ProofJob, batch: pa.Table) -> MaskProof:
    """Prove each row's labels (``masking.verify_mask``) against one batched re-render of the batch's conversations,
    one batched decode of its rows, and one batched re-encode of the rows in the canonical sample; a row tokenised
    with another tokenizer or template fails without being re-rendered."""
    identity = job.identity
    tok, hashes = identity.tokenizer, (identity.tokenizer_sha256, identity.chat_template_sha256)
    proof = MaskProof()
    if "tools" not in batch.column_names:  # rows given without tool definitions declare none
        batch = batch.append_column("tools", pa.nulls(batch.num_rows, pa.string()))
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
    kept = [row["messages"][: row["num_messages"]] for row, _, _ in current]
    renderings = template_renderings(tok, kept, [row["tools"] for row, _, _ in current])
    sampled = [
        isinstance(rendering, str) and in_canonical_sample(row["id"], job.canonical_every)
        for (row, _, _), rendering in zip(current, renderings, strict=True)
    ]
    encoded = iter(canonical_ids(tok, [r for r, s in zip(renderings, sampled, strict=True) if s]))
    canonical = [next(encoded) if s else None for s in sampled]
    decoded = decode_rows(tok, [ids.tolist() for _, ids, _ in current], [labels for _, _, labels in current])
    unconfigured = [i for i, (row, _, _) in enumerate(current) if row["end_of_turn"] is None]
    markers: list[str | None] = [None] * len(current)
    for i, marker in zip(unconfigured, independent_markers(tok, [kept[i] for i in unconfigured]), strict=True):
        markers[i] = marker
    for i, (row, input_ids, labels) in enumerate(current):
        cfg = MaskConfig(
            train_on=row["train_on"], train_reasoning=row["train_reasoning"], end_of_turn=row["end_of_turn"]
        )
        inputs = ProofInputs(renderings[i], canonical[i], decoded[i], markers[i])
        problem = verify_mask(tok, row["messages"], input_ids, labels, cfg, row["num_messages"], inputs, row["tools"])
        if problem:
            proof.failures.append((row["id"], row["source"], problem))
        counts = proof.tokens_by_source.setdefault(row["source"], [0, 0])
        counts[0] += len(input_ids)
        counts[1] += int(np.count_nonzero(labels != IGNORE_INDEX))
    proof.checked = batch.num_rows
    proof.canonical_checked = sum(sampled)
    return proof
