"""posttrain-assets: a Dagster medallion platform for post-training data (SFT, preference, RL)."""
