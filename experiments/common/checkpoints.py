"""An NNX model's parameters on disk: `model.json` (what rebuilds the model) and
`params.npz` (one array per parameter, named by its path in the model)."""

import json
import pathlib
from typing import TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

M = TypeVar("M", bound=nnx.Module)


def save(model: nnx.Module, path: pathlib.Path, meta: dict) -> None:
    """Write `meta` (JSON) and the model's `nnx.Param`s under `path`."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "model.json").write_text(json.dumps(meta))
    leaves = jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))
    arrays = {jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}
    np.savez(path / "params.npz", **arrays)  # type: ignore[arg-type]  # numpy's stub


def meta(path: pathlib.Path) -> dict:
    return json.loads((path / "model.json").read_text())


def restore(model: M, path: pathlib.Path) -> M:
    """Load the parameters saved under `path` into `model` (built from `meta`);
    a checkpoint whose parameter names differ is refused."""
    saved = np.load(path / "params.npz")
    state = nnx.state(model, nnx.Param)
    paths, treedef = jax.tree_util.tree_flatten_with_path(state)
    names = [jax.tree_util.keystr(k) for k, _ in paths]
    if sorted(names) != sorted(saved.files):
        raise ValueError(f"checkpoint {path} does not match the model")
    leaves = [jnp.asarray(saved[n]) for n in names]
    nnx.update(model, jax.tree_util.tree_unflatten(treedef, leaves))
    return model


def find(setting: str, workdir, trainer: str, user: str) -> pathlib.Path | None:
    """Where a config's `checkpoint: ...` setting points: None for "" (train
    here), the newest `runs/<trainer>/*/checkpoint` beside this run for
    "latest" (FileNotFoundError naming both experiments when there is none),
    else the path given."""
    if setting == "":
        return None
    if setting != "latest":
        return pathlib.Path(setting)
    runs = sorted((workdir.path.parent.parent / trainer).glob("*/checkpoint"))
    if not runs:
        raise FileNotFoundError(
            f"{user}: no {trainer} checkpoint under runs/; run `iterjax run "
            f"{trainer}` first, or set checkpoint=''"
        )
    return runs[-1]
