"""YAML config files -> frozen, typed dataclasses. Unknown or mistyped keys are errors.

A config file names its experiment and sets that experiment's `Config` fields::

    # configs/fixed_point_study.yaml
    experiment: fixed_point_study
    dim: 32
    solvers:
      - {name: anderson, history: 5}
    smoke: {dim: 8}        # overrides used by the test suite's shrunk smoke run

Overrides on the command line use dotted keys and YAML values: `dim=64`,
`solvers='[{name: picard}]'`. Every value is checked against the dataclass field's
type annotation (int, float, str, bool, tuples, nested dataclasses, `Literal`,
`Optional`, and `Spec` for registry objects such as solvers) before anything runs.
"""

import copy
import dataclasses
import importlib.resources
import math
import numbers
import pathlib
import re
import types
import typing
from typing import Any, Literal, Union

from . import registry
from .spec import ConfigError as ConfigError
from .spec import Count as Count
from .spec import Fraction as Fraction
from .spec import NonNegative as NonNegative
from .spec import Positive as Positive
from .spec import Range as Range
from .spec import Spec as Spec
from .spec import float_literal as float_literal
from .spec import read_yaml as read_yaml
from .spec import spec as spec

_SCALARS = {int: "an int", float: "a number", str: "a string", bool: "true or false"}


def _fail(where, msg):
    raise ConfigError(f"config key `{where or '<root>'}`: {msg}")


def from_dict(cls, data: Any, where: str = ""):
    """Build dataclass `cls` from a mapping, checking every key and type."""
    return _convert(cls, data, where)


def _convert(tp, value, where):
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        base, *meta = typing.get_args(tp)
        if base is Spec:
            return registry.to_spec(meta[0], value, where)
        value = _convert(base, value, where)
        for bound in meta:
            if isinstance(bound, Range) and (problem := bound.check(value)):
                _fail(where, problem)
        return value
    if dataclasses.is_dataclass(tp):
        return _to_dataclass(tp, value, where)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for a in options:
            try:
                return _convert(a, value, where)
            except ConfigError as e:
                errors.append(e)
        # a mapping meant for the one dataclass option: its error names the key
        shaped = [
            e
            for a, e in zip(options, errors)
            if len(options) == 1 or (isinstance(value, dict) and _is_mapping_type(a))
        ]
        if len(shaped) == 1:
            raise shaped[0]
        allowed = " or ".join(_describe(a) for a in options)
        _fail(where, f"expected {allowed}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            _fail(where, f"{value!r} is not one of {list(choices)}")
        return value
    if origin is dict:
        key_type, value_type = typing.get_args(tp)
        if not isinstance(value, dict):
            _fail(where, f"expected a mapping, got {value!r}")
        return {
            _convert(key_type, k, where): _convert(value_type, v, f"{where}.{k}")
            for k, v in value.items()
        }
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            _fail(where, f"expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(
                _convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)
            )
        if len(args) != len(value):
            _fail(where, f"expected {len(args)} items, got {len(value)}")
        return tuple(
            _convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value))
        )
    if tp in _SCALARS:
        ok = isinstance(value, tp) and not (tp is not bool and isinstance(value, bool))
        if tp is int and ok and not -(2**63) <= value < 2**63:
            _fail(where, f"{value} does not fit a 64-bit int")
        if tp is float and isinstance(value, float) and math.isnan(value):
            _fail(where, "expected a number, got nan")
        if tp is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if tp is float and (number := float_literal(value)) is not None:
            return number
        if not ok:
            _fail(where, f"expected {_SCALARS[tp]}, got {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {tp!r} at {where}")


