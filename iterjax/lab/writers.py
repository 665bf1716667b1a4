"""Where a run's rows go besides `metrics.jsonl`: TensorBoard, W&B, or a writer
registered by name (see `Workdir`)."""

import importlib
import pathlib
import time

from tensorboardX import SummaryWriter

from .tables import STAMPS, flatten, is_number


class TensorBoardWriter:
    """Rows as TensorBoard scalars, in `<run>/tensorboard/` (tensorboardX)."""

    def __init__(self, path):
        self._dir = str(pathlib.Path(path) / "tensorboard")
        self._events = self._open()

    def _open(self, purge_step=None):
        # a file of its own: tensorboardX names event files by the second, and a
        # resume in the same second as the interruption would overwrite its file
        unique = f".{time.time_ns()}"
        return SummaryWriter(self._dir, purge_step=purge_step, filename_suffix=unique)

    def purge(self, step):
        """A resume writes the rows from `step` on again: a new event file that
        starts with TensorBoard's purge marker, so that the events the
        interrupted run wrote at those steps are dropped when it reads them."""
        self._events.close()
        self._events = self._open(purge_step=step)

    def write(self, row):
        for tag, value in scalars(row).items():
            self._events.add_scalar(tag, value, row["step"])
        self._events.flush()

    def write_member(self, index, settings, metrics):
        """Sweep member `index` as an HParams run `member-NNN`: its swept
        settings (dotted) as hyperparameters, its numeric metrics as
        `sweep/<metric>` results."""
        hparams = {
            k: v
            for k, v in flatten(settings).items()
            if isinstance(v, (bool, str)) or is_number(v)
        }
        results = {
            f"sweep/{k}": float(v) for k, v in flatten(metrics).items() if is_number(v)
        }
        self._events.add_hparams(
            hparams, results, name=f"member-{index:03d}", global_step=index
        )
        self._events.flush()

    def close(self):
        self._events.close()


def scalars(row) -> dict[str, float]:
    """A logged row's numbers as `{"namespace/key": value}` (nested keys dotted):
    the tags of the TensorBoard and W&B writers."""
    return {
        f"{row['namespace']}/{key}": float(value)
        for key, value in flatten(row).items()
        if key not in STAMPS and is_number(value)
    }


# A writer: a class, or the import path "module:Class" of one, imported when a
# config selects it (so that an optional package is needed only then).
WRITERS: dict = {
    "tensorboard": TensorBoardWriter,
    "wandb": "iterjax.lab.wandb_writer:WandbWriter",
}


def writer_class(name):
    """The class registered as writer `name` (importing it if given by path)."""
    target = WRITERS[name]
    if not isinstance(target, str):
        return target
    module, _, attr = target.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except ImportError as e:  # an optional package: name what to install
        missing = f"; install the package {e.name!r}" if e.name else ""
        raise ImportError(f"writer {name!r} ({target}): {e}{missing}") from e
