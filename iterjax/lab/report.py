"""`iterjax report DIR... [--out report.md|report.html]`: runs side by side.

One document for one or several run (or sweep) directories: what ran (status,
time, commit, devices), the config keys whose values differ between the runs,
their scalar metrics in one table, flagged failures and non-finite metrics,
each run's own table and its plots. Markdown links the PNGs; HTML embeds them.
A failed run shows the error its `status.json` recorded.
"""

import base64
import html
import json
import os
import pathlib

import yaml

from .records import RecordError, read_json
from .sweep import label_settings, scalar_metrics
from .tables import flatten, markdown_table


class ReportError(ValueError):
    """A report that cannot be written: not a run directory, or a bad --out."""


def load(run_dir) -> dict:
    d = pathlib.Path(run_dir)
    if not (d / "config.yaml").exists():
        why = "does not exist" if not d.exists() else "has no config.yaml"
        raise ReportError(f"{d} is not a run directory: it {why}")

    def read(name):
        try:
            return read_json(d / name, {})
        except RecordError as e:
            raise ReportError(str(e)) from None

    status = read("status.json")
    return {
        "dir": d,
        "config": yaml.safe_load((d / "config.yaml").read_text()),
        "summary": read("summary.json"),
        "status": status.get("status", "unknown"),
        "error": status.get("error"),
        "plots": sorted(d.glob("*.png")),
    }


def _numbers(summary):
    skip = {"seconds", "members", "vectorised_groups"}
    return {
        k: v
        for k, v in scalar_metrics(summary).items()
        if not isinstance(v, bool) and k not in skip
    }


def _fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _target_rows(name, t):
    """A run's time to target as report rows: one for a run, one per setting
    (seeds pooled: how many reached it, their mean step and seconds) for a sweep."""
    bound = f"<= {t['below']}" if "below" in t else f">= {t['above']}"
    if "settings" not in t:  # a single run
        reached = "yes" if t["reached"] else "no"
        step = t.get("step", "not reached")
        return [
            [name, t["metric"], bound, reached, step, t.get("seconds", ""), t["device"]]
        ]
    rows = []
    for e in t["settings"]:
        mean = lambda key: _fmt(e[key]["mean"]) if key in e else ""
        rows.append(
            [
                f"{name} ({label_settings(e['settings'])})",
                t["metric"],
                bound,
                f"{e['reached']} of {e['n']}",
                mean("step") or "not reached",
                mean("seconds"),
                t["device"],
            ]
        )
    return rows


def markdown(run_dirs, relative_to=None) -> str:
    runs = [load(d) for d in run_dirs]
    names = [r["dir"].name for r in runs]
    lines = ["# iterjax report", ""]
    rows = []
    for r, name in zip(runs, names):
        s, env = r["summary"], r["summary"].get("environment", {})
        rows.append(
            [
                name,
                r["config"].get("experiment"),
                r["status"],
                s.get("seconds", ""),
                (env.get("git_commit") or "")[:10]
                + ("+" if env.get("git_dirty") else ""),
                ", ".join(sorted(set(env.get("devices", [])))),
                s.get("members", 1),
            ]
        )
    head = ["run", "experiment", "status", "seconds", "commit", "devices", "members"]
    lines += ["## Runs", "", markdown_table(head, rows), ""]

    flat = [flatten(r["config"]) for r in runs]
    keys = sorted(set().union(*flat))
    differ = [k for k in keys if len({json.dumps(f.get(k)) for f in flat}) > 1]
    if len(runs) > 1 and differ:
        rows = [[k, *(_fmt(f.get(k, "")) for f in flat)] for k in differ]
        lines += ["## Settings that differ", "", markdown_table(["key", *names], rows)]
        lines.append("")

    targets = [(name, r["summary"].get("target")) for r, name in zip(runs, names)]
    rows = [row for name, t in targets if t for row in _target_rows(name, t)]
    if rows:
        head = ["run", "metric", "target", "reached", "step", "seconds", "device"]
        lines += ["## Time to target", "", markdown_table(head, rows), ""]

    metrics = [_numbers(r["summary"]) for r in runs]
    mkeys = list(dict.fromkeys(k for m in metrics for k in m))
    if mkeys:
        rows = [[k, *(_fmt(m.get(k, "")) for m in metrics)] for k in mkeys]
        lines += ["## Metrics", "", markdown_table(["metric", *names], rows), ""]

    for r, name in zip(runs, names):
        s = r["summary"]
        lines += [f"## {name} ({r['config'].get('experiment')})", ""]
        if r["error"]:
            lines += [f"**Error:** `{r['error'][:1000]}`", ""]
        for label, key in [
            ("Failed members", "failed"),
            ("Non-finite", "nonfinite_metrics"),
        ]:
            if s.get(key):
                lines += [f"**{label}:** `{json.dumps(s[key])[:500]}`", ""]
        if s.get("table"):
            lines += [s["table"], ""]
        for png in r["plots"]:
            target = os.path.relpath(png, relative_to) if relative_to else str(png)
            lines += [f"![{png.stem}]({target})", ""]
    return "\n".join(lines)


def write(run_dirs, out="report.md") -> pathlib.Path:
    out = pathlib.Path(out)
    if out.suffix not in (".md", ".html"):
        raise ReportError(f"--out {out}: the report is a .md or an .html file")
    if not out.parent.is_dir():
        raise ReportError(f"--out {out}: the folder {out.parent} does not exist")
    text = markdown(run_dirs, relative_to=out.parent.resolve())
    if out.suffix == ".html":
        text = to_html(text, out.parent.resolve())
    out.write_text(text)
    return out


def to_html(md: str, base: pathlib.Path) -> str:
    """The little markdown `markdown()` writes (headings, tables, images,
    bold lines) as one self-contained HTML page with the images embedded."""
    body: list[str] = []
    table: list[str] = []

    def flush():
        if table:
            cells = [[c.strip() for c in r.strip("|").split("|")] for r in table]
            head, rest = cells[0], cells[2:]
            out = [
                "<table><tr>",
                *(f"<th>{html.escape(c)}</th>" for c in head),
                "</tr>",
            ]
            for r in rest:
                out += ["<tr>", *(f"<td>{html.escape(c)}</td>" for c in r), "</tr>"]
            body.append("".join(out) + "</table>")
            table.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{html.escape(line[level:].strip())}</h{level}>")
        elif line.startswith("!["):
            alt, src = line[2:].split("](", 1)
            data = base64.b64encode((base / src.rstrip(")")).read_bytes()).decode()
            body.append(
                f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'
            )
        elif line.strip():
            body.append(f"<p>{html.escape(line)}</p>")
    flush()
    style = (
        "body{font-family:sans-serif;max-width:1200px;margin:auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}"
        "img{max-width:100%}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>iterjax report"
        f"</title><style>{style}</style></head><body>{''.join(body)}</body></html>"
    )
