"""Small data helpers for the examples and tests (numpy only; no downloads at run time)."""
