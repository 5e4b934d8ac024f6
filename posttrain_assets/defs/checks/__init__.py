"""Asset checks that gate the gold layer."""
