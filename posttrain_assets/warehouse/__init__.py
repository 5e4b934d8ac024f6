"""Warehouse: the table model, the catalogue of every table, DuckDB I/O, the bronze view, table-level validations."""
