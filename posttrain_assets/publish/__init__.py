"""Publish: trainer-ready exports of the gold tables and the provenance trace of every gold row."""
