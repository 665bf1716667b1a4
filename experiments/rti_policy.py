"""Real-Time Iteration for a diffusion policy (RTI-DP), small: a point mass
steered to the origin by a diffusion policy that denoises only k steps per
control step.

The task: p_{t+1} = p_t + dt v_t, v_{t+1} = v_t + dt a_t in 2-D, cost
Σ_t (|p_t|² + r |a_t|²) dt over `horizon` control steps. The expert is a
saturated PD law a* = clip(-k_p p - k_d v, ±1); the demonstrations add Gaussian
noise σ to its actions. The policy is a conditional noise-prediction MLP
ε̂(a_τ, τ, state) trained on the demonstrations (VP process of
`experiments.common.diffusion`), sampled by DDIM.

At each control step the policy runs k DDIM steps:

* `cold`: from pure noise, the schedule of N = k steps from τ = 1;
* `rti`: from the previous control step's action, noised to the level τ_k of a
  `full_steps`-step schedule (k steps before its end), then those k steps:
  the warm start of Real-Time Iteration, one model call a step.

Reported per variant and k: the closed-loop cost relative to the expert's (mean
over `episodes` random starts), the final distance to the origin, and model
calls per control step; the full N-step policy from noise beside them. Every
action is clipped to the expert's bounds, as actuators clip.
"""

import dataclasses

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

from iterjax.experiments.common import diffusion, training
from iterjax.experiments.common import digits_diffusion as dd
from iterjax.lab.spec import Count, NonNegative, Positive
from iterjax.lab.tables import markdown_table
from iterjax.sequence import samplers


@dataclasses.dataclass(frozen=True)
class Config:
    dt: Positive = 0.1
    horizon: Count = 60  # control steps per episode
    episodes: Count = 64
    kp: Positive = 1.0
    kd: Positive = 1.5
    action_cost: NonNegative = 0.1
    demo_noise: Positive = 0.1  # σ of the demonstrations' actions
    demos: Count = 20_000
    hidden: Count = 128
    train_steps: Count = 4000
    batch: Count = 256
    lr: Positive = 2e-3
    full_steps: Count = 20  # the full policy's DDIM steps
    ks: tuple[Count, ...] = (1, 2, 4)  # denoising steps per control step
    seed: int = 0
    x64: bool = True


class Policy(nnx.Module):
    """ε̂(a_τ, τ, state): [..., 2] x [...] x [..., 4] -> [..., 2]."""

    def __init__(self, hidden: int, rngs: nnx.Rngs, frequencies: int = 8):
        self.frequencies = frequencies
        sizes = [2 + 2 * frequencies + 4, hidden, hidden]
        self.layers = nnx.List(
            [nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])]
        )
        self.out = nnx.Linear(hidden, 2, rngs=rngs)

    def __call__(self, a, tau, state):
        h = jnp.concatenate([dd.time_features(a, tau, self.frequencies), state], -1)
        for layer in self.layers:
            h = jax.nn.silu(layer(h))
        return self.out(h)


def expert(cfg, state):
    p, v = state[..., :2], state[..., 2:]
    return jnp.clip(-cfg.kp * p - cfg.kd * v, -1.0, 1.0)


def dynamics(cfg, state, action):
    p, v = state[..., :2], state[..., 2:]
    return jnp.concatenate([p + cfg.dt * v, v + cfg.dt * action], -1)


def train(cfg):
    rng = np.random.default_rng(cfg.seed)
    states = np.concatenate(
        [rng.uniform(-2, 2, (cfg.demos, 2)), rng.uniform(-1.5, 1.5, (cfg.demos, 2))], 1
    ).astype(np.float32)
    actions = np.asarray(expert(cfg, jnp.asarray(states)))
    actions = actions + cfg.demo_noise * rng.standard_normal(actions.shape)
    actions = actions.astype(np.float32)
    model = Policy(cfg.hidden, nnx.Rngs(cfg.seed))

    def loss(model, batch):
        a0, s, tau, noise = batch
        ab = diffusion.alpha_bar(tau)[:, None]
        at = jnp.sqrt(ab) * a0 + jnp.sqrt(1 - ab) * noise
        return jnp.mean((model(at, tau, s) - noise) ** 2)

    def batches(k):
        r = np.random.default_rng([cfg.seed, k])
        idx = r.integers(0, cfg.demos, cfg.batch)
        tau = r.uniform(dd.T_MIN, 1.0, cfg.batch).astype(np.float32)
        noise = r.standard_normal((cfg.batch, 2)).astype(np.float32)
        return actions[idx], states[idx], tau, noise

    opt = training.adam_cosine(cfg.lr, cfg.train_steps)
    losses = training.fit(model, loss, cfg.train_steps, opt, batches)
    return model, losses


