"""The README's and the manual's examples, and the docstring examples, run as
written."""

import doctest
import importlib
import importlib.util
import inspect
import json
import pathlib
import re
import subprocess
import sys

import pytest

MODULES = [
    "iterjax.fixed_point._api",
    "iterjax.fixed_point.picard",
    "iterjax.fixed_point.momentum",
    "iterjax.fixed_point.async_coordinates",
    "iterjax.fixed_point.halpern",
    "iterjax.fixed_point.lazy_newton",
    "iterjax.fixed_point.chain",
    "iterjax.fixed_point.relaxed",
    "iterjax.fixed_point.restarted",
    "iterjax.fixed_point.safeguarded",
    "iterjax.diagnostics",
    "iterjax.sequence._scan",
    "iterjax.sequence.jacobi",
    "iterjax.sequence.picard",
    "iterjax.sequence.deer",
    "iterjax.sequence.decode",
    "iterjax.sequence.samplers",
    "iterjax.sequence.staged",
    "iterjax.linear.mfac",
    "iterjax.linear.preconditioners",
    "iterjax.linear.sketch",
    "iterjax.deq._layer",
    "iterjax.deq._cells",
    "iterjax.deq._stabilize",
    "iterjax.deq.linen",
    "iterjax.bilevel._argmin",
    "iterjax.bilevel._hypergradient",
    "iterjax.fixed_point.optax_solver",
    "iterjax.fixed_point.nag_gs",
    "iterjax.tuning.schedules",
    "iterjax.tuning.optex",
    "iterjax.bilevel.borep",
    "iterjax.bilevel.lvhba",
    "iterjax.bilevel.slbamm",
    "iterjax.bilevel.vpbgd",
    "iterjax.deq._graph",
    "iterjax.linear.amg",
    "iterjax.linear.krylov",
    "iterjax.linear.multigrid",
    "iterjax.gallery",
    "iterjax.fixed_point.anderson",
    "iterjax.fixed_point.newton",
    "iterjax.fixed_point.broyden",
    "iterjax.fixed_point.backtracking",
    "iterjax.fixed_point.switched",
    "iterjax.linear.neumann",
    "iterjax.sequence.gauss_seidel",
    "iterjax.sequence.elk",
    "iterjax.implicit",
    "iterjax.linear.stationary",
    "iterjax.linear.chebyshev",
    "iterjax.linear.cholesky",
    "iterjax.linear.recycle",
    "iterjax._tree",
    "iterjax.linear._base",
    "iterjax.classical.bradley_terry",
    "iterjax.classical.sinkhorn",
]

ROOT = pathlib.Path(__file__).resolve().parent.parent
# The README's blocks, then the manual pages' (docs/), in this order
PAGES = ["README.md", "docs/platform.md"]
BLOCKS = [
    block
    for page in PAGES
    for block in re.findall(r"```python\n(.*?)```", (ROOT / page).read_text(), re.S)
]
# Every block tagged python runs (signatures and fragments are tagged text).
EXAMPLES = BLOCKS


def test_readme_has_an_example_per_pillar():
    assert sum(b.startswith("import") for b in EXAMPLES) >= 6


def test_the_readme_is_a_short_front_door():
    # issue 41: at most 300 lines, and a short example (<= 20 lines) for at
    # least each of the four pillars; the manual is the docs site
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    own = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert sum(len(b.splitlines()) <= 20 for b in own) >= 4


# What each README example must also satisfy, run after it in the same process.
CHECKS = {
    1: [  # the penalty hypergradient approximates the implicit one
        "g = jax.jit(jax.grad(hyper_objective))(lam)",
        "assert float(jnp.linalg.norm(hg.grad - g)) < 0.05 * float(jnp.linalg.norm(g))",
        "assert int(hg.cost['hvps']) == 0",
    ],
    2: [  # iterjax.scan matches lax.scan in a few sweeps
        "assert int(stats.num_sweeps) < 20 and bool(stats.converged)",
        "assert float(jnp.max(jnp.abs(ys - ref))) < 1e-3",
    ],
    3: [  # jacobi_decode returns sequential greedy decoding's tokens
        "ref = iterjax.jacobi_decode(logits_fn, prompt, 32, block_size=1)[0]",
        "assert bool(jnp.all(ref == tokens)) and batch.shape == (2, 32)",
        "assert bool(stats.converged) and sampled.shape == (32,)",
    ],
    5: [  # Halpern converges where Picard cycles; warm starts save steps
        "assert not bool(picard.converged) and bool(halpern.converged)",
        "assert int(warm.num_steps.sum()) < int(cold.num_steps.sum())",
        "assert bool(jnp.all(warm.converged)) and bool(jnp.isfinite(grad(0.5)))",
    ],
    6: [  # the user's experiment module runs on a workdir
        "import tempfile",
        "from iterjax.lab.workdir import Workdir",
        "out = run(Config(), Workdir(tempfile.mkdtemp(), quiet=True))",
        "assert out['steps'] > 0",
    ],
    4: [  # the DEQ trains, and its solves converge
        "assert float(losses[-1][0]) < 0.5 * float(losses[0][0])",
        "assert int(losses[-1][1]) < 100",
    ],
}


