"""The curation tables: their schema, name, columns and meaning (the same table model as the catalogue)."""

from __future__ import annotations

from posttrain_assets.warehouse.model import Column, Table


def _c(name: str, type_: str, description: str, nullable: bool = True) -> Column:
    return Column(name, type_, description, nullable)


MODEL_COLUMNS = (
    _c("model", "VARCHAR", "embedding model name (e.g. wordllama/l2_supercat_256)", False),
    _c("model_sha256", "VARCHAR", "hash of the embedding model's weights and tokenizer files", False),
)

SILVER_EMBEDDINGS = Table(
    "silver",
    "embeddings",
    "One unit-length embedding per silver.records row, of the row's dedup unit (the text the cleaning pass "
    "deduplicates), with the model that made it.",
    (
        _c("id", "VARCHAR", "silver.records id", False),
        _c("regime", "VARCHAR", "sft | preference | rl", False),
        _c("source", "VARCHAR", "registry source name", False),
        _c("embedding", "FLOAT[]", "L2-normalised vector of the dedup unit (cosine similarity = dot product)", False),
        *MODEL_COLUMNS,
    ),
)

SILVER_SEMANTIC_DUPLICATES = Table(
    "silver",
    "semantic_duplicates",
    "Pairs of silver.records rows of the same regime whose embeddings' cosine similarity reaches the threshold: "
    "near duplicates in meaning that MinHash did not collapse (paraphrases), with the row the policy keeps.",
    (
        _c("regime", "VARCHAR", "the regime both rows belong to", False),
        _c("id_a", "VARCHAR", "the smaller id of the pair", False),
        _c("id_b", "VARCHAR", "the larger id of the pair", False),
        _c("source_a", "VARCHAR", "id_a's source", False),
        _c("source_b", "VARCHAR", "id_b's source", False),
        _c("similarity", "DOUBLE", "cosine similarity of the two embeddings", False),
        _c("group_id", "VARCHAR", "the kept row of the pair's connected group (its smallest id)", False),
        _c("policy", "VARCHAR", "report | drop: with drop, every row of a group but group_id leaves curation", False),
        *MODEL_COLUMNS,
    ),
)

SILVER_DIVERSITY_SELECTION = Table(
    "silver",
    "diversity_selection",
    "The rows a diversity selection picked from each regime's gold table under its budget, in pick order, with "
    "each pick's marginal gain.",
    (
        _c("regime", "VARCHAR", "sft | preference | rl", False),
        _c("group", "VARCHAR", "the budget group: a source or domain name, or 'all'", False),
        _c("id", "VARCHAR", "gold row id", False),
        _c("rank", "INTEGER", "pick order within the group, from 1", False),
        _c("gain", "DOUBLE", "marginal gain of the pick (method-dependent; null for k_center's first pick)"),
        _c("tokens", "INTEGER", "the row's tokens (the budget's unit when the budget is in tokens)", False),
        _c("method", "VARCHAR", "facility_location | k_center", False),
        _c("seed", "BIGINT", "the seed of the selection", False),
        *MODEL_COLUMNS,
    ),
)

GOLD_MIXTURES = Table(
    "gold",
    "mixtures",
    "The rows of every materialised mixture, in order: one row per drawn copy of a gold row (a component with "
    "epochs > 1 draws each selected row that many times).",
    (
        _c("mixture", "VARCHAR", "the mixture spec's name", False),
        _c("spec_sha256", "VARCHAR", "hash of the canonical mixture spec", False),
        _c(
            "position",
            "BIGINT",
            "row order in the mixture, from 0 (components in spec order, rows in draw order)",
            False,
        ),
        _c("component", "VARCHAR", "the spec component that drew the row", False),
        _c("id", "VARCHAR", "the gold row's id", False),
        _c("epoch", "INTEGER", "which copy of the row this is, from 0 (up-sampling is explicit: epochs)", False),
        _c("regime", "VARCHAR", "sft | preference | rl", False),
        _c("source", "VARCHAR", "registry source name", False),
        _c("tokens", "INTEGER", "the row's tokens", False),
    ),
)

GOLD_MIXTURE_MANIFESTS = Table(
    "gold",
    "mixture_manifests",
    "One manifest per materialised mixture: rows and tokens per component as asked and as delivered, the spec hash "
    "and the versions of the gold tables it was drawn from.",
    (
        _c("mixture", "VARCHAR", "the mixture spec's name", False),
        _c("spec_sha256", "VARCHAR", "hash of the canonical mixture spec", False),
        _c("manifest", "JSON", "the manifest (docs/curation.md#manifest)", False),
    ),
)

CURATION_TABLES = (
    SILVER_EMBEDDINGS,
    SILVER_SEMANTIC_DUPLICATES,
    SILVER_DIVERSITY_SELECTION,
    GOLD_MIXTURES,
    GOLD_MIXTURE_MANIFESTS,
)

# Each regime's gold tables, in preference order (the length-balanced remedy stands in for gold.preference while the
# length gate holds it back), and the SQL of one pool row per gold row: id, source, domain and tokens. SFT counts
# the tokens it trains on (num_tokens, after truncation); the other regimes the silver record's chat-template count.
GOLD_TABLES = {
    "sft": ("gold.sft",),
    "preference": ("gold.preference", "gold.preference_length_balanced"),
    "rl": ("gold.rl_prompts",),
}
_TOKENS = {"sft": "g.num_tokens", "preference": "coalesce(g.token_count, 0)", "rl": "coalesce(r.token_count, 0)"}


def pool_sql(regime: str, table: str) -> str:
    """id, source, domain, tokens of every row of ``table`` (a gold table of ``regime``), unsorted."""
    if table not in GOLD_TABLES.get(regime, ()):
        raise ValueError(
            f"{table!r} is not a gold table of regime {regime!r} ({', '.join(GOLD_TABLES.get(regime, ()))})"
        )
    return (
        f"SELECT g.id, g.source, r.domain, {_TOKENS[regime]}::BIGINT AS tokens "
        f"FROM {table} g LEFT JOIN silver.records r ON r.id = g.id"
    )
