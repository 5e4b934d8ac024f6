"""The seeded demo landing zone that `posttrain demo` generates (not used by the pipeline itself)."""
