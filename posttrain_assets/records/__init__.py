"""Records: one canonical schema for every regime, the input formats that map raw rows to it, and the
normalisation of a bronze row."""
