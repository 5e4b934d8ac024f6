"""Jobs: ingest one source partition into bronze; refresh everything downstream of bronze."""

import dagster as dg

from posttrain_assets.defs.bronze import source_partitions
from posttrain_assets.settings import CURATION, setting

BRONZE = dg.AssetSelection.assets(["bronze", "records"])

ingest_source_job = dg.define_asset_job(
    "ingest_source",
    selection=BRONZE,
    partitions_def=source_partitions,
    description="Re-ingest one registry source (a bronze partition) from its landing files.",
)

PUBLISH = dg.AssetSelection.groups("publish")

# Curation (embeddings, semantic duplicates, diversity selection, mixtures; docs/curation.md) is opt-in: its own
# `curate` job runs it, and the refresh includes it only when POSTTRAIN_CURATION is "on" as the definitions load.
CURATION_GROUP = dg.AssetSelection.groups("curation")


def refreshed(curation: bool) -> dg.AssetSelection:
    """What refresh_corpus materialises: everything downstream of bronze but publish, and curation if asked."""
    selection = dg.AssetSelection.all() - BRONZE - PUBLISH
    return selection if curation else selection - CURATION_GROUP


refresh_corpus_job = dg.define_asset_job(
    "refresh_corpus",
    selection=refreshed(setting(CURATION) == "on"),
    description="Rebuild silver and gold from bronze, running every check; blocking checks stop gold.",
)

publish_job = dg.define_asset_job(
    "publish",
    selection=PUBLISH,
    description="The provenance view and audit over every gold table, then the trainer-ready exports. A separate run, "
    "so a gold table held back by its gate does not stop the others from being published.",
)

estimate_rl_difficulty_job = dg.define_asset_job(
    "estimate_rl_difficulty",
    selection=dg.AssetSelection.assets(["silver", "rl_difficulty"], ["gold", "rl_prompts"]),
    description="Sample a batch of pending RL seeds with the policy (SmolLM2-135M-Instruct, extra `policy`), then "
    "re-curate the bank. Run it repeatedly (or on a schedule): each run only samples seeds without an estimate.",
    # Sized by tokens, not prompts: 131,072 tokens at K = 8 x 256 is 64 prompts, 4 times rollout version 1's 16 per
    # run, about the same wall time at the batched decoder's measured speed-up (median 4.1x side by side on the
    # shared 2-core machines; benchmarks/rollouts.py, docs/rl-bank.md).
    config={
        "ops": {
            "silver__rl_difficulty": {
                "config": {"max_prompts": 100_000, "token_budget": 131_072, "k": 8, "max_new_tokens": 256}
            }
        }
    },
)
