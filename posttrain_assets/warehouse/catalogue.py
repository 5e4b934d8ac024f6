"""Every DuckDB table the platform writes: its columns, types and meaning, in one place.

Assets create tables from these declarations and describe them in Dagster (``dagster/column_schema``) from the
same list, so the table reference, the UI and the database cannot drift apart. No Dagster imports here.
"""

from __future__ import annotations

from posttrain_assets.warehouse.model import MESSAGES_TYPE, ORIGIN_TYPE, Column, Table


def _c(name: str, type_: str, description: str, nullable: bool = True) -> Column:
    return Column(name, type_, description, nullable)


SOURCE_REF_TYPE = 'STRUCT(data_source VARCHAR, split VARCHAR, "index" BIGINT)'
# records.annotations.PairAnnotations.as_row()
ANNOTATIONS_TYPE = (
    "STRUCT(judge VARCHAR, chosen_model VARCHAR, rejected_model VARCHAR, "
    "chosen_ratings STRUCT(aspect VARCHAR, rating DOUBLE)[], rejected_ratings STRUCT(aspect VARCHAR, rating DOUBLE)[], "
    "rater_scores STRUCT(rater VARCHAR, chosen DOUBLE, rejected DOUBLE)[])"
)


PROVENANCE_COLUMNS = (
    _c("source", "VARCHAR", "registry source name (the bronze partition)", False),
    _c("file_path", "VARCHAR", "landing file the row came from (absolute path)", False),
    _c("row_number", "BIGINT", "0-based row in the file (JSONL line index, array element, Parquet row)", False),
    _c("record_sha256", "VARCHAR", "sha256 of the row's raw bytes", False),
)

BRONZE_RECORDS = Table(
    "bronze",
    "records",
    "One row per input record, raw payload unchanged, partitioned by source (a view over one table per source).",
    (
        *PROVENANCE_COLUMNS,
        _c("payload", "VARCHAR", "the raw row text (JSON line, array element or Parquet row as JSON)", False),
        _c(
            "decode_error",
            "VARCHAR",
            "where the row's bytes are not UTF-8 (payload then has U+FFFD); 'file broken: <why>' on the row that "
            "ends a file whose content stopped decoding (payload: what was read after the last whole row)",
        ),
        _c("file_sha256", "VARCHAR", "sha256 of the whole landing file", False),
        _c("ingested_at", "TIMESTAMP WITH TIME ZONE", "when this partition was (re)ingested", False),
        _c("run_id", "VARCHAR", "Dagster run that ingested the row", False),
    ),
)


