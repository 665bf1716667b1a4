"""The run directory an experiment writes to: metrics, plots, progress, checkpoints."""

import contextlib
import json
import numbers
import pathlib
import sys
import time
import warnings

import jax
import matplotlib.pyplot as plt
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec
from matplotlib.backends.backend_agg import FigureCanvasAgg

from . import writers as writerslib
from .figures import overlapping_labels
from .progress import show_progress, status_text
from .records import jsonable, nonfinite_paths, verify_manifest, write_manifest


class Workdir:
    """What an experiment's `run(cfg, workdir)` writes to.

    `log(namespace, **row)` appends to `metrics.jsonl`, `savefig` writes a PNG,
    `progress` shows a bar.

    Every row has one schema: `{"namespace": ..., "step": ..., "wall_time": ...,
    **row}`. The namespace names the series ("train", "eval", "sweep"; "metrics"
    when not given), `step` is the row's own `step=` when it gives one, else its
    row number in the run, and `wall_time` is when it was logged (Unix seconds,
    as TensorBoard's events carry it). Writers key on both: TensorBoard tags are
    `namespace/metric`. A training loop makes itself resumable with two calls::

        step, state = workdir.restore(state)      # (0, state) on a fresh run
        for step in range(step + 1, steps + 1):
            state = update(state)
            workdir.log("train", step=step, ...)
            workdir.checkpoint(step, state)       # every `checkpoint_every` steps

    `checkpoint` saves the pytree `state` with orbax together with the number of
    metrics rows written so far; `iterjax run --resume DIR` truncates
    `metrics.jsonl` back to that row and `restore` returns the saved state, so
    the resumed run ends with the same metrics as an uninterrupted one.
    `state` must hold everything the loop depends on (parameters, optimiser
    state, PRNG keys as `jax.random.key_data`).

    `writers` names where rows go besides `metrics.jsonl` (always written: the
    record that a resume cuts back): "tensorboard" writes each row's numbers as
    TensorBoard scalars (tensorboardX event files in `tensorboard/`), one tag
    `namespace/key` per numeric entry (nested keys dotted) at the row's `step`
    (`tensorboard --logdir runs/`); a resumed run appends. "wandb" writes the
    same tags as a Weights & Biases run, offline unless `WANDB_MODE` says
    otherwise (`lab/wandb_writer.py`). More writers plug in through `WRITERS` (a
    name -> a class taking the run directory, with `write(row)` for a stamped
    row and `close()`, or the class's import path "module:Class"); a writer
    with `purge(step)` is told on a resume that the rows from `step` on come
    again (TensorBoard then drops the interrupted run's events there).

    On a multi-process run every process calls the same methods; only process 0
    writes metrics and plots.
    """

    def __init__(
        self,
        path,
        quiet=False,
        *,
        checkpoint_every=0,
        mesh=None,
        resume=False,
        primary=True,
        writers=("jsonl",),
        target=None,
    ):
        self.path = pathlib.Path(path)
        self.target = target  # a config.Target, or None
        self.target_reached = None  # the first row that met it: step, seconds
        self._started = time.perf_counter()
        self.path.mkdir(parents=True, exist_ok=True)
        self.quiet = quiet or not primary
        self.checkpoint_every = checkpoint_every
        self.mesh = mesh
        self.primary = primary
        self.nonfinite = {}  # metric name -> rows in which it was NaN or inf
        self._manager = None
        self._metrics = None
        unknown = sorted(set(writers) - {"jsonl", *writerslib.WRITERS})
        if unknown:
            raise ValueError(
                f"unknown writers {unknown}; known: jsonl, {sorted(writerslib.WRITERS)}"
            )
        self._writers = [
            writerslib.writer_class(w)(self.path)
            for w in writers
            if w != "jsonl" and primary
        ]
        self._rows = 0
        self._last_row = None  # what progress shows as the latest metric
        self._restored = None
        if resume:
            self._restored = self._latest()
            keep = self._restored[1]["metrics_rows"] if self._restored else 0
            self._truncate_metrics(keep)

    # --- metrics and plots

    def log(self, namespace: str = "metrics", /, **row) -> None:
        """Append one row of metrics (numbers, strings, lists) to metrics.jsonl,
        stamped with its `namespace` and `step` (see the class docstring)."""
        if not isinstance(namespace, str) or not namespace:
            raise ValueError(f"log: the namespace must be a name, got {namespace!r}")
        if "namespace" in row:
            raise ValueError("log: `namespace` is the first argument, not a metric")
        if "wall_time" in row:
            raise ValueError("log: `wall_time` is stamped by the workdir, not a metric")
        step = row.pop("step", self._rows)
        if isinstance(step, bool) or not isinstance(step, numbers.Integral):
            raise ValueError(f"log: step must be an int, got {step!r}")
        step = int(step)
        row = {"namespace": namespace, "step": step, "wall_time": time.time(), **row}
        self._last_row = row
        self._check_target(row)
        for k in nonfinite_paths(row):
            self.nonfinite[k] = self.nonfinite.get(k, 0) + 1
        self._rows += 1
        if not self.primary:
            return
        if self._metrics is None:
            self._metrics = open(self.path / "metrics.jsonl", "a")
        self._metrics.write(json.dumps(jsonable(row)) + "\n")
        self._metrics.flush()
        for writer in self._writers:
            writer.write(row)

    def _check_target(self, row):
        t = self.target
        if t is None or self.target_reached is not None or not t.met(row.get(t.metric)):
            return
        self.target_reached = {
            "step": row["step"],
            "seconds": round(time.perf_counter() - self._started, 3),
            "value": row[t.metric],
        }

    def write_member(self, index: int, settings: dict, metrics: dict) -> None:
        """One finished sweep member, for the writers that show sweeps
        (`write_member`): TensorBoard's HParams tab gets its swept settings as
        hyperparameters and its numeric metrics as results."""
        for writer in self._writers:
            if hasattr(writer, "write_member"):
                writer.write_member(index, settings, metrics)

    def logged(self) -> list[dict]:
        """The rows in metrics.jsonl (after a resume: those before the checkpoint)."""
        if self._metrics is not None:
            self._metrics.flush()
        path = self.path / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line]

    def savefig(self, fig, name: str) -> pathlib.Path:
        """Write `fig` as PNG `name`, laid out so that titles and labels do not
        collide (matplotlib's constrained layout unless the figure set one);
        warns, naming them, about any two texts of different axes that overlap."""
        out = self.path / name
        if fig.get_layout_engine() is None:
            fig.set_layout_engine("constrained")
        if self.primary:
            if not hasattr(fig.canvas, "get_renderer"):  # a Figure() without pyplot
                FigureCanvasAgg(fig)
            fig.canvas.draw()  # lays it out
            fig.set_layout_engine("none")  # and keeps it: savefig draws again
            found = overlapping_labels(fig)
            if found:
                pairs = "; ".join(f"{a!r} overlaps {b!r}" for a, b in found)
                warnings.warn(f"{name}: {pairs}", stacklevel=2)
            fig.savefig(out, dpi=120, bbox_inches="tight")
        plt.close(fig)
        return out

    def progress(self, total: int, description: str):
        """Progress of one phase; yields `advance(n=1, item=None)`. On a
        terminal: a rich bar with elapsed time and ETA. Otherwise (a batch job's
        redirected output): a plain line at most every `PLAIN_EVERY` seconds and
        at the end, flushed. Silent when quiet. `stdout.log` gets the plain lines
        either way.

        Both show the current item and the latest metric: `item` names what was
        just done (else the text fields of the row logged last, "anderson/tanh"),
        and the first numbers of the row logged last follow it
        ("residual=3.1e-11")."""
        if self.quiet:
            return contextlib.nullcontext(lambda n=1, item=None: None)
        return show_progress(
            total, description, lambda item: status_text(item, self._last_row)
        )

    def shard(self, tree):
        """Place the leading axis of every leaf over the mesh's first axis (the
        config's `mesh:`); unchanged without a mesh."""
        if self.mesh is None:
            return tree
        spec = NamedSharding(self.mesh, PartitionSpec(self.mesh.axis_names[0]))
        return jax.device_put(tree, spec)

    # --- checkpoints

    def restore(self, state):
        """`(step, state)` from the latest good checkpoint of a resumed run, else
        `(0, state)`. `state` gives the structure, dtypes and shardings.

        A checkpoint whose files no longer match the SHA-256 manifest written
        with it (flipped bytes, a truncated or missing file), or that orbax
        fails to load, is reported on stderr, deleted, and the previous one is
        used (the metrics are cut back to it); with none left the run starts
        over. The manifest is checked before orbax reads anything.
        """
        if self._restored is None:
            return 0, state
        manager = self._checkpoints()
        for step in sorted(manager.all_steps(), reverse=True):
            try:
                problem = verify_manifest(self._step_dir(step))
                if problem:
                    raise ValueError(problem)
                restored = manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(state),
                        meta=ocp.args.JsonRestore(),
                    ),
                )
            except Exception as e:  # orbax's errors, or ours: try an older one
                print(
                    f"iterjax: checkpoint {step} in {self.path} is unusable "
                    f"({type(e).__name__}: {e}); deleted, falling back to an "
                    "earlier one",
                    file=sys.stderr,
                )
                manager.delete(step)  # the resumed run saves this step again
                continue
            self._truncate_metrics(restored["meta"]["metrics_rows"])
            return step, restored["state"]
        print(
            f"iterjax: no usable checkpoint in {self.path}; starting over",
            file=sys.stderr,
        )
        self._truncate_metrics(0)
        return 0, state

    def checkpoint(self, step: int, state, *, force: bool = False) -> bool:
        """Save `state` after `step` when `step` is a multiple of
        `checkpoint_every` (or `force`); returns whether it saved."""
        every = self.checkpoint_every
        if not force and (every <= 0 or step % every):
            return False
        manager = self._checkpoints()
        manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                meta=ocp.args.JsonSave({"metrics_rows": self._rows}),
            ),
            force=True,
        )
        manager.wait_until_finished()
        if self.primary:
            write_manifest(self._step_dir(step))
        return True

    def _step_dir(self, step):
        return self.path / "checkpoints" / str(step)

    def _checkpoints(self):
        if self._manager is None:
            self._manager = ocp.CheckpointManager(
                (self.path / "checkpoints").absolute(),
                options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True),
            )
        return self._manager

    def _latest(self):
        """(step, meta) of the newest complete checkpoint, or None."""
        if not (self.path / "checkpoints").exists():
            return None
        manager = self._checkpoints()
        for step in sorted(manager.all_steps(), reverse=True):
            try:
                meta = manager.restore(
                    step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
                )
            except Exception:  # unreadable: `restore` says so and goes back further
                continue
            return step, dict(meta["meta"])
        return None

    def _truncate_metrics(self, rows):
        """Cut metrics.jsonl back to its first `rows` rows (a resume's
        checkpoint), and have the writers that can (`purge(step)`) drop what
        they hold past the last step kept."""
        path = self.path / "metrics.jsonl"
        kept = []
        if path.exists() and self.primary:
            kept = path.read_text().splitlines(keepends=True)[:rows]
            path.write_text("".join(kept))
        self._rows = rows
        last = max((json.loads(line)["step"] for line in kept), default=-1)
        for writer in self._writers:
            if hasattr(writer, "purge"):
                writer.purge(last + 1)

    def close(self):
        for writer in self._writers:
            writer.close()
        self._writers = []
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        if self._manager is not None:
            self._manager.close()
            self._manager = None
