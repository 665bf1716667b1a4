"""The `iterjax` command: the experiment platform's command line, or, on an
install without the platform's dependencies, which extra to install."""

import importlib
import sys

import iterjax


def main(argv=None) -> int:
    needs = iterjax._LAZY["lab"][1]
    try:
        cli = importlib.import_module("iterjax.lab.cli")
    except ModuleNotFoundError as e:
        if e.name is None or e.name.split(".")[0] not in needs:
            raise
        print(
            f"iterjax: the command line is the experiment platform's, which needs "
            f"{e.name.split('.')[0]}: pip install 'iterjax[lab]'",
            file=sys.stderr,
        )
        return 2
    return cli.main(argv)
