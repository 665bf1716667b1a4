"""Real UCR time series, offline: the `.ts` files that the sktime 1.2.0 wheel ships.

The DEER paper trains on UCR/UEA series (EigenWorms, 17,984 steps). Those are not
reachable offline, but the sktime wheel carries a few UCR problems as text, e.g.
ACSF1 (appliance power, 10 classes, T = 1460), OSULeaf (6 classes, T = 427) and
GunPoint (2 classes, T = 150). `make` installs the wheel with `--no-deps`; this
module only reads its files (it never imports sktime).

The `.ts` format: `#` comments, `@key value` headers, then after `@data` one
series per line, `v_1,...,v_T:label` (a univariate, equal-length problem; other
kinds are refused).
"""

import functools
import pathlib

import numpy as np

from iterjax.experiments.common.wheels import data_path

PROBLEMS = ("ACSF1", "OSULeaf", "GunPoint", "ArrowHead", "ItalyPowerDemand")


def data_dir() -> pathlib.Path:
    return data_path("sktime==1.2.0", "sktime/datasets/data", "The UCR series")


def parse_ts(text: str) -> tuple[np.ndarray, list[str], dict[str, str]]:
    """(series (N, T) float64, labels as written, headers) of a `.ts` file's text."""
    headers: dict[str, str] = {}
    lines = iter(text.splitlines())
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.lower() == "@data":
            break
        key, _, value = line[1:].partition(" ")
        headers[key.lower()] = value.strip()
    else:
        raise ValueError("not a .ts file: no @data line")
    for key in ("univariate", "equallength"):
        if headers.get(key, "true").lower() != "true":
            raise ValueError(f"only univariate equal-length problems ({key} false)")
    rows, labels = [], []
    for line in lines:
        line = line.strip()
        if not line:
            continue
        values, sep, label = line.rpartition(":")
        if not sep or ":" in values:
            raise ValueError(f"expected 'v_1,...,v_T:label', got {line[:40]!r}...")
        rows.append([float(v) for v in values.split(",")])
        labels.append(label)
    if len({len(r) for r in rows}) != 1:
        raise ValueError("series of different lengths")
    return np.asarray(rows), labels, headers


@functools.lru_cache
def load(problem: str):
    """(x_train, y_train, x_test, y_test): series (N, T) z-normalised per series as
    float64, labels int32 in 0..C-1 (ordered as the file's `@classLabel` list)."""
    if problem not in PROBLEMS:
        raise ValueError(f"unknown UCR problem {problem!r}; known: {PROBLEMS}")
    out = []
    for split in ("TRAIN", "TEST"):
        text = (data_dir() / problem / f"{problem}_{split}.ts").read_text()
        x, labels, headers = parse_ts(text)
        classes = headers["classlabel"].split()[1:]
        x = (x - x.mean(1, keepdims=True)) / (x.std(1, keepdims=True) + 1e-8)
        out += [x, np.asarray([classes.index(c) for c in labels], np.int32)]
    return tuple(out)
