"""Names used in config files, resolved through explicit dictionaries."""

import dataclasses
import importlib
import typing

import jax

from .. import AbstractFixedPointSolver, implicit, linear, sequence
from ..fixed_point import (
    NAGGS,
    Anderson,
    AsyncCoordinates,
    Backtracking,
    Broyden,
    Halpern,
    LazyNewton,
    Momentum,
    Newton,
    Picard,
    Relaxed,
    Restarted,
    RestartRule,
    Safeguarded,
    Switched,
)
from . import optim
from .spec import ConfigError, Spec, float_literal
from .writers import WRITERS
from .writers import writer_class as writer_class

EXPERIMENTS = {
    "fixed_point_study": "iterjax.experiments.fixed_point_study",
    "jacobi_rnn": "iterjax.experiments.jacobi_rnn",
    "deer_gru": "iterjax.experiments.deer_gru",
    "picard_diffusion": "iterjax.experiments.picard_diffusion",
    "charlm_train": "iterjax.experiments.charlm_train",
    "jacobi_decoding": "iterjax.experiments.jacobi_decoding",
    "deq_digits": "iterjax.experiments.deq_digits",
    "deq_memory": "iterjax.experiments.deq_memory",
    "deq_solvers": "iterjax.experiments.deq_solvers",
    "hpo_ridge": "iterjax.experiments.hpo_ridge",
    "hyperparameters_at_scale": "iterjax.experiments.hyperparameters_at_scale",
    "data_hypercleaning": "iterjax.experiments.data_hypercleaning",
    "bilevel_many_minimisers": "iterjax.experiments.bilevel_many_minimisers",
    "bilevel_constrained": "iterjax.experiments.bilevel_constrained",
    "bilevel_multiblock": "iterjax.experiments.bilevel_multiblock",
    "bloop_multitask": "iterjax.experiments.bloop_multitask",
    "stn_schedule": "iterjax.experiments.stn_schedule",
    "hyper_representation": "iterjax.experiments.hyper_representation",
    "hpo_logreg": "iterjax.experiments.hpo_logreg",
    "fixed_point_sweep": "iterjax.experiments.fixed_point_sweep",
    "hpo_sweep": "iterjax.experiments.hpo_sweep",
    "halpern_vs_picard": "iterjax.experiments.halpern_vs_picard",
    "warmstart_sequence": "iterjax.experiments.warmstart_sequence",
    "sinkhorn_newton": "iterjax.experiments.sinkhorn_newton",
    "bradley_terry": "iterjax.experiments.bradley_terry",
    "sor_bandit": "iterjax.experiments.sor_bandit",
    "krylov_recycle": "iterjax.experiments.krylov_recycle",
    "linear_solvers": "iterjax.experiments.linear_solvers",
    "learned_preconditioner": "iterjax.experiments.learned_preconditioner",
    "elk_ar_gru": "iterjax.experiments.elk_ar_gru",
    "schedules": "iterjax.experiments.schedules",
    "diffusion_train": "iterjax.experiments.diffusion_train",
    "picard_diffusion_trained": "iterjax.experiments.picard_diffusion_trained",
    "made_sampling": "iterjax.experiments.made_sampling",
    "diffusion_restoration": "iterjax.experiments.diffusion_restoration",
    "diffusion_inversion": "iterjax.experiments.diffusion_inversion",
    "fpdm": "iterjax.experiments.fpdm",
    "rti_policy": "iterjax.experiments.rti_policy",
    "graph_solvers": "iterjax.experiments.graph_solvers",
    "optex": "iterjax.experiments.optex",
}

