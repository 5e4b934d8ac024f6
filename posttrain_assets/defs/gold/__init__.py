"""Gold layer: regime projections of silver, materialised only past the blocking checks."""
