"""Timing and memory helpers shared by the benchmarks."""

import statistics
import time

import jax


def median_ms(f, *args, repeats=20):
    """Median wall time of a jitted call in milliseconds, after one warm-up call."""
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def interleaved_median_ms(calls, rounds=50):
    """Median ms of each `name -> (f, args)`, timed round-robin so that drift in
    machine load affects every method alike. Each is compiled and warmed first."""
    for f, args in calls.values():
        jax.block_until_ready(f(*args))
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, (f, args) in calls.items():
            t = time.perf_counter()
            jax.block_until_ready(f(*args))
            times[name].append(time.perf_counter() - t)
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


def compiled_bytes(f, *args):
    """(temp bytes, total bytes) from the compiled executable's memory analysis."""
    m = jax.jit(f).lower(*args).compile().memory_analysis()
    total = (
        m.temp_size_in_bytes
        + m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
    )
    return m.temp_size_in_bytes, total


def markdown(headers, rows):
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)
