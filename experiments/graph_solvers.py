"""Convergent Graph Solvers against explicit GNNs on a long-range graph task.

The task, policy evaluation on random graphs: a random geometric graph of n
nodes in the unit square (an edge between nodes closer than `radius`; an
isolated node is joined to its nearest neighbour), symmetric log-normal edge
weights w_ij, the random walk P_ij = w_ij / Σ_k w_ik and rewards s_i ~ N(0, 1).
The target is the discounted value y = (I - c P)⁻¹ s = Σ_k c^k P^k s, which sums
rewards over paths of every length (about 1 / (1 - c) hops). Node features
(s_i, u_i) with u_i a distractor; edge features log w_ij.

Models, trained by Adam on the same graphs and budget (mean squared error):

* CGS (`iterjax.deq.ConvergentGraphSolver`, σ the identity, γ = `gamma`,
  Anderson to `atol`, implicit gradients): z* = (I - A(x))⁻¹ b(x) per head;
* explicit GNNs of depth K in `gnn_depths`: K rounds h ← relu(U h + V Â h) with
  Â the softmax over in-neighbours of the same kind of edge scores, then a
  linear read-out: each node sees K hops.

Reported: the test relative error |ŷ - y|² / |y|² on unseen graphs of the
training size and on graphs `scale_up` times larger (the radius shrunk to keep
the mean degree), parameters, ms per training step, and for CGS the forward
steps and whether every forward solve converged.
"""

import dataclasses
import functools
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from flax import nnx

import iterjax as ij
from iterjax.lab.spec import Count, Positive
from iterjax.lab.tables import markdown_table


@dataclasses.dataclass(frozen=True)
class Config:
    nodes: Count = 32
    radius: Positive = 0.2
    discount: Positive = 0.95  # c
    gamma: Positive = 0.95  # CGS's contraction factor
    train_graphs: Count = 256
    test_graphs: Count = 128
    scale_up: Count = 2  # the larger test graphs have scale_up x nodes
    hidden: Count = 16
    heads: Count = 4
    gnn_depths: tuple[Count, ...] = (2, 4, 8)
    steps: Count = 600
    batch: Count = 32
    lr: Positive = 3e-3
    atol: Positive = 1e-6
    seed: int = 0
    x64: bool = True

    def __post_init__(self):  # checked before a run directory exists
        for name in ("discount", "gamma"):
            if not getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be < 1, got {getattr(self, name)}")


def graphs(count, n, radius, discount, rng):
    """(x [B, n, 2], adjacency [B, n, n], edges [B, n, n, 1], y [B, n, 1])."""
    xs, adjs, edges, ys = [], [], [], []
    for _ in range(count):
        pos = rng.uniform(size=(n, 2))
        dist = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
        np.fill_diagonal(dist, np.inf)
        adj = dist < radius
        lonely = ~adj.any(1)
        nearest = dist.argmin(1)
        adj[lonely, nearest[lonely]] = True
        adj = adj | adj.T
        w = np.exp(0.5 * rng.normal(size=(n, n)))
        w = np.where(adj, np.sqrt(w * w.T), 0.0)
        p = w / w.sum(1, keepdims=True)
        s = rng.normal(size=n)
        xs.append(np.stack([s, rng.normal(size=n)], -1))
        adjs.append(adj)
        edges.append(np.log(np.where(adj, w, 1.0))[..., None])
        ys.append(np.linalg.solve(np.eye(n) - discount * p, s)[:, None])
    return tuple(np.asarray(a) for a in (xs, adjs, edges, ys))


def _arrays(data):
    """The graphs as JAX arrays in the run's float dtype (x64 or not)."""
    dtype = jnp.zeros(()).dtype
    return tuple(jnp.asarray(a, a.dtype if a.dtype == bool else dtype) for a in data)


class ExplicitGNN(nnx.Module):
    """K rounds of h ← relu(U h + V Â h), Â a softmax over in-neighbours of edge
    scores from (h_i, h_j, e_ij) (computed once from the encoded nodes)."""

    def __init__(self, hidden, depth, dtype, rngs):
        linear = lambda i, o: nnx.Linear(i, o, param_dtype=dtype, rngs=rngs)
        self.encoder = linear(2, hidden)
        self.edge = linear(2 * hidden + 1, 1)
        self.own = nnx.List([linear(hidden, hidden) for _ in range(depth)])
        self.sent = nnx.List([linear(hidden, hidden) for _ in range(depth)])
        self.decoder = linear(hidden, 1)

    def __call__(self, x, adjacency, edges):
        h = jax.nn.relu(self.encoder(x))
        shape = (*h.shape[:-2], h.shape[-2], h.shape[-2], h.shape[-1])
        pairs = [
            jnp.broadcast_to(h[..., :, None, :], shape),
            jnp.broadcast_to(h[..., None, :, :], shape),
            edges,
        ]
        logits = self.edge(jnp.concatenate(pairs, -1))
        a = ij.deq.graph_transition(logits, adjacency, 1.0)[..., 0, :, :]
        for own, sent in zip(self.own, self.sent):
            h = jax.nn.relu(own(h) + sent(a @ h))
        return self.decoder(h)