# One fresh interpreter (default float32, no test-suite configuration) runs every
# example, each as a module of its own (its own namespace, in sys.modules, as a
# script's would be), and names the first that fails. One interpreter, not one
# an example: each would spend ~3 s importing jax and iterjax.
RUN_EXAMPLES = """
import json, sys, traceback, types
for i, code in enumerate(json.loads(sys.stdin.read())):
    module = types.ModuleType(f"readme_example_{i}")
    sys.modules[module.__name__] = module
    try:
        exec(compile(code, f"<example {i}>", "exec"), module.__dict__)
    except BaseException:
        sys.exit(f"example {i} failed:\\n" + traceback.format_exc())
"""


@pytest.mark.slow
def test_the_readme_and_manual_examples_run_with_default_jax_config():
    codes = [
        "\n".join([example, *CHECKS.get(i, [])]) + "\n"
        for i, example in enumerate(EXAMPLES)
    ]
    out = subprocess.run(
        [sys.executable, "-c", RUN_EXAMPLES],
        input=json.dumps(codes),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0


def test_the_configs_reference_is_generated_from_the_typed_configs():
    # docs/configs.md cannot drift: regenerate it with
    # `python -m iterjax.lab.reference > docs/configs.md`
    from iterjax.lab import reference

    page = (ROOT / "docs" / "configs.md").read_text()
    assert page == reference.markdown(), "docs/configs.md is stale: regenerate it"
    # every experiment and platform block is there, with its keys' ranges
    assert "### `linear_solvers`" in page and "### `sweep.random`" in page
    assert "| `sigma` | a number >= 0.0 | `1.0` |" in page


def test_the_readme_lists_every_shipped_config_once_with_claim_and_number():
    readme = (ROOT / "README.md").read_text()
    table = readme.split("[start:configs]")[1].split("[end:configs]")[0]
    rows = [r for r in table.splitlines() if r.startswith("| `")]
    names = [re.match(r"\| `([a-z0-9_]+)", r).group(1) for r in rows]
    shipped = sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))
    assert sorted(names) == shipped
    for r in rows:  # config, what, claim, number, runtime: none left empty
        cells = [c.strip() for c in r.strip("|").split("|")]
        assert len(cells) == 5 and all(cells), r


PUBLIC_MODULES = [
    "iterjax",
    "iterjax.linear",
    "iterjax.sequence",
    "iterjax.sequence.samplers",
    "iterjax.bilevel",
    "iterjax.deq",
    "iterjax.tuning",
    "iterjax.classical",
    "iterjax.diagnostics",
    "iterjax.gallery",
]


def test_every_public_name_is_on_the_api_pages():
    # `::: module.Name` entries of docs/api; a name counts as documented under
    # any module that re-exports it (iterjax.CG is iterjax.linear.CG)
    text = "\n".join(p.read_text() for p in (ROOT / "docs" / "api").glob("*.md"))
    documented = {
        d.rsplit(".", 1)[-1] for d in re.findall(r"^::: ([\w.]+)", text, re.M)
    }
    missing = []
    for name in PUBLIC_MODULES:
        module = importlib.import_module(name)
        for attr in getattr(module, "__all__", dir(module)):
            obj = getattr(module, attr)
            public = not attr.startswith("_") and not inspect.ismodule(obj)
            if public and attr not in documented:
                missing.append(f"{name}.{attr}")
    assert not missing, missing


def _public_objects():
    """(qualified name, object) of each public class and function, once (under
    the first module of PUBLIC_MODULES that exports it)."""
    seen = {}
    for name in PUBLIC_MODULES:
        module = importlib.import_module(name)
        for attr in getattr(module, "__all__", dir(module)):
            obj = getattr(module, attr)
            if attr.startswith("_") or not (
                inspect.isclass(obj) or inspect.isfunction(obj)
            ):
                continue
            if (getattr(obj, "__module__", "") or "").startswith("iterjax"):
                seen.setdefault(id(obj), (f"{name}.{attr}", obj))
    return list(seen.values())


