"""Rows as Weights & Biases history, offline by default (`writers: [jsonl, wandb]`).

Imported only when a config names the `wandb` writer (it needs the `wandb`
package: `pip install 'iterjax[wandb]'`). The run is written under
`<run>/wandb/` in offline mode unless `WANDB_MODE` says otherwise; upload it
later with `wandb sync <run>/wandb/offline-run-*`.
"""

import os
import pathlib

import wandb
import yaml

from .writers import scalars


class WandbWriter:
    """One W&B run per iterjax run: its resolved `config.yaml` as the run's
    config, each logged row as history at the row's `step`, keys
    `namespace/key` (nested keys dotted), as the TensorBoard writer names them.

    W&B requires a run's steps to increase; a row whose step is behind the last
    one (another namespace, e.g. a sweep's summary after its members) is logged
    at W&B's own step (merged into its last history row, or the next), so it is
    kept rather than dropped.
    """

    def __init__(self, path):
        path = pathlib.Path(path)
        config = path / "config.yaml"
        self._path, self._name = path, f"{path.parent.name}/{path.name}"
        self._run = _init(
            path,
            self._name,
            yaml.safe_load(config.read_text()) if config.exists() else None,
        )
        self._step = -1

    def write_member(self, index, settings, metrics):
        """Sweep member `index` as a W&B run of its own, grouped under the
        sweep's: its swept settings as config, its numeric metrics logged once
        (`sweep/<metric>`), in `wandb-members/NNN/wandb/`."""
        where = self._path / "wandb-members" / f"{index:03d}"
        where.mkdir(parents=True, exist_ok=True)
        name = f"{self._name}/member-{index:03d}"
        run = _init(where, name, dict(settings), group=self._name)
        row = {"namespace": "sweep", "step": 0, **metrics}
        run.log(scalars(row), step=0)
        run.finish()

    def write(self, row):
        values, step = scalars(row), int(row["step"])
        if step >= self._step:
            self._run.log(values, step=step)
            self._step = step
        else:
            self._run.log(values)

    def close(self):
        self._run.finish()


def _init(path, name, config, group=None):
    """A W&B run written under `path/wandb/`, offline unless WANDB_MODE says."""
    return wandb.init(
        dir=str(path),
        mode=os.environ.get("WANDB_MODE", "offline"),
        project=os.environ.get("WANDB_PROJECT", "iterjax"),
        name=name,
        group=group,
        config=config,
        settings=wandb.Settings(console="off", silent=True),
        reinit="create_new",
    )
