"""The ``harness`` fixture (one per backend of :data:`tests.contract.backends.HARNESSES`), and JAX's persistent
compilation cache for the session.

Every contract test builds new trainers, so JAX compiles their steps again (a new ``jax.jit`` function each time),
the same programs over and over: a persistent compilation cache in a temporary directory of this session
(``JAX_COMPILATION_CACHE_DIR``, every compilation cached: ``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0``) loads
them instead, also in the subprocesses of the checkpoint tests, which inherit the environment. It is set here before
JAX is imported (or through ``jax.config`` when it already was), unless the environment chose a cache; the other
backends never read it.
"""

import atexit
import os
import shutil
import sys
import tempfile

import pytest

from tests.contract.backends import HARNESSES

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="mlpug-contract-jax-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    if "jax" in sys.modules:  # imported already: its configuration read the environment before
        sys.modules["jax"].config.update("jax_compilation_cache_dir", _cache)
        sys.modules["jax"].config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


@pytest.fixture(params=sorted(HARNESSES), scope="module")
def harness(request):
    return HARNESSES[request.param]()
