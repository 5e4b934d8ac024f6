"""Curation beyond cleaning: embeddings of the dedup units, semantic near-duplicates, diversity selection and
reproducible mixtures with token budgets (docs/curation.md). Pure: DuckDB connections and numpy, no Dagster.

The embedding model is an optional dependency (the ``curation`` extra); nothing here imports it until an
embedder is loaded, so the rest of the package works without it.
"""
