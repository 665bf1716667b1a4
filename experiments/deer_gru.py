"""DEER on GRUs over long sequences, the chaotic case, and training with DEER.

Three parts:

1. `long`: a random GRU (hidden `dims`) over T in `lengths` (the DEER paper's
   EigenWorms series are 17,984 steps): Newton sweeps to `atol`, error vs
   `lax.scan`, and the error after each sweep at the longest T.
2. `chaotic`: a tanh RNN with recurrent spectral norm `chaotic_scale` (expanding,
   chaotic dynamics) in `chaotic_dtype`: sweeps, fallbacks (sweeps in which
   Newton's update was not finite, i.e. where plain DEER would have diverged) and
   the error of every method in `chaotic_methods`.
2b. `lazy`: `lazy_methods` (DEER, quasi-DEER) with lazy Jacobians
   (`jacobian_every=d`, d in `lazy`) on the long GRUs at the longest T: sweeps,
   Jacobian evaluations (sweeps that linearise), error and median wall time
   against d = 1.
3. `train`: a GRU classifier trained with Adam from the same initialisation on
   the same batches, once with `lax.scan` and once with
   `iterjax.scan(method=DEER())`: the two loss curves agree to solver tolerance;
   time per epoch of each. The data (`train_data`) is a real UCR problem from the
   sktime wheel (`ucr.py`; ACSF1: 10 appliance classes, T = 1460, as the DEER
   paper trains on UCR/UEA series), or "sinusoids": noisy sinusoids whose period
   is the label (`classes` periods, `train_samples` series).
"""

import dataclasses
import time
from typing import Annotated, Literal

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import iterjax as ij
from iterjax.experiments.common import cells, ucr
from iterjax.lab.config import Spec
from iterjax.lab.registry import build
from iterjax.lab.spec import Count, Positive, Stop
from iterjax.lab.tables import markdown_table


@dataclasses.dataclass(frozen=True)
class Config:
    # 1. long sequences
    dims: tuple[Count, ...] = (16, 64)
    lengths: tuple[Count, ...] = (1024, 4096, 16384)
    input_dim: Count = 4
    atol: Positive = 1e-6
    lazy: tuple[Count, ...] = (1, 2, 3, 4)  # jacobian_every of the lazy rows
    lazy_methods: tuple[Annotated[Spec, "sequence_method"], ...] = (
        Spec("deer"),
        Spec("quasi_deer"),
    )
    lazy_rounds: Count = 3
    # 2. chaotic dynamics
    chaotic_scale: Positive = 3.0
    chaotic_length: Count = 2048
    chaotic_dim: Count = 8
    chaotic_dtype: Literal["float32", "float64"] = "float32"
    chaotic_stop: Stop = Stop(atol=1e-4)
    chaotic_methods: tuple[Annotated[Spec, "sequence_method"], ...] = (
        Spec("deer"),
        Spec("deer", (("damping", 0.5),)),
        Spec("quasi_deer"),
        Spec("elk"),
        Spec("quasi_elk"),
        Spec("jacobi"),
    )
    # 3. training
    train_data: Literal[
        "sinusoids", "ACSF1", "OSULeaf", "GunPoint", "ArrowHead", "ItalyPowerDemand"
    ] = "ACSF1"
    train_length: Count | None = None  # None: the series' own length (sinusoids: 1024)
    classes: Count = 4  # sinusoids only
    train_samples: Count = 256  # sinusoids only
    test_samples: Count = 256  # sinusoids only
    hidden: Count = 16
    batch: Count = 32
    epochs: Count = 30
    learning_rate: Positive = 3e-3
    clip_norm: Positive = 1.0  # gradient clipping by global norm
    train_stop: Stop = Stop(atol=1e-8)  # DEER's solves in training
    seed: int = 0
    x64: bool = True


def long_sequences(cfg, workdir, advance):
    rows, curves = [], {}
    for dim in cfg.dims:
        for T in cfg.lengths:
            f, init, xs = cells.gru(dim, T, cfg.input_dim, seed=cfg.seed)
            run = jax.jit(
                lambda xs, f=f, init=init: ij.scan(
                    f,
                    init,
                    xs,
                    method=ij.DEER(mesh=workdir.mesh),
                    atol=cfg.atol,
                    return_stats=True,
                )
            )
            carry, ys, stats = run(xs)
            ref = jax.jit(lambda xs, f=f, init=init: jax.lax.scan(f, init, xs))(xs)
            row = dict(
                part="long",
                dim=dim,
                length=T,
                sweeps=int(stats.num_sweeps),
                converged=bool(stats.converged),
                residual=float(stats.residual),
                error=cells.max_error((carry, ys), ref),
            )
            workdir.log(**row)
            rows.append(row)
            advance()
        curves[dim] = cells.sweep_errors(f, init, xs, ij.DEER(), cfg.atol, 30)
        workdir.log(part="long_curve", dim=dim, length=T, errors=curves[dim])
    return rows, curves


