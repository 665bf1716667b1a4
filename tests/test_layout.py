"""The package's import structure: the numerical core never imports the platform
(`iterjax.lab`) or the experiments, no module imports inside a function, and no
two modules of `iterjax` import each other (directly or through others)."""

import ast
import contextlib
import io
import pathlib
import tomllib

import optax
import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
SETUPTOOLS = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]


def _folder(package):
    """The folder `package` installs from, by pyproject's `package-dir`."""
    dirs = SETUPTOOLS["package-dir"]
    base = max(
        (b for b in dirs if package == b or package.startswith(b + ".")), key=len
    )
    rest = package.removeprefix(base).lstrip(".")
    return REPO / dirs[base] / rest.replace(".", "/")


# every module the wheel installs, by its import name
MODULES = {
    package if f.name == "__init__.py" else f"{package}.{f.stem}": f
    for package in SETUPTOOLS["packages"]
    for f in sorted(_folder(package).glob("*.py"))
}
# the platform, its experiments and the `python -m iterjax` command line
PLATFORM = ("iterjax.lab", "iterjax.experiments", "iterjax.__main__")


def _resolve(module, node):
    """The absolute names an import statement in `module` refers to."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = ""
    if node.level:  # relative: start from the module's package, go up
        parts = module.split(".")
        if MODULES[module].name != "__init__.py":
            parts = parts[:-1]
        base = ".".join(parts[: len(parts) - node.level + 1])
    base = ".".join(filter(None, [base, node.module]))
    # `from pkg import sub` names the submodule when there is one
    return [
        f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
        for a in node.names
    ]


def _imports(module):
    """(names, function-level import lines) of one module."""
    tree = ast.parse(MODULES[module].read_text())
    names, nested = [], []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names += _resolve(module, node)
            if node not in tree.body:
                nested.append(node.lineno)
    return names, nested


GRAPH = {m: _imports(m) for m in MODULES}


def _internal(names):
    return {n for n in names if n in MODULES}


def test_the_wheel_lists_every_package_folder():
    # pyproject names its packages one by one (experiments/ and configs/ install
    # as subpackages of iterjax): a folder left out would be left out of the wheel
    listed = {_folder(p) for p in SETUPTOOLS["packages"]}
    roots = {REPO / d for d in SETUPTOOLS["package-dir"].values()}
    folders = {f.parent for r in roots for f in r.rglob("__init__.py")}
    assert folders == listed, sorted(map(str, folders ^ listed))
    assert {"iterjax.experiments.common.cells", "iterjax.configs"} <= set(MODULES)


def test_resolution_sees_known_edges():
    # guards the checks below against a resolver that sees nothing
    assert "iterjax._iterate" in _internal(GRAPH["iterjax.linear.neumann"][0])
    assert "iterjax.lab.registry" in _internal(GRAPH["iterjax.lab.config"][0])
    assert "iterjax.fixed_point" in _internal(GRAPH["iterjax.bilevel._argmin"][0])


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_function_level_imports(module):
    assert not GRAPH[module][1], f"{module}: imports inside a function, lines"


@pytest.mark.parametrize(
    "module", sorted(m for m in MODULES if not m.startswith(PLATFORM))
)
def test_core_never_imports_the_platform(module):
    bad = [n for n in GRAPH[module][0] if n.startswith(PLATFORM)]
    assert not bad, f"{module} imports {bad}"


def _owner_of_private(name):
    """The package whose private module `name` is (`iterjax.sequence._core` ->
    `iterjax.sequence`), or None when no part of it is private."""
    parts = name.split(".")
    for i, part in enumerate(parts[1:], 1):
        if part.startswith("_") and not part.startswith("__"):
            return ".".join(parts[:i])
    return None


def _private_imports_out_of_place(module, names):
    """Imports of private modules that `module` may not make: only modules of
    the owning package may (the top-level `iterjax._*` modules are the core's
    shared base), and outside the core only `iterjax.internal` is the door."""
    bad = []
    for name in names:
        owner = _owner_of_private(name)
        if owner is None or module == "iterjax.internal":
            continue
        inside = module == owner or module.startswith(owner + ".")
        if not inside or (owner == "iterjax" and module.startswith(PLATFORM)):
            bad.append(name)
    return bad


@pytest.mark.parametrize("module", sorted(MODULES))
def test_private_modules_cross_packages_only_through_iterjax_internal(module):
    bad = _private_imports_out_of_place(module, _internal(GRAPH[module][0]))
    assert not bad, f"{module} imports {bad}: use iterjax.internal"


def test_benchmarks_import_no_private_module():
    for path in sorted((REPO / "benchmarks").glob("*.py")):
        tree = ast.parse(path.read_text())
        names = [
            n.module if isinstance(n, ast.ImportFrom) else a.name
            for n in ast.walk(tree)
            if isinstance(n, (ast.Import, ast.ImportFrom))
            and not getattr(n, "level", 0)
            for a in n.names
        ]
        bad = [n for n in names if n.startswith("iterjax") and _owner_of_private(n)]
        assert not bad, f"{path.name} imports {bad}: use iterjax.internal"


def test_the_private_import_rule_sees_a_violation():
    # guards the rule above against one that passes everything
    assert _private_imports_out_of_place(
        "iterjax.experiments.common.cells", ["iterjax.sequence._core"]
    )
    assert _private_imports_out_of_place("iterjax.lab.registry", ["iterjax._iterate"])
    assert _private_imports_out_of_place(
        "iterjax.bilevel._argmin", ["iterjax.linear._base"]
    )
    assert not _private_imports_out_of_place(
        "iterjax.bilevel._argmin", ["iterjax._tree"]
    )


def test_no_import_cycles():
    # A module's own parent packages are imported first by Python itself, so
    # an edge to an ancestor is not part of a cycle.
    edges = {
        m: {n for n in _internal(names) if not m.startswith(n + ".")}
        for m, (names, _) in GRAPH.items()
    }
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(edges[m]):
            if state.get(n) == "open":
                cycle = stack[stack.index(n) :] + [n]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m)


def test_version_comes_from_the_package_metadata():
    import importlib.metadata

    import iterjax
    from iterjax.lab import cli

    assert iterjax.__version__ == importlib.metadata.version("iterjax")
    # not capsys: with absl imported at collection (optax, above), capsys's
    # teardown met a closed stream and pytest lost sys.stderr (run alone)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        cli.main(["--version"])
    assert out.getvalue().strip() == f"iterjax {iterjax.__version__}"


def test_pyproject_states_ranges_and_constraints_pin_them():
    import tomllib

    root = REPO
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    assert all(">=" in d and "==" not in d for d in project["dependencies"])
    name = lambda d: d.split(">=")[0].lower().replace("_", "-")  # PEP 503
    pins = {
        name(line.split("==")[0]): line.split("==")[1]
        for line in (root / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    }
    for dep in project["dependencies"]:
        assert name(dep) in pins, dep
    # the library's core needs none of the platform's packages, nor flax
    core = {name(d) for d in project["dependencies"]}
    platform = {"matplotlib", "scikit-learn", "rich", "pyyaml", "orbax-checkpoint"}
    assert not core & {"flax", *platform}


@pytest.mark.slow  # a subprocess
def test_the_core_runs_without_the_platforms_dependencies():
    # A solver-only install (`pip install iterjax`, no extras) has jax, optax
    # (and what they pull in: chex, scipy) but no flax, matplotlib, scikit-learn,
    # rich, pyyaml or orbax: importing iterjax and solving must not need them,
    # nor the platform; `iterjax.deq` and `iterjax.lab` say which extra they need.
    import subprocess
    import sys

    script = """
