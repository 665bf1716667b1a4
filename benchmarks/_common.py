"""Memory, timing and table helpers shared by the benchmarks."""

import datetime
import os
import pathlib
import platform

import jax

from iterjax.diagnostics import compiled_memory
from iterjax.lab.tables import markdown_table

markdown = markdown_table
RESULTS = pathlib.Path(__file__).parent / "results"


def compiled_bytes(f, *args):
    """(temp bytes, total bytes): `iterjax.diagnostics.compiled_memory`."""
    m = compiled_memory(f, *args)
    return m["temp"], m["total"]


def cpu_model():
    """The CPU's model name (Linux's /proc/cpuinfo), else `platform.processor()`."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load():
    """The load average over 1, 5 and 15 minutes, as text."""
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def machine():
    """The results file's first lines: date, machine, device, versions, load."""
    device = jax.devices()[0]
    return (
        f"{datetime.date.today()}; {cpu_model()}, {os.cpu_count()} logical cores; "
        f"JAX {jax.__version__} on {device.platform} ({device.device_kind}); "
        f"load average (1/5/15 min) at the start {load()}"
    )


TIME_COLUMNS = ["ms, median [IQR]", "compile ms"]


def time_cells(t):
    """The two table cells of an `iterjax.diagnostics.Timing`: the median
    [q1, q3], and the compile time apart ("-" where nothing is compiled)."""
    return [str(t), "-" if t.compile is None else f"{t.compile:.0f}"]
