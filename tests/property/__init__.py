"""Property-based tests: generated hostile input, refused everywhere it can enter."""