SOLVERS = {
    "picard": Picard,
    "momentum": Momentum,
    "nag_gs": NAGGS,
    "async_coordinates": AsyncCoordinates,
    "anderson": Anderson,
    "broyden": Broyden,
    "newton": Newton,
    "halpern": Halpern,
    "lazy_newton": LazyNewton,
    "relaxed": Relaxed,
    "restarted": Restarted,
    "safeguarded": Safeguarded,
    "switched": Switched,
    "backtracking": Backtracking,
}
LINEAR_SOLVERS = {
    "cg": linear.CG,
    "flexible_cg": linear.FlexibleCG,
    "chebyshev": linear.Chebyshev,
    "gmres": linear.GMRES,
    "bicgstab": linear.BiCGStab,
    "neumann": linear.Neumann,
    "richardson": linear.Richardson,
    "sketch_and_project": linear.SketchAndProject,
    "block_kaczmarz": linear.BlockKaczmarz,
    "multigrid": linear.MultigridSolver,  # `cycle`: any preconditioner spec
}
ADJOINTS = {
    "implicit": implicit.ImplicitAdjoint,
    "unrolled": implicit.UnrolledAdjoint,
    "phantom": implicit.PhantomAdjoint,
}
SEQUENCE_METHODS = {
    "sequential": sequence.Sequential,
    "jacobi": sequence.Jacobi,
    "gauss_seidel": sequence.GaussSeidel,
    "picard": sequence.Picard,
    "deer": sequence.DEER,
    "quasi_deer": sequence.QuasiDEER,
    "elk": sequence.ELK,
    "quasi_elk": sequence.QuasiELK,
}
PRECONDITIONERS = {
    "jacobi": linear.JacobiPreconditioner,
    "chebyshev": linear.ChebyshevPreconditioner,
    "multigrid": linear.Multigrid,
    "nystrom": linear.NystromPreconditioner,
    "amg": linear.SmoothedAggregation,
    "ic": linear.IncompleteCholesky,
}
KINDS: dict[str, dict[str, typing.Any]] = {
    "solver": SOLVERS,
    "linear_solver": LINEAR_SOLVERS,
    "preconditioner": PRECONDITIONERS,
    "adjoint": ADJOINTS,
    "sequence_method": SEQUENCE_METHODS,
}


def _options(cls):
    return {f.name: f for f in dataclasses.fields(cls)}


def validate(kind, spec, where):
    """Check a `Spec`'s name and options by building it; return the object, or
    raise ConfigError naming the key."""
    if kind in optim.FUNCTION_KINDS:
        return optim.validate(kind, spec, where)
    table = KINDS[kind]
    if spec.name not in table:
        raise ConfigError(
            f"config key `{where}.name`: unknown {kind} {spec.name!r}; "
            f"allowed: {sorted(table)}"
        )
    try:
        return _build(kind, spec, where)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config key `{where}`: {e}") from None


def build(kind, spec, where="?", mesh=None):
    """Instantiate the object a `Spec` names (nested specs for linear solvers).

    `mesh` (a run's `Workdir.mesh`) goes to sequence methods that take one and
    were not given one: their time axis is then sharded over it (windowed
    methods excepted, which do not shard).
    """
    if kind in optim.FUNCTION_KINDS:
        return (
            spec.built if spec.built is not None else optim.validate(kind, spec, where)
        )
    obj = spec.built if spec.built is not None else _build(kind, spec, where)
    if (
        mesh is not None
        and "mesh" in _options(type(obj))
        and "mesh" not in spec.kwargs()
        and getattr(obj, "window", None) is None
    ):
        obj = dataclasses.replace(obj, mesh=mesh)
    return obj


def _build(kind, spec, where):
    cls = KINDS[kind][spec.name]
    fields = _options(cls)
    kwargs = {}
    for key, value in spec.options:
        if key not in fields:
            raise ConfigError(
                f"config key `{where}.{key}`: unknown option for {spec.name}; "
                f"allowed: {sorted(fields)}"
            )
        nested = _nested_kind(fields[key])
        if nested:  # a nested spec: a wrapped solver, a linear solver, ...
            value = build(nested, to_spec(nested, value, f"{where}.{key}"))
        elif isinstance(fields[key].default, RestartRule):  # its factors, or null
            value = _restart_rule(value, f"{where}.{key}")
        elif isinstance(value, jax.Array):
            pass  # a traced setting of a vectorised sweep; checked concrete before
        elif isinstance(value, bool) != isinstance(fields[key].default, bool):
            raise ConfigError(f"config key `{where}.{key}`: wrong type {value!r}")
        elif isinstance(fields[key].default, int) and not isinstance(
            fields[key].default, bool
        ):
            if not isinstance(value, int):
                raise ConfigError(
                    f"config key `{where}.{key}`: expected an int, got {value!r}"
                )
        elif isinstance(fields[key].default, float | None) and (
            float_literal(value) is not None
        ):
            value = float_literal(value)
        elif fields[key].default is None and not isinstance(value, int | float):
            raise ConfigError(
                f"config key `{where}.{key}`: expected a number or null, got {value!r}"
            )
        elif isinstance(fields[key].default, float) and not isinstance(
            value, (int, float)
        ):
            raise ConfigError(
                f"config key `{where}.{key}`: expected a number, got {value!r}"
            )
        kwargs[key] = value
    return cls(**kwargs)