import importlib.abc, sys
BLOCKED = ("flax", "matplotlib", "sklearn", "rich", "yaml", "orbax")
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"blocked: {name}", name=name)
sys.meta_path.insert(0, Block())
import jax.numpy as jnp
import iterjax
sol = iterjax.fixed_point(lambda y, a: jnp.cos(y), jnp.array(1.0), atol=1e-6)
_, ys = iterjax.scan(lambda h, x: (0.5 * h + x, h), jnp.zeros(()), jnp.ones(8))
s = iterjax.classical.bradley_terry(jnp.array([[0.0, 2.0], [1.0, 0.0]]))
w = iterjax.argmin(lambda w, t: jnp.sum((w - t) ** 2), jnp.zeros(2), jnp.ones(2))
assert bool(sol.converged) and bool(s.converged) and bool(w.converged), (sol, s)
platform = ("iterjax.lab", "iterjax.experiments", "iterjax.deq")
assert not any(m.startswith(platform) for m in sys.modules)
assert not any(m.split(".")[0] in BLOCKED for m in sys.modules)
for name, extra in (("deq", "flax"), ("lab", "lab")):
    try:
        getattr(iterjax, name)
    except ModuleNotFoundError as e:
        assert f"pip install 'iterjax[{extra}]'" in str(e), e
    else:
        raise AssertionError(f"iterjax.{name} imported without its extra")
