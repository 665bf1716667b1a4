"""Runs an experiment or a sweep from a config and records it (the command line
is `iterjax.lab.cli`).

A run writes `runs/<experiment>/<stamp>/` with the resolved config (`config.yaml`,
itself a valid config), `metrics.jsonl` (one JSON object per logged row),
`summary.json` (what the experiment's `run(cfg, workdir)` returns, plus timing,
environment and non-finite metrics), `status.json` (running, done, failed or
interrupted) and the experiment's PNG plots. A config with a `sweep:` block
writes one directory for the whole sweep (see `iterjax.lab.sweep`).

The reserved top-level config keys (`iterjax.lab.config.Platform`) say how to run:
`sweep`, `mesh` (a device mesh; sweeps shard over its first axis),
`distributed` (`jax.distributed.initialize`, or `auto`), `compilation_cache`
(a directory for JAX's persistent compilation cache), `checkpoint_every` and
`writers` (`[jsonl, tensorboard]`: logged rows also as TensorBoard scalars).
"""

import contextlib
import dataclasses
import datetime
import fcntl
import importlib.metadata
import json
import math
import os
import pathlib
import platform
import socket
import subprocess
import sys
import time
import typing
import warnings

import jax
import matplotlib
import numpy as np
import submitit
import yaml
from jax.experimental import multihost_utils
from jax.sharding import AxisType

from . import config as cfglib
from . import figures, registry
from . import sweep as sweeplib
from .config import resolve_config_path
from .records import (
    RecordError,
    changed_keys,
    jsonable,
    nonfinite_paths,
    read_json,
    write_json,
)
from .tables import flatten
from .tee import teed
from .workdir import Workdir

__all__ = ["Workdir", "prepare", "run_experiment", "make_mesh", "environment"]

