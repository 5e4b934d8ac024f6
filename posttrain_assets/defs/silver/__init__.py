"""Silver layer: the canonical corpus and its per-regime preparations."""