# Public names whose docstrings have no example yet (issue 41). The list may only
# shrink: a new public name comes with an example, and one that gains an example
# leaves the list.
WITHOUT_EXAMPLE = {
    "iterjax.AbstractAdjoint",
    "iterjax.AbstractFixedPointSolver",
    "iterjax.DecodeStats",
    "iterjax.NonConvergenceError",
    "iterjax.PhantomAdjoint",
    "iterjax.RestartRule",
    "iterjax.ScanStats",
    "iterjax.Solution",
    "iterjax.VRHalpern",
    "iterjax.bilevel.AbstractMethod",
    "iterjax.bilevel.AmIGO",
    "iterjax.bilevel.Batches",
    "iterjax.bilevel.BilevelState",
    "iterjax.bilevel.BloopState",
    "iterjax.bilevel.F2SA",
    "iterjax.bilevel.Forward",
    "iterjax.bilevel.HyperGrad",
    "iterjax.bilevel.Implicit",
    "iterjax.bilevel.LVHBAState",
    "iterjax.bilevel.MultiBlock",
    "iterjax.bilevel.MultiBlockState",
    "iterjax.bilevel.Penalty",
    "iterjax.bilevel.SABA",
    "iterjax.bilevel.SOBA",
    "iterjax.bilevel.StocBiO",
    "iterjax.bilevel.Truncated",
    "iterjax.bilevel.Unrolled",
    "iterjax.bilevel.bloop",
    "iterjax.classical.Potentials",
    "iterjax.classical.SparseNewton",
    "iterjax.deq.GraphPropagation",
    "iterjax.deq.graph_transition",
    "iterjax.deq.subhomogeneity",
    "iterjax.diagnostics.Timing",
    "iterjax.diagnostics.compiled_memory",
    "iterjax.diagnostics.executable_memory",
    "iterjax.diagnostics.time_calls",
    "iterjax.diagnostics.timings",
    "iterjax.iterative_solve",
    "iterjax.linear.AbstractLinearSolver",
    "iterjax.linear.AbstractPreconditioner",
    "iterjax.linear.ChebyshevPreconditioner",
    "iterjax.linear.FlexibleCG",
    "iterjax.linear.GCRODR",
    "iterjax.linear.LinearStats",
    "iterjax.linear.RecycleState",
    "iterjax.linear.RecycledCG",
    "iterjax.linear.Stencil",
    "iterjax.linear.solve_sequence",
    "iterjax.nag_gs",
    "iterjax.sequence.AbstractSequenceMethod",
    "iterjax.sequence.Staged",
    "iterjax.sequence.samplers.Sampler",
    "iterjax.sequence.samplers.SamplerSteps",
    "iterjax.sequence.samplers.ddim",
    "iterjax.sequence.samplers.ddim_transfer",
    "iterjax.sequence.samplers.dpm_solver_pp",
    "iterjax.sequence.samplers.plms",
    "iterjax.sequence.samplers.sampler_steps",
    "iterjax.tuning.BanditState",
    "iterjax.tuning.Exp3",
    "iterjax.tuning.OptExState",
    "iterjax.tuning.SquareCB",
}


def test_every_public_name_has_an_example_unless_listed():
    objects = _public_objects()
    missing = {q for q, obj in objects if ">>>" not in (inspect.getdoc(obj) or "")}
    assert not missing - WITHOUT_EXAMPLE, (
        f"add an example: {sorted(missing - WITHOUT_EXAMPLE)}"
    )
    assert not WITHOUT_EXAMPLE - missing, (
        f"these have examples now: drop them from WITHOUT_EXAMPLE: "
        f"{sorted(WITHOUT_EXAMPLE - missing)}"
    )
    # and every example runs: its module is doctested
    with_examples = {obj.__module__ for q, obj in objects if q not in missing}
    assert with_examples <= set(MODULES), sorted(with_examples - set(MODULES))


def test_the_public_name_check_sees_a_missing_name():
    # guards the check above against one that finds every name everywhere
    text = "\n".join(p.read_text() for p in (ROOT / "docs" / "api").glob("*.md"))
    assert "::: iterjax.MFAC" in text and "::: iterjax.NoSuchName" not in text


def test_no_api_entry_names_a_module_where_a_function_is_meant():
    # `::: iterjax.fixed_point` rendered the subpackage's docstring, not the
    # function's: an entry whose path is a module while the attribute of that
    # name is a function or class (a re-export shadowing the package) is wrong
    text = "\n".join(p.read_text() for p in (ROOT / "docs" / "api").glob("*.md"))
    wrong = []
    for path in re.findall(r"^::: ([\w.]+)", text, re.M):
        parent, _, attr = path.rpartition(".")
        package = importlib.import_module(parent) if parent else None
        if not hasattr(package, "__path__") or importlib.util.find_spec(path) is None:
            continue  # not a module's path
        if not inspect.ismodule(getattr(package, attr)):
            wrong.append(path)
    assert not wrong, wrong
