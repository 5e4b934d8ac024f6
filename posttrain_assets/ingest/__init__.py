"""Ingest: landing files -> raw bronze rows with their provenance.

Readers, bronze batches, the source registry and file fingerprints.
"""
