"""Budgeted runs of bilevel solvers, shared by hpo_logreg, data_hypercleaning and
hpo_sweep.

Each experiment states its bilevel `Problem` (losses on minibatches of indices,
start, smoothness constant, test metrics) once. A run gives one solver a budget
of per-sample oracle calls (gradients and Hessian-vector products, times the
batch size they were evaluated on) and records `evaluate(w, theta)` at `evals`
evenly spaced points, with the calls and the wall time spent so far
(compilation excluded, evaluation excluded). Solvers: the stochastic
`iterjax.bilevel` solvers on random minibatches of indices, and the
deterministic implicit baseline: full-batch `hypergradient` (implicit CG), Adam
on θ, each inner solve warm-started from the last.
"""

import dataclasses
import time
from collections.abc import Callable
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import iterjax as ij
from iterjax import bilevel as bl
from iterjax.internal import optax_init, optax_step
from iterjax.lab.spec import Count, Fraction, NonNegative, Positive


@dataclasses.dataclass(frozen=True)
class Solver:
    name: Literal[
        "implicit",
        "soba",
        "saba",
        "amigo",
        "stocbio",
        "f2sa",
        "borep",
        "vpbgd",
        "slbamm",
    ]
    # sgd on θ (implicit: Adam at a tenth of it; borep: normalised momentum,
    # steps of length outer_lr)
    outer_lr: Positive = 1.0
    inner_lr: Positive = 0.5
    inner_steps: Count = 5  # amigo, stocbio, f2sa, borep (per update), vpbgd (z and y)
    lam: Positive = 10.0  # f2sa: λ_0, grown by lam_growth per step to lam_max
    lam_growth: NonNegative = 0.01
    lam_max: Positive = 1000.0
    gamma: Positive = 100.0  # vpbgd: the penalty
    period: Count = 5  # borep: outer steps between lower-level updates
    init_steps: NonNegative = 100  # borep: the initial refinement's steps
    beta: Fraction = 0.9  # borep: the momentum
    mu: Fraction = 0.5  # slbamm: the upper objective's initial weight in w's step
    mu_decay: Positive = 0.5  # slbamm: μ_k = mu (k + 1)^-mu_decay
    # implicit: the inner Newton-CG's forcing and the adjoint CG's tolerance
    forcing: Literal["fixed", "superlinear", "eisenstat-walker"] = "fixed"
    cg_rtol: Positive = 1e-6
    # amigo, stocbio: a fresh minibatch for every inner oracle call of a step
    # (`iterjax.bilevel.Batches`, as their papers sample), not one a step
    fresh_batches: bool = False

    def __post_init__(self):
        if self.fresh_batches and self.name not in ("amigo", "stocbio"):
            raise ValueError(
                f"`fresh_batches` is for the solvers with inner loops (amigo, "
                f"stocbio), not {self.name}"
            )


class Problem(NamedTuple):
    """A bilevel problem on minibatches of sample indices.

    `inner(w, θ, idx)` over `n` training samples, `outer(w, θ, idx)` over `m`
    validation samples, the start `(theta0, w0)`, `L` the smoothness constant of
    the inner loss at θ0 (the unit of a `Solver`'s `inner_lr`), and
    `test(w) -> (held-out loss, accuracy)`.
    """

    inner: Callable
    outer: Callable
    theta0: jax.Array
    w0: jax.Array
    n: int
    m: int
    L: float
    test: Callable


def classifier_metrics(w, x, y):
    """(mean cross-entropy, accuracy) of the linear classifier `x @ w`."""
    logp = jax.nn.log_softmax(x @ w)
    loss = -jnp.mean(jnp.take_along_axis(logp, y[:, None], 1))
    acc = jnp.mean((jnp.argmax(logp, -1).astype(y.dtype) == y).astype(w.dtype))
    return loss, acc


def softmax_smoothness(x):
    """L of mean CE(x w, y) in w (any class count): Böhning's bound
    λ_max(xᵀx / n) / 2."""
    x = np.asarray(x)
    return float(np.linalg.eigvalsh(x.T @ x / len(x))[-1]) / 2