def denoise(model, state, a, steps):
    """DDIM over `steps` (SamplerSteps) from a, conditioned on the state."""
    s = samplers.ddim(lambda x, t, ab: model(x, t, state))
    return jax.lax.scan(s.step, a, steps)[0]


def episode_cost(cfg, model, variant, k, starts, key):
    """Closed-loop cost of each start [E, 4] under the policy (or the expert)."""
    full = dd.sampling_steps(cfg.full_steps)

    def act(state, a_prev, key):
        if variant == "expert":
            return expert(cfg, state)
        noise = jax.random.normal(key, state.shape[:-1] + (2,), state.dtype)
        if variant == "full":
            return denoise(model, state, noise, full)
        if variant == "cold":
            return denoise(model, state, noise, dd.sampling_steps(k))
        tail = jax.tree.map(lambda x: x[cfg.full_steps - k :], full)
        ab = tail.alpha_bar[0]  # rti: the previous action at level τ_k
        start = jnp.sqrt(ab) * a_prev + jnp.sqrt(1 - ab) * noise
        return denoise(model, state, start, tail)

    def step(carry, key):
        state, a_prev, cost = carry
        a = jnp.clip(act(state, a_prev, key), -1.0, 1.0)  # the actuator's bounds
        c = jnp.sum(state[..., :2] ** 2, -1) + cfg.action_cost * jnp.sum(a**2, -1)
        return (dynamics(cfg, state, a), a, cost + cfg.dt * c), None

    keys = jax.random.split(key, cfg.horizon)
    a0 = jnp.zeros(starts.shape[:-1] + (2,), starts.dtype)
    init = (starts, a0, jnp.zeros(starts.shape[:-1], starts.dtype))
    (final, _, cost), _ = jax.lax.scan(step, init, keys)
    return cost, jnp.linalg.norm(final[..., :2], axis=-1)


def run(cfg: Config, workdir) -> dict:
    with workdir.progress(cfg.train_steps, "training the policy") as advance:
        model, losses = train(cfg)
        advance(cfg.train_steps)
    for k in range(0, len(losses), 100):
        workdir.log("train", step=k + 100, loss=float(np.mean(losses[k : k + 100])))
    model = dd.cast(model, jnp.float64)
    key = jax.random.key(cfg.seed + 1)
    starts = jnp.concatenate(
        [
            jax.random.uniform(key, (cfg.episodes, 2), jnp.float64, -2, 2),
            jnp.zeros((cfg.episodes, 2)),
        ],
        1,
    )
    run_one = jax.jit(
        lambda variant, k: episode_cost(cfg, model, variant, k, starts, key),
        static_argnums=(0, 1),
    )
    expert_cost, expert_final = run_one("expert", 0)
    cases = [("full", cfg.full_steps)]
    cases += [(v, k) for k in cfg.ks for v in ("cold", "rti")]
    rows = []
    for variant, k in cases:
        cost, final = run_one(variant, k)
        row = dict(
            variant=variant,
            k=k,
            calls_per_control_step=k,
            relative_cost=float(jnp.mean(cost) / jnp.mean(expert_cost)),
            final_distance=float(jnp.mean(final)),
        )
        workdir.log(**row)
        rows.append(row)
    _plot(cfg, rows, losses, workdir)
    return dict(
        expert=dict(
            cost=float(jnp.mean(expert_cost)),
            final_distance=float(jnp.mean(expert_final)),
        ),
        final_loss=float(np.mean(losses[-100:])),
        rows=rows,
        table=_table(rows),
    )


def _plot(cfg, rows, losses, workdir):
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    ax[0].semilogy(losses, lw=0.5)
    ax[0].set(title="policy's denoising loss", xlabel="step")
    for variant in ("cold", "rti"):
        pts = [(r["k"], r["relative_cost"]) for r in rows if r["variant"] == variant]
        ax[1].plot(*np.asarray(pts).T, "o-", label=variant)
    full = next(r for r in rows if r["variant"] == "full")
    ax[1].axhline(
        full["relative_cost"],
        color="k",
        ls="--",
        lw=0.7,
        label=f"full ({cfg.full_steps} steps)",
    )
    ax[1].axhline(1.0, color="0.5", lw=0.5, label="expert")
    ax[1].set(
        title="closed-loop cost / expert's", xlabel="denoising steps per control step"
    )
    ax[1].legend(fontsize=8)
    workdir.savefig(fig, "rti_policy.png")


def _table(rows):
    headers = ["variant", "denoising steps k", "cost / expert", "final distance"]
    cells = lambda r: [
        r["variant"],
        r["k"],
        f"{r['relative_cost']:.3f}",
        f"{r['final_distance']:.3f}",
    ]
    return markdown_table(headers, map(cells, rows))