RECORD_COLUMNS = (
    _c("id", "VARCHAR", "stable content hash of regime + content (sha256, 32 hex)", False),
    _c("source", "VARCHAR", "registry source name", False),
    _c("regime", "VARCHAR", "sft | preference | rl", False),
    _c(
        "messages",
        MESSAGES_TYPE,
        "sft: whole conversation; preference/rl: the prompt conversation. Each turn: role, content ('' for an "
        "assistant turn that only calls tools) and, where the source gives them, reasoning_content (assistant), "
        "tool_calls (assistant: id, type, function name and arguments as JSON text), tool_call_id and name (tool)",
        False,
    ),
    _c(
        "tools",
        "VARCHAR",
        "the conversation's tool definitions as JSON ([{type: function, function: {name, description, parameters "
        "(JSON Schema)}}]), passed to the chat template as tools=; null when it declares none",
    ),
    _c("prompt", "VARCHAR", "last user turn of the conversation / prompt", False),
    _c("response", "VARCHAR", "sft: last assistant turn"),
    _c("chosen", "VARCHAR", "preference: preferred final assistant response"),
    _c("rejected", "VARCHAR", "preference: dispreferred final assistant response"),
    _c("answer", "VARCHAR", "rl: gold answer the verifier checks against"),
    _c("verifier", "VARCHAR", "rl: verifier name (exact_match | numeric | math | python_eval)"),
    _c("lang", "VARCHAR", "language code (filled by the quality gate)"),
    _c("difficulty", "DOUBLE", "difficulty in [0, 1] as given by the source (rl)"),
    _c(
        "token_count",
        "INTEGER",
        "tokens of the chat-template rendering with the project tokenizer (preference: prompt + longer response; rl: "
        "prompt + generation prompt); null for sft rows, counted by the encode that builds their tokens "
        "(silver.sft_tokenized.num_tokens)",
    ),
    _c("license", "VARCHAR", "SPDX-like license id of the source", False),
    _c("origin", ORIGIN_TYPE, "provenance: source, uri (registry origin), file, row, record and file sha256", False),
    _c("created_at", "TIMESTAMP WITH TIME ZONE", "modification time of the landing file the row came from", False),
    _c("domain", "VARCHAR", "task domain, e.g. math/arithmetic (rl)"),
    _c("source_kind", "VARCHAR", "human | ai | synthetic, from the registry", False),
    _c("score_chosen", "DOUBLE", "preference: score of the chosen response, when the source has one"),
    _c("score_rejected", "DOUBLE", "preference: score of the rejected response, when the source has one"),
    _c(
        "source_ref",
        SOURCE_REF_TYPE,
        "the row's place in its own dataset as the landing row gives it: data_source (a verl row's, or the dataset "
        "of the GSM8K/MATH formats), split and index (a verl row's extra_info); null where it gives none",
    ),
    _c(
        "tests",
        "VARCHAR",
        "rl, python_eval: the unit tests the verifier runs a solution against (Python source with asserts that "
        "call the solution's functions); null elsewhere, and for a python_eval row whose source gives none",
    ),
    _c(
        "annotations",
        ANNOTATIONS_TYPE,
        "preference: who labelled the pair, where the source says: judge, chosen_model and rejected_model (the models "
        "that wrote the responses), chosen_ratings and rejected_ratings (aspect, rating), rater_scores (rater, "
        "chosen, rejected: one per annotator); null elsewhere and where the source gives none",
    ),
)

SILVER_RECORDS = Table(
    "silver",
    "records",
    "The canonical training corpus, cleaned: every valid row of every training source that passed the quality "
    "gate and decontamination, one row per (near-)distinct content; duplicates are in silver.dedup_clusters.",
    RECORD_COLUMNS,
)

SILVER_EVAL_RECORDS = Table(
    "silver",
    "eval_records",
    "Valid rows of evaluation sources (role: eval): never trained on, kept as the decontamination reference.",
    RECORD_COLUMNS,
)

SILVER_QUARANTINE = Table(
    "silver",
    "quarantine",
    "Every bronze row that could not be parsed or validated, or that the shared cleaning pass removed (quality "
    "gate, decontamination, cross-regime leak policy), with its raw payload, the stage and the reason.",
    (
        *PROVENANCE_COLUMNS,
        _c("id", "VARCHAR", "content id, for rows that parsed (null for parse failures)"),
        _c("stage", "VARCHAR", "canonical | quality | decontamination | leak", False),
        _c("reason", "VARCHAR", "reason code (see docs/tables.md)", False),
        _c("field", "VARCHAR", "offending field as a dotted path, when one is to blame"),
        _c("message", "VARCHAR", "human-readable error naming the file, row and field", False),
        _c("payload", "VARCHAR", "the raw row text", False),
    ),
)

SILVER_DEDUP_CLUSTERS = Table(
    "silver",
    "dedup_clusters",
    "One row per dropped duplicate: which kept row it collapsed onto, by which method and how similar.",
    (
        _c("cluster_id", "VARCHAR", "cluster identifier (the kept row's id)", False),
        _c("kept_id", "VARCHAR", "id of the kept twin in silver.records", False),
        _c("member_id", "VARCHAR", "content id of the dropped row", False),
        *PROVENANCE_COLUMNS,
        _c(
            "method",
            "VARCHAR",
            "exact (same content id) / exact_normalized (same after NFKC, case, whitespace folding) / near (MinHash)",
            False,
        ),
        _c("similarity", "DOUBLE", "word-level edit similarity to the kept twin (1.0 for exact)", False),
    ),
)


def _pick(names: tuple[str, ...]) -> tuple[Column, ...]:
    by_name = {c.name: c for c in RECORD_COLUMNS}
    return tuple(by_name[n] for n in names)