PACKAGES = (
    "iterjax",
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "chex",
    "numpy",
    "orbax-checkpoint",
)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run; `args[0]` is the run directory to resume."""


class Prepared(typing.NamedTuple):
    name: str
    module: typing.Any
    cfg: typing.Any
    platform: cfglib.Platform
    members: list | None  # the sweep's members, or None for a single run


def prepare(path, overrides=(), smoke=False, values=None) -> Prepared:
    """Load and validate a config (a path, a built-in name or a mapping), and
    every member of its sweep, before anything is compiled or run."""
    source = path if isinstance(path, dict) else resolve_config_path(str(path))
    name, raw, plat = cfglib.load(source, overrides, smoke=smoke, values=values)
    module = registry.experiment(name)
    _check_field_names(name, module.Config)
    cfg = cfglib.from_dict(module.Config, raw)
    members = sweeplib.plan(module, raw, plat.sweep) if plat.sweep else None
    if plat.sweep:
        given = [k for k, _ in cfglib.parse_overrides(overrides)] + [*(values or {})]
        for key, swept in sweeplib.replaced(given, plat.sweep):
            warnings.warn(
                f"{key}: the value given on the command line is replaced in "
                f"every sweep member by the sweep's `{swept}`",
                stacklevel=2,
            )
    return Prepared(name, module, cfg, plat, members)


def run(config, /, *, out="runs", smoke=False, quiet=True, **values):
    """Run an experiment from Python (a notebook, a script); returns
    `(run_dir, summary)`.

    `config` is a built-in config's name, a YAML file's path or the config as a
    mapping (with its `experiment` key); keyword arguments override its keys,
    dotted keys through a mapping: `run("fixed_point_study", dim=16,
    **{"solvers.0.name": "picard"})`. JAX's global configuration (float64 included)
    is left as it was found.
    """
    return run_experiment(config, out=out, smoke=smoke, quiet=quiet, values=values)


def run_experiment(
    path=None,
    overrides=(),
    *,
    out="runs",
    smoke=False,
    quiet=False,
    resume=None,
    compilation_cache=None,
    values=None,
    force=False,
):
    """Validate, run and record one experiment or sweep; returns (run_dir, summary).

    `resume=DIR` continues the run in DIR from its last checkpoint (a sweep from
    its last finished member) with the config recorded there; a config.yaml
    edited since the run started is refused (naming the changed keys) unless
    `force` (then recorded in status.json). The run draws its figures with
    matplotlib's file-only Agg backend, whatever the display, in the
    colour-blind-safe palette of `iterjax.lab.figures.style`, and uses float64
    when its config's `x64` says so; both are restored afterwards, so that the
    experiments need not set either.
    """
    x64, backend = bool(jax.config.jax_enable_x64), matplotlib.get_backend()
    matplotlib.use("Agg")
    try:
        with figures.style():
            return _run_experiment(
                path,
                overrides,
                out,
                smoke,
                quiet,
                resume,
                compilation_cache,
                values,
                force,
            )
    finally:
        jax.config.update("jax_enable_x64", x64)
        matplotlib.use(backend)


def _run_experiment(
    path, overrides, out, smoke, quiet, resume, compilation_cache, values, force
):
    if resume is not None:
        run_dir = pathlib.Path(resume)
        if not (run_dir / "config.yaml").exists():
            raise cfglib.ConfigError(f"--resume {resume}: no config.yaml there")
        if overrides or values:
            raise cfglib.ConfigError("--resume takes no overrides")
        path, smoke = run_dir / "config.yaml", False
        status = _read_record(run_dir / "status.json", {})
        _check_unchanged(run_dir, status, force)
        if status.get("status") == "done":
            summary = _read_record(run_dir / "summary.json", None)
            if summary is not None and not summary.get("failed"):
                return run_dir, summary  # (a sweep's failed members are retried)
    p = prepare(path, overrides, smoke, values)
    _start(p.platform, compilation_cache)
    mesh = make_mesh(p.platform.mesh)
    if resume is None:
        run_dir = _new_run_dir(pathlib.Path(out) / p.name)
    try:
        with _locked(run_dir), _logged(run_dir):
            if resume is None:  # (under the lock: nothing is written before it)
                with open(run_dir / "config.yaml", "w") as f:
                    yaml.safe_dump(resolved(p), f, sort_keys=False)
                if jax.process_index() == 0:
                    write_json(run_dir / "status.json", {"config": resolved(p)})
            if p.members is None:
                summary = _run_one(p, p.cfg, run_dir, quiet, mesh, resume is not None)
            else:
                summary = _run_sweep(p, run_dir, quiet, mesh, resume is not None)
    except Interrupted:
        raise
    except KeyboardInterrupt:
        raise Interrupted(run_dir) from None
    return run_dir, summary


def _read_record(path, default):
    try:
        return read_json(path, default)
    except RecordError as e:
        raise cfglib.ConfigError(f"--resume: {e}") from None


def _check_unchanged(run_dir, status, force):
    """Refuse to resume a run whose config.yaml was edited since it started (its
    steps would mix two configs), naming the changed keys; with `force`, go on
    and record them in status.json."""
    if "config" not in status:  # (a run from before configs were recorded)
        return
    with open(run_dir / "config.yaml") as f:
        now = cfglib.read_yaml(f, str(run_dir / "config.yaml"))
    changed = changed_keys(status["config"], now)
    if not changed:
        return
    if not force:
        raise cfglib.ConfigError(
            f"--resume {run_dir}: config.yaml changed since the run started "
            f"({', '.join(changed)}); the resumed steps would run another config. "
            "Restore it, start a new run, or resume with --force (recorded in "
            "status.json)"
        )
    status.setdefault("forced", []).append({"changed": changed, "config": now})
    write_json(run_dir / "status.json", {**status, "config": now})


def _new_run_dir(parent):
    """A new directory `parent/<stamp>`, made by this process alone: two runs
    started in the same microsecond get `<stamp>-1`, ... (with several
    processes, all share process 0's stamp)."""
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise cfglib.ConfigError(
            f"--out: cannot make {parent} ({e.strerror or e})"
        ) from None
    stamp = _stamp()
    if jax.process_count() > 1:
        (parent / stamp).mkdir(exist_ok=True)
        return parent / stamp
    for i in range(1000):
        run_dir = parent / (stamp if i == 0 else f"{stamp}-{i}")
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            continue
        except OSError as e:
            raise cfglib.ConfigError(
                f"--out: cannot make {run_dir} ({e.strerror or e})"
            ) from None
    raise cfglib.ConfigError(f"cannot make a new run directory in {parent}")


def _logged(run_dir):
    """The run's stdout and stderr also land in `stdout.log` (process 0's)."""
    if jax.process_index() != 0:
        return contextlib.nullcontext()
    return teed(pathlib.Path(run_dir) / "stdout.log")


@contextlib.contextmanager
def _locked(run_dir):
    """An exclusive lock on the run directory for the run's duration: a second
    process resuming the same directory gets a clear error instead of
    interleaving its rows and checkpoints with the first's."""
    with open(pathlib.Path(run_dir) / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise cfglib.ConfigError(
                f"{run_dir} is in use by another iterjax process (a run or a "
                "--resume of it); wait for it to finish"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _check_field_names(name, config_cls):
    """A Config field spelled like a reserved platform key could never be set
    from a config (the platform takes the key): refuse it, naming both."""
    reserved = {f.name for f in dataclasses.fields(cfglib.Platform)}
    clash = sorted(reserved & {f.name for f in dataclasses.fields(config_cls)})
    if clash:
        raise cfglib.ConfigError(
            f"experiment {name!r}: its Config field `{clash[0]}` is a reserved "
            f"top-level key of the platform ({sorted(reserved)}); rename the field"
        )


def resolved(p: Prepared) -> dict:
    """The config as run: experiment, every field, and the platform keys set."""
    plat = {
        k: v
        for k, v in cfglib.to_dict(p.platform).items()
        if v != cfglib.to_dict(getattr(cfglib.Platform(), k))
    }
    return {"experiment": p.name, **cfglib.to_dict(p.cfg), **plat}


def _run_one(p: Prepared, cfg, run_dir, quiet, mesh, resume, primary=None):
    """One run; `primary` (default: process 0) writes the files."""
    _set_x64(cfg)
    if primary is None:
        primary = jax.process_index() == 0
    workdir = Workdir(
        run_dir,
        quiet,
        checkpoint_every=p.platform.checkpoint_every,
        mesh=mesh,
        resume=resume,
        primary=primary,
        writers=p.platform.writers,
        target=p.platform.target,
    )
    start = time.perf_counter()
    with _recorded(run_dir, primary), contextlib.closing(workdir):
        summary = p.module.run(cfg, workdir) or {}
    summary = {
        "experiment": p.name,
        "seconds": round(time.perf_counter() - start, 3),
        "environment": environment(cfg),
        **summary,
    }
    if p.platform.target is not None:
        summary["target"] = _target_record(p.platform.target, workdir, resume)
    flagged = dict(workdir.nonfinite)
    flagged.update({k: "summary" for k in nonfinite_paths(summary)})
    summary["nonfinite_metrics"] = flagged
    _finish(run_dir, summary, primary)
    return summary


def _run_sweep(p: Prepared, run_dir, quiet, mesh, resume):
    """Every member, vectorised by groups where the experiment allows; rows are
    appended as they finish so that an interrupted sweep resumes where it was."""

    pid, nproc = jax.process_index(), jax.process_count()
    primary = pid == 0
    sweep, everyone = p.platform.sweep, p.members
    assert sweep is not None and everyone is not None  # a sweep's Prepared
    # A resume keeps the members that finished, and retries the failed ones.
    rows = _read_rows(run_dir, repair=primary) if resume else []
    done = {r["member"]: r for r in rows if r["status"] == "ok"}
    workdir = Workdir(run_dir, quiet, mesh=mesh, primary=primary)
    start = time.perf_counter()
    record = _recorder(run_dir / f"rows-{pid}.jsonl")
    plan = _plan(p, lambda index: index not in done)
    launcher = p.platform.launcher
    with (
        _recorded(run_dir, primary),
        contextlib.closing(workdir),
        workdir.progress(len(everyone), "sweep") as advance,
    ):
        advance(len(done))
        if launcher is not None and launcher.name == "submitit":
            _submit(
                launcher, [(k, ms) for k, ms in plan if ms], run_dir, record, advance
            )
        else:
            _run_groups(p, plan, run_dir, mesh, record, advance, primary)
    if nproc > 1:
        multihost_utils.sync_global_devices("iterjax sweep rows")
    rows = sorted(_read_rows(run_dir), key=lambda r: r["member"])
    aggregates = sweeplib.aggregate(rows, sweep.seed_key)
    summary = {
        "experiment": p.name,
        "seconds": round(time.perf_counter() - start, 3),
        "environment": environment(p.cfg),
        "members": len(everyone),
        "vectorised_groups": sum(1 for keys, _ in plan if keys),
        "mesh": dict(mesh.shape) if mesh is not None else None,
        "failed": {r["member"]: r["error"] for r in rows if r["status"] != "ok"},
        "nonfinite_metrics": {
            r["member"]: r["nonfinite"] for r in rows if r.get("nonfinite")
        },
        "aggregates": aggregates,
        "table": sweeplib.markdown(aggregates, sweep.seed_key),
    }
    if p.platform.target is not None:
        summary["target"] = {
            **_target_spec(p.platform.target),
            "device": jax.devices()[0].device_kind,
            "settings": sweeplib.aggregate_targets(rows, sweep.seed_key),
        }
    if primary:
        sweeplib.write_tables(run_dir, rows)
        sweeplib.plot(aggregates, rows, sweep.seed_key, workdir)
        # the writers' view of the sweep (TensorBoard's HParams): every member
        writers = p.platform.writers
        with contextlib.closing(Workdir(run_dir, True, writers=writers)) as members:
            for r in rows:
                if r["status"] == "ok":
                    members.write_member(r["member"], r["settings"], r["metrics"])
    _finish(run_dir, summary, primary)
    return summary


def _target_record(target, workdir, resumed):
    """summary.json's `target`: the target, whether and where it was met (after a
    resume, the seconds count from the resume and the rows kept are not
    searched), and the device."""
    reached = workdir.target_reached
    return {
        **_target_spec(target),
        "reached": reached is not None,
        **(reached or {}),
        "device": jax.devices()[0].device_kind,
        "resumed": bool(resumed),
    }


def _target_spec(target):
    """The target as summary.json states it: its metric and its bound."""
    return {k: v for k, v in cfglib.to_dict(target).items() if v is not None}


def _recorder(rows_file):
    """`record(row)`: append one sweep row to `rows_file` (JSON lines), stamped
    with its `wall_time` (Unix seconds), as `Workdir.log` stamps its rows."""

    def record(row):
        with open(rows_file, "a") as f:
            f.write(json.dumps(jsonable({**row, "wall_time": time.time()})) + "\n")

    return record


def _plan(p: Prepared, keep):
    """The sweep's groups (`sweeplib.groups`), each with its members whose
    index `keep` accepts."""
    assert p.members is not None and p.platform.sweep is not None  # a sweep's
    groups = sweeplib.groups(p.module, p.members, p.platform.sweep)
    return [(keys, [m for m in ms if keep(m.index)]) for keys, ms in groups]


def _run_groups(p: Prepared, plan, run_dir, mesh, record, advance, primary=True):
    """Run the members of `plan` here: each group of vectorisable members as one
    `jax.vmap` (one by one if it fails), the others each as a run of its own in
    `members/NNN/`; on several processes, those are split between them."""
    pid, nproc = jax.process_index(), jax.process_count()
    target = p.platform.target
    for keys, todo in plan:
        if keys and todo:
            _set_x64(todo[0].cfg)
            try:
                results = sweeplib.run_vectorised(
                    p.module, todo, keys, mesh, rows=target is not None
                )
            except Exception as e:  # one bad member: isolate it
                print(
                    f"iterjax: vectorised group failed ({e}); "
                    "running its members one by one",
                    file=sys.stderr,
                )
            else:
                for m, metrics in zip(todo, results):
                    columns = metrics.pop("rows", None)
                    row = _row(m, metrics)
                    if target is not None:
                        row["target"] = sweeplib.target_in_rows(target, columns)
                    if primary:
                        record(row)
                    advance()
                continue
        for m in todo:
            if m.index % nproc != pid:
                continue
            member_dir = run_dir / "members" / f"{m.index:03d}"
            # a member interrupted before goes on from its checkpoint
            again = (member_dir / "status.json").exists()
            try:
                # members are split over processes: each writes its own
                own = mesh if nproc == 1 else None  # no global mesh
                s = _run_one(p, m.cfg, member_dir, True, own, again, True)
                row = _row(m, sweeplib.scalar_metrics(s))
                if "target" in s:
                    keep = ("reached", "step", "seconds", "value")
                    row["target"] = {
                        k: s["target"][k] for k in keep if k in s["target"]
                    }
            except KeyboardInterrupt:
                raise
            except Exception as e:
                row = sweeplib.error_row(m, e)
            record(row)
            advance()


def _submit(launcher, plan, run_dir, record, advance):
    """The members of `plan` as submitit jobs (one per vectorised group, one per
    member that runs alone); waits for them. A job that fails records a failed
    row for each of its members that wrote none (`--resume` retries them)."""
    folder = launcher.folder or str(run_dir / "submitit")
    cluster = None if launcher.cluster == "auto" else launcher.cluster
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    if launcher.options:
        executor.update_parameters(**launcher.options)
    jobs = []
    for keys, members in plan:
        for batch in [members] if keys else [[m] for m in members]:
            name = f"job-{batch[0].index:03d}"
            indices = [m.index for m in batch]
            jobs.append((batch, executor.submit(_job, str(run_dir), indices, name)))
    for batch, job in jobs:
        try:
            job.result()
        except Exception as e:
            written = {r["member"] for r in _read_rows(run_dir)}
            for m in batch:
                if m.index not in written:
                    record(sweeplib.error_row(m, e))
        advance(len(batch))


def _job(run_dir: str, indices: list[int], name: str) -> None:
    """One launcher job, in its own process: the sweep members `indices` of the
    run in `run_dir` (its recorded config), rows in `rows-<name>.jsonl`."""
    path = pathlib.Path(run_dir)
    p = prepare(path / "config.yaml")
    plan = _plan(p, set(indices).__contains__)
    record = _recorder(path / f"rows-{name}.jsonl")
    _run_groups(p, plan, path, None, record, lambda n=1, item=None: None)


@contextlib.contextmanager
def _recorded(run_dir, primary):
    """status.json: running, then interrupted (with the resume command) or
    failed when the body raises; `_finish` writes done."""
    _status(run_dir, "running", primary)
    try:
        yield
    except KeyboardInterrupt:
        _status(
            run_dir, "interrupted", primary, resume=f"iterjax run --resume {run_dir}"
        )
        raise
    except Exception as e:
        _status(run_dir, "failed", primary, error=f"{type(e).__name__}: {e}")
        raise


def _finish(run_dir, summary, primary):
    if primary:
        write_json(pathlib.Path(run_dir) / "summary.json", jsonable(summary), indent=2)
    _status(run_dir, "done", primary)


def _set_x64(cfg):
    """A config's `x64: bool` field sets jax_enable_x64 before its run."""
    if isinstance(getattr(cfg, "x64", None), bool):
        jax.config.update("jax_enable_x64", cfg.x64)


def _row(member, metrics):
    row = {"member": member.index, "settings": member.settings, "metrics": metrics}
    row["status"] = "ok"
    bad = list(nonfinite_paths(metrics))
    if bad:
        row["nonfinite"] = bad
    return row


def _read_rows(run_dir, repair=False):
    """Each member's last row. A torn last line (a crash or a full disk in the
    middle of a write) is skipped, and with `repair` cut from its file, so that
    the rows appended next start on a line of their own."""
    rows = {}
    for path in sorted(pathlib.Path(run_dir).glob("rows-*.jsonl")):
        text = path.read_text()
        lines = text.splitlines(keepends=True)
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                if i != len(lines) - 1:
                    raise
                if repair:
                    path.write_text("".join(lines[:-1]))
                break
            rows[r["member"]] = r
    return list(rows.values())


def _status(run_dir, status, primary, **extra):
    """Write status.json, keeping the config the run started with (and any
    forced resume) from the record before."""
    if primary:
        path = pathlib.Path(run_dir) / "status.json"
        try:
            kept = read_json(path, {})
        except RecordError:
            kept = {}
        kept = {k: kept[k] for k in ("config", "forced") if k in kept}
        write_json(path, {"status": status, **extra, **kept})


# --- Platform: processes, compilation cache, mesh.


def _start(plat: cfglib.Platform, compilation_cache=None):
    """Multi-host initialisation and the compilation cache, before any compile."""
    dist = plat.distributed
    if dist is None and os.environ.get("ITERJAX_DISTRIBUTED"):
        dist = "auto"
    if dist is not None and not jax.distributed.is_initialized():
        kwargs = {}
        if isinstance(dist, cfglib.DistributedSpec):
            kwargs = {k: v for k, v in cfglib.to_dict(dist).items() if v is not None}
        jax.distributed.initialize(**kwargs)
    cache = compilation_cache or plat.compilation_cache
    cache = cache or os.environ.get("ITERJAX_COMPILATION_CACHE")
    if cache:
        cache = os.path.expanduser(str(cache))
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def make_mesh(spec: cfglib.MeshSpec | None):
    """A `jax.sharding.Mesh` over all devices (of every process), or None."""
    if spec is None:
        return None

    n = jax.device_count()
    known = math.prod(s for s in spec.shape if s != -1)
    shape = tuple(n // known if s == -1 else s for s in spec.shape)
    if math.prod(shape) != n:
        raise cfglib.ConfigError(
            f"config key `mesh.shape`: {list(spec.shape)} does not cover the "
            f"{n} devices"
        )
    return jax.make_mesh(shape, spec.axes, axis_types=(AxisType.Auto,) * len(shape))


def _stamp():

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    if jax.process_count() > 1:  # every process writes to process 0's directory
        code = np.frombuffer(stamp.encode().ljust(32), dtype=np.uint8)
        code = multihost_utils.broadcast_one_to_all(code)
        stamp = bytes(np.asarray(code)).decode().strip()
    return stamp


def environment(cfg=None) -> dict:
    """What it takes to reproduce a run: versions, the git state of the working
    directory (the user's project, not iterjax's), devices, seeds."""
    root = os.getcwd()

    def git(*args):
        try:
            return subprocess.run(
                ["git", *args], capture_output=True, text=True, timeout=5, cwd=root
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    seeds = {}
    if cfg is not None:
        flat = flatten(cfglib.to_dict(cfg))
        seeds = {k: v for k, v in flat.items() if k.split(".")[-1].endswith("seed")}
    return {
        "jax": jax.__version__,
        "python": platform.python_version(),
        "packages": versions,
        "git_commit": git("rev-parse", "HEAD") or None,
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "devices": [d.device_kind for d in jax.devices()],
        "platform": jax.default_backend(),
        "process_count": jax.process_count(),
        "host": socket.gethostname(),
        "x64": bool(jax.config.read("jax_enable_x64")),
        "seeds": seeds,
        "argv": sys.argv,
    }