def num_params(model):
    return sum(int(p.size) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def relative_error(pred, y):
    return float(jnp.sum((pred - y) ** 2) / jnp.sum(y**2))


def train(model, data, cfg, key):
    """Adam on the mean squared error; returns (model, losses, ms per step)."""
    x, adj, e, y = _arrays(data)
    opt = nnx.Optimizer(model, optax.adam(cfg.lr), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, idx):
        def loss(model):
            return jnp.mean((model(x[idx], adj[idx], e[idx]) - y[idx]) ** 2)

        value, grads = nnx.value_and_grad(loss)(model)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes int and float
            opt.update(model, grads)
        return value

    losses, times = [], []
    for _ in range(cfg.steps):
        key, sub = jax.random.split(key)
        idx = jax.random.choice(sub, len(x), (cfg.batch,), replace=False)
        start = time.perf_counter()
        losses.append(float(step(model, opt, idx)))
        times.append(time.perf_counter() - start)
    return losses, 1e3 * float(np.median(times[1:] or times))


@nnx.jit
def _predict(model, x, adjacency, edges):
    if isinstance(model, ij.deq.ConvergentGraphSolver):
        pred, sol = model(x, adjacency, edges, return_solution=True)
        return pred, sol.num_steps, sol.converged
    return model(x, adjacency, edges), jnp.int32(0), jnp.bool_(True)


def evaluate(model, data):
    """(relative error, the CGS solve's steps (0 for a GNN), converged)."""
    x, adj, e, y = _arrays(data)
    pred, steps, converged = _predict(model, x, adj, e)
    return relative_error(pred, y), int(steps), bool(converged)


def run(cfg: Config, workdir) -> dict:
    rng = np.random.default_rng(cfg.seed)
    make = lambda count, n, r: graphs(count, n, r, cfg.discount, rng)
    train_data = make(cfg.train_graphs, cfg.nodes, cfg.radius)
    test_data = make(cfg.test_graphs, cfg.nodes, cfg.radius)
    big = cfg.nodes * cfg.scale_up
    big_data = make(cfg.test_graphs, big, cfg.radius / np.sqrt(cfg.scale_up))
    dtype = jnp.zeros(()).dtype  # float64 under x64
    models: dict[str, Callable[[nnx.Rngs], nnx.Module]] = {
        "cgs": lambda rngs: ij.deq.ConvergentGraphSolver(
            2,
            1,
            edge_features=1,
            hidden=cfg.hidden,
            heads=cfg.heads,
            gamma=cfg.gamma,
            atol=cfg.atol,
            param_dtype=dtype,
            rngs=rngs,
        ),
    }
    for k in cfg.gnn_depths:
        models[f"gnn(depth={k})"] = functools.partial(ExplicitGNN, cfg.hidden, k, dtype)
    rows, curves = [], {}
    with workdir.progress(len(models), "training") as advance:
        for name, build in models.items():
            model = build(nnx.Rngs(cfg.seed))
            key = jax.random.key(cfg.seed + 1)
            losses, ms = train(model, train_data, cfg, key)
            err, steps, converged = evaluate(model, test_data)
            err_big, steps_big, converged_big = evaluate(model, big_data)
            row = dict(
                model=name,
                params=num_params(model),
                test_error=err,
                test_error_larger=err_big,
                forward_steps=steps,
                forward_steps_larger=steps_big,
                converged=converged and converged_big,
                ms_per_step=round(ms, 2),
            )
            workdir.log(**row)
            rows.append(row)
            curves[name] = losses
            advance()
    _plot(curves, workdir)
    return {"rows": rows, "table": _table(rows, cfg)}


def _plot(curves, workdir):
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, losses in curves.items():
        ax.semilogy(losses, label=name, lw=1)
    ax.set(xlabel="Adam step", ylabel="training MSE", title="policy evaluation")
    ax.legend()
    workdir.savefig(fig, "graph_solvers.png")


def _table(rows, cfg):
    head = [
        "model",
        "params",
        f"test rel. error (n={cfg.nodes})",
        f"(n={cfg.nodes * cfg.scale_up})",
        "CGS forward steps",
        "converged",
        "ms / step",
    ]
    body = [
        [
            r["model"],
            r["params"],
            f"{r['test_error']:.2e}",
            f"{r['test_error_larger']:.2e}",
            f"{r['forward_steps']} / {r['forward_steps_larger']}",
            r["converged"],
            r["ms_per_step"],
        ]
        for r in rows
    ]
    return markdown_table(head, body)