def _describe(tp):
    if typing.get_origin(tp) is typing.Annotated:
        base, *meta = typing.get_args(tp)
        if base is Spec:  # spec(kind): a registry name
            return f"a {meta[0]} (name or mapping with `name`)"
        bounds = [
            f"{'>' if b.lo_open else '>='} {b.lo}" if b.lo is not None else ""
            for b in meta
            if isinstance(b, Range)
        ]
        return " ".join([_describe(base), *filter(None, bounds)])
    if dataclasses.is_dataclass(tp):
        return f"a mapping of {tp.__name__} fields"
    if typing.get_origin(tp) is Literal:
        return " or ".join(repr(c) for c in typing.get_args(tp))
    if typing.get_origin(tp) is tuple:
        return f"a list, each {_describe(typing.get_args(tp)[0])}"
    if typing.get_origin(tp) in (Union, types.UnionType):
        arms = [a for a in typing.get_args(tp) if a is not type(None)]
        null = " or null" if len(arms) < len(typing.get_args(tp)) else ""
        return " or ".join(_describe(a) for a in arms) + null
    if typing.get_origin(tp) is dict:
        return "a mapping"
    if tp is Any:
        return "any value"
    return _SCALARS.get(tp, getattr(tp, "__name__", str(tp)))


def _is_mapping_type(tp):
    return dataclasses.is_dataclass(tp) or typing.get_origin(tp) is dict


