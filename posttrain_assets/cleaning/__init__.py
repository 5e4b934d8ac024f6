"""Cleaning: the one shared silver pass over every regime (quality gate, decontamination, exact and near dedup)."""