def make_solver(s, inner, outer, n, m):
    opt = optax.sgd(s.outer_lr)
    kw = dict(inner_lr=s.inner_lr)
    if s.name == "soba":
        return bl.SOBA(inner, outer, opt, **kw)
    if s.name == "saba":
        return bl.SABA(inner, outer, opt, n, m, **kw)
    if s.name == "amigo":
        return bl.AmIGO(inner, outer, opt, inner_steps=s.inner_steps, **kw)
    if s.name == "stocbio":
        return bl.StocBiO(inner, outer, opt, inner_steps=s.inner_steps, **kw)
    if s.name == "f2sa":
        return bl.F2SA(
            inner,
            outer,
            opt,
            inner_steps=s.inner_steps,
            lam=s.lam,
            lam_growth=s.lam_growth,
            lam_max=s.lam_max,
            **kw,
        )
    if s.name == "slbamm":
        return bl.SLBAMM(inner, outer, opt, mu=s.mu, mu_decay=s.mu_decay, **kw)
    if s.name == "vpbgd":
        steps = dict(inner_steps=s.inner_steps, y_steps=s.inner_steps)
        return bl.VPBGD(inner, outer, opt, gamma=s.gamma, **steps, **kw)
    if s.name == "borep":
        opt = bl.normalized_momentum(s.outer_lr, s.beta)
        return bl.BOREP(
            inner,
            outer,
            opt,
            init_steps=int(s.init_steps),
            inner_steps=s.inner_steps,
            period=s.period,
            **kw,
        )
    raise ValueError(f"no stochastic solver {s.name!r}")


def random_step(solver, n, m, batch, fresh=False):
    """`step(state, key)`: one solver step on random minibatches of indices
    (`fresh`: a `Batches` stack of `solver.inner_batches` inner minibatches),
    returning `(state, oracle calls)`: the step's gradients and HVPs, each on
    one minibatch."""
    shape = (solver.inner_batches, batch) if fresh else (batch,)

    def step(state, key):
        ki, ko = jax.random.split(key)
        i = jax.random.randint(ki, shape, 0, n)
        i = bl.Batches(i) if fresh else i
        j = jax.random.randint(ko, (batch,), 0, m)
        state, info = solver.step(state, i, j)
        return state, info["grads"] + info["hvps"]

    return step


def chunked(solver, n, m, batch, budget, evals, fresh=False):
    """`chunk(state, key)`: `random_step`s, a pure function returning `(state,
    per-sample oracle calls it spent)` (as the steps' `info` counts them);
    `evals` chunks spend about `budget` (at the solver's mean calls per step)."""
    steps = max(1, int(budget / (sum(solver.oracles) * batch) / evals))
    body = random_step(solver, n, m, batch, fresh)

    def chunk(state, key):
        state, calls = jax.lax.scan(body, state, jax.random.split(key, steps))
        return state, jnp.sum(calls) * batch

    return chunk


def run(s, p: Problem, *, batch, budget, evals, evaluate, seed):
    """A list of `dict(oracles, seconds, **evaluate(w, theta))`, one per eval.
    `s.inner_lr` is in units of 1/`p.L`."""
    if s.name == "implicit":
        return _run_implicit(s, p, budget, evals, evaluate)
    s = dataclasses.replace(s, inner_lr=s.inner_lr / p.L)
    solver = make_solver(s, p.inner, p.outer, p.n, p.m)
    state = solver.init(p.theta0, p.w0)
    chunk = chunked(solver, p.n, p.m, batch, budget, evals, s.fresh_batches)
    key = jax.random.PRNGKey(seed)
    chunk = jax.jit(chunk).lower(state, key).compile()
    curve, seconds, used = [], 0.0, 0
    for _ in range(evals):
        key, sub = jax.random.split(key)
        start = time.perf_counter()
        state, calls = jax.block_until_ready(chunk(state, sub))
        seconds += time.perf_counter() - start
        used += int(calls)
        point = dict(oracles=used, seconds=seconds)
        curve.append({**point, **evaluate(state.w, state.theta)})
    return curve


def _run_implicit(s, p, budget, evals, evaluate):
    n, m, theta, w = p.n, p.m, p.theta0, p.w0
    full_in, full_out = jnp.arange(n), jnp.arange(m)
    g = lambda w, t: p.inner(w, t, full_in)
    f = lambda w, t: p.outer(w, t, full_out)
    newton = ij.Newton(ij.CG(rtol=0.1), forcing=s.forcing)
    method = bl.Implicit(ij.CG(rtol=s.cg_rtol), solver=newton, atol=1e-6)
    opt = optax.adam(s.outer_lr * 0.1)

    def step(theta, w, opt_state):
        hg = ij.hypergradient(f, g, theta, w, method=method, return_info=True)
        theta, opt_state = optax_step(opt, hg.grad, opt_state, theta)
        calls = (hg.cost["inner_grads"] + hg.cost["hvps"]) * n + m
        return theta, hg.w, opt_state, calls

    opt_state = optax_init(opt, theta)
    step = jax.jit(step).lower(theta, w, opt_state).compile()
    used, seconds, curve, next_eval = 0, 0.0, [], budget / evals
    while used < budget:
        start = time.perf_counter()
        theta, w, opt_state, calls = jax.block_until_ready(step(theta, w, opt_state))
        seconds += time.perf_counter() - start
        used += int(calls)
        while used >= next_eval and len(curve) < evals:
            curve.append(dict(oracles=used, seconds=seconds, **evaluate(w, theta)))
            next_eval += budget / evals
    return curve
