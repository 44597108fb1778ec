"""Property-based fuzz tests (hypothesis): bounded, deterministic budgets, part of the normal suite."""
