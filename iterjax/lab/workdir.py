"""The run directory an experiment writes to: metrics, plots, progress, checkpoints."""

import contextlib
import hashlib
import importlib
import io
import json
import math
import numbers
import pathlib
import sys
import time
import warnings

import jax
import matplotlib.pyplot as plt
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec
from matplotlib.backends.backend_agg import FigureCanvasAgg
from rich.console import Console
from rich.progress import BarColumn, Progress, TimeElapsedColumn, TimeRemainingColumn
from tensorboardX import SummaryWriter

from .records import write_json
from .tables import flatten


class Workdir:
    """What an experiment's `run(cfg, workdir)` writes to.

    `log(namespace, **row)` appends to `metrics.jsonl`, `savefig` writes a PNG,
    `progress` shows a bar.

    Every row has one schema: `{"namespace": ..., "step": ..., **row}`. The
    namespace names the series ("train", "eval", "sweep"; "metrics" when not
    given) and `step` is the row's own `step=` when it gives one, else its row
    number in the run. Writers key on both: TensorBoard tags are
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
    row and `close()`, or the class's import path "module:Class").

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
    ):
        self.path = pathlib.Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.quiet = quiet or not primary
        self.checkpoint_every = checkpoint_every
        self.mesh = mesh
        self.primary = primary
        self.nonfinite = {}  # metric name -> rows in which it was NaN or inf
        self._manager = None
        self._metrics = None
        unknown = sorted(set(writers) - {"jsonl", *WRITERS})
        if unknown:
            raise ValueError(
                f"unknown writers {unknown}; known: jsonl, {sorted(WRITERS)}"
            )
        self._writers = [
            writer_class(w)(self.path) for w in writers if w != "jsonl" and primary
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
        step = row.pop("step", self._rows)
        if isinstance(step, bool) or not isinstance(step, numbers.Integral):
            raise ValueError(f"log: step must be an int, got {step!r}")
        step = int(step)
        row = {"namespace": namespace, "step": step, **row}
        self._last_row = row
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
            found = overlapping_labels(fig)
            if found:
                pairs = "; ".join(f"{a!r} overlaps {b!r}" for a, b in found)
                warnings.warn(f"{name}: {pairs}", stacklevel=2)
            fig.savefig(out, dpi=120, bbox_inches="tight")
        plt.close(fig)
        return out

    @contextlib.contextmanager
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
            yield lambda n=1, item=None: None
            return
        terminal = getattr(sys.stdout, "terminal", sys.stdout)
        status = lambda item: _status_text(item, self._last_row)
        if not terminal.isatty():
            with _plain_progress(total, description, sys.stdout, status) as advance:
                yield advance
            return
        log = getattr(sys.stdout, "log", None)  # stdout.log, without the bar
        with (
            Progress(
                "[progress.description]{task.description}",
                BarColumn(),
                "{task.completed}/{task.total}",
                TimeElapsedColumn(),
                "eta",
                TimeRemainingColumn(),
                console=Console(file=terminal),
            ) as bar,
            _plain_progress(total, description, log, status, every=math.inf) as logged,
        ):
            task = bar.add_task(description, total=total)

            def advance(n=1, item=None):
                now = status(item)
                text = f"{description} {now}" if now else description
                bar.update(task, advance=n, description=text)
                logged(n, item)

            yield advance

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
        path = self.path / "metrics.jsonl"
        if path.exists() and self.primary:
            lines = path.read_text().splitlines(keepends=True)[:rows]
            path.write_text("".join(lines))
        self._rows = rows

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


MANIFEST = "iterjax-manifest.json"


PLAIN_EVERY = 10.0  # seconds between plain progress lines


def _status_text(item, row, numbers_shown=2) -> str:
    """ "item metric=value ...": `item`, else the text fields of `row` joined by
    "/", then the first numbers of `row` (its `step` aside)."""
    row = {} if row is None else flatten(row)
    if row.get("namespace") == "metrics":  # the default says nothing
        row.pop("namespace")
    if item is None:
        item = "/".join(v for k, v in row.items() if isinstance(v, str))
    values = [
        f"{k}={float(v):.4g}" for k, v in row.items() if k != "step" and _is_number(v)
    ][:numbers_shown]
    return " ".join([str(item), *values] if item else values)


@contextlib.contextmanager
def _plain_progress(total, description, stream, status, every=None):
    """`advance(n=1, item=None)` that writes "description: done/total [status]
    (elapsed, eta)" to `stream` (None: nowhere) at most every `every` seconds
    and at the end. `status(item)` gives the text in brackets."""
    every = PLAIN_EVERY if every is None else every
    start = last = time.monotonic()
    done, current = 0, None

    def line():
        elapsed = time.monotonic() - start
        eta = elapsed / done * (total - done) if done else math.nan
        now = status(current)
        now = f" [{now}]" if now else ""
        stream.write(
            f"{description}: {done}/{total}{now} ({elapsed:.0f} s, eta {eta:.0f} s)\n"
        )
        stream.flush()

    def advance(n=1, item=None):
        nonlocal done, last, current
        done += n
        current = item  # None: the row logged last names the item
        if stream is not None and time.monotonic() - last >= every:
            last = time.monotonic()
            line()

    yield advance
    if stream is not None:
        line()


class Tee(io.TextIOBase):
    """A text stream that writes to `terminal` and to `log` (a file), flushing
    both at every line, so that a redirected run's output is never held back
    in a buffer. `isatty` is the terminal's."""

    def __init__(self, terminal, log):
        self.terminal, self.log = terminal, log

    def write(self, text):
        self.terminal.write(text)
        self.log.write(text)
        if "\n" in text:
            self.flush()
        return len(text)

    def flush(self):
        self.terminal.flush()
        self.log.flush()

    def isatty(self):
        return self.terminal.isatty()

    @property
    def encoding(self):
        return getattr(self.terminal, "encoding", "utf-8")


