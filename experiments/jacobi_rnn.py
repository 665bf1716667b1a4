"""Sweeps to converge vs sequence length, per method, on a tanh RNN and a GRU.

For every (cell, T, method): sweeps of `iterjax.scan` to reach `atol`, the error
against `lax.scan`, the parallel depth (sweeps x depth of one sweep, against T for
`lax.scan`), fallback sweeps, and the wall-time ratio to `lax.scan` on this
machine. Then, at `error_length`, the error after each sweep. Plots: sweeps vs T,
depth vs T, error vs sweeps.
"""

import dataclasses
from typing import Annotated, Literal

import jax
import matplotlib.pyplot as plt
import numpy as np

import iterjax as ij
from iterjax.experiments.common import cells
from iterjax.lab.config import Spec
from iterjax.lab.registry import build
from iterjax.lab.spec import Count, Positive
from iterjax.lab.tables import markdown_table

Cell = Literal["tanh_rnn", "gru"]


@dataclasses.dataclass(frozen=True)
class Config:
    cells: tuple[Cell, ...] = ("tanh_rnn", "gru")
    lengths: tuple[Count, ...] = (64, 256, 1024, 4096, 16384)
    methods: tuple[Annotated[Spec, "sequence_method"], ...] = (
        Spec("jacobi"),
        Spec("gauss_seidel", (("block", 8),)),
        Spec("quasi_deer"),
        Spec("deer"),
        Spec("elk"),
        Spec("quasi_elk"),
    )
    dim: Count = 16
    input_dim: Count = 4
    tanh_scale: Positive = 0.9  # spectral norm of the tanh RNN's recurrent weights
    gru_scale: Positive = 1.0  # scale of the GRU's recurrent weights
    atol: Positive = 1e-8
    error_length: Count = 1024
    error_sweeps: Count = 100  # sweeps recorded for the error-vs-sweeps curves
    repeats: Count = 3
    seed: int = 0
    x64: bool = True


def make_cell(cfg, name, length):
    if name == "tanh_rnn":
        return cells.tanh_rnn(
            cfg.dim, length, cfg.tanh_scale, cfg.input_dim, seed=cfg.seed
        )
    return cells.gru(cfg.dim, length, cfg.input_dim, cfg.gru_scale, seed=cfg.seed)


def measure(f, init, xs, method, atol, repeats):
    """One row: sweeps, error vs lax.scan, depth and wall ratio for one method."""
    run = jax.jit(
        lambda xs: ij.scan(f, init, xs, method=method, atol=atol, return_stats=True)
    )
    ref = jax.jit(lambda xs: jax.lax.scan(f, init, xs))
    carry, ys, stats = run(xs)
    error = cells.max_error((carry, ys), ref(xs))
    times = ij.diagnostics.time_calls(
        {"iterjax": (run, (xs,)), "lax": (ref, (xs,))}, repeats
    )
    T = xs.shape[0]
    sweeps = int(stats.num_sweeps)
    return dict(
        sweeps=sweeps,
        converged=bool(stats.converged),
        fallbacks=int(stats.fallbacks),
        error=error,
        depth=sweeps * cells.parallel_depth(method, T),
        wall_ratio=times["iterjax"] / times["lax"],
    )


def run(cfg: Config, workdir) -> dict:
    rows = []
    total = len(cfg.cells) * (len(cfg.lengths) + 1) * len(cfg.methods)
    curves = {}
    with workdir.progress(total, "sweeping") as advance:
        for cname in cfg.cells:
            for T in cfg.lengths:
                f, init, xs = make_cell(cfg, cname, T)
                for s in cfg.methods:
                    method = build("sequence_method", s, mesh=workdir.mesh)
                    row = dict(cell=cname, length=T, method=s.label)
                    row.update(measure(f, init, xs, method, cfg.atol, cfg.repeats))
                    workdir.log(**row)
                    rows.append(row)
                    advance()
            f, init, xs = make_cell(cfg, cname, cfg.error_length)
            for s in cfg.methods:
                method = build("sequence_method", s, mesh=workdir.mesh)
                err = cells.sweep_errors(
                    f, init, xs, method, cfg.atol, cfg.error_sweeps
                )
                curves[(cname, s.label)] = err
                workdir.log(
                    kind="error_vs_sweeps", cell=cname, method=s.label, errors=err
                )
                advance()
    _plot(cfg, rows, curves, workdir)
    return {"rows": rows, "table": _table(rows)}


def _plot(cfg, rows, curves, workdir):
    n = len(cfg.cells)
    fig, axes = plt.subplots(3, n, figsize=(5 * n, 12), squeeze=False)
    for j, cname in enumerate(cfg.cells):
        mine = [r for r in rows if r["cell"] == cname]
        for m in dict.fromkeys(r["method"] for r in mine):
            pts = [
                (r["length"], r["sweeps"], r["depth"]) for r in mine if r["method"] == m
            ]
            T, sweeps, depth = np.asarray(pts).T
            axes[0, j].loglog(T, sweeps, "o-", label=m)
            axes[1, j].loglog(T, depth, "o-", label=m)
        T = np.asarray(cfg.lengths)
        axes[0, j].loglog(T, T, "k--", lw=0.7, label="T (worst case)")
        axes[1, j].loglog(T, T, "k--", lw=0.7, label="lax.scan")
        axes[0, j].set(
            title=f"{cname}: sweeps to atol {cfg.atol:g}", xlabel="T", ylabel="sweeps"
        )
        axes[1, j].set(
            title=f"{cname}: parallel depth",
            xlabel="T",
            ylabel="sweeps x depth per sweep",
        )
        for (c, m), err in curves.items():
            if c == cname:
                axes[2, j].semilogy(
                    np.arange(1, len(err) + 1), np.maximum(err, 1e-17), label=m
                )
        axes[2, j].axhline(cfg.atol, color="k", lw=0.5, ls="--")
        axes[2, j].set(
            title=f"{cname}, T={cfg.error_length}: error vs sweeps",
            xlabel="sweep",
            ylabel="max |s_t - s_t(lax.scan)|",
        )
        for ax in axes[:, j]:
            ax.legend(fontsize=7)
    workdir.savefig(fig, "sweeps_vs_length.png")


def _table(rows):
    headers = ["cell", "T", "method", "sweeps", "depth", "error vs lax.scan"]
    headers += ["fallbacks", "wall / lax.scan"]
    cells = lambda r: (
        [r[k] for k in ("cell", "length", "method", "sweeps", "depth")]
        + [
            f"{r['error']:.1e}",
            r["fallbacks"],
            f"{r['wall_ratio']:.1f}",
        ]
    )
    return markdown_table(headers, map(cells, rows))
