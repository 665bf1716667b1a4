"""The config's vocabulary shared by `config` and `registry`: the error type,
`Spec` (a registry object named in a config) and `Range` (a bound on a number)."""

import dataclasses
import math
import re
import typing

import yaml


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key."""


@dataclasses.dataclass(frozen=True)
class Spec:
    """A registry object by name with options, e.g. `{name: anderson, history: 5}`.

    `kind` says which registry validates it (`solver`, `adjoint`, `linear_solver`).
    A spec read from a config carries the object its validation built, so that
    `registry.build` does not build it a second time.
    """

    name: str
    options: tuple = ()  # sorted (key, value) pairs
    built: typing.Any = dataclasses.field(default=None, compare=False, repr=False)

    def kwargs(self) -> dict:
        return dict(self.options)

    @classmethod
    def parse(cls, value, where: str, what: str) -> "Spec":
        """A config value, a name or a mapping with `name`, as an unvalidated
        Spec; a ConfigError names `where` and says `what` was expected."""
        if isinstance(value, str):
            value = {"name": value}
        if not isinstance(value, dict) or "name" not in value:
            raise ConfigError(
                f"config key `{where}`: expected {what} or a mapping with `name`, "
                f"got {value!r}"
            )
        options = tuple(sorted((k, v) for k, v in value.items() if k != "name"))
        return cls(value["name"], options)

    @property
    def label(self) -> str:
        """`name(key=value,...)` for tables and plots, e.g. `picard(window=64)`;
        a nested spec shows its own options, `cg(preconditioner=multigrid(
        coarsening=galerkin))`."""
        nested = lambda v: isinstance(v, dict) and "name" in v  # else plain data
        show = lambda v: Spec.parse(v, "", "").label if nested(v) else v
        opts = ",".join(f"{k}={show(v)}" for k, v in self.options)
        return f"{self.name}({opts})" if opts else self.name


def spec(kind: str):
    """Annotate a field as a registry `Spec` of the given kind."""
    return typing.Annotated[Spec, kind]


@dataclasses.dataclass(frozen=True)
class Range:
    """A bound on a config number, as `typing.Annotated` metadata: the loader
    checks it on every value (list items too) and names the key when it fails.

    Example: `steps: Annotated[int, Range(lo=1)] = 100`, or the aliases below.
    """

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def check(self, value) -> str | None:
        """None when `value` is inside, else what is wrong (NaN and inf are
        never inside: a bounded number is a finite one)."""
        if isinstance(value, float) and not math.isfinite(value):
            return f"must be a finite number, got {value!r}"
        if self.lo is not None and (
            value <= self.lo if self.lo_open else value < self.lo
        ):
            return f"must be {'>' if self.lo_open else '>='} {self.lo}, got {value!r}"
        if self.hi is not None and (
            value >= self.hi if self.hi_open else value > self.hi
        ):
            return f"must be {'<' if self.hi_open else '<='} {self.hi}, got {value!r}"
        return None


# The bounds that experiments' configs use most. Sizes and counts stay below
# 2^31 (JAX's default int32 indexing): a `dim: 10000000000000` is refused naming
# its key, not met by an out-of-memory error after the run directory exists.
_INT32 = 2**31 - 1
Count = typing.Annotated[int, Range(lo=1, hi=_INT32)]  # sizes, steps, repeats
Positive = typing.Annotated[float, Range(lo=0.0, lo_open=True)]  # lrs, tolerances
NonNegative = typing.Annotated[float, Range(lo=0.0)]
NonNegativeInt = typing.Annotated[int, Range(lo=0, hi=_INT32)]
Fraction = typing.Annotated[float, Range(lo=0.0, hi=1.0)]


@dataclasses.dataclass(frozen=True)
class Stop:
    """A phase's stopping rule, spelled as the solvers spell it.

    An experiment's main solve reads `atol` / `rtol` / `max_steps` at the top of
    its config; every other phase (an evaluation, a gradient check, a harder
    problem) has a `<phase>_stop` block of this type, e.g.
    `eval_stop: {atol: 1e-5, max_steps: 100}`, so that one option has one
    spelling everywhere. `max_steps: null` keeps the solver's own budget.
    """

    atol: NonNegative = 1e-6
    rtol: NonNegative = 0.0
    max_steps: Count | None = None

    def kwargs(self, steps: str = "max_steps") -> dict:
        """The keyword arguments of a solver call; `steps` names the budget's
        argument (`max_sweeps` for `iterjax.scan`)."""
        out = {"atol": self.atol, "rtol": self.rtol}
        if self.max_steps is not None:
            out[steps] = self.max_steps
        return out


class _UniqueKeys(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML
    itself lets the last one win, silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {key!r} is given twice (lines {seen[key]} and "
                    f"{key_node.start_mark.line + 1})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def read_yaml(text, source: str):
    """The YAML document `text` (a string or a file), or a ConfigError naming
    `source` and the line: malformed YAML, tabs, a key given twice."""
    try:
        return yaml.load(text, Loader=_UniqueKeys)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f", line {where.line + 1}" if where is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        if "\t" in problem or "\\t" in problem:
            problem += " (YAML indents with spaces, not tabs)"
        raise ConfigError(f"{source}{line}: not valid YAML: {problem}") from None


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def float_literal(value):
    """`float(value)` for a string like 1e-3, which YAML 1.1 reads as a string
    (it wants 1.0e-3); else None."""
    if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        return float(value)
    return None
