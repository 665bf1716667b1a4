"""Command line: `iterjax run CONFIG [key=value ...]`, `iterjax run --resume DIR`,
`iterjax list`, `iterjax report DIR...`."""

import argparse
import os
import pathlib
import re
import sys
import warnings

import yaml

import iterjax

from . import config as cfglib
from . import registry, report
from . import sweep as sweeplib
from .config import CONFIG_DIR
from .runner import (
    Interrupted,
    make_mesh,
    prepare,
    resolved,
    run_experiment,
)
from .tables import markdown_table


def _common_folder(dirs) -> str:
    """The deepest folder that holds every run directory of `dirs` (one run
    directory: itself)."""
    return os.path.commonpath([os.path.abspath(d) for d in dirs])


def describe(path) -> str:
    """The first sentence of a config's leading comment block."""
    words = []
    for line in pathlib.Path(path).read_text().splitlines():
        text = line.lstrip("#").strip()
        if not line.startswith("#") or text.startswith(("Run:", "Runtime:")):
            break
        words.append(text)
    header = " ".join(words)
    end = header.find(". ")
    return header if end < 0 else header[: end + 1]


def _list_configs():
    for p in sorted(CONFIG_DIR.glob("*.yaml")):
        print(f"{p.stem:20s} {describe(p)}")


def main(argv=None):
    """The `iterjax` command; warnings print as one line, `iterjax: warning: ...`."""
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            return _main(argv)
        except BrokenPipeError:  # `iterjax list | head`: the reader left
            sys.stdout = open(os.devnull, "w")  # (no second error at exit)
            return 0


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"iterjax: warning: {message}", file=sys.stderr if file is None else file)


