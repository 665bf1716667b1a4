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

import dataclasses
import re
import types
import typing
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key."""


@dataclasses.dataclass(frozen=True)
class Spec:
    """A registry object by name with options, e.g. `{name: anderson, history: 5}`.

    `kind` says which registry validates it (`solver`, `adjoint`, `linear_solver`).
    """

    name: str
    options: tuple = ()  # sorted (key, value) pairs

    def kwargs(self) -> dict:
        return dict(self.options)

    @property
    def label(self) -> str:
        """`name(key=value,...)` for tables and plots, e.g. `picard(window=64)`."""
        show = lambda v: v["name"] if isinstance(v, dict) and "name" in v else v
        opts = ",".join(f"{k}={show(v)}" for k, v in self.options)
        return f"{self.name}({opts})" if opts else self.name


def spec(kind: str):
    """Annotate a field as a registry `Spec` of the given kind."""
    return typing.Annotated[Spec, kind]


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def float_literal(value):
    """`float(value)` for a string like 1e-3, which YAML 1.1 reads as a string
    (it wants 1.0e-3); else None."""
    if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        return float(value)
    return None


_SCALARS = {int: "an int", float: "a number", str: "a string", bool: "true or false"}


def _fail(where, msg):
    raise ConfigError(f"config key `{where or '<root>'}`: {msg}")


def from_dict(cls, data: Any, where: str = ""):
    """Build dataclass `cls` from a mapping, checking every key and type."""
    return _convert(cls, data, where)


def _convert(tp, value, where):
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        base, kind = typing.get_args(tp)
        assert base is Spec
        return _to_spec(kind, value, where)
    if dataclasses.is_dataclass(tp):
        return _to_dataclass(tp, value, where)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(a, value, where)
            except ConfigError as e:
                errors.append(str(e))
        _fail(where, f"{value!r} matches none of {args}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            _fail(where, f"{value!r} is not one of {list(choices)}")
        return value
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
        if tp is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if tp is float and (number := float_literal(value)) is not None:
            return number
        if not ok:
            _fail(where, f"expected {_SCALARS[tp]}, got {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {tp!r} at {where}")


def _to_dataclass(cls, value, where):
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
        if name in value:
            kwargs[name] = _convert(hints[name], value[name], key)
        elif (
            f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ):
            _fail(key, "missing required key")
    return cls(**kwargs)


def _to_spec(kind, value, where):
    from . import registry

    if isinstance(value, Spec):
        return value
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict) or "name" not in value:
        _fail(where, f"expected a {kind} name or a mapping with `name`, got {value!r}")
    options = {k: v for k, v in value.items() if k != "name"}
    out = Spec(value["name"], tuple(sorted(options.items())))
    registry.validate(kind, out, where)
    return out


def to_dict(cfg) -> Any:
    """A plain (YAML-serialisable) view of a config dataclass."""
    if isinstance(cfg, Spec):
        return {"name": cfg.name, **{k: to_dict(v) for k, v in cfg.options}}
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    return cfg


def set_dotted(data: dict, dotted: str, value: Any) -> None:
    """`data['a']['b'] = value` for `dotted = 'a.b'` (creating mappings as needed)."""
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key `{dotted}`: `{k}` is not a mapping")
    node[keys[-1]] = value


def parse_overrides(items) -> list[tuple[str, Any]]:
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        out.append((key.strip(), yaml.safe_load(raw)))
    return out


def load(path, overrides=(), smoke: bool = False):
    """Read a config file; returns `(experiment_name, raw_dict)` after overrides.

    The raw dict is turned into the experiment's `Config` by `from_dict`.
    """
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict) or "experiment" not in data:
        raise ConfigError(
            f"{path}: a config must be a mapping with an `experiment` key"
        )
    name = data.pop("experiment")
    smoke_overrides = data.pop("smoke", {}) or {}
    if smoke:
        for k, v in smoke_overrides.items():
            set_dotted(data, k, v)
    for k, v in parse_overrides(overrides):
        set_dotted(data, k, v)
    return name, data
