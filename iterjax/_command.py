"""The `iterjax` command: the experiment platform's command line, or, on an
install without the platform's dependencies, which extra to install."""

import sys

import iterjax


def main(argv=None) -> int:
    try:
        cli = iterjax._import_part("lab", "iterjax.lab.cli")
    except iterjax._MissingExtra as e:
        print(
            f"iterjax: the command line is the experiment platform's: {e}",
            file=sys.stderr,
        )
        return 2
    return cli.main(argv)
