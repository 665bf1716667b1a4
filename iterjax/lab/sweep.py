"""Sweeps: one config run over a grid, random draws and seeds, vectorised where it can.

A config's `sweep:` block (`iterjax.lab.config.Sweep`) expands into members, each a
set of dotted-key settings applied to the config::

    sweep:
      seeds: 16                                  # seed = 0..15
      grid: {radius: [0.5, 0.9], solver: [picard, anderson]}
      random: {num: 4, space: {atol: {log_uniform: [1.0e-10, 1.0e-6]}}}

Every member is validated as a config before anything compiles. An experiment
module may declare `ARRAY_KEYS` (dotted config keys it reads as arrays: seeds,
step sizes, damping) and a pure function `trial(cfg) -> dict of scalars`. Members
that differ only in array keys then run as one `jax.vmap` of `trial`, with the
members sharded over the first axis of the config's `mesh:`; the other keys split
the sweep into groups, run one after another. Without `trial`, each member is a
separate run in `members/NNN/` (a crash there is recorded and the rest go on).

The sweep directory holds `metrics.jsonl` and `metrics.csv` (one row per member:
its settings, metrics, status), `summary.json` (mean/std/min/max over seeds per
setting, failures, members with non-finite metrics) and `sweep.png` (the mean
over seeds with a band of one standard deviation).
"""

import copy
import csv
import dataclasses
import fnmatch
import itertools
import json
import traceback

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec
from matplotlib.figure import Figure

from . import config as cfglib
from .tables import markdown_table


@dataclasses.dataclass(frozen=True)
class Member:
    index: int
    settings: dict  # dotted key -> value, as written in the sweep
    cfg: object  # the member's validated experiment Config


def expand(sweep: cfglib.Sweep) -> list[dict]:
    """The members' settings: grid x random draws x seeds, in that nesting order."""
    grid = [
        dict(zip(sweep.grid, values))
        for values in itertools.product(*sweep.grid.values())
    ]
    draws: list[dict] = [{}]
    if sweep.random is not None:
        rng = np.random.default_rng(sweep.random.seed)
        draws = [
            {k: _draw(rng, d) for k, d in sweep.random.space.items()}
            for _ in range(sweep.random.num)
        ]
    n = sweep.seeds
    values = list(range(n)) if isinstance(n, int) else list(n)
    seeds = [{sweep.seed_key: s} for s in values] or [{}]
    return [{**g, **r, **s} for g in grid for r in draws for s in seeds]


def replaced(keys, sweep: cfglib.Sweep) -> list[tuple[str, str]]:
    """(key, sweep key) for each of the dotted `keys` (overrides) that the
    sweep sets in every member: the same key, or one inside the other."""
    swept = {f"sweep.grid.{k}": k for k in sweep.grid}
    if sweep.random is not None:
        swept |= {f"sweep.random.space.{k}": k for k in sweep.random.space}
    if sweep.seeds:
        swept["sweep.seeds"] = sweep.seed_key
    inside = lambda a, b: a == b or a.startswith(b + ".")
    return [
        (key, where)
        for key in keys
        for where, k in swept.items()
        if inside(key, k) or inside(k, key)
    ]


def _draw(rng, dist):
    ((kind, v),) = dist.items()
    if kind == "choice":
        return v[int(rng.integers(len(v)))]
    if kind == "int_uniform":
        return int(rng.integers(v[0], v[1] + 1))
    if kind == "log_uniform":
        return float(np.exp(rng.uniform(np.log(v[0]), np.log(v[1]))))
    return float(rng.uniform(v[0], v[1]))