_NESTED = {
    AbstractFixedPointSolver: "solver",
    linear.AbstractLinearSolver: "linear_solver",
    linear.AbstractPreconditioner: "preconditioner",
}


def _nested_kind(field):
    """The registry kind of a field that holds a solver, a linear solver or a
    preconditioner (its type, or a member of its union type), else None."""
    for member in typing.get_args(field.type) or (field.type,):
        for base, kind in _NESTED.items():
            if isinstance(member, type) and issubclass(member, base):
                return kind
    return None


def to_spec(kind, value, where) -> Spec:
    """A config value (a name, or a mapping with `name`) as a validated `Spec`."""
    if isinstance(value, Spec):
        return value
    out = Spec.parse(value, where, f"a {kind} name")
    return dataclasses.replace(out, built=validate(kind, out, where))


def _restart_rule(value, where):
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ConfigError(
            f"config key `{where}`: expected a mapping of RestartRule factors "
            f"or null, got {value!r}"
        )
    fields = _options(RestartRule)
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise ConfigError(
            f"config key `{where}.{unknown[0]}`: unknown option; "
            f"allowed: {sorted(fields)}"
        )
    factors = {k: float_literal(v) or v for k, v in value.items()}
    return RestartRule(**factors)


def experiment(name):
    """The module of experiment `name`: a built-in or registered name, or the
    import path of a module of the user's (`mypkg.my_experiment`) that defines a
    dataclass `Config` and `run(cfg, workdir) -> dict`."""
    path = EXPERIMENTS.get(name, name)
    try:
        module = importlib.import_module(path)
    except (ImportError, TypeError, ValueError) as e:
        raise ConfigError(
            f"config key `experiment`: unknown experiment {name!r}: neither a "
            f"built-in one ({', '.join(sorted(EXPERIMENTS))}) nor an importable "
            f"module ({e})"
        ) from None
    missing = [a for a in ("Config", "run") if not hasattr(module, a)]
    if missing:
        raise ConfigError(
            f"config key `experiment`: module {path!r} defines no "
            f"{' or '.join(missing)}; an experiment module defines a dataclass "
            "`Config` and `run(cfg, workdir) -> dict`"
        )
    return module


def register(kind: str, name: str, target) -> None:
    """Make `name` usable in config files.

    `kind` is "experiment" (`target`: a module's import path), "writer" (`target`:
    a class built as `target(run_dir)`, with `write(row)` for each logged row and
    `close()`, or its import path "module:Class", imported when a config selects
    it; then `writers: [jsonl, name]`), or one of "solver",
    "linear_solver", "adjoint", "sequence_method" (`target`: the class, built
    with the options the config gives, checked against its fields), or
    "optimizer", "schedule" (`target`: a function returning an optax
    `GradientTransformation` or schedule, called with the options the config
    gives, checked against its signature).
    Example: `register("solver", "my_picard", MyPicard)`, then
    `solvers: [{name: my_picard, damping: 0.5}]`.
    """
    kinds = ["experiment", "writer", *sorted(KINDS), *sorted(optim.FUNCTION_KINDS)]
    if kind not in kinds:
        raise ValueError(f"register: unknown kind {kind!r}; one of {kinds}")
    if kind == "experiment":
        if not isinstance(target, str):
            raise TypeError("register: an experiment is registered by its import path")
        EXPERIMENTS[name] = target
    elif kind == "writer":
        by_path = isinstance(target, str) and ":" in target
        if name == "jsonl" or not (
            by_path
            or all(callable(getattr(target, m, None)) for m in ("write", "close"))
        ):
            raise TypeError(
                f"register: a writer is a class with write(row) and close(), or "
                f"the import path 'module:Class' of one, and a name other than "
                f"'jsonl', got {name!r}: {target!r}"
            )
        WRITERS[name] = target
    elif kind in optim.FUNCTION_KINDS:
        if not callable(target):
            raise TypeError(f"register: a {kind} must be a function, got {target!r}")
        optim.FUNCTION_KINDS[kind][name] = target
    else:
        if not dataclasses.is_dataclass(target):
            raise TypeError(f"register: a {kind} must be a dataclass, got {target!r}")
        table: dict = KINDS[kind]
        table[name] = target