# Per regime, the fields the projection table (shared/docs/data-by-regime.txt) requires, beyond
# the ones every row must have (id, source, license, origin).
REQUIRED_FOR_ALL = ("id", "source", "regime", "messages", "prompt", "license", "origin", "created_at", "source_kind")
REQUIRED_BY_REGIME = {
    "sft": ("response",),
    "preference": ("chosen", "rejected"),
    "rl": ("answer", "verifier"),
}

TOKENIZER_COLUMNS = (
    _c("tokenizer_sha256", "VARCHAR", "hash of the tokenizer (vocab, merges, special tokens)", False),
    _c("chat_template_sha256", "VARCHAR", "hash of the chat template that rendered the row", False),
)

SILVER_SFT_TOKENIZED = Table(
    "silver",
    "sft_tokenized",
    "Every SFT row of silver.records rendered with the chat template and tokenised, with assistant-only labels "
    "(-100 on every untrained position). Rows that cannot be masked exactly are in silver.sft_quarantine.",
    (
        _c("id", "VARCHAR", "silver.records id", False),
        _c("source", "VARCHAR", "registry source name", False),
        _c("input_ids", "INTEGER[]", "token ids of the chat-template rendering", False),
        _c("labels", "INTEGER[]", "input id where trained, -100 elsewhere (unshifted)", False),
        _c("num_tokens", "INTEGER", "len(input_ids)", False),
        _c("num_trainable_tokens", "INTEGER", "positions whose label is not -100", False),
        _c("num_messages", "INTEGER", "leading messages rendered (fewer than the conversation when truncated)", False),
        _c("truncated", "BOOLEAN", "cut at a turn boundary to fit max_seq_len", False),
        _c("train_on", "VARCHAR", "all_assistant | last_assistant", False),
        _c("train_reasoning", "VARCHAR", "all | last | none: which assistant turns' reasoning is trained", False),
        _c("end_of_turn", "VARCHAR", "end-of-turn marker override (null: detected from the template)"),
        *TOKENIZER_COLUMNS,
        _c("max_seq_len", "INTEGER", "the token budget the row was fitted to (num_tokens <= max_seq_len)", False),
    ),
)

SILVER_SFT_QUARANTINE = Table(
    "silver",
    "sft_quarantine",
    "SFT rows of silver.records kept out of gold.sft because no exact loss mask could be built, with the reason.",
    (
        _c("id", "VARCHAR", "silver.records id", False),
        _c("source", "VARCHAR", "registry source name", False),
        _c(
            "reason", "VARCHAR", "too_long | no_trainable_tokens | template_error | mask_boundary_straddle | ...", False
        ),
        _c("message", "VARCHAR", "human-readable explanation", False),
        *TOKENIZER_COLUMNS,
    ),
)

GOLD_SFT = Table(
    "gold",
    "sft",
    "Training-ready SFT rows: the conversation, its tokens and assistant-only labels, proven by loss_mask_check.",
    (
        *_pick(("id", "source", "source_kind", "messages", "tools", "response")),
        *SILVER_SFT_TOKENIZED.columns[2:8],
        *_pick(("lang", "license", "origin", "created_at")),
        *TOKENIZER_COLUMNS,
        SILVER_SFT_TOKENIZED.column("max_seq_len"),
    ),
)


SILVER_CONTAMINATION = Table(
    "silver",
    "contamination",
    "Every overlap between a training row and an evaluation row (shared word n-gram, or a short prompt equal to "
    "an eval prompt); the training rows are removed by the cleaning pass.",
    (
        _c("id", "VARCHAR", "training row id (in silver.quarantine with stage decontamination)", False),
        _c("source", "VARCHAR", "training source", False),
        _c("benchmark", "VARCHAR", "evaluation source (role: eval)", False),
        _c("eval_id", "VARCHAR", "id of the evaluation row in silver.eval_records", False),
        _c("field", "VARCHAR", "training field that overlaps (messages[i], chosen, answer, ...)", False),
        _c("eval_field", "VARCHAR", "prompt | answer", False),
        _c("shared_ngrams", "INTEGER", "distinct shared n-grams (0 for a whole short-prompt match)", False),
        _c("ngram_text", "VARCHAR", "the first shared n-gram, normalised", False),
    ),
)

