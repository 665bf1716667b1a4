"""Memory and table helpers shared by the benchmarks (timing: iterjax.diagnostics)."""

import jax


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