@contextlib.contextmanager
def teed(path):
    """stdout and stderr also go to the file `path` (appended) while inside."""
    with open(path, "a", buffering=1) as log:
        out, err = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = Tee(out, log), Tee(err, log)
        try:
            yield
        finally:
            sys.stdout, sys.stderr = out, err


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


class TensorBoardWriter:
    """Rows as TensorBoard scalars, in `<run>/tensorboard/` (tensorboardX)."""

    def __init__(self, path):
        self._events = SummaryWriter(str(pathlib.Path(path) / "tensorboard"))

    def write(self, row):
        for tag, value in scalars(row).items():
            self._events.add_scalar(tag, value, row["step"])
        self._events.flush()

    def close(self):
        self._events.close()


def overlapping_labels(fig) -> list[tuple[str, str]]:
    """Pairs of texts that overlap on the drawn figure: titles, axis labels and
    tick labels of different axes, and the figure's title against them all."""
    renderer = fig.canvas.get_renderer()
    groups = []
    for ax in fig.axes:
        texts = [ax.title, ax.xaxis.label, ax.yaxis.label]
        for axis in (ax.xaxis, ax.yaxis):  # tick labels drawn: inside the view
            lo, hi = sorted(axis.get_view_interval())
            texts += [
                tick.label1
                for tick in axis.get_major_ticks()
                if lo <= tick.get_loc() <= hi
            ]
        groups.append([t for t in texts if t.get_visible() and t.get_text()])
    if fig._suptitle is not None:
        groups.append([fig._suptitle])
    boxes = [
        [(t.get_text(), t.get_window_extent(renderer)) for t in group]
        for group in groups
    ]
    found = []
    for i, first in enumerate(boxes):
        for second in boxes[i + 1 :]:
            for a, box_a in first:
                for b, box_b in second:
                    if box_a.overlaps(box_b):
                        found.append((a, b))
    return found


def scalars(row) -> dict[str, float]:
    """A logged row's numbers as `{"namespace/key": value}` (nested keys dotted):
    the tags of the TensorBoard and W&B writers."""
    return {
        f"{row['namespace']}/{key}": float(value)
        for key, value in flatten(row).items()
        if key not in ("namespace", "step") and _is_number(value)
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


def _is_number(x):
    return (
        isinstance(x, (int, float, np.number))
        and not isinstance(x, bool)
        or (hasattr(x, "shape") and getattr(x, "shape", None) == ())
    )


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