SILVER_CROSS_REGIME_LEAKS = Table(
    "silver",
    "cross_regime_leaks",
    "Prompts (normalised last user turn) found in more than one regime, with the ids of the rows that carry them.",
    (
        _c("prompt_key", "VARCHAR", "sha256 of the normalised prompt", False),
        _c("prompt", "VARCHAR", "the prompt as first seen", False),
        _c("regimes", "VARCHAR[]", "regimes the prompt occurs in", False),
        _c("ids", "VARCHAR[]", "silver row ids carrying it", False),
    ),
)

PAIR_COLUMNS = (
    *_pick(
        ("id", "source", "source_kind", "messages", "prompt", "chosen", "rejected", "score_chosen", "score_rejected")
    ),
    *_pick(("annotations",)),
    _c("score_margin", "DOUBLE", "score_chosen - score_rejected, when both scores exist"),
    _c("chosen_tokens", "INTEGER", "tokens of the chosen response (project tokenizer, no special tokens)", False),
    _c("rejected_tokens", "INTEGER", "tokens of the rejected response", False),
    _c("length_diff", "INTEGER", "chosen_tokens - rejected_tokens", False),
    _c("is_tie", "BOOLEAN", "chosen and rejected are identical or near-identical after normalisation", False),
    *_pick(("token_count", "lang", "license", "origin", "created_at")),
)

SILVER_PREFERENCE_PAIRS = Table(
    "silver",
    "preference_pairs",
    "Every preference pair of the corpus with its length and tie audit columns; length_confound_check judges it.",
    PAIR_COLUMNS,
)

SILVER_PREFERENCE_PAIRS_BALANCED = Table(
    "silver",
    "preference_pairs_balanced",
    "The pairs left after subsampling offending sources by matched length-difference strata, and dropping ties.",
    PAIR_COLUMNS,
)

SILVER_PREFERENCE_BALANCE_DROPS = Table(
    "silver",
    "preference_balance_drops",
    "Every pair left out of the balanced set, and why (tie, low_margin, annotator_disagreement, length_balance, "
    "cannot_balance).",
    (
        _c("id", "VARCHAR", "pair id (silver.preference_pairs)", False),
        _c("source", "VARCHAR", "registry source name", False),
        _c(
            "reason",
            "VARCHAR",
            "tie | low_margin | annotator_disagreement | length_balance | cannot_balance (docs/preference-audit.md)",
            False,
        ),
    ),
)

SILVER_PREFERENCE_JUDGE_AUDIT = Table(
    "silver",
    "preference_judge_audit",
    "Judge-bias audit of the AI-labelled preference sources: length and style markers (lists, headers, hedging) of "
    "chosen vs rejected, per source, per judge and per model of the chosen response.",
    (
        _c("source", "VARCHAR", "registry source name", False),
        _c("stratum_kind", "VARCHAR", "source | judge | chosen_model", False),
        _c("stratum", "VARCHAR", "the source, the judge, or the model that wrote the chosen response", False),
        _c("feature", "VARCHAR", "tokens | list | header | hedge", False),
        _c("pairs", "INTEGER", "pairs in the stratum", False),
        _c("chosen_mean", "DOUBLE", "mean of the feature on the chosen side (a marker: share having it)", False),
        _c("rejected_mean", "DOUBLE", "mean of the feature on the rejected side", False),
        _c("differing_pairs", "INTEGER", "pairs whose two sides differ in the feature", False),
        _c("chosen_higher_share", "DOUBLE", "share of pairs whose chosen side has more of it (equal = half)", False),
        _c("point_biserial_r", "DOUBLE", "mean(d) / rms(d), d = chosen - rejected value (symmetrised r)", False),
    ),
)

