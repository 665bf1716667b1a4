"""Plain-text helpers shared by runs, sweeps and reports: markdown tables,
dotted views of nested mappings, and what counts as a logged number."""

import numpy as np

# The keys `Workdir.log` stamps on every row; the rest are the row's metrics.
STAMPS = ("namespace", "step", "wall_time")


def markdown_table(headers, rows) -> str:
    """A markdown table: one header row, then one row per list of cells."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def flatten(tree, prefix="") -> dict:
    """`{'a': {'b': 1}}` -> `{'a.b': 1}`: a nested mapping with dotted keys."""
    out = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
    else:
        out[prefix.rstrip(".")] = tree
    return out


def is_number(x) -> bool:
    """A logged value that is one number: not a bool, a string or an array."""
    return (
        isinstance(x, (int, float, np.number))
        and not isinstance(x, bool)
        or (hasattr(x, "shape") and getattr(x, "shape", None) == ())
    )
