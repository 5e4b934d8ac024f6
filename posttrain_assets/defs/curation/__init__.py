"""Curation (opt-in): embeddings, semantic near-duplicates, diversity selection, mixtures (docs/curation.md)."""