SILVER_PREFERENCE_AGREEMENT = Table(
    "silver",
    "preference_agreement",
    "Inter-annotator agreement per preference source, over the pairs that two or more annotators scored.",
    (
        _c("source", "VARCHAR", "registry source name", False),
        _c("rated_pairs", "INTEGER", "pairs with scores of two or more annotators", False),
        _c("raters", "INTEGER", "distinct annotators of those pairs", False),
        _c("ratings", "INTEGER", "annotator scorings of those pairs", False),
        _c("label_agreement", "DOUBLE", "mean share of a pair's annotators preferring the chosen side", False),
        _c("order_agreement", "DOUBLE", "mean share of a pair's annotator pairs giving the same order", False),
        _c("order_alpha", "DOUBLE", "Krippendorff's alpha of the annotators' orders (ordinal), units = pairs"),
        _c("rating_alpha", "DOUBLE", "Krippendorff's alpha of the annotators' scores (interval), units = responses"),
        _c("disagreeing_pairs", "INTEGER", "rated pairs whose label agreement is below min_pair_agreement", False),
    ),
)

SILVER_PREFERENCE_AUDIT = Table(
    "silver",
    "preference_audit",
    "Length-confound and tie statistics of silver.preference_pairs per source, per source kind and overall.",
    (
        _c("group_kind", "VARCHAR", "source | source_kind | overall", False),
        _c("group_name", "VARCHAR", "the source, the kind, or 'all'", False),
        _c("pairs", "INTEGER", "pairs in the group", False),
        _c("chosen_longer_share", "DOUBLE", "share of pairs whose chosen side has more tokens (equal = half)", False),
        _c("share_ci_low", "DOUBLE", "Wilson 95% interval, low", False),
        _c("share_ci_high", "DOUBLE", "Wilson 95% interval, high", False),
        _c("mean_length_ratio", "DOUBLE", "mean of chosen/rejected tokens", False),
        _c("median_length_ratio", "DOUBLE", "median of chosen/rejected tokens", False),
        _c("length_diff_mean", "DOUBLE", "mean of chosen - rejected tokens", False),
        _c("length_diff_median", "DOUBLE", "median of chosen - rejected tokens", False),
        _c("length_auc_unpaired", "DOUBLE", "Mann-Whitney AUC of chosen vs rejected lengths", False),
        _c("point_biserial_r", "DOUBLE", "correlation of length difference and label (symmetrised)", False),
        _c("rank_biserial_r", "DOUBLE", "matched-pairs rank-biserial correlation (robust companion of r)", False),
        _c("tie_rate", "DOUBLE", "share of identical or near-identical pairs", False),
        _c("scored_pairs", "INTEGER", "pairs with both scores", False),
        _c("score_tie_rate", "DOUBLE", "share of scored pairs with equal scores"),
        _c("score_margin_mean", "DOUBLE", "mean score margin"),
        _c("score_margin_median", "DOUBLE", "median score margin"),
    ),
)

GOLD_PREFERENCE = Table(
    "gold",
    "preference",
    "Training-ready preference pairs (DPO/IPO/KTO/RM): the prompt conversation, chosen and rejected responses, "
    "written only when length_confound_check passes.",
    PAIR_COLUMNS,
)

GOLD_PREFERENCE_LENGTH_BALANCED = Table(
    "gold",
    "preference_length_balanced",
    "The length-balanced remedy: silver.preference_pairs_balanced, for when the full set fails the length gate.",
    PAIR_COLUMNS,
)

SILVER_RL_CERTIFICATION = Table(
    "silver",
    "rl_certification",
    "Every RL seed's certification: its verifier scored the gold answer 1.0 in each of 3 separate processes and a "
    "perturbed wrong answer 0.0, or the reason it did not.",
    (
        _c("id", "VARCHAR", "silver.records id", False),
        _c("source", "VARCHAR", "registry source name", False),
        _c("verifier", "VARCHAR", "verifier name", False),
        _c("verifier_version", "VARCHAR", "verifier version that certified the seed", False),
        _c(
            "certified", "BOOLEAN", "true when every run accepted the gold answer and rejected the perturbed one", False
        ),
        _c(
            "reason", "VARCHAR", "why not: gold_not_accepted / nondeterministic / perturbation_accepted / timeout / ..."
        ),
        _c("gold_scores", "DOUBLE[]", "the gold answer's score in each run", False),
        _c("perturbed_score", "DOUBLE", "the perturbed wrong answer's score", False),
    ),
)