import contextlib, io
from iterjax._command import main
err = io.StringIO()
with contextlib.redirect_stderr(err):
    code = main(["--help"])
assert code == 2 and "pip install 'iterjax[lab]'" in err.getvalue(), err.getvalue()
print("ok")
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_deq_is_there_on_first_use():
    import iterjax

    assert iterjax.deq.DEQ.__module__.startswith("iterjax.deq")
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        iterjax.nope  # noqa: B018


def _pytree_classes():
    """Every class of the core built on `iterjax._struct.PyTreeNode`, recursively."""
    import iterjax.classical  # noqa: F401  (import every wing's classes)
    from iterjax._struct import PyTreeNode

    found, todo = set(), [PyTreeNode]
    while todo:
        for sub in todo.pop().__subclasses__():
            where = sub.__module__
            if where.startswith("iterjax") and sub not in found:
                found.add(sub)
                todo.append(sub)
    core = [c for c in found if not c.__module__.startswith(PLATFORM)]
    return sorted(core, key=lambda c: c.__qualname__)


PLATFORM = ("iterjax.lab", "iterjax.experiments")


# A float that fixes a shape cannot be traced: SparseNewton keeps ceil(density n)
# entries per column; SmoothedAggregation's theta picks the aggregates (host
# setup), and its operator complexity is a fact of that setup.
STATIC_FLOATS = {
    ("SparseNewton", "density"),
    ("SmoothedAggregation", "theta"),
    ("SmoothedAggregation", "operator_complexity"),
}


def test_hyperparameters_follow_one_rule_floats_are_leaves_ints_static():
    import dataclasses

    classes = _pytree_classes()
    names = {c.__name__ for c in classes}
    assert {"SOBA", "PhantomAdjoint", "Neumann", "Implicit", "CG", "Exp3"} <= names
    wrong = []
    for cls in classes:
        for field in dataclasses.fields(cls):
            leaf = field.metadata.get("pytree_node", True)
            kind = getattr(field.type, "__name__", str(field.type))
            if kind in ("float", "float | None") and not leaf:
                if (cls.__name__, field.name) not in STATIC_FLOATS:
                    wrong.append(f"{cls.__name__}.{field.name}: a static float")
            if kind == "int" and leaf:
                wrong.append(f"{cls.__name__}.{field.name}: an int leaf")
    assert not wrong, wrong


def test_abstract_bases_cannot_be_instantiated():
    from iterjax._iterate import AbstractFixedPointSolver
    from iterjax.bilevel._hypergradient import AbstractMethod
    from iterjax.bilevel._stochastic import _Stochastic
    from iterjax.implicit import AbstractAdjoint
    from iterjax.linear._base import AbstractLinearSolver
    from iterjax.linear.preconditioners import AbstractPreconditioner

    bases = [AbstractFixedPointSolver, AbstractMethod, AbstractAdjoint]
    bases += [AbstractLinearSolver, AbstractPreconditioner]
    for base in bases:
        with pytest.raises(TypeError, match="abstract"):
            base()
    with pytest.raises(TypeError, match="abstract"):
        _Stochastic(lambda *a: 0.0, lambda *a: 0.0, optax.sgd(0.1))

    class Incomplete(AbstractFixedPointSolver):  # no step
        def init(self, fn, y0, args):
            return None

    with pytest.raises(TypeError, match="step"):
        Incomplete()


def test_the_platform_is_an_attribute_of_the_package():
    import iterjax
    import iterjax.lab as lab

    assert iterjax.lab is lab
    with pytest.raises(AttributeError, match="no attribute 'labs'"):
        iterjax.labs
