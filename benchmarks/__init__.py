"""The benchmark: a seeded synthetic corpus through the real graph, beside its peers (not runtime code)."""