SILVER_RL_DIFFICULTY = Table(
    "silver",
    "rl_difficulty",
    "Difficulty estimates from real policy rollouts, one row per (seed, lineage); responses are never stored. "
    "Incremental: a seed is sampled again only for a new lineage (model, file hash, sampling, K, seed, verifier).",
    (
        _c("id", "VARCHAR", "silver.records id", False),
        _c("lineage", "VARCHAR", "hash of everything the estimate depends on", False),
        _c("model", "VARCHAR", "policy model name", False),
        _c("model_sha256", "VARCHAR", "sha256 of the model file", False),
        _c("sampling", "VARCHAR", "sampling parameters as JSON (temperature, top_p, max_new_tokens, k, seed)", False),
        _c("verifier", "VARCHAR", "verifier that scored the samples", False),
        _c("verifier_version", "VARCHAR", "its version", False),
        _c("k", "INTEGER", "samples drawn", False),
        _c("passes", "INTEGER", "samples the verifier scored 1.0", False),
        _c("pass_rate", "DOUBLE", "passes / k", False),
        _c("difficulty", "DOUBLE", "1 - pass_rate", False),
        _c("truncated", "INTEGER", "samples that hit max_new_tokens", False),
        _c("estimated_at", "TIMESTAMP WITH TIME ZONE", "when the estimate was made", False),
    ),
)

GOLD_RL_PROMPTS = Table(
    "gold",
    "rl_prompts",
    "The RLVR prompt bank: certified seeds (prompt, gold answer, verifier and its version), curated to the pass-rate "
    "band where a policy learns; responses are never stored.",
    (
        *_pick(("id", "source", "source_kind", "messages", "prompt", "answer", "verifier")),
        _c("verifier_version", "VARCHAR", "version of the verifier that certified the seed", False),
        _c("domain", "VARCHAR", "task domain, e.g. math/arithmetic"),
        _c("difficulty", "DOUBLE", "1 - pass rate of the policy rollouts (null: not estimated yet)"),
        _c("difficulty_source", "DOUBLE", "difficulty as the source gave it, never overwritten"),
        _c("pass_rate", "DOUBLE", "policy pass rate at K samples (null: not estimated yet)"),
        _c("difficulty_k", "INTEGER", "K of the estimate"),
        _c("difficulty_lineage", "VARCHAR", "lineage of the estimate (silver.rl_difficulty)"),
        _c("difficulty_estimated", "BOOLEAN", "false when no estimate exists yet for the seed", False),
        *_pick(("token_count", "lang", "license", "origin", "created_at", "source_ref", "tests")),
    ),
)

CHECK_VERDICTS = Table(
    "checks",
    "verdicts",
    "The latest verdict of every asset check, one row per check, written by the check itself (the dataset cards "
    "read them from here).",
    (
        _c("asset", "VARCHAR", "the checked asset's key, e.g. silver/records", False),
        _c("check_name", "VARCHAR", "the check's name", False),
        _c("passed", "BOOLEAN", "the verdict", False),
        _c("severity", "VARCHAR", "ERROR (blocks what is downstream when it fails) or WARN", False),
        _c("description", "VARCHAR", "the check's one-line summary"),
        _c("evaluated_at", "TIMESTAMP WITH TIME ZONE", "when the check ran", False),
    ),
)

ALL_TABLES = (
    BRONZE_RECORDS,
    SILVER_RECORDS,
    SILVER_EVAL_RECORDS,
    SILVER_QUARANTINE,
    SILVER_DEDUP_CLUSTERS,
    SILVER_CONTAMINATION,
    SILVER_CROSS_REGIME_LEAKS,
    SILVER_SFT_TOKENIZED,
    SILVER_SFT_QUARANTINE,
    SILVER_PREFERENCE_PAIRS,
    SILVER_PREFERENCE_PAIRS_BALANCED,
    SILVER_PREFERENCE_BALANCE_DROPS,
    SILVER_PREFERENCE_AUDIT,
    SILVER_PREFERENCE_JUDGE_AUDIT,
    SILVER_PREFERENCE_AGREEMENT,
    GOLD_SFT,
    GOLD_PREFERENCE,
    GOLD_PREFERENCE_LENGTH_BALANCED,
    SILVER_RL_CERTIFICATION,
    SILVER_RL_DIFFICULTY,
    GOLD_RL_PROMPTS,
)
