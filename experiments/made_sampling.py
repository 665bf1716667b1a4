"""Sampling a MADE in parallel: the feed-forward chain of Song et al. (2021) §3.1.

A MADE on binarised digits (`experiments.common.made`) at D = 16, 64 and 256
pixels samples pixel by pixel: with fixed uniform noise, x_d = 1[u_d <
σ(logit_d(x_<d))]. `iterjax.jacobi_decode` (greedy) runs that chain with a window
of B guessed pixels per network call: B = 1 is sequential sampling (D calls), B
= D is Jacobi over the whole image (Song et al.'s Jacobi), and B in between is
their Gauss-Seidel-Jacobi hybrid (Jacobi inside a block that slides on as its
prefix is proven). For each D and B: network calls per sample (mean and
largest over `samples` noise draws), D / calls, and exactness against
sequential sampling (every pixel of every sample). Plots: calls against D, and
samples.
"""

import dataclasses

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import iterjax as ij
from iterjax.experiments.common import made
from iterjax.lab.spec import Count
from iterjax.lab.tables import markdown_table


@dataclasses.dataclass(frozen=True)
class Config:
    sides: tuple[Count, ...] = (4, 8, 16)  # images side x side: D = side²
    blocks: tuple[Count, ...] = (8, 32, 256)  # window B; B >= D: Jacobi on all D
    samples: Count = 128  # noise draws per D
    train: made.TrainConfig = made.TrainConfig()
    seed: int = 0


def sample(model, noise, block):
    """Greedy Jacobi decoding of the MADE chain for each row of `noise` [S, D]."""
    D = noise.shape[1]
    start = jnp.zeros((1,), jnp.int32)

    @jax.jit
    @jax.vmap
    def decode(u):
        tokens, stats = ij.jacobi_decode(
            made.logits_fn(model, u), start, D, block_size=block
        )
        return tokens, stats.num_calls, stats.converged

    return decode(noise)


def run(cfg: Config, workdir) -> dict:
    rows, images = [], {}
    with workdir.progress(len(cfg.sides), "MADE") as advance:
        for side in cfg.sides:
            D = side * side
            model, bits = made.train(side, cfg.train)
            key = jax.random.key(cfg.seed + side)
            noise = jax.random.uniform(
                key, (cfg.samples, D), jnp.float32, 1e-6, 1 - 1e-6
            )
            reference, calls, ok = sample(model, noise, 1)
            assert bool(jnp.all(ok)) and int(jnp.max(calls)) == D
            images[side] = np.asarray(reference)
            for block in dict.fromkeys(min(b, D) for b in cfg.blocks):
                tokens, calls, ok = sample(model, noise, block)
                row = dict(
                    D=D,
                    block=block,
                    test_bits_per_dim=bits,
                    mean_calls=float(jnp.mean(calls)),
                    max_calls=int(jnp.max(calls)),
                    converged=bool(jnp.all(ok)),
                    exact=bool(jnp.all(tokens == reference)),
                    speedup=D / float(jnp.mean(calls)),
                )
                workdir.log(**row)
                rows.append(row)
            advance()
    _plot(cfg, rows, images, workdir)
    return dict(rows=rows, table=_table(rows))


def _plot(cfg, rows, images, workdir):
    fig, ax = plt.subplots(1, 1 + len(images), figsize=(5 + 3 * len(images), 4))
    for block in cfg.blocks:
        pts = [
            (r["D"], r["mean_calls"]) for r in rows if r["block"] == min(block, r["D"])
        ]
        ax[0].loglog(*np.asarray(pts).T, "o-", label=f"B = min({block}, D)")
    Ds = np.asarray(sorted({r["D"] for r in rows}))
    ax[0].loglog(Ds, Ds, "k--", lw=0.7, label="D (sequential)")
    ax[0].set(title="network calls per sample", xlabel="pixels D", ylabel="calls")
    ax[0].minorticks_off()
    ax[0].set_xticks(Ds, [str(d) for d in Ds])
    ax[0].legend(fontsize=7)
    for a, (side, x) in zip(ax[1:], images.items()):
        grid = np.ones((4 * (side + 1), 8 * (side + 1)))
        for i, img in enumerate(x[:32]):
            r, c = divmod(i, 8)
            grid[
                r * (side + 1) : r * (side + 1) + side,
                c * (side + 1) : c * (side + 1) + side,
            ] = 1 - img.reshape(side, side)
        a.imshow(grid, cmap="gray", vmin=0, vmax=1)
        a.set(title=f"samples, D = {side * side}", xticks=[], yticks=[])
    workdir.savefig(fig, "made_sampling.png")


def _table(rows):
    headers = [
        "D",
        "block B",
        "calls (mean / max)",
        "D / calls",
        "exact",
        "test bits/dim",
    ]
    cells = lambda r: [
        r["D"],
        r["block"],
        f"{r['mean_calls']:.1f} / {r['max_calls']}",
        f"{r['speedup']:.2f}",
        "yes" if r["exact"] else "NO",
        f"{r['test_bits_per_dim']:.3f}",
    ]
    return markdown_table(headers, map(cells, rows))