def plan(module, raw: dict, sweep: cfglib.Sweep) -> list[Member]:
    """Validate every member's config; raise ConfigError naming member and key."""
    members = []
    for i, settings in enumerate(expand(sweep)):
        data = copy.deepcopy(raw)
        try:
            for key, value in settings.items():
                cfglib.set_dotted(data, key, copy.deepcopy(value))
            cfg = cfglib.from_dict(module.Config, data)
        except cfglib.ConfigError as e:
            hint = ""
            if sweep.seeds and f"`{sweep.seed_key}`" in str(e):
                hint = (
                    f"; `sweep.seeds` sets `{sweep.seed_key}` in every member: give "
                    f"the experiment's Config a field `{sweep.seed_key}: int = 0` "
                    "that seeds the run, or name the field that does with "
                    "`sweep.seed_key`"
                )
            raise cfglib.ConfigError(
                f"sweep member {i} ({label_settings(settings)}): {e}{hint}"
            ) from None
        members.append(Member(i, settings, cfg))
    if sweep.vmap:
        fixed = [k for k in members[0].settings if not _is_array_key(module, k)]
        if not hasattr(module, "trial") or fixed:
            allowed = list(getattr(module, "ARRAY_KEYS", ()))
            raise cfglib.ConfigError(
                f"config key `sweep.vmap`: cannot vectorise over {fixed or 'anything'}"
                f"; this experiment's array-valued keys: {allowed}"
            )
    return members


def _is_array_key(module, key):
    patterns = getattr(module, "ARRAY_KEYS", ())
    return hasattr(module, "trial") and any(fnmatch.fnmatch(key, p) for p in patterns)


def label_settings(settings):
    """`k=v, ...`: a sweep setting in one line (floats to 4 digits)."""

    def show(v):
        if isinstance(v, dict):
            return v.get("name", v)
        return f"{v:.4g}" if isinstance(v, float) else v

    return ", ".join(f"{k}={show(v)}" for k, v in settings.items())


def groups(module, members, sweep: cfglib.Sweep):
    """Members split by the values of the keys that cannot be vectorised:
    `[(vectorised_keys, [members...]), ...]` (no keys: run separately)."""
    keys = list(members[0].settings)
    if sweep.vmap is False or not hasattr(module, "trial"):
        return [((), [m]) for m in members]
    array = [
        k
        for k in keys
        if _is_array_key(module, k) and all(_is_number(m.settings[k]) for m in members)
    ]
    out: dict = {}
    for m in members:
        fixed = json.dumps([m.settings[k] for k in keys if k not in array])
        out.setdefault(fixed, []).append(m)
    return [(tuple(array), ms) for ms in out.values()]


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# --- Settings as arrays inside a config: the traced copy `trial` sees.


def get_dotted(cfg, key):
    head, _, rest = key.partition(".")
    node = cfg.kwargs()[head] if isinstance(cfg, cfglib.Spec) else getattr(cfg, head)
    return get_dotted(node, rest) if rest else node


def replace_dotted(cfg, key, value):
    """A copy of a (frozen) config with the dotted key set to `value`."""
    head, _, rest = key.partition(".")
    if isinstance(cfg, cfglib.Spec):
        opts = cfg.kwargs()
        opts[head] = replace_dotted(opts[head], rest, value) if rest else value
        return cfglib.Spec(cfg.name, tuple(sorted(opts.items())))
    new = replace_dotted(getattr(cfg, head), rest, value) if rest else value
    return dataclasses.replace(cfg, **{head: new})


def _indexer(array):
    return lambda index: array[index]


