"""A run's small JSON records (`status.json`, `summary.json`, a checkpoint's
SHA-256 manifest): written whole or not at all, read with a clear error, values
made JSON-safe, and the config a run started with, to refuse a resume of an
edited one."""

import hashlib
import json
import math
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


MANIFEST = "iterjax-manifest.json"


def _digests(directory):
    """{relative path: SHA-256} of every file under `directory` but the manifest."""
    out = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            out[path.relative_to(directory).as_posix()] = digest
    return out


def write_manifest(directory):
    """Record the SHA-256 of every file of a finished checkpoint."""
    write_json(directory / MANIFEST, _digests(directory), indent=0)


def verify_manifest(directory):
    """None when every file recorded by `write_manifest` is present and unchanged
    (or when there is no manifest: a checkpoint from an older iterjax), else
    what is wrong."""
    path = directory / MANIFEST
    if not path.exists():
        return None
    recorded, found = json.loads(path.read_text()), _digests(directory)
    for name, digest in recorded.items():
        if name not in found:
            return f"{name} is missing"
        if found[name] != digest:
            return f"{name} does not match its SHA-256 in {MANIFEST}"
    return None


def jsonable(x):
    """Arrays to lists, NaN to null and +-inf to strings, recursively."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if hasattr(x, "tolist"):
        return jsonable(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else str(x)
    return x


def nonfinite_paths(tree, prefix=""):
    """The dotted keys of a nested mapping whose values are NaN or +-inf floats."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from nonfinite_paths(v, f"{prefix}{k}.")
    elif isinstance(tree, float) and not math.isfinite(tree):
        yield prefix.rstrip(".")


def read_series(source: str, where: str = "?") -> list[float]:
    """The values of one metric, in order, from a run's rows: `source` is
    '<run dir or metrics.jsonl>:<key>'; a missing file or key is a RecordError
    naming `where`."""
    path, _, key = source.rpartition(":")
    if not path or not key:
        raise RecordError(
            f"config key `{where}`: expected '<run dir or metrics.jsonl>:<key>', "
            f"got {source!r}"
        )
    file = pathlib.Path(path).expanduser()
    file = file / "metrics.jsonl" if file.is_dir() else file
    if not file.is_file():
        raise RecordError(f"config key `{where}`: no metrics file at {str(file)!r}")
    rows = [json.loads(line) for line in file.read_text().splitlines() if line]
    values = [float(r[key]) for r in rows if key in r]
    if not values:
        raise RecordError(f"config key `{where}`: no row of {str(file)!r} has {key!r}")
    return values
