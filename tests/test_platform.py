"""The experiment platform: sweeps (vectorised and not), sharding, resume,
robustness, reports, multi-host and cache settings, invalid configs."""

import io
import json
import pathlib
import re
import signal
import struct
import subprocess
import sys
import textwrap
import time
import warnings

import jax
import matplotlib
import numpy as np
import pytest
from helpers import run_on_host_devices

import iterjax
import iterjax.lab
from iterjax.lab import cli, figures, registry
from iterjax.lab import config as cfglib
from iterjax.lab import progress as progresslib
from iterjax.lab import report as reportlib
from iterjax.lab import runner as runlib
from iterjax.lab import sweep as sweeplib
from iterjax.lab import writers as writerslib
from iterjax.lab.workdir import Workdir

# end-to-end runs of the lab: left out by `make test-fast`
pytestmark = pytest.mark.slow


@pytest.fixture
def toy(monkeypatch):
    """Register tests/toy_experiment.py as the experiment `toy`."""
    monkeypatch.setitem(registry.EXPERIMENTS, "toy", "toy_experiment")
    return registry.experiment("toy")


def _config(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def _rows(run_dir, wall_time=False):
    """metrics.jsonl's rows; without `wall_time` (two runs' rows compare equal)."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return rows if wall_time else [_untimed(r) for r in rows]


def _untimed(row):
    return {k: v for k, v in row.items() if k != "wall_time"}


def _metrics_by_settings(run_dir):
    return {json.dumps(r["settings"]): r["metrics"] for r in _rows(run_dir)}


# --- Expansion


def test_expand_grid_random_and_seeds():
    sweep = cfglib.from_dict(
        cfglib.Sweep,
        {
            "grid": {"a": [1, 2], "b.c": ["x", "y", "z"]},
            "random": {
                "num": 4,
                "seed": 3,
                "space": {
                    "lr": {"log_uniform": [1e-3, 1e-1]},
                    "k": {"int_uniform": [1, 2]},
                    "name": {"choice": ["p", "q"]},
                },
            },
            "seeds": 2,
        },
    )
    members = sweeplib.expand(sweep)
    assert len(members) == 2 * 3 * 4 * 2
    assert members[0] == {**members[0], "a": 1, "b.c": "x", "seed": 0}
    assert members[1]["seed"] == 1 and members[1]["lr"] == members[0]["lr"]
    assert [m["a"] for m in members[:24]] == [1] * 24  # grid outermost
    for m in members:
        assert 1e-3 <= m["lr"] <= 1e-1 and m["k"] in (1, 2) and m["name"] in "pq"
    assert members == sweeplib.expand(sweep)  # the draws are reproducible
    assert len({m["lr"] for m in members}) == 4
    seeds = sweeplib.expand(cfglib.Sweep(seeds=(5, 9), seed_key="train.seed"))
    assert seeds == [{"train.seed": 5}, {"train.seed": 9}]


def test_overrides_reach_dotted_grid_keys(tmp_path):
    path = _config(tmp_path, FP_SWEEP % "null")
    p = runlib.prepare(path, ["sweep.grid.solver.damping=[0.25]", "sweep.seeds=3"])
    assert [m.settings for m in p.members] == [
        {"solver.damping": 0.25, "seed": s} for s in range(3)
    ]


def test_groups_split_on_keys_that_cannot_be_vectorised():
    p = runlib.prepare(cfglib.CONFIG_DIR / "fixed_point_sweep.yaml", smoke=True)
    plan = sweeplib.groups(p.module, p.members, p.platform.sweep)
    assert [len(ms) for _, ms in plan] == [4, 4]  # one group per solver
    assert all(set(keys) == {"radius", "seed"} for keys, _ in plan)
    never = dataclasses_replace(p.platform.sweep, vmap=False)
    assert [keys for keys, _ in sweeplib.groups(p.module, p.members, never)] == [()] * 8


def dataclasses_replace(obj, **kw):
    import dataclasses

    return dataclasses.replace(obj, **kw)


# --- Vectorised sweeps equal separate runs


FP_SWEEP = """\
experiment: fixed_point_sweep
problem: slow_system
dim: 6
solver: {name: picard}
atol: 1.0e-9
max_steps: 500
sweep:
  grid: {solver.damping: [0.5, 1.0]}
  seeds: [3]
  vmap: %s
"""


def test_vectorised_sweep_equals_separate_runs(tmp_path):
    vec_dir, vec = runlib.run_experiment(
        _config(tmp_path, FP_SWEEP % "true", "v.yaml"), out=tmp_path, quiet=True
    )
    sep_dir, sep = runlib.run_experiment(
        _config(tmp_path, FP_SWEEP % "false", "s.yaml"), out=tmp_path, quiet=True
    )
    assert vec["vectorised_groups"] == 1 and sep["vectorised_groups"] == 0
    assert len(list((sep_dir / "members").iterdir())) == 2
    a, b = _metrics_by_settings(vec_dir), _metrics_by_settings(sep_dir)
    assert a.keys() == b.keys() and len(a) == 2
    for k in a:
        assert a[k]["steps"] == b[k]["steps"] and a[k]["converged"] == 1.0, k
        np.testing.assert_allclose(a[k]["residual"], b[k]["residual"], rtol=1e-9)
    # damping changes the answer's path: the members really differ
    assert len({m["steps"] for m in a.values()}) > 1
    csv_lines = (vec_dir / "metrics.csv").read_text().splitlines()
    assert csv_lines[0].startswith("member,solver.damping,seed") and len(csv_lines) == 3
    agg = {a["settings"]["solver.damping"]: a for a in vec["aggregates"]}
    assert agg[0.5]["n"] == 1 and agg[0.5]["steps"]["std"] == 0.0
    assert (vec_dir / "sweep.png").exists()


SHARDED = r"""
import json, pathlib, sys, tempfile
import jax
assert jax.device_count() == 8
from iterjax.lab import runner as runlib
tmp = pathlib.Path(tempfile.mkdtemp())
base = '''experiment: fixed_point_sweep
problem: tanh_deq
dim: 6
solver: {name: anderson, history: 3}
sweep: {grid: {radius: [0.5, 0.7, 0.9]}, seeds: 2}
'''
out = {}
for name, mesh in [("plain", ""), ("sharded", "mesh: {shape: [-1], axes: [sweep]}\n")]:
    path = tmp / f"{name}.yaml"
    path.write_text(base + mesh)
    d, s = runlib.run_experiment(path, out=tmp, quiet=True)
    assert s["vectorised_groups"] == 1
    out[name] = {json.dumps(json.loads(l)["settings"]): json.loads(l)["metrics"]
                 for l in (d / "metrics.jsonl").read_text().splitlines()}
    out[name + "_mesh"] = s.get("mesh")
assert out["sharded_mesh"] == {"sweep": 8} and out["plain_mesh"] is None, out
assert len(out["plain"]) == 6 and out["plain"].keys() == out["sharded"].keys()
for k, m in out["plain"].items():
    assert m["steps"] == out["sharded"][k]["steps"], (k, m, out["sharded"][k])
    r = out["sharded"][k]["residual"]
    assert abs(m["residual"] - r) <= 1e-12 * (1 + r), (k, m, r)
# batches: Workdir.shard splits the leading axis over the mesh; parameters that
# were never placed follow, replicated (data parallelism without code changes)
import jax.numpy as jnp, numpy as np
from iterjax.lab.workdir import Workdir
mesh = runlib.make_mesh(runlib.cfglib.MeshSpec((-1,), ("batch",)))
x = np.arange(48.0).reshape(16, 3)
xs = Workdir(tmp / "w", mesh=mesh).shard({"x": x})["x"]
assert len(xs.sharding.device_set) == 8
assert xs.addressable_shards[0].data.shape == (2, 3)
w = jnp.linspace(0.0, 1.0, 3)
step = jax.jit(lambda w, x: w - 0.1 * jax.grad(lambda w: jnp.sum(jnp.tanh(x @ w)))(w))
np.testing.assert_allclose(step(w, xs), step(w, x), rtol=1e-12)
print("SWEEP SHARDING OK")
"""


def test_sweep_sharded_over_eight_devices_equals_unsharded():
    assert "SWEEP SHARDING OK" in run_on_host_devices(SHARDED)


# --- Resume


def _interrupt_at_step(monkeypatch, at):
    save = Workdir.checkpoint

    def checkpoint(self, step, state, force=False):
        saved = save(self, step, state, force=force)
        if step == at:
            raise KeyboardInterrupt
        return saved

    monkeypatch.setattr(Workdir, "checkpoint", checkpoint)


def test_resume_after_interruption_equals_uninterrupted_run(toy, tmp_path, monkeypatch):
    path = _config(tmp_path, "experiment: toy\nsteps: 7\ncheckpoint_every: 2\n")
    full_dir, full = runlib.run_experiment(path, out=tmp_path / "a", quiet=True)
    _interrupt_at_step(monkeypatch, 5)  # after the step-4 checkpoint and row 5
    with pytest.raises(runlib.Interrupted) as info:
        runlib.run_experiment(path, out=tmp_path / "b", quiet=True)
    run_dir = info.value.args[0]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "interrupted" and str(run_dir) in status["resume"]
    assert len(_rows(run_dir)) == 5  # row 5 was written after the last checkpoint
    monkeypatch.undo()
    monkeypatch.setitem(registry.EXPERIMENTS, "toy", "toy_experiment")
    assert cli.main(["run", "--resume", str(run_dir), "--quiet"]) == 0
    assert _rows(run_dir) == _rows(full_dir)
    resumed = json.loads((run_dir / "summary.json").read_text())
    assert resumed["metrics"] == full["metrics"]
    assert json.loads((run_dir / "status.json").read_text())["status"] == "done"
    # resuming a finished run changes nothing
    again_dir, again = runlib.run_experiment(resume=run_dir)
    assert again["metrics"] == full["metrics"] and _rows(run_dir) == _rows(full_dir)


def test_interrupted_sweep_resumes_with_the_missing_members(toy, tmp_path, monkeypatch):
    text = (
        "experiment: toy\ncheckpoint_every: 2\n"
        "sweep: {grid: {lr: [0.1, 0.2]}, seeds: 2, vmap: false}\n"
    )
    path = _config(tmp_path, text)
    full_dir, _ = runlib.run_experiment(path, out=tmp_path / "a", quiet=True)
    saves = []
    save = Workdir.checkpoint

    def checkpoint(self, step, state, force=False):  # Ctrl-C inside member 2
        saved = save(self, step, state, force=force)
        saves.extend([step] if saved else [])
        # members 0 and 1 save at steps 2, 4, 6; member 2 at 2, then 4: stop there
        if saved and len(saves) == 2 * 3 + 2:
            raise KeyboardInterrupt
        return saved

    monkeypatch.setattr(Workdir, "checkpoint", checkpoint)
    with pytest.raises(runlib.Interrupted) as info:
        runlib.run_experiment(path, out=tmp_path / "b", quiet=True)
    run_dir = info.value.args[0]
    member = run_dir / "members" / "002"
    assert json.loads((member / "status.json").read_text())["status"] == "interrupted"
    assert len(_rows(member)) == 4
    monkeypatch.setattr(Workdir, "checkpoint", save)
    restore, starts = Workdir.restore, []

    def restore_and_record(self, state):
        out = restore(self, state)
        starts.append(out[0])
        return out

    monkeypatch.setattr(Workdir, "restore", restore_and_record)
    _, summary = runlib.run_experiment(resume=run_dir, quiet=True)
    assert starts == [4, 0]  # member 2 from its checkpoint, member 3 afresh
    assert summary["members"] == 4 and not summary["failed"]
    assert _metrics_by_settings(run_dir) == _metrics_by_settings(full_dir)
    # member 2 went on from its step-4 checkpoint: the same rows, none twice
    assert _rows(member) == _rows(full_dir / "members" / "002")


# --- Robustness


def test_a_crashing_member_is_recorded_and_the_rest_run(toy, tmp_path):
    text = "experiment: toy\nfail_seed: 1\nsweep: {seeds: 3, vmap: false}\n"
    run_dir, summary = runlib.run_experiment(_config(tmp_path, text), out=tmp_path)
    assert list(summary["failed"]) == [1]
    assert "toy failure for seed 1" in summary["failed"][1]
    status = {r["member"]: r["status"] for r in _rows(run_dir)}
    assert status == {0: "ok", 1: "failed", 2: "ok"}
    assert summary["aggregates"][0]["n"] == 2
    # the sweep's table rows follow the metrics schema: namespace and step
    assert all(r["namespace"] == "sweep" and r["step"] == r["member"]
               for r in _rows(run_dir))  # fmt: skip


def test_a_failing_vectorised_group_falls_back_to_separate_runs(
    toy, tmp_path, monkeypatch
):
    def broken(*args, **kwargs):
        raise RuntimeError("out of memory, say")

    monkeypatch.setattr(sweeplib, "run_vectorised", broken)
    text = "experiment: toy\nfail_seed: 0\nsweep: {seeds: 2}\n"
    run_dir, summary = runlib.run_experiment(
        _config(tmp_path, text), out=tmp_path, quiet=True
    )
    assert list(summary["failed"]) == [0]
    assert (run_dir / "members" / "001" / "summary.json").exists()


def test_nonfinite_metrics_are_flagged(toy, tmp_path):
    text = "experiment: toy\nnan_seed: 1\nsweep: {seeds: 3, grid: {lr: [0.1]}}\n"
    run_dir, summary = runlib.run_experiment(
        _config(tmp_path, text), out=tmp_path, quiet=True
    )
    assert summary["vectorised_groups"] == 1
    assert summary["nonfinite_metrics"] == {1: ["loss"]}
    rows = _rows(run_dir)
    assert rows[1]["metrics"]["loss"] is None and rows[0]["metrics"]["loss"] > 0
    single_dir, single = runlib.run_experiment(
        _config(tmp_path, "experiment: toy\nnan_seed: 0\n", "n.yaml"),
        out=tmp_path,
        quiet=True,
    )
    assert single["nonfinite_metrics"] == {"metrics.loss": "summary"}


@pytest.mark.parametrize(
    "text, match",
    [
        (
            "sweep: {grid: {stepz: [1, 2]}}\n",
            r"sweep member 0 \(stepz=1\): .*`stepz`: unknown key",
        ),
        (
            "sweep: {grid: {lr: [0.1, fast]}}\n",
            r"sweep member 1 \(lr=fast\): .*`lr`: expected a number",
        ),
        (
            "sweep: {grid: {steps: [2, 3]}, vmap: true}\n",
            r"`sweep.vmap`: cannot vectorise over \['steps'\]",
        ),
        ("sweep: {grid: {lr: 0.1}}\n", r"`sweep.grid.lr`: expected a list"),
        ("sweep: {seeds: 0}\n", r"`sweep.seeds`"),
        (
            "sweep: {random: {num: 2, space: {lr: {gauss: [0, 1]}}}}\n",
            r"`sweep.random.space.lr`: one of",
        ),
        (
            "sweep: {random: {num: 2, space: {lr: {uniform: [1, 0]}}}}\n",
            r"`sweep.random.space.lr.uniform`",
        ),
        ("sweep: {seed: 3}\n", r"`sweep.seed`: unknown key; allowed keys"),
        ("mesh: {shape: [2, 2], axes: [a]}\n", r"`mesh`: `shape` and `axes`"),
        ("mesh: {shape: [-1, -1], axes: [a, b]}\n", r"`mesh.shape`"),
        ("distributed: yes\n", r"`distributed`: expected 'auto' or a mapping"),
        ("checkpoint_every: -1\n", r"`checkpoint_every`: must be >= 0"),
    ],
)
def test_invalid_platform_keys_are_rejected_by_key(toy, tmp_path, text, match):
    with pytest.raises(cfglib.ConfigError, match=match):
        runlib.prepare(_config(tmp_path, "experiment: toy\n" + text))


def test_a_mesh_that_does_not_cover_the_devices_is_rejected(toy, tmp_path):
    n = jax.device_count()
    path = _config(tmp_path, f"experiment: toy\nmesh: {{shape: [{n + 1}]}}\n")
    with pytest.raises(cfglib.ConfigError, match="does not cover"):
        runlib.run_experiment(path, out=tmp_path, quiet=True)
    assert not (tmp_path / "toy").exists()  # rejected before the run directory


def test_resume_needs_a_run_directory(tmp_path):
    with pytest.raises(cfglib.ConfigError, match="no config.yaml"):
        runlib.run_experiment(resume=tmp_path)


# --- Records, reports, platform settings


def test_run_directory_records_what_reproduces_it(toy, tmp_path):
    run_dir, summary = runlib.run_experiment(
        _config(tmp_path, "experiment: toy\nseed: 4\n"), out=tmp_path, quiet=True
    )
    env = summary["environment"]
    assert env["packages"]["jax"] == jax.__version__ and env["packages"]["flax"]
    assert env["seeds"] == {"seed": 4, "fail_seed": -1, "nan_seed": -1}
    assert env["devices"] and env["process_count"] == 1 and "git_commit" in env
    again = runlib.prepare(run_dir / "config.yaml")
    assert again.cfg.seed == 4 and again.name == "toy"


def test_report_puts_runs_side_by_side(toy, tmp_path, monkeypatch):
    dirs = [
        runlib.run_experiment(
            _config(tmp_path, f"experiment: toy\nlr: {lr}\n", f"{i}.yaml"),
            out=tmp_path,
            quiet=True,
        )[0]
        for i, lr in enumerate([0.1, 0.3])
    ]
    assert cli.main(["report", *map(str, dirs), "--out", str(tmp_path / "r.md")]) == 0
    md = (tmp_path / "r.md").read_text()
    assert "## Settings that differ" in md and "| lr | 0.1 | 0.3 |" in md
    assert "| loss |" in md and "![loss](toy/" in md
    cli.main(["report", *map(str, dirs), "--out", str(tmp_path / "r.html")])
    page = (tmp_path / "r.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "<table>" in page
    # without --out: report.md beside the runs, not in the working directory
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert cli.main(["report", *map(str, dirs)]) == 0
    assert (tmp_path / "toy" / "report.md").exists() and not list(elsewhere.iterdir())
    links = re.findall(
        r"!\[loss\]\(([^)]+)\)", (tmp_path / "toy" / "report.md").read_text()
    )
    assert links and all((tmp_path / "toy" / link).exists() for link in links)


def test_report_shows_a_failed_runs_error_and_rejects_bad_paths(toy, tmp_path, capsys):
    text = "experiment: toy\nseed: 2\nfail_seed: 2\n"
    with pytest.raises(RuntimeError, match="toy failure"):
        runlib.run_experiment(_config(tmp_path, text), out=tmp_path, quiet=True)
    (failed,) = [d for d in (tmp_path / "toy").iterdir() if d.is_dir()]
    out = tmp_path / "r.md"
    assert cli.main(["report", str(failed), "--out", str(out)]) == 0
    md = out.read_text()
    assert "| failed |" in md and "**Error:** `RuntimeError: toy failure" in md
    capsys.readouterr()
    bad = [
        ([str(tmp_path)], str(out), "has no config.yaml"),
        ([str(tmp_path / "nope")], str(out), "does not exist"),
        ([str(failed)], str(tmp_path / "no" / "r.md"), "folder .* does not exist"),
        ([str(failed)], str(tmp_path / "r.txt"), "a .md or an .html file"),
    ]
    for dirs, dest, match in bad:
        assert cli.main(["report", *dirs, "--out", dest]) == 2
        assert re.search(match, capsys.readouterr().err)


def test_distributed_initialisation_from_config_and_environment(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    spec = cfglib.DistributedSpec("10.0.0.1:1234", num_processes=4, process_id=2)
    runlib._start(cfglib.Platform(distributed=spec))
    runlib._start(cfglib.Platform(distributed="auto"))
    monkeypatch.setenv("ITERJAX_DISTRIBUTED", "1")
    runlib._start(cfglib.Platform())
    assert calls == [
        {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 2},
        {},
        {},
    ]


def test_compilation_cache_option(tmp_path):
    # In a subprocess: once a process has used a persistent cache, jax keeps
    # compiling through it, which must not leak into the rest of the suite.
    cache = tmp_path / "cache"
    script = f"""
import jax, jax.numpy as jnp
from iterjax.lab import config, runner
runner._start(config.Platform(compilation_cache={str(cache)!r}))
assert jax.config.jax_compilation_cache_dir == {str(cache)!r}
jax.jit(lambda x: jnp.sin(x) * 2)(1.0).block_until_ready()
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert any(cache.iterdir()), "nothing was written to the cache"


def test_cli_list_shows_every_config_with_its_description(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    for path in cfglib.CONFIG_DIR.glob("*.yaml"):
        line = next(x for x in out.splitlines() if x.startswith(path.stem + " "))
        assert len(line.split(None, 1)[1]) > 20, line


def test_the_config_mesh_reaches_sequence_methods():
    from iterjax.lab.config import Spec

    mesh = runlib.make_mesh(cfglib.MeshSpec())
    assert registry.build("sequence_method", Spec("deer"), mesh=mesh).mesh is mesh
    assert registry.build("sequence_method", Spec("jacobi")).mesh is None
    windowed = Spec("picard", (("window", 8),))
    assert registry.build("sequence_method", windowed, mesh=mesh).mesh is None


# --- Your own experiments: an import path, registered names, the Python API.


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    """A package outside the repository whose module `exp` is the toy
    experiment with an `x64` field (so a run switches float64 on)."""
    pkg = tmp_path / "site" / "userpkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    toy_source = (pathlib.Path(__file__).parent / "toy_experiment.py").read_text()
    toy_source = toy_source.replace(
        "    nan_seed: int = -1\n", "    nan_seed: int = -1\n    x64: bool = True\n"
    )
    (pkg / "exp.py").write_text(toy_source)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    return "userpkg.exp"


def test_experiment_by_import_path_runs_sweeps_and_resumes(
    user_package, tmp_path, monkeypatch
):
    text = f"experiment: {user_package}\nsteps: 7\ncheckpoint_every: 2\n"
    path = _config(tmp_path, text)
    full_dir, full = runlib.run_experiment(path, out=tmp_path / "a", quiet=True)
    assert full["experiment"] == user_package and full_dir.parent.name == user_package
    _interrupt_at_step(monkeypatch, 5)
    with pytest.raises(runlib.Interrupted) as info:
        runlib.run_experiment(path, out=tmp_path / "b", quiet=True)
    monkeypatch.undo()
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    _, resumed = runlib.run_experiment(resume=info.value.args[0])
    assert resumed["metrics"] == full["metrics"]
    sweep = (
        f"experiment: {user_package}\nsweep: {{grid: {{lr: [0.1, 0.2]}}, seeds: 2}}\n"
    )
    _, summary = runlib.run_experiment(_config(tmp_path, sweep, "s.yaml"), out=tmp_path)
    assert summary["members"] == 4 and summary["vectorised_groups"] == 1
    assert not summary["failed"]


def test_python_api_leaves_jax_config_as_found(user_package, tmp_path):
    jax.config.update("jax_enable_x64", False)
    backend = matplotlib.get_backend()
    matplotlib.use("svg")  # a caller's backend (a notebook's, say)
    seen = []
    real_run = runlib._run_one
    spy = lambda *a, **k: seen.append(matplotlib.get_backend()) or real_run(*a, **k)
    try:
        with pytest.MonkeyPatch.context() as m:
            m.setattr(runlib, "_run_one", spy)
            run_dir, summary = iterjax.lab.run(
                {"experiment": user_package, "steps": 3}, out=tmp_path, lr=0.2
            )
        assert [b.lower() for b in seen] == ["agg"]
        assert matplotlib.get_backend() == "svg"
        assert not jax.config.jax_enable_x64  # the run's x64 was switched back
        assert summary["environment"]["x64"] is True  # ... and was on for the run
        assert (run_dir / "config.yaml").read_text().count("lr: 0.2") == 1
        _, again = iterjax.lab.run(
            "fixed_point_study",
            out=tmp_path,
            smoke=True,
            **{"solvers.0.name": "anderson"},
        )
        assert again["rows"][0]["solver"].startswith("anderson")
    finally:
        jax.config.update("jax_enable_x64", True)
        matplotlib.use(backend)


@pytest.mark.parametrize(
    "name, match",
    [
        ("no_such_pkg.exp", "unknown experiment 'no_such_pkg.exp': neither"),
        ("json", "defines no Config or run"),
    ],
)
def test_bad_experiment_names_are_explained(name, match, tmp_path):
    with pytest.raises(cfglib.ConfigError, match=match):
        runlib.prepare({"experiment": name})


def test_registered_solver_names_reach_configs(monkeypatch):
    monkeypatch.setattr(
        registry, "KINDS", {**registry.KINDS, "solver": dict(registry.SOLVERS)}
    )
    iterjax.lab.register("solver", "km", iterjax.Picard)
    spec = registry.to_spec("solver", {"name": "km", "damping": 0.5}, "s")
    assert registry.build("solver", spec) == iterjax.Picard(damping=0.5)
    with pytest.raises(ValueError, match="unknown kind"):
        iterjax.lab.register("optimiser", "x", iterjax.Picard)
    with pytest.raises(TypeError, match="dataclass"):
        iterjax.lab.register("solver", "x", lambda: None)


# --- A platform that loses nothing: locks, torn rows, failed members, corruption.


def _interrupted(monkeypatch, path, out, at):
    """The run directory of `path` interrupted after step `at` (the toy
    experiment registered again, the interruption undone)."""
    _interrupt_at_step(monkeypatch, at)
    with pytest.raises(runlib.Interrupted) as info:
        runlib.run_experiment(path, out=out, quiet=True)
    monkeypatch.undo()
    monkeypatch.setitem(registry.EXPERIMENTS, "toy", "toy_experiment")
    return info.value.args[0]


def test_a_second_process_cannot_resume_a_directory_in_use(toy, tmp_path, monkeypatch):
    import fcntl

    path = _config(tmp_path, "experiment: toy\nsteps: 5\ncheckpoint_every: 2\n")
    run_dir = _interrupted(monkeypatch, path, tmp_path, at=4)
    with open(run_dir / ".lock", "w") as held:  # another process holds the run
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(cfglib.ConfigError, match="in use by another"):
            runlib.run_experiment(resume=run_dir)
    _, summary = runlib.run_experiment(resume=run_dir)  # released: it resumes
    assert summary["metrics"]["loss"] > 0


def test_resume_repairs_a_torn_row_and_retries_failed_members(
    toy, tmp_path, monkeypatch
):
    run = toy.run

    def disk_full_once(cfg, workdir):  # member 1 fails the first time only
        if cfg.seed == 1 and not getattr(disk_full_once, "failed", False):
            disk_full_once.failed = True
            raise OSError(28, "No space left on device")
        return run(cfg, workdir)

    monkeypatch.setattr(toy, "run", disk_full_once)
    text = "experiment: toy\nsweep: {seeds: 3, vmap: false}\n"
    run_dir, summary = runlib.run_experiment(_config(tmp_path, text), out=tmp_path)
    assert list(summary["failed"]) == [1]
    rows_file = run_dir / "rows-0.jsonl"
    with open(rows_file, "a") as f:  # the write that the full disk cut short
        f.write('{"member": 2, "settings": {"se')
    _, again = runlib.run_experiment(resume=run_dir)
    assert not again["failed"] and again["members"] == 3
    lines = rows_file.read_text().splitlines()
    assert all(json.loads(line) for line in lines)  # no torn line left
    assert {r["member"]: r["status"] for r in _rows(run_dir)} == {
        0: "ok",
        1: "ok",
        2: "ok",
    }


def test_a_run_killed_while_checkpointing_resumes_to_the_same_metrics(tmp_path):
    # SIGKILL (no handler runs, nothing is flushed or cleaned up) while the 5th
    # checkpoint is being written; --resume then ends with the uninterrupted
    # run's metrics, rows and summary.
    tests = pathlib.Path(__file__).resolve().parent
    text = "experiment: toy_experiment\nsteps: 7\ncheckpoint_every: 1\n"
    path = _config(tmp_path, text)
    sys.path.insert(0, str(tests))
    try:
        full_dir, full = runlib.run_experiment(path, out=tmp_path / "a", quiet=True)
    finally:
        sys.path.remove(str(tests))
    script = f"""
import os, signal, sys
sys.path.insert(0, {str(tests)!r})
import jax
jax.config.update("jax_enable_x64", True)  # as in this process (conftest)
import orbax.checkpoint as ocp
from iterjax.lab import runner
wait = ocp.CheckpointManager.wait_until_finished
calls = []
def killing(self):
    calls.append(1)
    if len(calls) == 5:  # the 5th save is in flight
        os.kill(os.getpid(), signal.SIGKILL)
    return wait(self)
ocp.CheckpointManager.wait_until_finished = killing
runner.run_experiment({str(path)!r}, out={str(tmp_path / "b")!r}, quiet=True)
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    run_dir = next((tmp_path / "b").rglob("status.json")).parent
    assert json.loads((run_dir / "status.json").read_text())["status"] == "running"
    sys.path.insert(0, str(tests))
    try:
        _, resumed = runlib.run_experiment(resume=run_dir)
    finally:
        sys.path.remove(str(tests))
    assert resumed["metrics"] == full["metrics"]
    assert _rows(run_dir) == _rows(full_dir)


def _events(event_dir):
    """The Events of a directory's tensorboard event files, file by file
    (TFRecord framing: length, its CRC, the serialised Event, its CRC)."""
    from tensorboardX.proto.event_pb2 import Event

    for path in sorted(event_dir.glob("events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i : i + 8])
            yield Event.FromString(data[i + 12 : i + 12 + n])
            i += 12 + n + 4


def _scalars(event_dir):
    """{tag: [(step, value)]} from tensorboard event files, read as TensorBoard
    does: a SessionLog START at step s (a purge) drops the values read so far
    at steps >= s."""
    from tensorboardX.proto.event_pb2 import SessionLog

    out = {}
    for event in _events(event_dir):
        if event.session_log.status == SessionLog.START:
            out = {
                t: [(s, v) for s, v in sv if s < event.step] for t, sv in out.items()
            }
        for v in event.summary.value:
            out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_a_resumed_run_purges_the_tensorboard_events_past_its_checkpoint(
    toy, tmp_path, monkeypatch
):
    text = "experiment: toy\nsteps: 7\ncheckpoint_every: 2\n"
    text += "writers: [jsonl, tensorboard]\n"
    path = _config(tmp_path, text)
    full_dir, _ = runlib.run_experiment(path, out=tmp_path / "a", quiet=True)
    _interrupt_at_step(monkeypatch, 5)  # steps 1-5 written, checkpoint at 4
    with pytest.raises(runlib.Interrupted) as info:
        runlib.run_experiment(path, out=tmp_path / "b", quiet=True)
    monkeypatch.undo()
    monkeypatch.setitem(registry.EXPERIMENTS, "toy", "toy_experiment")
    run_dir = info.value.args[0]
    assert cli.main(["run", "--resume", str(run_dir), "--quiet"]) == 0
    got, want = _scalars(run_dir / "tensorboard"), _scalars(full_dir / "tensorboard")
    steps = [s for s, _ in got["train/loss"]]
    assert steps == sorted(set(steps)) == [s for s, _ in want["train/loss"]]
    np.testing.assert_allclose(got["train/loss"], want["train/loss"], rtol=1e-6)


def test_a_sweep_shows_in_tensorboards_hparams_one_run_per_member(toy, tmp_path):

    text = "experiment: toy\nsteps: 3\nwriters: [jsonl, tensorboard]\n"
    text += "sweep: {grid: {lr: [0.1, 0.2]}, seeds: 2}\n"
    run_dir, _ = runlib.run_experiment(_config(tmp_path, text), out=tmp_path)
    rows = sorted(
        (json.loads(line) for f in run_dir.glob("rows-*.jsonl") for line in
         f.read_text().splitlines()), key=lambda r: r["member"],
    )  # fmt: skip
    assert all(r["wall_time"] > 0 for r in _rows(run_dir, wall_time=True))
    members = sorted((run_dir / "tensorboard").glob("member-*"))
    assert [m.name for m in members] == [f"member-{i:03d}" for i in range(4)]
    for member, row in zip(members, rows):
        # the results: every numeric metric of the member's row
        scalars = _scalars(member).items()
        results = {t: v for t, [(_, v)] in scalars if not t.startswith("_hparams_")}
        want = {f"sweep/{k}": v for k, v in row["metrics"].items()}
        assert results.keys() == want.keys()
        np.testing.assert_allclose(
            [results[k] for k in want], list(want.values()), rtol=1e-6
        )
        # the hyperparameters: the swept settings, in the HParams plugin's data
        plugin = b"".join(
            v.metadata.plugin_data.content
            for event in _events(member)
            for v in event.summary.value
            if v.metadata.plugin_data.plugin_name == "hparams"
        )
        assert b"lr" in plugin and b"seed" in plugin


def test_tensorboard_scalars_mirror_the_metrics(toy, tmp_path):
    text = "experiment: toy\nsteps: 5\nwriters: [jsonl, tensorboard]\n"
    run_dir, _ = runlib.run_experiment(_config(tmp_path, text), out=tmp_path)
    scalars = _scalars(run_dir / "tensorboard")
    rows = _rows(run_dir)
    assert set(scalars) == {"train/loss"}
    expected = [(r["step"], r["loss"]) for r in rows]
    assert [s for s, _ in scalars["train/loss"]] == [s for s, _ in expected]
    np.testing.assert_allclose(
        [v for _, v in scalars["train/loss"]], [v for _, v in expected], rtol=1e-6
    )
    # off by default
    plain, _ = runlib.run_experiment(
        _config(tmp_path, "experiment: toy\nsteps: 2\n", "d.yaml"), out=tmp_path / "p"
    )
    assert not (plain / "tensorboard").exists()
    with pytest.raises(cfglib.ConfigError, match="must include jsonl"):
        runlib.run_experiment(
            _config(tmp_path, "experiment: toy\nwriters: [tensorboard]\n", "e.yaml")
        )


def _wandb_history(run_dir):
    """The history rows of the W&B offline run in `run_dir/wandb` (LevelDB log
    framing: 7-byte header `:W&B` + version, then 32 KiB blocks of records, each
    CRC, length, kind (1 whole, 2-4 first/middle/last fragment) and a
    serialised `Record`)."""
    from wandb.proto.wandb_internal_pb2 import Record

    [path] = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data, pos, block, chunk, rows = path.read_bytes(), 7, 32768, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (n == 0 and kind == 0):  # block trailer
            pos += left
            continue
        chunk, pos = chunk + data[pos + 7 : pos + 7 + n], pos + 7 + n
        if kind in (1, 4):
            record = Record.FromString(chunk)
            chunk = b""
            if record.WhichOneof("record_type") == "history":
                items = {
                    i.key or "/".join(i.nested_key): json.loads(i.value_json)
                    for i in record.history.item
                }
                rows.append(
                    {k: v for k, v in items.items() if k[0] != "_"}
                    | {"_step": items["_step"]}
                )
    return rows


def test_wandb_offline_run_holds_the_scalars(toy, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    text = "experiment: toy\nsteps: 5\nwriters: [jsonl, wandb]\n"
    run_dir, _ = runlib.run_experiment(_config(tmp_path, text), out=tmp_path)
    history = _wandb_history(run_dir)
    rows = _rows(run_dir)
    assert [h["_step"] for h in history] == [r["step"] for r in rows]
    np.testing.assert_allclose(
        [h["train/loss"] for h in history], [r["loss"] for r in rows], rtol=1e-12
    )


def test_a_sweep_writes_one_wandb_run_per_member(toy, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    text = "experiment: toy\nsteps: 3\nwriters: [jsonl, wandb]\n"
    text += "sweep: {grid: {lr: [0.1, 0.2]}, seeds: 2}\n"
    run_dir, _ = runlib.run_experiment(_config(tmp_path, text), out=tmp_path)
    rows = {json.dumps(r["settings"]): r for r in _rows(run_dir)}
    members = sorted((run_dir / "wandb-members").iterdir())
    assert len(members) == len(rows) == 4
    for member in members:
        [history] = _wandb_history(member)
        row = next(r for r in rows.values() if r["member"] == int(member.name))
        want = {f"sweep/{k}": v for k, v in row["metrics"].items()}
        assert history.keys() - {"_step"} == want.keys()
        np.testing.assert_allclose([history[k] for k in want], list(want.values()))


class _MemoryWriter:
    """A user's writer: keeps the rows it is given (and where)."""

    runs: list = []

    def __init__(self, path):
        self.rows, self.closed = [], False
        _MemoryWriter.runs.append((pathlib.Path(path), self))

    def write(self, row):
        self.rows.append(dict(row))

    def close(self):
        self.closed = True


def test_a_registered_writer_receives_every_row(toy, tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "WRITERS", dict(registry.WRITERS))
    monkeypatch.setattr(writerslib, "WRITERS", registry.WRITERS)
    _MemoryWriter.runs.clear()
    registry.register("writer", "memory", _MemoryWriter)
    text = "experiment: toy\nsteps: 4\nwriters: [jsonl, memory]\n"
    run_dir, _ = runlib.run_experiment(_config(tmp_path, text), out=tmp_path)
    [(path, writer)] = _MemoryWriter.runs
    assert path == run_dir and writer.closed
    assert writer.rows == _rows(run_dir, wall_time=True)  # the same rows, stamps
    with pytest.raises(cfglib.ConfigError, match=r"unknown \['mlflow'\]; known"):
        runlib.run_experiment(
            _config(tmp_path, "experiment: toy\nwriters: [jsonl, mlflow]\n", "u.yaml")
        )
    # by import path: imported when selected, and a missing package is named
    registry.register("writer", "later", "tests_nonexistent_pkg.writers:W")
    with pytest.raises(cfglib.ConfigError, match="tests_nonexistent_pkg"):
        runlib.run_experiment(
            _config(tmp_path, "experiment: toy\nwriters: [jsonl, later]\n", "l.yaml")
        )
    with pytest.raises(TypeError, match="write"):
        registry.register("writer", "bad", object)
    with pytest.raises(TypeError, match="jsonl"):
        registry.register("writer", "jsonl", _MemoryWriter)


def test_progress_names_the_current_item_and_the_latest_metric(tmp_path):
    lines = io.StringIO()
    wd = Workdir(tmp_path, quiet=True)
    status = lambda item: progresslib.status_text(item, wd._last_row)
    with progresslib.plain_progress(3, "solve", lines, status, every=0.0) as advance:
        advance(item="warm-up")
        wd.log(solver="anderson", problem="tanh", residual=3.14159e-11, steps=12)
        advance()
        advance(item="broyden/tanh")
    wd.close()
    got = lines.getvalue().splitlines()
    assert got[0].startswith("solve: 1/3 [warm-up] (")
    assert got[1].startswith("solve: 2/3 [anderson/tanh residual=3.142e-11 steps=12] (")
    assert got[2].startswith("solve: 3/3 [broyden/tanh residual=3.142e-11 steps=12] (")
    assert got[3].startswith("solve: 3/3 [broyden/tanh")  # the closing line


def test_every_metrics_row_has_a_namespace_a_step_and_a_wall_time(tmp_path):
    wd = Workdir(tmp_path, quiet=True)
    before = time.time()
    wd.log("train", step=np.int64(3), loss=0.5)
    wd.log(loss=0.25)  # no namespace, no step: "metrics" and the row number
    wd.log("eval", acc=1.0)
    times = [r["wall_time"] for r in wd.logged()]
    assert before <= times[0] <= times[1] <= times[2] <= time.time()
    assert [_untimed(r) for r in wd.logged()] == [
        {"namespace": "train", "step": 3, "loss": 0.5},
        {"namespace": "metrics", "step": 1, "loss": 0.25},
        {"namespace": "eval", "step": 2, "acc": 1.0},
    ]
    for bad, match in [
        (lambda: wd.log("", x=1), "namespace must be a name"),
        (lambda: wd.log(namespace="a", x=1), "first argument"),
        (lambda: wd.log("a", wall_time=1.0), "`wall_time` is stamped by the workdir"),
        (lambda: wd.log("a", step=1.5), "step must be an int"),
        (lambda: wd.log("a", step=True), "step must be an int"),
    ]:
        with pytest.raises(ValueError, match=match):
            bad()
    assert len(wd.logged()) == 3
    wd.close()


def _flip_bytes(data):
    raw = bytearray(data.read_bytes())
    for i in range(len(raw) // 2, len(raw) // 2 + 8):
        raw[i] ^= 0xFF
    data.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    "damage, says",
    [(_flip_bytes, "does not match its SHA-256"), (pathlib.Path.unlink, "missing")],
)
def test_a_corrupted_checkpoint_falls_back_to_the_previous_one(
    toy, tmp_path, monkeypatch, capsys, damage, says
):
    path = _config(tmp_path, "experiment: toy\nsteps: 7\ncheckpoint_every: 2\n")
    full_dir, full = runlib.run_experiment(path, out=tmp_path / "a", quiet=True)
    _interrupt_at_step(monkeypatch, 6)  # checkpoints 4 and 6 are kept
    with pytest.raises(runlib.Interrupted) as info:
        runlib.run_experiment(path, out=tmp_path / "b", quiet=True)
    monkeypatch.undo()
    monkeypatch.setitem(registry.EXPERIMENTS, "toy", "toy_experiment")
    run_dir = info.value.args[0]
    state = run_dir / "checkpoints" / "6" / "state"
    for data in [p for p in state.rglob("*") if p.is_file() and p.parent.name == "d"]:
        damage(data)  # the array data
    _, resumed = runlib.run_experiment(resume=run_dir)
    err = capsys.readouterr().err
    assert "checkpoint 6" in err and says in err
    assert resumed["metrics"] == full["metrics"]
    assert _rows(run_dir) == _rows(full_dir)


def test_a_run_logs_to_stdout_log_with_plain_progress_off_a_terminal(
    tmp_path, toy, capsys, monkeypatch
):
    monkeypatch.setattr(progresslib, "PLAIN_EVERY", 0.0)  # a line per advance
    path = _config(tmp_path, "experiment: toy\nsteps: 3\n")
    run_dir, _ = runlib.run_experiment(path, out=tmp_path, quiet=False)
    log = (run_dir / "stdout.log").read_text()
    for line in ("toy: lr 0.1, from step 0", "training: 1/3", "training: 3/3"):
        assert line in log
    # the current item and the latest metric: here the row logged last
    last = _rows(run_dir)[-1]
    assert f"training: 3/3 [train loss={last['loss']:.4g}] (" in log
    assert "training: 3/3" in capsys.readouterr().out  # the terminal's copy
    assert sys.stdout is not None and not hasattr(sys.stdout, "log")  # restored
    monkeypatch.setattr(progresslib, "PLAIN_EVERY", 3600.0)  # only the last line
    run_dir, _ = runlib.run_experiment(path, out=tmp_path, quiet=False)
    log = (run_dir / "stdout.log").read_text()
    assert "training: 3/3" in log and "training: 1/3" not in log


def test_savefig_lays_out_figures_and_names_overlapping_labels(tmp_path):
    import matplotlib.pyplot as plt
    from matplotlib.layout_engine import PlaceHolderLayoutEngine

    def grid():
        fig, axes = plt.subplots(2, 2, figsize=(8, 5))
        for ax, title in zip(axes.flat, ["a", "b", "digits", "moons"], strict=True):
            ax.plot([1, 2])
            ax.set_title(title)
            ax.set_xlabel("per-sample oracle calls")
        return fig

    # matplotlib's default layout puts the top row's x labels on the bottom
    # row's titles; the check sees it
    fig = grid()
    fig.canvas.draw()
    found = figures.overlapping_labels(fig)
    assert ("per-sample oracle calls", "digits") in found
    plt.close(fig)
    # savefig lays the same figure out, so nothing overlaps and nothing warns
    wd = Workdir(tmp_path, quiet=True)
    wd.savefig(grid(), "ok.png")
    assert (tmp_path / "ok.png").exists()
    # a figure that chose its own layout (here: one that does nothing) keeps
    # it, and gets a warning
    fig = grid()
    fig.set_layout_engine(PlaceHolderLayoutEngine(True, True))
    with pytest.warns(UserWarning, match="'per-sample oracle calls' overlaps"):
        wd.savefig(fig, "bad.png")
    wd.close()


# --- Run records (issue 34): a resume of an edited config, shared stamps, torn
# records


def test_resume_refuses_an_edited_config_naming_the_keys(toy, tmp_path, monkeypatch):
    path = _config(tmp_path, "experiment: toy\nsteps: 7\ncheckpoint_every: 2\n")
    run_dir = _interrupted(monkeypatch, path, tmp_path, at=4)
    config = run_dir / "config.yaml"
    config.write_text(config.read_text().replace("lr: 0.1", "lr: 0.3"))
    with pytest.raises(
        cfglib.ConfigError, match=r"changed since the run started \(lr\)"
    ):
        runlib.run_experiment(resume=run_dir)
    assert cli.main(["run", "--resume", str(run_dir), "--quiet"]) == 2
    # --force goes on, and says so in the run's records
    assert cli.main(["run", "--resume", str(run_dir), "--quiet", "--force"]) == 0
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "done" and status["forced"][0]["changed"] == ["lr"]
    assert status["config"]["lr"] == 0.3
    runlib.run_experiment(resume=run_dir)  # the forced config is now the record


def test_two_runs_with_the_same_stamp_get_their_own_directories(
    toy, tmp_path, monkeypatch
):
    monkeypatch.setattr(runlib, "_stamp", lambda: "20260101-000000-000000")
    a = _config(tmp_path, "experiment: toy\nlr: 0.1\n", "a.yaml")
    b = _config(tmp_path, "experiment: toy\nlr: 0.2\n", "b.yaml")
    dir_a, _ = runlib.run_experiment(a, out=tmp_path / "runs", quiet=True)
    dir_b, _ = runlib.run_experiment(b, out=tmp_path / "runs", quiet=True)
    assert dir_a != dir_b and dir_b.name == dir_a.name + "-1"
    assert "lr: 0.1" in (dir_a / "config.yaml").read_text()
    assert "lr: 0.2" in (dir_b / "config.yaml").read_text()


def test_records_are_written_whole_and_a_bad_one_is_named(toy, tmp_path, monkeypatch):
    from iterjax.lab import records, report

    target = tmp_path / "r.json"
    records.write_json(target, {"a": 1})
    with pytest.raises(TypeError):
        records.write_json(target, {"a": object()})  # fails mid-write
    assert json.loads(target.read_text()) == {"a": 1}  # the old record stands
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temp left
    path = _config(tmp_path, "experiment: toy\n")
    run_dir, _ = runlib.run_experiment(path, out=tmp_path / "runs", quiet=True)
    (run_dir / "summary.json").write_text('{"metrics": {"lo')  # torn elsewhere
    with pytest.raises(report.ReportError, match="summary.json is not valid JSON"):
        report.write([run_dir], tmp_path / "report.md")
    with pytest.raises(cfglib.ConfigError, match="summary.json is not valid JSON"):
        runlib.run_experiment(resume=run_dir)


@pytest.mark.parametrize(
    "text, extra, named",
    [
        ("experiment: toy\nsteps: 3\nsteps: 4\n", [], "key 'steps' is given twice"),
        ("experiment: toy\nlr:\n\t0.1\n", [], "spaces, not tabs"),
        ("experiment: toy\nlr: [0.1\n", [], "c.yaml, line"),
        ("experiment: toy\n", ["steps=[1,"], "override 'steps=[1,'"),
        ("experiment: toy\nlr: .nan\n", [], "`lr`: expected a number, got nan"),
        ("experiment: toy\nseed: 100000000000000000000\n", [], "`seed`: 1000"),
        ("experiment: ../../escape\n", [], "`experiment`: '../../escape'"),
        ("experiment: toy\nmesh: {shape: [3]}\n", ["--dry-run"], "`mesh.shape`"),
    ],
    ids=["duplicate", "tab", "malformed", "override", "nan", "seed", "path", "mesh"],
)
def test_bad_configs_are_one_line_naming_the_key_before_any_run_directory(
    toy, tmp_path, capsys, text, extra, named
):
    path = _config(tmp_path, text)
    out = tmp_path / "runs"
    assert cli.main(["run", str(path), "--out", str(out), "--quiet", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert named in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_a_bound_refuses_inf_and_a_read_only_out_is_named(
    toy, tmp_path, capsys, monkeypatch
):
    assert (
        cfglib.Range(lo=0.0).check(float("inf")) == "must be a finite number, got inf"
    )
    path = _config(tmp_path, "experiment: toy\n")
    mkdir = pathlib.Path.mkdir

    def read_only(self, *args, **kwargs):  # (a real read-only folder: root writes)
        if "runs" in self.parts:
            raise PermissionError(13, "Permission denied")
        return mkdir(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "mkdir", read_only)
    assert cli.main(["run", str(path), "--out", str(tmp_path / "runs"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--out: cannot make" in err and "Permission denied" in err


def test_an_absurd_size_is_refused_before_any_run_directory(toy, tmp_path, capsys):
    path = _config(tmp_path, "experiment: fixed_point_study\ndim: 10000000000000\n")
    out = tmp_path / "runs"
    assert cli.main(["run", str(path), "--out", str(out), "--quiet"]) == 2
    assert "`dim`: must be <= 2147483647" in capsys.readouterr().err
    assert not out.exists()


# --- Your own experiments: show, init, seeds, swept overrides


def test_show_prints_a_builtin_config_and_names_unknown_ones(capsys):
    assert cli.main(["show", "fixed_point_study"]) == 0
    text = capsys.readouterr().out
    assert text == (cfglib.CONFIG_DIR / "fixed_point_study.yaml").read_text()
    assert cli.main(["show", "nope"]) == 2
    assert (
        f"no built-in config 'nope'; built-in: {_first_config()}, "
        in capsys.readouterr().err
    )


def test_init_copies_a_config_and_its_experiment_that_then_run(
    tmp_path, monkeypatch, capsys
):
    where = tmp_path / "mine"
    assert cli.main(["init", "fixed_point_study", str(where)]) == 0
    config, module = (
        where / "my_fixed_point_study.yaml",
        where / "my_fixed_point_study.py",
    )
    assert "experiment: my_fixed_point_study" in config.read_text()
    assert (
        module.read_text()
        == pathlib.Path(registry.experiment("fixed_point_study").__file__).read_text()
    )
    # run from that directory: the current directory is on the import path
    monkeypatch.chdir(where)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(where))])
    out = ["--smoke", "--quiet", "--out", str(tmp_path / "runs")]
    assert cli.main(["run", config.name, *out]) == 0
    assert "my_fixed_point_study" in sys.modules
    assert list((tmp_path / "runs" / "my_fixed_point_study").glob("*/summary.json"))
    # a second init replaces nothing
    capsys.readouterr()
    assert cli.main(["init", "fixed_point_study", str(where)]) == 2
    assert "exist; not replaced" in capsys.readouterr().err


def test_seeds_on_a_config_without_the_seed_key_say_what_to_add(tmp_path, monkeypatch):
    pkg = tmp_path / "noseed"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "exp.py").write_text(
        "import dataclasses\n\n\n@dataclasses.dataclass(frozen=True)\n"
        "class Config:\n    damping: float = 0.5\n\n\ndef run(cfg, workdir):\n"
        "    return {}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(cfglib.ConfigError, match=r"a field `seed: int = 0`"):
        runlib.prepare({"experiment": "noseed.exp", "sweep": {"seeds": 2}})
    with pytest.raises(cfglib.ConfigError, match=r"a field `trial_seed: int = 0`"):
        runlib.prepare(
            {
                "experiment": "noseed.exp",
                "sweep": {"seeds": 2, "seed_key": "trial_seed"},
            }
        )


def test_a_command_line_value_the_sweep_replaces_is_warned_about(toy):
    config = {"experiment": "toy", "sweep": {"grid": {"lr": [0.1, 0.2]}, "seeds": 2}}
    with pytest.warns(
        UserWarning, match=r"lr: the value .* by the sweep's `sweep.grid.lr`"
    ):
        runlib.prepare(config, ["lr=0.3"])
    with pytest.warns(UserWarning, match=r"seed: .* `sweep.seeds`"):
        runlib.prepare(config, values={"seed": 4})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        runlib.prepare(config, ["steps=3", "sweep.seeds=3"])  # neither is replaced


def _first_config():
    """The shipped config that comes first by name."""
    return min(p.stem for p in cli.CONFIG_DIR.glob("*.yaml"))


def test_listing_into_a_closed_pipe_is_quiet():
    # `iterjax list | head -1`: no BrokenPipeError traceback
    iterjax_bin = pathlib.Path(sys.executable).parent / "iterjax"
    out = subprocess.run(
        f"'{iterjax_bin}' list | head -1",
        shell=True, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.stdout.startswith(_first_config() + " ") and out.stderr == "", out.stderr


def test_a_sweep_runs_its_members_as_submitit_jobs_and_resumes(
    user_package, tmp_path, monkeypatch
):
    # submitit's local executor runs each job as a real process: they import
    # this iterjax and the user's package through PYTHONPATH
    here = pathlib.Path(iterjax.__file__).parent.parent
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path / 'site'}:{here}")
    sweep = "sweep: {grid: {lr: [0.1, 0.2]}, seeds: 1, vmap: false}\n"
    text = f"experiment: {user_package}\nsteps: 3\n{sweep}"
    launcher = "launcher: {name: submitit, cluster: local, options: {timeout_min: 5}}\n"
    local_dir, local = runlib.run_experiment(
        _config(tmp_path, text, "l.yaml"), out=tmp_path / "l", quiet=True
    )
    run_dir, jobs = runlib.run_experiment(
        _config(tmp_path, text + launcher, "j.yaml"), out=tmp_path / "j", quiet=True
    )
    assert jobs["members"] == 2 and not jobs["failed"]
    assert _metrics_by_settings(run_dir) == _metrics_by_settings(local_dir)
    submitted = lambda: len(list((run_dir / "submitit").glob("*_submitted.pkl")))
    assert submitted() == 2  # one job per member that runs alone
    assert sorted(f.name for f in run_dir.glob("rows-*.jsonl")) == [
        f"rows-job-{i:03d}.jsonl" for i in range(2)
    ]
    # a job that never ran: --resume submits only its member
    (run_dir / "rows-job-001.jsonl").unlink()
    (run_dir / "summary.json").unlink()
    runlib.run_experiment(None, resume=run_dir, quiet=True)
    assert submitted() == 3
    assert _metrics_by_settings(run_dir) == _metrics_by_settings(local_dir)
    with pytest.raises(cfglib.ConfigError, match="`launcher`: runs a sweep's"):
        runlib.prepare({"experiment": user_package, "launcher": {"name": "submitit"}})


def test_a_target_records_the_first_step_and_time_that_meet_it(toy, tmp_path):
    # toy's loss falls from 1.5 by about (1 - lr)^2 a step: with lr 0.1 it is
    # first <= 1.0 at step 2 or 3, and never <= 1e-9 in 6 steps
    base = """
        experiment: toy
        lr: 0.1
        target: {metric: loss, below: %s}
    """
    d, s = runlib.run_experiment(_config(tmp_path, base % 1.0), out=tmp_path)
    losses = [r["loss"] for r in _rows(d)]
    first = next(i for i, v in enumerate(losses) if v <= 1.0)
    t = s["target"]
    assert t["reached"] and t["step"] == first + 1 and t["value"] == losses[first]
    assert 0 <= t["seconds"] <= s["seconds"] and t["device"] and not t["resumed"]
    assert t["metric"] == "loss" and t["below"] == 1.0 and "above" not in t
    d2, s2 = runlib.run_experiment(
        _config(tmp_path, base % 1e-9, "never.yaml"), out=tmp_path
    )
    assert s2["target"]["reached"] is False and "step" not in s2["target"]
    text = reportlib.markdown([d, d2])
    assert "## Time to target" in text and "not reached" in text
    assert f"| {d.name} | loss | <= 1.0 | yes | {first + 1} |" in text


def _sweep_targets(run_dir):
    rows = [
        json.loads(x)
        for f in sorted(run_dir.glob("rows-*.jsonl"))
        for x in f.read_text().splitlines()
    ]
    return {(r["settings"]["lr"], r["settings"]["seed"]): r["target"] for r in rows}


@pytest.mark.parametrize("vmap", [True, False], ids=["vectorised", "alone"])
def test_a_sweeps_members_each_record_their_time_to_target(toy, tmp_path, vmap):
    # each member's step is the one a single run of it records; lr 0.01 never
    # gets the loss from 1.5 to 1.0 in 6 steps, lr 0.1 does in 2 or 3
    target = "target: {metric: loss, below: 1.0}\n"
    grid = "{grid: {lr: [0.1, 0.01]}, seeds: 2, vmap: " + str(vmap).lower() + "}"
    text = f"experiment: toy\n{target}sweep: {grid}\n"
    d, s = runlib.run_experiment(_config(tmp_path, text), out=tmp_path, quiet=True)
    assert s["vectorised_groups"] == (1 if vmap else 0)
    targets = _sweep_targets(d)
    for (lr, seed), t in targets.items():
        one = f"experiment: toy\n{target}lr: {lr}\nseed: {seed}\n"
        path = _config(tmp_path, one, f"{lr}-{seed}.yaml")
        _, single = runlib.run_experiment(path, out=tmp_path / "single", quiet=True)
        want = single["target"]
        assert t["reached"] == want["reached"] == (lr == 0.1), (lr, seed)
        assert t.get("step") == want.get("step") and t.get("value") == want.get("value")
        assert ("seconds" in t) == (want["reached"] and not vmap)  # a vmap: no clock
    by_lr = {e["settings"]["lr"]: e for e in s["target"]["settings"]}
    assert by_lr[0.01]["reached"] == 0 and "step" not in by_lr[0.01]
    steps = [targets[0.1, seed]["step"] for seed in (0, 1)]
    assert by_lr[0.1]["reached"] == 2 and by_lr[0.1]["step"]["mean"] == np.mean(steps)
    assert s["target"]["metric"] == "loss" and s["target"]["device"]
    text = reportlib.markdown([d])
    assert f"| {d.name} (lr=0.01) | loss | <= 1.0 | 0 of 2 | not reached |" in text
    assert (
        f"| {d.name} (lr=0.1) | loss | <= 1.0 | 2 of 2 | {np.mean(steps):.4g} |" in text
    )


def test_a_target_runs_members_alone_where_the_trial_returns_no_rows(
    toy, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(toy, "trial", lambda cfg: toy._metrics(cfg, toy._init(cfg)))
    text = (
        "experiment: toy\ntarget: {metric: loss, below: 1.0}\n"
        "sweep: {grid: {lr: [0.1]}, seeds: 2}\n"
    )
    d, s = runlib.run_experiment(_config(tmp_path, text), out=tmp_path, quiet=True)
    assert "returns no `rows`" in capsys.readouterr().err
    assert all(t["reached"] and "seconds" in t for t in _sweep_targets(d).values())


@pytest.mark.parametrize(
    "block,match",
    [
        ("{metric: loss}", "`target`: give one of `below` and `above`"),
        ("{metric: loss, below: 1, above: 0}", "`target`: give one of"),
        ("{metric: loss, below: .nan}", "`target.below`"),
        ("{below: 1.0}", "`target.metric`: missing required key"),
    ],
)
def test_a_bad_target_is_refused_naming_the_key(toy, tmp_path, block, match):
    path = _config(tmp_path, f"experiment: toy\ntarget: {block}\n")
    with pytest.raises(cfglib.ConfigError, match=match):
        runlib.prepare(path)


def test_a_target_meets_no_nan_and_no_bool():
    t = cfglib.Target("loss", above=0.5)
    assert t.met(0.5) and t.met(3) and not t.met(float("nan"))
    assert not t.met(float("inf")) and not t.met(True) and not t.met("0.9")


def test_a_config_field_named_like_a_platform_key_is_refused(toy, monkeypatch):
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class Clashing:
        target: float = 0.1  # the platform's `target:` would take this key

    monkeypatch.setattr(toy, "Config", Clashing)
    with pytest.raises(cfglib.ConfigError, match="Config field `target` is a reserved"):
        runlib.prepare({"experiment": "toy"})


def test_runs_draw_in_the_colour_blind_safe_palette(toy, tmp_path, monkeypatch):
    def run(cfg, workdir):  # what the experiment's figures would be drawn with
        cycle = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
        return {"colors": list(cycle)}

    monkeypatch.setattr(toy, "run", run)
    before = matplotlib.rcParams["axes.prop_cycle"]
    _, summary = runlib.run_experiment(
        _config(tmp_path, "experiment: toy\n"), out=tmp_path, quiet=True
    )
    assert [c.upper() for c in summary["colors"]] == list(figures.PALETTE)
    assert matplotlib.rcParams["axes.prop_cycle"] == before  # restored after
