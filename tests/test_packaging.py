"""The packaging checks, in one module (slow: `make test-fast` leaves them out):
the wheel as a user gets it (built from the repository, installed in a fresh
venv, it lists the built-in configs and runs one smoke config, away from the
checkout), the editable install's mapping, the type checker and the
reference site."""

import os
import pathlib
import re
import shutil
import subprocess
import sys
import sysconfig
import venv

import pytest

pytestmark = pytest.mark.slow

REPO = pathlib.Path(__file__).resolve().parent.parent


def _run(cmd, cwd, env=None, timeout=600):
    out = subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert out.returncode == 0, f"{cmd}:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    return out.stdout


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory):
    """A venv with only the wheel installed (`--no-deps`); its dependencies come
    from the test's own environment through a `.pth` line, which adds that
    site-packages folder but not its `.pth` files (so not the editable install
    of the checkout)."""
    tmp = tmp_path_factory.mktemp("wheel")
    # built from a copy: setuptools builds in the source tree's build/, and a
    # stale build/ (a module since moved) would slip into the wheel
    source = tmp / "source"
    skip = (".*", "build", "runs", "site", "*.egg-info", "__pycache__")
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(*skip))
    _run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", tmp, source],
        cwd=tmp,
    )
    (wheel,) = tmp.glob("iterjax-*.whl")
    env_dir = tmp / "venv"
    venv.create(env_dir, with_pip=False)
    py = env_dir / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", py, "install", "-q",
          "--no-deps", wheel], cwd=tmp)  # fmt: skip
    fresh_site = _run(
        [py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], tmp
    ).strip()
    deps = sysconfig.get_path("purelib")
    (pathlib.Path(fresh_site) / "deps.pth").write_text(deps + "\n")
    return env_dir, tmp


def test_the_installed_wheel_lists_and_runs_its_configs(fresh_venv):
    env_dir, cwd = fresh_venv
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = _run(
        [env_dir / "bin" / "python", "-c", "import iterjax; print(iterjax.__file__)"],
        cwd,
        env,
    )
    assert str(env_dir) in where and str(REPO) not in where
    # the package installs `iterjax` and nothing else at the top level
    site = pathlib.Path(where.strip()).parent.parent
    assert not (site / "experiments").exists() and not (site / "configs").exists()
    # experiments/ and configs/ install as subpackages of iterjax
    for sub in ("experiments/common/cells.py", "configs/fixed_point_sweep.yaml"):
        assert (site / "iterjax" / sub).is_file(), sub
    listed = _run([env_dir / "bin" / "iterjax", "list"], cwd, env)
    names = [line.split()[0] for line in listed.splitlines() if line.strip()]
    assert len(names) >= 14 and "fixed_point_sweep" in names, listed
    out = _run(
        [env_dir / "bin" / "iterjax", "run", "fixed_point_sweep", "--smoke",
         "--out", cwd / "runs", "--quiet"],
        cwd,
        env,
    )  # fmt: skip
    run_dirs = list((cwd / "runs" / "fixed_point_sweep").iterdir())
    assert len(run_dirs) == 1 and "results in" in out
    assert (run_dirs[0] / "summary.json").exists()


def test_the_editable_install_maps_experiments_and_configs(tmp_path):
    # `make` installs the checkout in editable mode: away from the checkout,
    # iterjax.experiments and iterjax.configs are the repository's top-level
    # folders, and `iterjax list` finds every shipped config through them
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    script = (
        "import iterjax.experiments.common.cells as c, iterjax.lab.config as r;"
        "print(c.__file__); print(r.CONFIG_DIR)"
    )
    cells, configs = _run([sys.executable, "-c", script], tmp_path, env).split()
    assert cells == str(REPO / "experiments" / "common" / "cells.py")
    assert configs == str(REPO / "configs")
    listed = _run([pathlib.Path(sys.executable).parent / "iterjax", "list"], tmp_path)
    assert len(listed.splitlines()) == len(list((REPO / "configs").glob("*.yaml")))


def test_the_package_type_checks():
    # `make lint`'s type checker, here so that CI runs it: mypy over iterjax/
    # with the configuration in pyproject.toml
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-incremental"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:]


def test_the_reference_site_builds_strictly(tmp_path):
    # `make docs`: mkdocs + mkdocstrings from the docstrings, offline; strict
    # mode fails on any warning (a broken cross-reference, a missing object, a
    # README section the examples page includes)
    root = REPO
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "-q",
            "-d",
            str(tmp_path),
        ],
        cwd=root,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    examples = (tmp_path / "examples" / "index.html").read_text()
    assert "A fixed point, differentiated implicitly" in examples
    assert "Accelerating a solver, and a chain of related problems" in examples
    assert "RecycledCG" in (tmp_path / "api" / "linear" / "index.html").read_text()


def _readme_experiment(where):
    """The manual's "Write your own experiment" (docs/platform.md):
    mypkg/quadratic.py and my.yaml, as written there, and the command it gives."""
    readme = (REPO / "docs" / "platform.md").read_text()
    code = re.search(r"```python\n# mypkg/quadratic.py\n(.*?)```", readme, re.S)
    config = re.search(
        r"```text\n# my.yaml +then: (iterjax run [^\n]*)\n(.*?)```", readme, re.S
    )
    (where / "mypkg").mkdir(parents=True)
    (where / "mypkg" / "__init__.py").write_text("")
    (where / "mypkg" / "quadratic.py").write_text(code.group(1))
    (where / "my.yaml").write_text(config.group(2))
    return config.group(1).split()[1:]  # ["run", "my.yaml", "damping=0.8"]


@pytest.mark.parametrize("install", ["wheel", "editable"])
def test_the_readme_experiment_runs_as_written_outside_the_repo(
    install, fresh_venv, tmp_path
):
    # from a directory outside the checkout, with the installed wheel or the
    # editable install: `experiment: mypkg.quadratic` is found in the current
    # directory, the sweep's seeds reach the Config, and the command line's
    # damping=0.8, which the sweep's grid replaces, is warned about
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    bin_dir = (
        fresh_venv[0] / "bin"
        if install == "wheel"
        else pathlib.Path(sys.executable).parent
    )
    args = _readme_experiment(tmp_path)
    out = subprocess.run(
        [bin_dir / "iterjax", *args, "--out", "runs", "--quiet"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "damping: the value given on the command line is replaced" in out.stderr
    (run_dir,) = (tmp_path / "runs" / "mypkg.quadratic").iterdir()
    rows = [r for f in run_dir.glob("rows-*.jsonl") for r in f.read_text().splitlines()]
    assert len(rows) == 4  # damping 0.5, 0.8 x seeds 0, 1
