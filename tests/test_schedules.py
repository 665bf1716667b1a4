"""Schedules and optimisers: the refined schedule against the paper's formula, and
optax's by name from configs (typed, range-checked, errors naming the key)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.ndimage

import iterjax as ij
from iterjax.lab import config as cfglib
from iterjax.lab import registry
from iterjax.lab.spec import ConfigError, Spec, spec
from iterjax.tuning import schedules

# optax's own schedules mix Python floats with the int step count, which the
# suite's strict dtype promotion refuses; users run JAX's standard promotion.
pytestmark = pytest.mark.usefixtures("standard_promotion")


@pytest.fixture
def standard_promotion():
    with jax.numpy_dtype_promotion("standard"):
        yield


def _paper_weights(g):
    """w_t = g_t^-2 Σ_{p>t} g_p^-2, peak 1, written as the sum it is."""
    T = len(g)
    w = np.array(
        [g[t] ** -2 * sum(g[p] ** -2 for p in range(t + 1, T)) for t in range(T)]
    )
    return w / w.max()


def test_constant_norms_give_linear_decay():
    T = 7
    np.testing.assert_allclose(
        schedules.refined_weights(np.full(T, 3.0)), (T - 1 - np.arange(T)) / (T - 1)
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_refined_weights_are_the_papers_formula(seed):
    g = np.exp(np.random.default_rng(seed).normal(size=40))
    np.testing.assert_allclose(
        schedules.refined_weights(g), _paper_weights(g), rtol=1e-12
    )


def test_growing_norms_anneal_faster_and_shrinking_ones_warm_up():
    T = 50
    t = np.arange(T)
    linear = (T - 1 - t) / (T - 1)
    growing = schedules.refined_weights(1.0 + t / 10.0)
    assert np.all(growing[1:-1] < linear[1:-1])  # below linear decay throughout
    shrinking = schedules.refined_weights(1.0 + (T - t) / 10.0)
    assert 0 < np.argmax(shrinking) < T - 1  # a warm-up, then decay
    assert shrinking[0] < 0.5


def test_smoothing_is_a_median_filter_reflected_at_both_ends():
    g = np.exp(np.random.default_rng(3).normal(size=30))
    g[10] = 1e3  # one outlier step
    for smoothing, width in [(0.1, 3), (0.2, 7), (0.25, 7)]:
        want = _paper_weights(scipy.ndimage.median_filter(g, size=width, mode="mirror"))
        got = schedules.refined_weights(g, smoothing)
        np.testing.assert_allclose(got, want, rtol=1e-12)
    # without smoothing the outlier's step gets (almost) nothing; with it, about
    # its neighbour's weight
    raw, smooth = schedules.refined_weights(g), schedules.refined_weights(g, 0.1)
    assert raw[10] < 1e-2 * raw[9] and smooth[10] > 0.1 * smooth[9]


def test_refined_schedule_is_an_optax_schedule_under_jit_and_vmap():
    g = np.linspace(1.0, 2.0, 8)
    sched = schedules.refined_schedule(0.5, g)
    steps = jnp.arange(10)
    values = jax.jit(jax.vmap(sched))(steps)
    np.testing.assert_allclose(values[:8], 0.5 * _paper_weights(g), rtol=1e-12)
    np.testing.assert_allclose(values[8:], 0.0)  # past the recorded run
    # in optax: sgd's t-th update is -lr_t * grad
    opt = optax.sgd(sched)
    params, state = jnp.array(0.0), opt.init(jnp.array(0.0))
    for t in range(3):
        upd, state = opt.update(jnp.array(1.0), state, params)
        np.testing.assert_allclose(upd, -0.5 * _paper_weights(g)[t], rtol=1e-12)


@pytest.mark.parametrize(
    "norms,smoothing,match",
    [
        ([1.0, 0.0, 2.0], 0.0, "grad_norms"),
        ([1.0, np.nan, 2.0], 0.0, "grad_norms"),
        ([1.0, np.inf], 0.0, "grad_norms"),
        ([[1.0, 2.0]], 0.0, "grad_norms"),
        ([1.0], 0.0, "grad_norms"),
        ([1.0, 2.0], 1.5, "smoothing"),
    ],
)
def test_bad_norms_and_smoothing_are_named(norms, smoothing, match):
    with pytest.raises(ValueError, match=match):
        schedules.refined_weights(norms, smoothing)


# --- optax by name from configs.


@dataclasses.dataclass(frozen=True)
class _Config:
    optimizer: spec("optimizer") = Spec("sgd", (("learning_rate", 0.1),))
    schedule: spec("schedule") = Spec("constant", (("value", 1.0),))


def _load(**blocks):
    return cfglib.from_dict(_Config, blocks)


def _updates(opt, steps=4):
    params = jnp.array([1.0, -2.0])
    state = opt.init(params)
    out = []
    for _ in range(steps):
        upd, state = opt.update(jnp.ones(2), state, params)
        out.append(upd)
    return jnp.stack(out)


def test_an_optimizer_with_a_nested_schedule_is_optaxs():
    cfg = _load(
        optimizer={
            "name": "adamw",
            "learning_rate": {
                "name": "warmup_cosine",
                "init_value": 0.0,
                "peak_value": "1e-2",
                "warmup_steps": 2,
                "decay_steps": 10,
            },
            "weight_decay": 1e-4,
        }
    )
    opt = registry.build("optimizer", cfg.optimizer)
    want = optax.adamw(
        optax.warmup_cosine_decay_schedule(0.0, 1e-2, 2, 10), weight_decay=1e-4
    )
    np.testing.assert_allclose(_updates(opt), _updates(want), rtol=1e-14)


@pytest.mark.parametrize(
    "block,want",
    [
        (
            {
                "name": "linear",
                "init_value": 1.0,
                "end_value": 0.0,
                "transition_steps": 4,
            },
            optax.linear_schedule(1.0, 0.0, 4),
        ),
        (
            {"name": "cosine", "init_value": 1.0, "decay_steps": 5, "alpha": 0.1},
            optax.cosine_decay_schedule(1.0, 5, 0.1),
        ),
        (
            {
                "name": "sgdr",
                "cosine_kwargs": [
                    {
                        "init_value": 0.0,
                        "peak_value": 1.0,
                        "warmup_steps": 1,
                        "decay_steps": 3,
                    },
                    {
                        "init_value": 0.0,
                        "peak_value": 0.5,
                        "warmup_steps": 1,
                        "decay_steps": 3,
                    },
                ],
            },
            optax.sgdr_schedule(
                [
                    dict(init_value=0.0, peak_value=1.0, warmup_steps=1, decay_steps=3),
                    dict(init_value=0.0, peak_value=0.5, warmup_steps=1, decay_steps=3),
                ]
            ),
        ),
        (
            {
                "name": "refined",
                "learning_rate": 0.3,
                "grad_norms": [1.0, 2.0, 1.0, 1.0],
            },
            schedules.refined_schedule(0.3, [1.0, 2.0, 1.0, 1.0]),
        ),
    ],
    ids=["linear", "cosine", "sgdr", "refined"],
)
def test_schedules_by_name_are_optaxs(block, want):
    sched = registry.build("schedule", _load(schedule=block).schedule)
    t = jnp.arange(8)
    np.testing.assert_allclose(jax.vmap(sched)(t), jax.vmap(want)(t), rtol=1e-14)


def test_schedule_free_and_polyak_by_name():
    cfg = _load(optimizer={"name": "schedule_free_sgd", "learning_rate": 0.1})
    opt = registry.build("optimizer", cfg.optimizer)
    np.testing.assert_allclose(
        _updates(opt), _updates(optax.contrib.schedule_free_sgd(0.1)), rtol=1e-14
    )
    cfg = _load(optimizer={"name": "polyak_sgd", "max_learning_rate": 2.0})
    assert isinstance(
        registry.build("optimizer", cfg.optimizer), optax.GradientTransformation
    )
    block = {"name": "nag_gs", "learning_rate": 0.1, "mu": 0.5, "gamma": 2.0}
    opt = registry.build("optimizer", _load(optimizer=block).optimizer)
    want = ij.nag_gs(0.1, mu=0.5, gamma=2.0)
    np.testing.assert_allclose(_updates(opt), _updates(want), rtol=1e-14)
    with pytest.raises(ConfigError, match="mu"):
        _load(optimizer={**block, "mu": 0.0})


def test_a_refined_schedule_from_a_recorded_run(tmp_path):
    norms = [2.0, 1.5, 1.0, 1.0, 0.5]
    rows = [{"step": i, "grad_norm": g, "loss": 1.0} for i, g in enumerate(norms)]
    rows.insert(2, {"step": 99, "eval_loss": 0.3})  # rows without the key are skipped
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for source in (f"{tmp_path}:grad_norm", f"{tmp_path / 'metrics.jsonl'}:grad_norm"):
        block = {"name": "refined", "learning_rate": 1.0, "grad_norms": source}
        sched = registry.build("schedule", _load(schedule=block).schedule)
        np.testing.assert_allclose(
            jax.vmap(sched)(jnp.arange(5)), _paper_weights(np.array(norms)), rtol=1e-12
        )
    with pytest.raises(ConfigError, match="schedule.grad_norms.*no row.*'lr'"):
        _load(
            schedule={
                "name": "refined",
                "learning_rate": 1.0,
                "grad_norms": f"{tmp_path}:lr",
            }
        )
    with pytest.raises(ConfigError, match="schedule.grad_norms.*no metrics file"):
        _load(
            schedule={
                "name": "refined",
                "learning_rate": 1.0,
                "grad_norms": f"{tmp_path}/nope:grad_norm",
            }
        )


@pytest.mark.parametrize(
    "blocks,match",
    [
        (
            {"optimizer": {"name": "adamm"}},
            r"`optimizer.name`: unknown optimizer 'adamm'",
        ),
        ({"optimizer": {"name": "sgd", "lr": 0.1}}, r"`optimizer.lr`: unknown option"),
        ({"optimizer": {"name": "adam"}}, r"`optimizer.learning_rate`: adam needs it"),
        (
            {"optimizer": {"name": "adam", "learning_rate": -1.0}},
            r"`optimizer.learning_rate`: must be >= 0.0, got -1.0",
        ),
        (
            {"optimizer": {"name": "adam", "learning_rate": 0.1, "b1": 1.5}},
            r"`optimizer.b1`: must be <= 1.0, got 1.5",
        ),
        (
            {"optimizer": {"name": "adam", "learning_rate": "fast"}},
            r"`optimizer.learning_rate.name`: unknown schedule 'fast'",
        ),
        (
            {"optimizer": {"name": "sgd", "learning_rate": 0.1, "nesterov": 1}},
            r"`optimizer.nesterov`: wrong type",
        ),
        (
            {
                "optimizer": {
                    "name": "sgd",
                    "learning_rate": {"name": "cosine", "init_value": 1.0},
                }
            },
            r"`optimizer.learning_rate.decay_steps`: cosine needs it",
        ),
        (
            {"schedule": {"name": "cosine", "init_value": 1.0, "decay_steps": 2.5}},
            r"`schedule.decay_steps`: expected an int",
        ),
        (
            {"schedule": {"name": "cosine", "init_value": 1.0, "decay_steps": 0}},
            r"`schedule.decay_steps`: must be >= 1, got 0",
        ),
        (
            {
                "schedule": {
                    "name": "linear",
                    "init_value": float("nan"),
                    "end_value": 0.0,
                    "transition_steps": 3,
                }
            },
            r"`schedule.init_value`: must be a finite number, got nan",
        ),
        (
            {"schedule": {"name": "sgdr", "cosine_kwargs": [{"peak_value": 1.0}]}},
            r"`schedule.cosine_kwargs\[0\].init_value`: an sgdr cycle needs it",
        ),
        (
            {
                "schedule": {
                    "name": "refined",
                    "learning_rate": 1.0,
                    "grad_norms": [1.0, -1.0],
                }
            },
            r"`schedule`: refined_weights: `grad_norms`",
        ),
    ],
)
def test_bad_blocks_are_refused_naming_the_key(blocks, match):
    with pytest.raises(ConfigError, match=match):
        _load(**blocks)


def test_users_register_their_own_schedule():
    def halving(init_value: float, every: int):
        return lambda t: init_value * 0.5 ** (t // every)

    registry.register("schedule", "halving", halving)
    try:
        sched = registry.build(
            "schedule",
            _load(schedule={"name": "halving", "init_value": 1.0, "every": 2}).schedule,
        )
        np.testing.assert_allclose(
            [float(sched(t)) for t in range(5)], [1, 1, 0.5, 0.5, 0.25]
        )
        with pytest.raises(ConfigError, match="`schedule.every`: expected an int"):
            _load(schedule={"name": "halving", "init_value": 1.0, "every": 0.5})
    finally:
        del registry.optim.SCHEDULES["halving"]
    with pytest.raises(TypeError, match="must be a function"):
        registry.register("schedule", "x", 3)


@pytest.mark.parametrize("name", ["linear", "refined", "polyak"])
def test_the_schedules_experiment_takes_the_steps_it_states(name):
    from iterjax.experiments import schedules as exp

    cfg = exp.Config(steps=20, eval_every=10, batch=4, seeds=1)
    X, Y, classes = exp.load("wine")
    f = exp.objective(X, Y, cfg.l2)
    W0 = jnp.zeros((X.shape[1], classes))
    norms = np.linspace(2.0, 1.0, 20)
    key = jax.random.PRNGKey(3)
    losses, got_norms = jax.jit(exp.train(f, X.shape[0], W0, cfg, name, norms))(
        0.5, key
    )
    # the same minibatches by hand: W <- W - η_t g_t
    rate = {
        "linear": lambda t, v, g: 0.5 * (1 - t / 20),
        "refined": lambda t, v, g: (
            0.5 * schedules.refined_weights(norms, cfg.smoothing)[t]
        ),
        "polyak": lambda t, v, g: min(0.5, float(v / jnp.sum(g**2))),
    }[name]
    W, want = W0, []
    for t, k in enumerate(jax.random.split(key, 20)):
        idx = jax.random.randint(k, (4,), 0, X.shape[0])
        v, g = jax.value_and_grad(f)(W, idx)
        np.testing.assert_allclose(got_norms[t], jnp.linalg.norm(g), rtol=1e-12)
        W = W - rate(t, v, g) * g
        if t % 10 == 9:
            want.append(f(W))
    np.testing.assert_allclose(losses, want, rtol=1e-12)
