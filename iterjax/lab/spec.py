"""The config's vocabulary shared by `config` and `registry`: the error type and
`Spec`, a registry object named in a config."""

import dataclasses
import re
import typing


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
