import atexit
import gc
import os
import shutil
import tempfile

# The suite is dominated by XLA compile time, not run time: skip the expensive
# LLVM passes, and emit fusions with XLA's older elemental emitter, which compiles
# the suite's small programs in about 40% of the time of the MLIR fusion emitters
# (results agree to rounding); and codegen each program in one piece, not split
# over threads that the two xdist workers' compiles then contend for (5-15% less
# CPU time). Set before jax starts; subprocesses (README examples,
# helpers.run_on_host_devices) inherit it.
TEST_XLA_FLAGS = (
    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
    "--xla_cpu_use_fusion_emitters=false --xla_cpu_parallel_codegen_split_count=1"
)
os.environ.setdefault("XLA_FLAGS", TEST_XLA_FLAGS)
# One on-disk compilation cache for the session, shared by the xdist workers and
# the subprocesses: a program compiled once (in another worker, or in a module
# before `_release_compiled_code` dropped it) is loaded, not compiled again. The
# controller creates it before the workers start, and they inherit the variable.
if "PYTEST_XDIST_WORKER" not in os.environ and (
    "JAX_COMPILATION_CACHE_DIR" not in os.environ
):
    _cache = tempfile.mkdtemp(prefix="iterjax-tests-jit-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")

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
settings.register_profile(  # make test-fast: the edit-test loop
    "fast",
    max_examples=4,
    deadline=None,
    derandomize=True,
    suppress_health_check=_slow_ok,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_addoption(parser):
    parser.addoption(
        "--first-case",
        action="store_true",
        help="run each parametrized test on its first parameter set only "
        "(make test-fast: every test function once; make test runs every case)",
    )


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--first-case"):
        return
    seen, keep, drop = set(), [], []
    for item in items:
        key = (item.nodeid.split("[")[0],)
        if getattr(item, "callspec", None) is not None and key in seen:
            drop.append(item)
        else:
            seen.add(key)
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture
def getkey():
    keys = iter(jax.random.split(jax.random.PRNGKey(0), 1000))
    return lambda: next(keys)


# Memory mappings a worker may hold before it drops its compiled code (the
# kernel's default `vm.max_map_count` is 65530; the most one module added in a
# measured run was ~22k). 24k (half the drops) measured no faster on the clean
# CI (9:55-10:59 against 9:20-10:12 at 12k, within this machine's spread).
MAX_MAPPINGS = 12_000


def _mappings() -> int:
    """This process's memory mappings; unknown (off Linux): as if at the limit."""
    try:
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return MAX_MAPPINGS


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
    """Drop JAX's compiled executables after a test module, once they are many.

    A worker that keeps every executable of ~400 tests holds ~65k memory
    mappings, the kernel's default `vm.max_map_count`, and XLA segfaults on the
    next compile. Dropping them only when the mappings near that (not after
    every module) spares the frees and the recompiles of programs that later
    modules share. Nothing a later module needs is lost but compile time."""
    yield
    if _mappings() > MAX_MAPPINGS:
        jax.clear_caches()
        gc.collect()
