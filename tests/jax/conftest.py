"""JAX tests: the whole directory is left out (not collected) when JAX, Flax or optax cannot be imported."""

import importlib.util

if not all(importlib.util.find_spec(name) for name in ("jax", "flax", "optax")):
    collect_ignore_glob = ["test_*.py"]
