"""Dagster definitions, one module per concern; loaded by ``load_from_defs_folder``."""
