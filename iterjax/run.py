"""Command line: `iterjax run CONFIG [key=value ...]`, `iterjax list`.

A run writes `runs/<experiment>/<stamp>/` with the resolved config (`config.yaml`),
`metrics.jsonl` (one JSON object per logged row), `summary.json` (what the
experiment's `run(cfg, workdir)` returns, plus timing and environment) and the
experiment's PNG plots.
"""

import argparse
import contextlib
import datetime
import json
import math
import os
import pathlib
import platform
import subprocess
import sys
import time

import yaml

from . import config as cfglib
from . import registry

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"


class Workdir:
    """What an experiment writes to: metrics rows, plots, progress bars."""

    def __init__(self, path: pathlib.Path, quiet: bool = False):
        self.path = pathlib.Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.quiet = quiet
        self._metrics = open(self.path / "metrics.jsonl", "a")

    def log(self, **row) -> None:
        """Append one row of metrics (numbers, strings, lists) to metrics.jsonl."""
        self._metrics.write(json.dumps(_jsonable(row)) + "\n")
        self._metrics.flush()

    def savefig(self, fig, name: str) -> pathlib.Path:
        out = self.path / name
        fig.savefig(out, dpi=120, bbox_inches="tight")
        import matplotlib.pyplot as plt

        plt.close(fig)
        return out

    @contextlib.contextmanager
    def progress(self, total: int, description: str):
        """A rich progress bar; yields `advance()` (silent when quiet)."""
        if self.quiet:
            yield lambda n=1: None
            return
        from rich.progress import BarColumn, Progress, TimeElapsedColumn

        with Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            "{task.completed}/{task.total}",
            TimeElapsedColumn(),
        ) as bar:
            task = bar.add_task(description, total=total)
            yield lambda n=1: bar.advance(task, n)

    def close(self):
        self._metrics.close()


def markdown_table(headers, rows) -> str:
    """A markdown table: one header row, then one row per list of cells."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "tolist"):
        return _jsonable(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else str(x)
    return x


def resolve_config_path(name_or_path: str) -> pathlib.Path:
    p = pathlib.Path(name_or_path)
    if p.exists():
        return p
    candidate = CONFIG_DIR / (p.name if p.suffix else p.name + ".yaml")
    if candidate.exists():
        return candidate
    raise cfglib.ConfigError(
        f"no config file {name_or_path!r} (looked in {CONFIG_DIR})"
    )


def prepare(path, overrides=(), smoke=False):
    """Load and validate a config; returns `(name, module, cfg)` without running."""
    name, raw = cfglib.load(resolve_config_path(str(path)), overrides, smoke=smoke)
    module = registry.experiment(name)
    return name, module, cfglib.from_dict(module.Config, raw)


def run_experiment(path, overrides=(), *, out="runs", smoke=False, quiet=False):
    """Validate, run and record one experiment; returns (run_dir, summary)."""
    name, module, cfg = prepare(path, overrides, smoke)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    workdir = Workdir(pathlib.Path(out) / name / stamp, quiet=quiet)
    with open(workdir.path / "config.yaml", "w") as f:
        yaml.safe_dump({"experiment": name, **cfglib.to_dict(cfg)}, f, sort_keys=False)
    start = time.perf_counter()
    try:
        summary = module.run(cfg, workdir) or {}
    finally:
        workdir.close()
    summary = {
        "experiment": name,
        "seconds": round(time.perf_counter() - start, 3),
        "environment": environment(),
        **summary,
    }
    with open(workdir.path / "summary.json", "w") as f:
        json.dump(_jsonable(summary), f, indent=2)
    return workdir.path, summary


def environment() -> dict:
    import jax

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=CONFIG_DIR.parent,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "jax": jax.__version__,
        "python": platform.python_version(),
        "devices": [d.device_kind for d in jax.devices()],
        "git_commit": commit or None,
    }


def _list_configs():
    for p in sorted(CONFIG_DIR.glob("*.yaml")):
        first = p.read_text().splitlines()[0:1]
        desc = (
            first[0].lstrip("# ").strip() if first and first[0].startswith("#") else ""
        )
        print(f"{p.stem:28s} {desc}")


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="iterjax", description=__doc__.splitlines()[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run an experiment from a config file")
    r.add_argument("config", help="path to a YAML config, or a name in configs/")
    r.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    r.add_argument("--out", default=os.environ.get("ITERJAX_RUNS", "runs"))
    r.add_argument(
        "--smoke", action="store_true", help="apply the config's smoke overrides"
    )
    r.add_argument("--quiet", action="store_true")
    sub.add_parser("list", help="list the configs in configs/")
    args = parser.parse_args(argv)
    if args.command == "list":
        _list_configs()
        return 0
    try:
        path, summary = run_experiment(
            args.config,
            args.overrides,
            out=args.out,
            smoke=args.smoke,
            quiet=args.quiet,
        )
    except cfglib.ConfigError as e:
        print(f"iterjax: {e}", file=sys.stderr)
        return 2
    print(f"results in {path}")
    if "table" in summary and not args.quiet:
        print(summary["table"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
