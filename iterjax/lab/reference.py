"""The configs reference (`docs/configs.md`), generated from the typed configs
so that it cannot drift from them: every key of every shipped experiment and of
the platform, with its type, range, default and the comment beside it in the
source. Regenerate it with `python -m iterjax.lab.reference > docs/configs.md`;
a test fails when the page and the configs differ."""

import dataclasses
import importlib
import inspect
import io
import re
import textwrap
import tokenize

import yaml

from . import config as cfglib
from . import registry

PLATFORM_BLOCKS = [
    ("sweep", cfglib.Sweep),
    ("sweep.random", cfglib.RandomSearch),
    ("mesh", cfglib.MeshSpec),
    ("distributed", cfglib.DistributedSpec),
    ("launcher", cfglib.Launcher),
    ("target", cfglib.Target),
]

HEADER = """# Configs reference

Every key a config may set, generated from the typed configs
(`python -m iterjax.lab.reference > docs/configs.md`; a test fails when this
page and the code differ). A config file also names its `experiment` (a
built-in name below or an importable module), may start from another with
`base: NAME` (its keys, then these), and may give a `smoke:` block of keys
that `--smoke` runs override. Values are checked against these types and
ranges before anything runs; a bad one is an error naming its key. How to use
them: [the experiment platform](platform.md).
"""


def field_comments(cls) -> dict[str, str]:
    """Each field's comment in `cls`'s source: the one on its line, else the
    comment lines just above it."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
    lines, out = source.splitlines(), {}
    for number, line in enumerate(lines, start=1):
        field = re.match(r"    (\w+)\s*:", line)
        if not field:
            continue
        if number in comments:
            out[field.group(1)] = comments[number]
            continue
        above = number - 1  # the run of comment-only lines just above
        while above in comments and lines[above - 1].lstrip().startswith("#"):
            above -= 1
        out[field.group(1)] = " ".join(comments[k] for k in range(above + 1, number))
    return out


def _value(value) -> str:
    """A default as YAML flow text, for a table cell."""
    if value is None:
        return "null"
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def table(cls) -> str:
    """A markdown table of `cls`'s keys: type and range, default, comment."""
    comments = field_comments(cls)
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for name, kind, default in cfglib.describe_fields(cls):
        shown = "required" if default is dataclasses.MISSING else f"`{_value(default)}`"
        rows.append(
            f"| `{name}` | {_cell(kind)} | {_cell(shown)} | "
            f"{_cell(comments.get(name, ''))} |"
        )
    return "\n".join(rows)


def _first_line(doc) -> str:
    """A docstring's first paragraph, on one line."""
    paragraph = (doc or "").strip().split("\n\n")[0]
    return " ".join(line.strip() for line in paragraph.splitlines())


def markdown() -> str:
    """The whole page."""
    parts = [HEADER, "## Platform keys (every config)", "", table(cfglib.Platform)]
    for key, cls in PLATFORM_BLOCKS:
        parts += ["", f"### `{key}`", "", _first_line(cls.__doc__), "", table(cls)]
    parts += ["", "## Experiments", ""]
    for name in sorted(registry.EXPERIMENTS):
        module = importlib.import_module(registry.EXPERIMENTS[name])
        parts += [
            f"### `{name}`",
            "",
            f"{_first_line(module.__doc__)} (`{module.__name__}`)",
            "",
            table(module.Config),
            "",
        ]
    return "\n".join(parts).rstrip() + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
