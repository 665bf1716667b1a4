"""optax's optimisers and schedules by name in configs, with typed, range-checked
options.

    optimizer:
      name: adamw
      learning_rate: {name: warmup_cosine, peak_value: 1e-2, warmup_steps: 100,
                      decay_steps: 1000}
      weight_decay: 1e-4

A config field typed `spec("optimizer")` (or `spec("schedule")`) holds such a
block; `registry.build("optimizer", cfg.optimizer)` gives the
`optax.GradientTransformation`. Options are the optax function's keyword
arguments, checked against its signature: an unknown or missing key, a wrong
type or a value out of range is a `ConfigError` that names the key. A
`learning_rate` (or a schedule's rate) is a number or a nested schedule block.
"""

import inspect
import numbers

import optax

from ..fixed_point import nag_gs
from ..tuning import schedules
from .records import RecordError, read_series
from .spec import ConfigError, Range, Spec, float_literal

SCHEDULES = {
    "constant": optax.constant_schedule,
    "linear": optax.linear_schedule,
    "cosine": optax.cosine_decay_schedule,
    "warmup_cosine": optax.warmup_cosine_decay_schedule,
    "warmup_constant": optax.warmup_constant_schedule,
    "sgdr": optax.sgdr_schedule,
    "exponential": optax.exponential_decay,
    "polynomial": optax.polynomial_schedule,
    "refined": schedules.refined_schedule,
}
OPTIMIZERS = {
    "sgd": optax.sgd,
    "adam": optax.adam,
    "adamw": optax.adamw,
    "polyak_sgd": optax.polyak_sgd,
    "nag_gs": nag_gs,
    "schedule_free_sgd": optax.contrib.schedule_free_sgd,
    "schedule_free_adamw": optax.contrib.schedule_free_adamw,
}
FUNCTION_KINDS = {"optimizer": OPTIMIZERS, "schedule": SCHEDULES}

# Bounds on the options that optax's signatures leave unstated, by name. Steps
# are ints >= 0 (counts of steps >= 1).
_POSITIVE = Range(0.0, lo_open=True)
_NONNEG = Range(0.0)
_UNIT = Range(0.0, 1.0)
_BOUNDS = {
    "learning_rate": _NONNEG,
    "max_learning_rate": _POSITIVE,
    "init_value": _NONNEG,
    "peak_value": _NONNEG,
    "end_value": _NONNEG,
    "value": _NONNEG,
    "alpha": _UNIT,
    "exponent": _POSITIVE,
    "power": _POSITIVE,
    "decay_rate": _POSITIVE,
    "b1": _UNIT,
    "b2": _UNIT,
    "momentum": _UNIT,
    "eps": _NONNEG,
    "weight_decay": _NONNEG,
    "weight_lr_power": _NONNEG,
    "smoothing": _UNIT,
    "scaling": _POSITIVE,
    "mu": _POSITIVE,
    "gamma": _POSITIVE,
    "decay_steps": Range(1),
    "transition_steps": Range(1),
    "warmup_steps": Range(0),
    "transition_begin": Range(0),
}
# Options a config cannot give: arrays, dtypes, callables and masks.
_HIDDEN = {"mask", "state_dtype", "mu_dtype", "accumulator_dtype", "nesterov_mu"}


def validate(kind: str, spec: Spec, where: str):
    """Build the optimiser or schedule `spec` names; a ConfigError names the key."""
    table = FUNCTION_KINDS[kind]
    if spec.name not in table:
        raise ConfigError(
            f"config key `{where}.name`: unknown {kind} {spec.name!r}; "
            f"allowed: {sorted(table)}"
        )
    fn = table[spec.name]
    try:
        return fn(**_kwargs(fn, spec.name, spec.options, where))
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config key `{where}`: {e}") from None


def _kwargs(fn, name, options, where) -> dict:
    """`fn`'s keyword arguments from a block's (key, value) pairs, checked."""
    params = {
        p.name: p
        for p in inspect.signature(fn).parameters.values()
        if p.name not in _HIDDEN
    }
    kwargs = {}
    for key, value in options:
        if key not in params:
            raise ConfigError(
                f"config key `{where}.{key}`: unknown option for {name}; "
                f"allowed: {sorted(params)}"
            )
        kwargs[key] = _value(key, value, params[key], f"{where}.{key}")
    missing = [k for k, p in params.items() if p.default is p.empty and k not in kwargs]
    if missing:
        raise ConfigError(
            f"config key `{where}.{missing[0]}`: {name} needs it (required: {missing})"
        )
    return kwargs


def _value(key, value, param, where):
    """A config value for `param`, converted and checked."""
    if (
        key in ("learning_rate", "scaling")
        and isinstance(value, (dict, str))
        and (float_literal(value) is None)
    ):
        return build_schedule(value, where)
    if key == "cosine_kwargs":  # SGDR: a list of cosine blocks
        if not isinstance(value, list) or not value:
            raise ConfigError(
                f"config key `{where}`: expected a list of warm-up + cosine "
                f"blocks, got {value!r}"
            )
        return [_cosine(block, f"{where}[{i}]") for i, block in enumerate(value)]
    if key == "grad_norms":
        return _norms(value, where)
    if key == "variant" and isinstance(value, str):
        return value
    default = param.default
    if isinstance(value, bool) or isinstance(default, bool):
        if not isinstance(value, bool) or not isinstance(default, bool):
            raise ConfigError(f"config key `{where}`: wrong type {value!r}")
        return value
    number = float_literal(value) if isinstance(value, str) else value
    if value is None and default is None:
        return None
    if not isinstance(number, numbers.Real):
        raise ConfigError(f"config key `{where}`: expected a number, got {value!r}")
    if _is_int(param) and not isinstance(number, int):
        raise ConfigError(f"config key `{where}`: expected an int, got {value!r}")
    problem = _BOUNDS.get(key, Range()).check(number)
    if problem:
        raise ConfigError(f"config key `{where}`: {problem}")
    return number


def _is_int(param):
    ann = param.annotation
    return ann is int or (isinstance(ann, str) and ann == "int")


def _cosine(block, where):
    """One SGDR cycle: the keyword arguments of a warm-up + cosine schedule."""
    if not isinstance(block, dict):
        raise ConfigError(f"config key `{where}`: expected a mapping, got {block!r}")
    fn = optax.warmup_cosine_decay_schedule
    return _kwargs(fn, "an sgdr cycle", sorted(block.items()), where)


def _norms(value, where):
    if isinstance(value, str):  # a run's metrics: path/metrics.jsonl[:key]
        try:
            return read_series(value, where)
        except RecordError as e:
            raise ConfigError(str(e)) from None
    if not isinstance(value, list) or not all(
        isinstance(v, numbers.Real) for v in value
    ):
        raise ConfigError(
            f"config key `{where}`: expected a list of gradient norms or "
            f"'<run dir or metrics.jsonl>:<key>', got {value!r}"
        )
    return value


def build_schedule(value, where):
    """The optax schedule a config value (a name or a block) names."""
    spec = Spec.parse(value, where, "a number, a schedule name")
    return validate("schedule", spec, where)
