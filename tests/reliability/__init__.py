"""Reliability and security: bad inputs, damaged artifacts, fuzzing, concurrency, soak,
reproducible builds and determinism (issue 7)."""
