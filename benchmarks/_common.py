"""Memory and table helpers shared by the benchmarks (timing: iterjax.diagnostics)."""

from iterjax.diagnostics import compiled_memory


def compiled_bytes(f, *args):
    """(temp bytes, total bytes): `iterjax.diagnostics.compiled_memory`."""
    m = compiled_memory(f, *args)
    return m["temp"], m["total"]


def markdown(headers, rows):
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)
