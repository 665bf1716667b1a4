"""Progress of a run's phases: a rich bar with elapsed time and ETA on a
terminal, plain flushed lines in a batch job's redirected output."""

import contextlib
import math
import sys
import time

from rich.console import Console
from rich.progress import BarColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

from .tables import STAMPS, flatten, is_number

PLAIN_EVERY = 10.0  # seconds between plain progress lines


def status_text(item, row, numbers_shown=2) -> str:
    """ "item metric=value ...": `item`, else the text fields of `row` joined by
    "/", then the first numbers of `row` (its `step` aside)."""
    row = {} if row is None else flatten(row)
    if row.get("namespace") == "metrics":  # the default says nothing
        row.pop("namespace")
    if item is None:
        item = "/".join(v for k, v in row.items() if isinstance(v, str))
    values = [
        f"{k}={float(v):.4g}"
        for k, v in row.items()
        if k not in STAMPS and is_number(v)
    ][:numbers_shown]
    return " ".join([str(item), *values] if item else values)


@contextlib.contextmanager
def plain_progress(total, description, stream, status, every=None):
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


@contextlib.contextmanager
def show_progress(total, description, status):
    """`advance(n=1, item=None)` for one phase of `total` items, shown on
    stdout's terminal as a rich bar, else as `plain_progress` lines; stdout.log
    (a `Tee`'s log) gets the plain lines either way. `status(item)` gives the
    text after the description (see `Workdir.progress`)."""
    terminal = getattr(sys.stdout, "terminal", sys.stdout)
    if not terminal.isatty():
        with plain_progress(total, description, sys.stdout, status) as advance:
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
        plain_progress(total, description, log, status, every=math.inf) as logged,
    ):
        task = bar.add_task(description, total=total)

        def advance(n=1, item=None):
            now = status(item)
            text = f"{description} {now}" if now else description
            bar.update(task, advance=n, description=text)
            logged(n, item)

        yield advance