def lazy_jacobians(cfg, workdir, advance):
    rows, T = [], cfg.lengths[-1]
    for dim in cfg.dims:
        f, init, xs = cells.gru(dim, T, cfg.input_dim, seed=cfg.seed)
        ref = jax.jit(lambda xs, f=f, init=init: jax.lax.scan(f, init, xs))(xs)
        runs = {}
        for s in cfg.lazy_methods:
            for d in cfg.lazy:
                method = build("sequence_method", s, "lazy_methods", workdir.mesh)
                method = dataclasses.replace(method, jacobian_every=d)
                runs[(s.label, d)] = jax.jit(
                    lambda xs, f=f, init=init, m=method: ij.scan(
                        f, init, xs, method=m, atol=cfg.atol, return_stats=True
                    )
                )
        calls = {key: (run, (xs,)) for key, run in runs.items()}
        ms = ij.diagnostics.time_calls(calls, cfg.lazy_rounds)
        for (label, d), run in runs.items():
            carry, ys, stats = run(xs)
            row = dict(
                part="lazy",
                dim=dim,
                length=T,
                method=label,
                jacobian_every=d,
                sweeps=int(stats.num_sweeps),
                jacobians=int(stats.jacobians),
                converged=bool(stats.converged),
                error=cells.max_error((carry, ys), ref),
                ms=round(ms[(label, d)], 1),
            )
            workdir.log(**row)
            rows.append(row)
            advance()
    return rows


def chaotic(cfg, workdir, advance):
    f, init, xs = cells.tanh_rnn(
        cfg.chaotic_dim,
        cfg.chaotic_length,
        cfg.chaotic_scale,
        seed=cfg.seed,
        dtype=cfg.chaotic_dtype,
    )
    ref = jax.lax.scan(f, init, xs)
    rows, curves = [], {}
    for s in cfg.chaotic_methods:
        method = build("sequence_method", s)
        out = jax.jit(
            lambda xs, method=method: ij.scan(
                f,
                init,
                xs,
                method=method,
                **cfg.chaotic_stop.kwargs("max_sweeps"),
                return_stats=True,
                trace=True,
            )
        )(xs)
        stats = out[2]
        row = dict(
            part="chaotic",
            method=s.label,
            sweeps=int(stats.num_sweeps),
            converged=bool(stats.converged),
            fallbacks=int(stats.fallbacks),
            error=cells.max_error(out[:2], ref),
        )
        curves[s.label] = np.asarray(stats.trace[: row["sweeps"]])
        workdir.log(**row)
        rows.append(row)
        advance()
    return rows, curves


def sinusoids(key, n, length, classes):
    """Noisy sinusoids whose period (4 * 2^label steps) is the label."""
    k1, k2, k3 = jax.random.split(key, 3)
    labels = jax.random.randint(k1, (n,), 0, classes)
    period = 4.0 * 2.0 ** labels.astype(jnp.float_)
    phase = jax.random.uniform(k2, (n, 1), maxval=2 * jnp.pi)
    t = jnp.arange(length, dtype=jnp.float_)
    x = jnp.sin(2 * jnp.pi * t[None, :] / period[:, None] + phase)
    x = x + 0.5 * jax.random.normal(k3, x.shape)
    return x[..., None], labels


def _classifier(scan, method, stop):
    """(logits, loss): logits(params, x) -> (logits, sweeps); loss(params, x, y)
    -> (loss, the batch's largest sweep count) (sweeps 0 with `lax.scan`)."""

    def logits(params, x):
        f = lambda h, xt: (cells.gru_cell(params["gru"], h, xt),) * 2
        init = jnp.zeros(params["gru"]["b"].shape[1])
        if scan is ij.scan:
            _, hs, stats = ij.scan(
                f,
                init,
                x,
                method=method,
                **stop.kwargs("max_sweeps"),
                return_stats=True,
            )
            sweeps = stats.num_sweeps
        else:
            _, hs = jax.lax.scan(f, init, x)
            sweeps = jnp.int32(0)
        return params["out"] @ jnp.mean(hs, axis=0), sweeps

    def loss(params, x, y):
        z, sweeps = jax.vmap(logits, (None, 0))(params, x)
        ce = optax.softmax_cross_entropy_with_integer_labels(z, y)
        return jnp.mean(ce), jnp.max(sweeps)

    return logits, loss