def _to_dataclass(cls, value, where, default=None):
    """`cls` from a mapping; keys it leaves out keep `default`'s values (the
    enclosing Config's default block: `eval_stop: {max_steps: 7}` keeps the
    experiment's atol), or else the class's."""
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        _fail(where, f"expected a mapping of {cls.__name__} fields, got {value!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls, include_extras=True)
    unknown = sorted(set(value) - set(fields))
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        _fail(key, f"unknown key; allowed keys: {sorted(fields)}")
    kwargs = {}
    for name, f in fields.items():
        key = f"{where}.{name}" if where else name
        block = dataclasses.is_dataclass(hints[name]) and isinstance(
            f.default, hints[name]
        )
        if name in value and block:
            kwargs[name] = _to_dataclass(type(f.default), value[name], key, f.default)
        elif name in value:
            kwargs[name] = _convert(hints[name], value[name], key)
        elif default is not None:
            kwargs[name] = getattr(default, name)
        elif (
            f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ):
            _fail(key, "missing required key")
    try:  # a Config's own range checks (`__post_init__`) name their key
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(
            f"config{' key `' + where + '`' if where else ''}: {e}"
        ) from None


def describe_fields(cls) -> list[tuple[str, str, Any]]:
    """(name, type, default) of every field of a config dataclass: what
    `iterjax run NAME --help` lists."""
    hints = typing.get_type_hints(cls, include_extras=True)
    rows = []
    for f in dataclasses.fields(cls):
        default = f.default
        if (
            default is dataclasses.MISSING
            and f.default_factory is not dataclasses.MISSING
        ):
            default = f.default_factory()
        rows.append((f.name, _describe(hints[f.name]), to_dict(default)))
    return rows


def to_dict(cfg) -> Any:
    """A plain (YAML-serialisable) view of a config dataclass."""
    if isinstance(cfg, Spec):
        return {"name": cfg.name, **{k: to_dict(v) for k, v in cfg.options}}
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    return cfg


def set_dotted(data: dict, dotted: str, value: Any) -> None:
    """`data['a']['b'] = value` for `dotted = 'a.b'` (creating mappings as needed).

    A digit indexes a list (`solvers.0.name`); a list element given as a name
    (`solvers: [picard]`) becomes the mapping `{name: picard}` to take a key.
    """
    keys = dotted.split(".")
    for prefix in ("sweep.grid.", "sweep.random.space."):  # their keys are dotted
        if dotted.startswith(prefix) and len(dotted) > len(prefix):
            keys = prefix.split(".")[:-1] + [dotted[len(prefix) :]]
    node = data
    for k in keys[:-1]:
        key = _key(node, k, dotted)
        if isinstance(node, dict):
            node.setdefault(key, {})
        if isinstance(node[key], str):  # a spec's shorthand: its name
            node[key] = {"name": node[key]}
        node = node[key]
    node[_key(node, keys[-1], dotted)] = value


def _key(node, k, dotted):
    if isinstance(node, list):
        if not k.isdigit() or int(k) >= len(node):
            raise ConfigError(
                f"config key `{dotted}`: `{k}` is not an index of a list of {len(node)}"
            )
        return int(k)
    if not isinstance(node, dict):
        raise ConfigError(f"config key `{dotted}`: `{k}` is not in a mapping")
    return k


def parse_overrides(items) -> list[tuple[str, Any]]:
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        out.append((key.strip(), read_yaml(raw, f"override {item!r}")))
    return out


# names and dotted import paths: no path separators or `..` (the run directory
# is <out>/<experiment>/<stamp>)
_EXPERIMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


# The built-in configs: the package `iterjax.configs` (configs/ in the
# repository), wherever it is installed; a folder, since pip never zips.
CONFIG_DIR = pathlib.Path(str(importlib.resources.files("iterjax.configs")))


def resolve_config_path(name_or_path: str, folder=None) -> pathlib.Path:
    """A config file: a path (relative to `folder`, else to the current
    directory), or the name of a built-in config."""
    p = pathlib.Path(name_or_path)
    for candidate in (pathlib.Path(folder or ".") / p, p):
        if candidate.is_file():
            return candidate
    candidate = CONFIG_DIR / (p.name if p.suffix else p.name + ".yaml")
    if candidate.exists():
        return candidate
    raise ConfigError(f"no config file {name_or_path!r} (looked in {CONFIG_DIR})")


def read_config(path) -> dict:
    """The config file at `path` as a mapping, its `base:` resolved: the keys
    `load` starts from, before overrides and smoke."""
    return _read_config(pathlib.Path(path), ())


def _read_config(path, chain):
    """The config file `path` as a mapping, its `base:` resolved."""
    with open(path) as f:
        data = read_yaml(f, str(path)) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping")
    return _rebase(data, path.parent, (*chain, path))


def _rebase(data, folder, chain):
    """`base: NAME` (a built-in config, or a file's path relative to the config
    that names it): that config's keys, with this one's over them (mappings
    merged key by key, smoke blocks and sweeps included; anything else
    replaced)."""
    if not isinstance(data, dict) or "base" not in data:
        return data
    base = data.pop("base")
    if not isinstance(base, str):
        _fail("base", f"must name a built-in config or a file, got {base!r}")
    path = resolve_config_path(base, folder)
    seen = [p.resolve() for p in chain]
    if path.resolve() in seen:
        loop = " -> ".join(str(p) for p in (*chain, path))
        _fail("base", f"the configs base each other in a cycle: {loop}")
    return _merge(_read_config(path, chain), data)


def _merge(base, over):
    out = dict(base)
    for k, v in over.items():
        both = isinstance(v, dict) and isinstance(out.get(k), dict)
        out[k] = _merge(out[k], v) if both else v
    return out


def load(source, overrides=(), smoke: bool = False, values=None):
    """Read a config; returns `(experiment_name, raw_dict, platform)`.

    `source` is a YAML file's path or the mapping itself. Overrides (`key=value`
    strings, and `values`: dotted keys to Python values; with `smoke`, the
    config's `smoke:` block first) are applied, then the raw dict is turned into
    the experiment's `Config` by `from_dict`, and the reserved top-level keys
    (`sweep`, `mesh`, ...) into a `Platform`.
    """
    if isinstance(source, dict):
        data = _rebase(copy.deepcopy(source), pathlib.Path.cwd(), ())
    else:
        data = _read_config(pathlib.Path(source), ())
    if not isinstance(data, dict) or "experiment" not in data:
        raise ConfigError(
            f"{source}: a config must be a mapping with an `experiment` key"
        )
    name = data.pop("experiment")
    if not (isinstance(name, str) and _EXPERIMENT.fullmatch(name)):
        _fail(
            "experiment",
            f"{name!r} is not an experiment name or a module's import path "
            "(letters, digits, _ and dots, as in mypkg.my_experiment)",
        )
    smoke_overrides = data.pop("smoke", {}) or {}
    if smoke:
        for k, v in smoke_overrides.items():
            set_dotted(data, k, v)
    for k, v in [*parse_overrides(overrides), *(values or {}).items()]:
        set_dotted(data, k, v)
    reserved = {f.name for f in dataclasses.fields(Platform)}
    platform = {k: data.pop(k) for k in list(data) if k in reserved}
    return name, data, from_dict(Platform, platform)


# --- The reserved top-level keys: how a config runs rather than what it computes.


@dataclasses.dataclass(frozen=True)
class RandomSearch:
    """`num` draws from `space`: each key maps to one distribution,
    `{uniform: [lo, hi]}`, `{log_uniform: [lo, hi]}`, `{int_uniform: [lo, hi]}`
    (both ends included) or `{choice: [v1, v2, ...]}`."""

    num: int  # draws
    space: dict[str, dict[str, tuple[Any, ...]]]  # dotted key -> {kind: values}
    seed: int = 0  # the draws' seed

    def __post_init__(self):
        if self.num < 1:
            _fail("sweep.random.num", f"must be >= 1, got {self.num}")
        for key, dist in self.space.items():
            where = f"sweep.random.space.{key}"
            if len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
                _fail(where, f"one of {sorted(DISTRIBUTIONS)}, got {dist!r}")
            ((kind, values),) = dist.items()
            if kind == "choice":
                if not values:
                    _fail(f"{where}.choice", "needs at least one value")
                continue
            lo, hi = (values + (None, None))[:2] if len(values) == 2 else (None, None)
            ok = (
                all(
                    isinstance(v, (int, float)) and not isinstance(v, bool)
                    for v in (lo, hi)
                )
                and lo <= hi
            )
            if kind == "log_uniform":
                ok = ok and lo > 0
            if kind == "int_uniform":
                ok = ok and isinstance(lo, int) and isinstance(hi, int)
            if not ok:
                _fail(
                    f"{where}.{kind}",
                    f"expected [lo, hi] with lo <= hi, got {list(values)}",
                )


DISTRIBUTIONS = ("uniform", "log_uniform", "int_uniform", "choice")


@dataclasses.dataclass(frozen=True)
class Sweep:
    """Runs of one config over several settings (see `iterjax.lab.sweep`).

    The members are the product of `grid` (dotted key -> list of values), the
    `random` draws and the seeds (`seeds: 8` means 0..7, or a list), which set
    the config key `seed_key`. `vmap: null` vectorises the members with `jax.vmap`
    when the experiment allows it for every key that varies, `true` insists,
    `false` runs them one after another.
    """

    # dotted key -> list of values
    grid: dict[str, tuple[Any, ...]] = dataclasses.field(default_factory=dict)
    random: RandomSearch | None = None  # random search, below
    seeds: int | tuple[int, ...] = ()  # n (0..n-1) or a list of seeds
    seed_key: str = "seed"  # the config key the seeds set
    # null: vectorise where the experiment allows; true: insist; false: one by one
    vmap: bool | None = None

    def __post_init__(self):
        for key, values in self.grid.items():
            if not values:
                _fail(f"sweep.grid.{key}", "needs at least one value")
        if isinstance(self.seeds, int) and self.seeds < 1:
            _fail("sweep.seeds", f"a count >= 1 or a list of ints, got {self.seeds}")
        if self.seed_key in self.grid and self.seeds:
            _fail(f"sweep.grid.{self.seed_key}", "is also set by `sweep.seeds`")
        if not (self.grid or self.random or self.seeds):
            _fail("sweep", "sets none of `grid`, `random`, `seeds`")


@dataclasses.dataclass(frozen=True)
class MeshSpec:
    """A device mesh over `jax.devices()`: `shape` (one -1 takes the devices
    left) and `axes` names. Sweeps shard their members over the first axis."""

    shape: tuple[int, ...] = (-1,)  # devices per axis; one -1 takes the rest
    axes: tuple[str, ...] = ("data",)  # axis names; sweeps shard over the first


@dataclasses.dataclass(frozen=True)
class DistributedSpec:
    """Arguments of `jax.distributed.initialize`; all None means auto-detect
    (SLURM, TPU pods, Open MPI), as does `distributed: auto`."""

    coordinator_address: str | None = None  # host:port of process 0
    num_processes: int | None = None  # processes in the job
    process_id: int | None = None  # this process's index


@dataclasses.dataclass(frozen=True)
class Launcher:
    """Where a sweep's members run: here, one after the other (`local`, the
    default), or as jobs through submitit (`submitit`): one job per vectorised
    group and one per member that runs alone, each writing its own rows; the
    head process waits for them and reports the sweep as usual, and `--resume`
    submits only the members without a row.

    `cluster`: submitit's executor, `auto` (SLURM where there is one, else
    local processes), `slurm`, `local` (processes on this machine) or `debug`
    (in this process). `folder`: submitit's logs and pickles (default
    `<run>/submitit`). `options`: passed to `executor.update_parameters`, e.g.
    `{timeout_min: 60, slurm_partition: gpu, gpus_per_node: 1}`.
    """

    name: Literal["local", "submitit"] = "local"  # here, or jobs through submitit
    cluster: Literal["auto", "slurm", "local", "debug"] = "auto"  # submitit's executor
    folder: str | None = None  # submitit's logs (default <run>/submitit)
    # submitit's executor parameters
    options: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Target:
    """A time-to-result target (the AlgoPerf protocol): the first logged row
    whose `metric` is at or below `below` (or at or above `above`) is recorded
    in `summary.json` as `target`: its step, the seconds since the run started
    and the device it ran on; `iterjax report` compares them across runs. A run
    that never gets there says `reached: false`. In a sweep, each member's row
    carries its own, and `summary.json`'s `target` gathers them per setting (a
    vectorised member is searched in the rows its `trial` returns, and has a
    step but no seconds of its own). Example: `target: {metric: loss, below: 0.3}`."""

    metric: str  # a logged column
    below: float | None = None  # reached at or below this
    above: float | None = None  # or at or above this (give one)

    def __post_init__(self):
        if (self.below is None) == (self.above is None):
            _fail("target", "give one of `below` and `above`")
        for key in ("below", "above"):
            value = getattr(self, key)
            if value is not None and not math.isfinite(value):
                _fail(f"target.{key}", f"must be a finite number, got {value!r}")

    def met(self, value) -> bool:
        """Whether a logged value meets the target (NaN and inf never do)."""
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return False
        x = float(value)
        if not math.isfinite(x):
            return False
        if self.below is not None:
            return x <= self.below
        return self.above is not None and x >= self.above

    def first(self, rows):
        """The first of `rows` (dicts) whose `metric` meets the target, or None."""
        return next((r for r in rows if self.met(r.get(self.metric))), None)


@dataclasses.dataclass(frozen=True)
class Platform:
    """The reserved top-level config keys."""

    sweep: Sweep | None = None  # runs over settings: grid, random, seeds
    mesh: MeshSpec | None = None  # a device mesh; sweeps shard over it
    distributed: Literal["auto"] | DistributedSpec | None = None  # multi-host
    compilation_cache: str | None = None  # a folder for JAX's persistent cache
    checkpoint_every: int = 0  # steps between checkpoints for --resume (0: none)
    # where logged rows go: metrics.jsonl (always: the run's record, which
    # resume cuts back) and, optionally, TensorBoard event files (tensorboard),
    # W&B offline runs (wandb) or a writer registered with
    # `registry.register("writer", name, cls)`
    writers: tuple[str, ...] = ("jsonl",)
    launcher: Launcher | None = None  # where a sweep's members run
    target: Target | None = None  # a time-to-result target

    def __post_init__(self):
        if self.launcher is not None and self.launcher.name != "local":
            if self.sweep is None:
                _fail("launcher", "runs a sweep's members as jobs: add a `sweep:`")
            if self.distributed is not None:
                _fail("launcher", "and `distributed` are two ways to scale: pick one")
        if "jsonl" not in self.writers:
            _fail("writers", "must include jsonl: metrics.jsonl is the run's record")
        unknown = sorted(set(self.writers) - {"jsonl", *registry.WRITERS})
        if unknown:
            known = ["jsonl", *sorted(registry.WRITERS)]
            _fail("writers", f"unknown {unknown}; known: {known}")
        for name in set(self.writers) - {"jsonl"}:
            try:  # a writer given by import path (wandb) is imported here
                registry.writer_class(name)
            except ImportError as e:
                _fail("writers", str(e))
        if self.checkpoint_every < 0:
            _fail("checkpoint_every", f"must be >= 0, got {self.checkpoint_every}")
        if self.mesh is not None:
            if len(self.mesh.shape) != len(self.mesh.axes):
                _fail("mesh", "`shape` and `axes` must have the same length")
            if sum(s == -1 for s in self.mesh.shape) > 1 or any(
                s == 0 or s < -1 for s in self.mesh.shape
            ):
                _fail(
                    "mesh.shape",
                    f"positive sizes and at most one -1, got {list(self.mesh.shape)}",
                )
