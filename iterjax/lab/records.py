"""A run's small JSON records (`status.json`, `summary.json`, the manifest):
written whole or not at all, read with a clear error, and the config a run
started with, to refuse a resume of an edited one."""

import json
import os
import pathlib
import tempfile


class RecordError(ValueError):
    """A record that is not valid JSON (written by something else, or torn)."""


def write_json(path, obj, **dump) -> None:
    """Write `obj` to `path` through a temporary file and a rename: a reader (a
    resume, `iterjax report`) sees the old record or the new one, never half."""
    path = pathlib.Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, **dump)
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path, default=None):
    """The record at `path`, `default` when there is none; RecordError naming
    the file when it is not valid JSON."""
    path = pathlib.Path(path)
    if not path.exists():
        return default
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RecordError(f"{path} is not valid JSON ({e}); it may be torn") from None


def changed_keys(old, new, prefix="") -> list[str]:
    """The dotted keys whose values differ between two config dicts."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return [] if old == new else [prefix or "(the whole config)"]
    keys = sorted(set(old) | set(new), key=str)
    out = []
    for k in keys:
        path = f"{prefix}.{k}" if prefix else str(k)
        if k not in old or k not in new:
            out.append(path)
        else:
            out += changed_keys(old[k], new[k], path)
    return out
