"""Memory and table helpers shared by the benchmarks (timing: iterjax.diagnostics)."""

from iterjax.diagnostics import compiled_memory
from iterjax.lab.tables import markdown_table


def compiled_bytes(f, *args):
    """(temp bytes, total bytes): `iterjax.diagnostics.compiled_memory`."""
    m = compiled_memory(f, *args)
    return m["temp"], m["total"]


markdown = markdown_table
