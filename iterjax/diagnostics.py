"""Diagnostics: count the evaluations a solver really makes; time jitted calls."""

import collections
import dataclasses
import random
import statistics
import time

import jax


class EvalCounter:
    """Wraps `fn(y, args)` so that every evaluation and every JVP is counted.

    Counts are made on the host by `jax.debug.callback`, so they are exact under
    `jit`, inside `while_loop`s and Krylov solvers, and per element under `vmap`:
    each batch element counts at every trip of a vmapped loop, lanes that have
    finished included (they are computed, then masked), which is the work done.
    Only for measurement: the callbacks cost time.

    Examples:
      >>> import jax.numpy as jnp, iterjax
      >>> counter = iterjax.diagnostics.EvalCounter(lambda y, a: jnp.cos(y))
      >>> sol = iterjax.fixed_point(counter.fn, jnp.array(1.0), solver=iterjax.Picard())
      >>> counter.read()["f"] == int(sol.num_steps) + 1
      True
    """

    def __init__(self, fn):
        self.counts = collections.Counter()
        add = lambda key: lambda *_: self.counts.update([key])

        @jax.custom_jvp
        def counted(y, args):
            out = fn(y, args)
            # the output as an operand: batched when y or args is, so that under
            # vmap the callback runs once per element
            jax.debug.callback(add("f"), out)
            return out

        @counted.defjvp
        def counted_jvp(primals, tangents):
            out, tangent_out = jax.jvp(fn, primals, tangents)
            jax.debug.callback(add("f"), out)
            # Depending on the tangent keeps this callback in the linear part of a
            # `jax.linearize`, so it fires at every Jacobian-vector product.
            jax.debug.callback(add("jvp"), tangents[0])
            return out, tangent_out

        self.fn = counted

    def read(self) -> dict:
        """The counts so far ({'f': ..., 'jvp': ...}), after pending callbacks ran."""
        jax.effects_barrier()
        return {"f": self.counts["f"], "jvp": self.counts["jvp"]}

    def reset(self) -> None:
        jax.effects_barrier()
        self.counts.clear()


@dataclasses.dataclass(frozen=True)
class Timing:
    """Wall times of one call, in ms: the median and interquartile range over
    `rounds` timed calls (after an untimed first call), and, for a `jax.jit`
    function, the time to lower and compile it (None for other callables)."""

    median: float
    q1: float
    q3: float
    compile: float | None
    rounds: int

    def __str__(self):
        return f"{self.median:.3g} [{self.q1:.3g}, {self.q3:.3g}]"


def timings(calls: dict, rounds: int = 10) -> dict[str, Timing]:
    """`name -> Timing` for each `name -> (f, args)`, timed `rounds` times (at
    least 5, for the quartiles); a jitted f's compilation is timed apart,
    whether or not f ran before."""
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 5:
        raise ValueError(f"timings: `rounds` must be an int >= 5, got {rounds!r}")
    compile_ms = {name: _compile_ms(f, args) for name, (f, args) in calls.items()}
    out = {}
    for name, ts in _timed(calls, rounds).items():
        q1, median, q3 = statistics.quantiles(ts, n=4, method="inclusive")
        out[name] = Timing(median, q1, q3, compile_ms[name], rounds)
    return out


def _compile_ms(f, args):
    """Lowering and compiling a fresh wrapper of jitted f: XLA compiles it again
    (f's own `lower().compile()` would hit the cache of a compiled f)."""
    if not callable(getattr(f, "lower", None)):
        return None
    start = time.perf_counter()
    jax.jit(lambda *a: f(*a)).lower(*args).compile()
    return 1e3 * (time.perf_counter() - start)


def time_calls(calls: dict, rounds: int = 50) -> dict:
    """Median wall time in ms of each `name -> (f, args)`, after a warm-up call
    (`timings` for the spread and the compile time)."""
    return {name: statistics.median(ts) for name, ts in _timed(calls, rounds).items()}


def _timed(calls, rounds):
    """The `rounds` timed calls' ms per name, after a warm-up call of each.

    The calls are timed round-robin, so that drift in machine load affects every
    one alike, in a fresh (seeded) order each round: a call's time depends on which
    one ran just before it (caches, the thread pool), by up to 15% on a 2-core CPU,
    and a fixed order would bias the ratios. Compare them as ratios.
    """
    for f, args in calls.values():
        jax.block_until_ready(f(*args))
    times: dict[str, list[float]] = {name: [] for name in calls}
    order, rng = list(calls), random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            f, args = calls[name]
            start = time.perf_counter()
            jax.block_until_ready(f(*args))
            times[name].append(1e3 * (time.perf_counter() - start))
    return times


def compiled_memory(f, *args) -> dict:
    """Bytes the compiled `jax.jit(f)(*args)` needs, from XLA's memory analysis.

    Returns `{"temp": ..., "total": ...}`: `temp` is the scratch space of the
    executable (where saved activations live), `total` adds arguments and outputs
    (less aliased buffers), the executable's peak footprint. Compile-time numbers:
    no run, no device allocator, the same on every call. (Of a program compiled
    already, `jax.jit(f).lower(*args).compile()`: `executable_memory`.)
    """
    return executable_memory(jax.jit(f).lower(*args).compile())


def executable_memory(compiled) -> dict:
    """`compiled_memory`'s numbers of a compiled program (`jax.stages.Compiled`),
    without compiling it again."""
    m = compiled.memory_analysis()
    if m is None:
        raise RuntimeError("compiled_memory: this backend reports no memory analysis")
    total = (
        m.temp_size_in_bytes
        + m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
    )
    return {"temp": int(m.temp_size_in_bytes), "total": int(total)}