def _main(argv):
    # `experiment: mypkg.module` finds mypkg in the current directory, with the
    # `iterjax` command as with `python -m iterjax` (which puts it on the path)
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    parser = argparse.ArgumentParser(
        prog="iterjax",
        description="iterjax's experiment platform: run experiments and sweeps "
        "from YAML configs, list and show the built-in ones, copy one to adapt, "
        "and report on run directories.",
        epilog="Examples: iterjax run fixed_point_study dim=128; iterjax run "
        "--resume runs/fixed_point_study/<stamp>; iterjax list; iterjax report "
        "runs/*/*",
    )
    parser.add_argument(
        "--version", action="version", version=f"iterjax {iterjax.__version__}"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser(
        "run",
        help="run an experiment (or sweep) from a config file",
        add_help=False,
    )
    r.add_argument(
        "-h",
        "--help",
        action="store_true",
        help="this help; with a CONFIG, that config's fields, types and defaults",
    )
    r.add_argument(
        "--dry-run",
        action="store_true",
        help="validate, print the resolved config and the sweep plan, run nothing",
    )
    r.add_argument(
        "config",
        nargs="?",
        help="a YAML config, or the name of a built-in config (iterjax list)",
    )
    r.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    r.add_argument(
        "--out",
        default=os.environ.get("ITERJAX_RUNS", "runs"),
        help="the folder that holds run directories (default: $ITERJAX_RUNS, "
        "else ./runs)",
    )
    r.add_argument(
        "--smoke", action="store_true", help="apply the config's smoke overrides"
    )
    r.add_argument("--resume", metavar="DIR", help="continue an interrupted run")
    r.add_argument(
        "--force",
        action="store_true",
        help="resume even though config.yaml changed (recorded in status.json)",
    )
    r.add_argument(
        "--compilation-cache", metavar="DIR", help="JAX's persistent compilation cache"
    )
    r.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bars or tables on the terminal (the run directory "
        "still records everything)",
    )
    sub.add_parser("list", help="list the built-in configs")
    show = sub.add_parser("show", help="print a built-in config")
    show.add_argument("name", help="a built-in config (iterjax list)")
    init = sub.add_parser(
        "init", help="copy a built-in config and its experiment's code to adapt"
    )
    init.add_argument("name", help="a built-in config (iterjax list)")
    init.add_argument("dir", nargs="?", default=".", help="where (default: here)")
    rep = sub.add_parser("report", help="summarise one or several run directories")
    rep.add_argument("dirs", nargs="+", help="run directories")
    rep.add_argument(
        "--out",
        help="the report, a .md or an .html file (default: report.md in the "
        "folder that holds the run directories)",
    )
    # overrides may come after options (`run cfg --smoke a=1`): argparse leaves
    # them over; anything else left over is an error.
    args, extra = parser.parse_known_args(argv)
    bad = [e for e in extra if args.command != "run" or "=" not in e or e[0] == "-"]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    if args.command == "list":
        _list_configs()
        return 0
    if args.command in ("show", "init"):
        try:
            path = _builtin_config(args.name)
            if args.command == "init":
                return _init(args.name, path, pathlib.Path(args.dir))
        except cfglib.ConfigError as e:
            print(f"iterjax: {e}", file=sys.stderr)
            return 2
        print(path.read_text(), end="")
        return 0
    if args.command == "report":
        try:
            out = args.out or os.path.join(_common_folder(args.dirs), "report.md")
            path = report.write(args.dirs, out)
        except report.ReportError as e:
            print(f"iterjax: {e}", file=sys.stderr)
            return 2
        print(f"report in {path}")
        return 0
    if args.help:
        if args.config is None:
            r.print_help()
            return 0
        return _config_help(args.config, args.overrides)
    if (args.config is None) == (args.resume is None):
        parser.error("run takes a CONFIG or --resume DIR")
    if args.dry_run:
        return _dry_run(args.config, args.overrides, args.smoke)
    try:
        path, summary = run_experiment(
            args.config,
            args.overrides,
            out=args.out,
            smoke=args.smoke,
            quiet=args.quiet,
            resume=args.resume,
            compilation_cache=args.compilation_cache,
            force=args.force,
        )
    except cfglib.ConfigError as e:
        print(f"iterjax: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(
            f"iterjax: interrupted; continue with: iterjax run --resume {e.args[0]}",
            file=sys.stderr,
        )
        return 130
    print(f"results in {path}")
    if "table" in summary and not args.quiet:
        print(summary["table"])
    return 0


def _config_help(config, overrides):
    """The fields of CONFIG's experiment: name, type, default, and the value the
    config (with the overrides) gives."""
    try:
        p = prepare(config, overrides)
    except cfglib.ConfigError as e:
        print(f"iterjax: {e}", file=sys.stderr)
        return 2
    given = cfglib.to_dict(p.cfg)
    rows = [
        [name, kind, repr(default), repr(given[name])]
        for name, kind, default in cfglib.describe_fields(p.module.Config)
    ]
    print(f"experiment {p.name} ({p.module.__name__}): {describe_module(p.module)}\n")
    print(markdown_table(["field", "type", "default", "in this config"], rows))
    return 0


def _builtin_config(name):
    path = CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
        raise cfglib.ConfigError(f"no built-in config {name!r}; built-in: {known}")
    return path


def _init(name, path, where):
    """Copy config NAME and its experiment's module into `where`, as
    `my_NAME.yaml` and `my_NAME.py`, the config pointing at the copy: a
    starting point to edit, run with `iterjax run my_NAME.yaml` from `where`."""
    module = registry.experiment(yaml.safe_load(path.read_text())["experiment"])
    mine = f"my_{name}"
    targets = [where / f"{mine}.yaml", where / f"{mine}.py"]
    existing = [str(t) for t in targets if t.exists()]
    if existing:
        raise cfglib.ConfigError(f"init: {', '.join(existing)} exist; not replaced")
    where.mkdir(parents=True, exist_ok=True)
    line = f"experiment: {mine}   # ./{mine}.py, a copy of {module.__name__}"
    text = re.sub(r"^experiment:.*$", line, path.read_text(), count=1, flags=re.M)
    targets[0].write_text(text)
    targets[1].write_text(pathlib.Path(module.__file__).read_text())
    print(f"wrote {targets[0]} and {targets[1]}; run: iterjax run {targets[0]}")
    return 0


def describe_module(module):
    doc = (module.__doc__ or "").strip().splitlines()
    return doc[0] if doc else ""


def _dry_run(config, overrides, smoke):
    """Validate everything a run would, print the resolved config and the sweep
    plan; compile and write nothing."""
    try:
        p = prepare(config, overrides, smoke)
        make_mesh(p.platform.mesh)  # (the mesh against this host's devices)
    except cfglib.ConfigError as e:
        print(f"iterjax: {e}", file=sys.stderr)
        return 2
    print(yaml.safe_dump(resolved(p), sort_keys=False).rstrip())
    if p.members is None:
        print("# one run")
        return 0
    plan = sweeplib.groups(p.module, p.members, p.platform.sweep)
    print(f"# sweep: {len(p.members)} members in {len(plan)} groups")
    for keys, members in plan:
        how = f"one jax.vmap over {list(keys)}" if keys else "one run each"
        print(f"#   {len(members)} members: {how}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