def run_vectorised(module, members, keys, mesh=None, rows=False) -> list[dict]:
    """`jax.vmap` of `module.trial` over the members' values of `keys`: each
    member's metrics, and under `rows` (which `rows=True` requires) the per-step
    rows its trial returned, as `{column: list}`."""
    base = members[0].cfg
    values = {k: np.asarray([get_dotted(m.cfg, k) for m in members]) for k in keys}
    n = len(members)
    width = mesh.shape[mesh.axis_names[0]] if mesh is not None else 1
    padded = -(-n // width) * width  # whole rows per device: repeat the last member
    values = {
        k: np.concatenate([v, np.repeat(v[-1:], padded - n)]) for k, v in values.items()
    }

    def one(vals):
        cfg = base
        for k, v in vals.items():
            cfg = replace_dotted(cfg, k, v)
        return module.trial(cfg)

    inputs: dict = values
    if mesh is not None:
        sharding = NamedSharding(mesh, PartitionSpec(mesh.axis_names[0]))
        inputs = {
            k: jax.make_array_from_callback(v.shape, sharding, _indexer(v))
            for k, v in values.items()
        }
    out = jax.jit(jax.vmap(one))(inputs)
    if rows and not isinstance(out.get("rows"), dict):
        raise ValueError(
            f"`target`: {module.__name__}.trial returns no `rows` (the per-step "
            "metrics a target is searched in)"
        )
    if jax.process_count() > 1:
        out = multihost_utils.process_allgather(out, tiled=True)
    out = jax.tree.map(np.asarray, out)
    return [jax.tree.map(lambda v, i=i: v[i].tolist(), out) for i in range(n)]


def target_in_rows(target: cfglib.Target, columns: dict) -> dict:
    """A vectorised member's time to target, from the rows its trial returned
    (`{column: list}`; `step` defaults to the row's index): its step and value,
    no seconds (the members of a vmap share one clock)."""
    length = len(next(iter(columns.values()), []))
    rows = [{k: v[i] for k, v in columns.items()} for i in range(length)]
    hit = target.first({"step": i, **r} for i, r in enumerate(rows))
    if hit is None:
        return {"reached": False}
    return {"reached": True, "step": hit["step"], "value": hit[target.metric]}


def aggregate_targets(rows, seed_key) -> list[dict]:
    """Per setting (all keys but the seed): of the members that finished, how
    many reached the target, and the mean/min/max of their steps (and seconds,
    where the members ran alone)."""
    out: dict = {}
    for r in rows:
        if r["status"] == "ok" and "target" in r:
            key = json.dumps({k: v for k, v in r["settings"].items() if k != seed_key})
            out.setdefault(key, []).append(r["target"])
    result = []
    for key, ts in out.items():
        hit = [t for t in ts if t["reached"]]
        entry = {"settings": json.loads(key), "n": len(ts), "reached": len(hit)}
        for name in ("step", "seconds"):
            xs = [t[name] for t in hit if t.get(name) is not None]
            if xs:
                entry[name] = {
                    "mean": float(np.mean(xs)),
                    "min": min(xs),
                    "max": max(xs),
                }
        result.append(entry)
    return result


# --- Results: rows, aggregates over seeds, table, plot.


def scalar_metrics(summary: dict) -> dict:
    """What a member reports to the sweep table: the summary's `metrics` mapping
    when it has one, else its top-level numbers."""
    source = summary.get("metrics", summary)
    return {k: v for k, v in source.items() if isinstance(v, int | float)}


def aggregate(rows, seed_key) -> list[dict]:
    """Per setting (all keys but the seed): n, then mean/std/min/max of each
    numeric metric over the seeds that finished, ignoring non-finite values
    (counted in `nonfinite`)."""
    out: dict = {}
    for r in rows:
        if r["status"] != "ok":
            continue
        key = json.dumps({k: v for k, v in r["settings"].items() if k != seed_key})
        out.setdefault(key, []).append(r["metrics"])
    names = list(dict.fromkeys(n for ms in out.values() for m in ms for n in m))
    result = []
    for key, ms in out.items():
        entry = {"settings": json.loads(key), "n": len(ms)}
        for name in names:
            xs = [m.get(name) for m in ms]
            if not all(x is None or isinstance(x, int | float) for x in xs):
                continue
            a = np.asarray([np.nan if x is None else x for x in xs], dtype=float)
            ok = a[np.isfinite(a)]
            stat = lambda f: float(f(ok)) if ok.size else float("nan")
            entry[name] = {
                "mean": stat(np.mean),
                "std": stat(np.std),
                "min": stat(np.min),
                "max": stat(np.max),
                "nonfinite": int(a.size - ok.size),
            }
        result.append(entry)
    return result


def write_tables(path, rows):
    """metrics.jsonl (one row per member, in the metrics schema: namespace
    "sweep", the member as its step) and metrics.csv."""
    with open(path / "metrics.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps({"namespace": "sweep", "step": r["member"], **r}) + "\n")
    keys = list(dict.fromkeys(k for r in rows for k in r["settings"]))
    names = list(dict.fromkeys(k for r in rows for k in r["metrics"]))
    with open(path / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["member", *keys, *names, "status", "error"])
        for r in rows:
            settings = [_cell(r["settings"].get(k)) for k in keys]
            w.writerow(
                [r["member"], *settings, *(r["metrics"].get(n) for n in names)]
                + [r["status"], r.get("error", "")]
            )


def _mean_std(stat):
    if stat is None:
        return ""
    flag = f" ({stat['nonfinite']} non-finite)" if stat["nonfinite"] else ""
    return f"{stat['mean']:.4g} ± {stat['std']:.2g}{flag}"


def _cell(v):
    return v if isinstance(v, str | int | float) else json.dumps(v)


def markdown(aggregates, seed_key) -> str:
    if not aggregates:
        return "(no member finished)"
    keys = list(aggregates[0]["settings"])
    names = [k for k in aggregates[0] if k not in ("settings", "n")]
    rows = []
    for a in aggregates:
        cells = [label_settings({k: a["settings"][k]}).split("=", 1)[1] for k in keys]
        cells.append(a["n"])
        cells += [_mean_std(a.get(n)) for n in names]
        rows.append(cells)
    return markdown_table([*keys, f"{seed_key}s", *names], rows)


def plot(aggregates, rows, seed_key, workdir, max_metrics=6):
    """Each metric's mean over seeds (band: one standard deviation) against the
    first numeric setting, one line per value of the others."""
    names = [
        k for k in (aggregates[0] if aggregates else {}) if k not in ("settings", "n")
    ]
    names = names[:max_metrics]
    fig = Figure(figsize=(4.5 * max(len(names), 1), 3.6))
    axes = fig.subplots(1, max(len(names), 1), squeeze=False)
    keys = list(aggregates[0]["settings"]) if aggregates else []
    xkey = next(
        (k for k in keys if all(_is_number(a["settings"][k]) for a in aggregates)),
        None,
    )
    lines = {}
    for a in aggregates:
        rest = {k: v for k, v in a["settings"].items() if k != xkey}
        lines.setdefault(label_settings(rest) or "all", []).append(a)
    for ax, name in zip(axes[0], names):
        for label, pts in lines.items():
            if xkey is not None:
                pts = sorted(pts, key=lambda a: a["settings"][xkey])
                x = np.asarray([a["settings"][xkey] for a in pts], dtype=float)
            else:
                x = np.arange(len(pts), dtype=float)
            nan = {"mean": np.nan, "std": np.nan}
            mean = np.asarray([a.get(name, nan)["mean"] for a in pts])
            std = np.asarray([a.get(name, nan)["std"] for a in pts])
            ax.plot(x, mean, "o-", label=label, ms=3)
            ax.fill_between(x, mean - std, mean + std, alpha=0.25)
        ax.set(title=name, xlabel=xkey or "setting")
        if xkey is not None and min(a["settings"][xkey] for a in aggregates) > 0:
            xs = [a["settings"][xkey] for a in aggregates]
            if max(xs) / min(xs) >= 100:
                ax.set_xscale("log")
        ax.legend(fontsize=7)
    n_seeds = max((a["n"] for a in aggregates), default=0)
    fig.suptitle(f"mean over {n_seeds} {seed_key}s, band: one std", fontsize=9)
    workdir.savefig(fig, "sweep.png")


def error_row(member, exc) -> dict:
    return {
        "member": member.index,
        "settings": member.settings,
        "metrics": {},
        "status": "failed",
        "error": f"{type(exc).__name__}: {exc}",
        "traceback": traceback.format_exc(),
    }
