"""A run's output teed to its `stdout.log`, line by line."""

import contextlib
import io
import sys


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
