import gc
import os

# The suite is dominated by XLA compile time, not run time: skip the expensive
# LLVM passes (about 20% off the suite; results agree to rounding). Set before
# jax starts; subprocesses (README examples) inherit it.
os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true",
)

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")

# Property-based tests (tests/test_properties.py): a bounded, reproducible number
# of examples in the suite ("ci"); HYPOTHESIS_PROFILE=deep searches much longer.
_slow_ok = [HealthCheck.too_slow, HealthCheck.differing_executors]
settings.register_profile(
    "ci",
    max_examples=12,
    deadline=None,
    derandomize=True,
    suppress_health_check=_slow_ok,
)
settings.register_profile(
    "deep", max_examples=400, deadline=None, suppress_health_check=_slow_ok
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def getkey():
    keys = iter(jax.random.split(jax.random.PRNGKey(0), 1000))
    return lambda: next(keys)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
    """Drop JAX's compiled executables after each test module.

    A worker that keeps every executable of ~400 tests holds ~65k memory
    mappings, the kernel's default `vm.max_map_count`, and XLA segfaults on the
    next compile. Nothing a later module needs is lost but compile time."""
    yield
    jax.clear_caches()
    gc.collect()