def training_data(cfg):
    """(x (N, T, 1), y, x_test, y_test, classes) of `cfg.train_data`."""
    if cfg.train_data == "sinusoids":
        kd, kt = jax.random.split(jax.random.PRNGKey(cfg.seed))
        length = cfg.train_length or 1024
        x, y = sinusoids(kd, cfg.train_samples, length, cfg.classes)
        xt, yt = sinusoids(kt, cfg.test_samples, length, cfg.classes)
        return x, y, xt, yt, cfg.classes
    x, y, xt, yt = ucr.load(cfg.train_data)
    crop = slice(0, cfg.train_length)
    x, xt = (jnp.asarray(a[:, crop, None], jnp.float_) for a in (x, xt))
    return x, jnp.asarray(y), xt, jnp.asarray(yt), int(max(y.max(), yt.max())) + 1


def train(cfg, workdir, advance):
    x, y, xt, yt, classes = training_data(cfg)
    kp, ko = jax.random.split(jax.random.PRNGKey(cfg.seed))
    params0 = {
        "gru": cells.gru_params(kp, cfg.hidden, 1),
        "out": jax.random.normal(ko, (classes, cfg.hidden)) / cfg.hidden**0.5,
    }
    opt = optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm), optax.adam(cfg.learning_rate)
    )
    per_epoch = max(1, len(x) // cfg.batch)
    rng = np.random.default_rng(cfg.seed)
    orders = [rng.permutation(len(x)) for _ in range(cfg.epochs)]
    curves, accuracy, epoch_s, sweeps = {}, {}, {}, {}
    for name, scan in [("lax.scan", jax.lax.scan), ("DEER", ij.scan)]:
        logits, loss = _classifier(scan, ij.DEER(), cfg.train_stop)

        @jax.jit
        def step(params, state, idx, loss=loss):
            grad = jax.value_and_grad(loss, has_aux=True)
            (value, sweeps), g = grad(params, x[idx], y[idx])
            updates, state = opt.update(g, state)
            return optax.apply_updates(params, updates), state, value, sweeps

        params, state = params0, opt.init(params0)
        losses, seconds, epoch_sweeps = [], [], []
        for order in orders:
            start, most = time.perf_counter(), 0
            for b in range(per_epoch):
                idx = order[b * cfg.batch : (b + 1) * cfg.batch]
                params, state, value, n = step(params, state, idx)
                losses.append(float(value))  # also waits for the step
                most = max(most, int(n))
            seconds.append(time.perf_counter() - start)
            epoch_sweeps.append(most)
            advance()
        z = jax.jit(jax.vmap(logits, (None, 0)))(params, xt)[0]
        pred = jnp.argmax(z, -1)
        sweeps[name] = epoch_sweeps
        curves[name] = np.asarray(losses)
        accuracy[name] = float(jnp.mean(pred == yt))
        # the first epoch compiles: the mean of the others (of all, if one)
        epoch_s[name] = float(np.mean(seconds[1:] or seconds))
        workdir.log(
            part="train",
            method=name,
            losses=losses,
            accuracy=accuracy[name],
            epoch_seconds=epoch_s[name],
            epoch_sweeps=sweeps[name],
        )
    gap = float(np.max(np.abs(curves["DEER"] - curves["lax.scan"])))
    summary = dict(
        data=cfg.train_data,
        length=int(x.shape[1]),
        loss_gap=gap,
        accuracy=accuracy,
        epoch_seconds=epoch_s,
        # DEER's largest forward sweep count in the first and the last epoch
        deer_sweeps=(sweeps["DEER"][0], sweeps["DEER"][-1]),
    )
    return summary, curves


def run(cfg: Config, workdir) -> dict:
    total = (
        len(cfg.dims) * len(cfg.lengths)
        + len(cfg.dims) * len(cfg.lazy) * len(cfg.lazy_methods)
        + len(cfg.chaotic_methods)
        + 2 * cfg.epochs
    )
    with workdir.progress(total, "deer_gru") as advance:
        long_rows, long_curves = long_sequences(cfg, workdir, advance)
        lazy_rows = lazy_jacobians(cfg, workdir, advance)
        chaos_rows, chaos_curves = chaotic(cfg, workdir, advance)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes int/float
            training, loss_curves = train(cfg, workdir, advance)
    workdir.log(part="train_summary", **training)
    _plot(cfg, long_rows, long_curves, chaos_curves, (training, loss_curves), workdir)
    table = _tables(long_rows, lazy_rows, chaos_rows, training)
    return {
        "long": long_rows,
        "lazy": lazy_rows,
        "chaotic": chaos_rows,
        "train": training,
        "table": table,
    }


def _plot(cfg, long_rows, long_curves, chaos_curves, trained, workdir):
    training, loss_curves = trained
    fig, ax = plt.subplots(1, 4, figsize=(22, 4.5))
    for dim in cfg.dims:
        pts = np.asarray(
            [(r["length"], r["sweeps"]) for r in long_rows if r["dim"] == dim]
        )
        ax[0].semilogx(pts[:, 0], pts[:, 1], "o-", label=f"GRU hidden {dim}")
        err = np.maximum(long_curves[dim], 1e-17)
        ax[1].semilogy(np.arange(1, len(err) + 1), err, "o-", label=f"hidden {dim}")
    ax[0].set(
        title=f"DEER sweeps to atol {cfg.atol:g} vs T",
        xlabel="T",
        ylabel="sweeps",
        ylim=(0, None),
    )
    ax[1].axhline(cfg.atol, color="k", lw=0.5, ls="--")
    ax[1].set(
        title=f"DEER error vs sweeps, T={cfg.lengths[-1]}",
        xlabel="sweep",
        ylabel="max |s_t - s_t(lax.scan)|",
    )
    for m, tr in chaos_curves.items():
        ax[2].semilogy(np.arange(1, len(tr) + 1), np.maximum(tr, 1e-30), label=m)
    ax[2].axhline(cfg.chaotic_stop.atol, color="k", lw=0.5, ls="--")
    ax[2].set(
        title=f"chaotic tanh RNN |W|={cfg.chaotic_scale}, "
        f"T={cfg.chaotic_length}, {cfg.chaotic_dtype}",
        xlabel="sweep",
        ylabel="residual",
        xscale="log",
    )
    for name, losses in loss_curves.items():
        ax[3].plot(losses, label=name, ls="-" if name == "DEER" else "--")
    ax[3].set(
        title=f"GRU classifier on {training['data']}, T={training['length']}",
        xlabel="step",
        ylabel="training loss",
    )
    for a in ax:
        a.legend(fontsize=7)
    workdir.savefig(fig, "deer_gru.png")


def _tables(long_rows, lazy_rows, chaos_rows, training):
    long = markdown_table(
        ["GRU hidden", "T", "DEER sweeps", "converged", "error vs lax.scan"],
        [
            [r["dim"], r["length"], r["sweeps"], r["converged"], f"{r['error']:.1e}"]
            for r in long_rows
        ],
    )
    base = {(r["dim"], r["method"]): r for r in lazy_rows if r["jacobian_every"] == 1}

    def vs_base(r):
        b = base[(r["dim"], r["method"])]
        return [
            f"{b['jacobians'] / r['jacobians']:.2f}x",
            f"{r['sweeps'] / b['sweeps']:.2f}x",
            f"{r['ms'] / b['ms']:.2f}x",
        ]

    lazy = markdown_table(
        [
            "lazy: hidden",
            "T",
            "method",
            "jacobian_every",
            "sweeps",
            "Jacobian sweeps",
            "fewer Jacobians",
            "sweeps vs d=1",
            "time vs d=1",
            "error",
        ],
        [
            [
                r["dim"],
                r["length"],
                r["method"],
                r["jacobian_every"],
                r["sweeps"],
                r["jacobians"],
                *vs_base(r),
                f"{r['error']:.1e}",
            ]
            for r in lazy_rows
        ],
    )
    chaos = markdown_table(
        ["chaotic: method", "sweeps", "converged", "fallbacks", "error"],
        [
            [r[k] for k in ("method", "sweeps", "converged", "fallbacks")]
            + [f"{r['error']:.1e}"]
            for r in chaos_rows
        ],
    )
    acc, sec = training["accuracy"], training["epoch_seconds"]
    note = (
        f"training on {training['data']} (T = {training['length']}): max "
        f"|loss(DEER) - loss(lax.scan)| over steps = {training['loss_gap']:.1e}; "
        f"test accuracy lax.scan {acc['lax.scan']:.3f}, DEER {acc['DEER']:.3f}; "
        f"s per epoch lax.scan {sec['lax.scan']:.2f}, DEER {sec['DEER']:.2f}; "
        f"DEER's most sweeps per forward, first -> last epoch: "
        f"{training['deer_sweeps'][0]} -> {training['deer_sweeps'][1]}"
    )
    return "\n\n".join([long, lazy, chaos, note])
