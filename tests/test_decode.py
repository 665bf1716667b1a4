"""jacobi_decode: greedy equals sequential greedy token for token; speculative
sampling keeps the model's distribution (chi-square on a Markov chain)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from flax import nnx

import iterjax as ij
from iterjax.experiments.common import made

VOCAB, DIM = 5, 8


def rnn_model(params, tokens):
    """A causal model whose row i depends on all of tokens[:i + 1]."""
    E, W, U = params

    def step(h, t):
        h = jnp.tanh(W @ h + E[t])
        return h, U @ h

    return jax.lax.scan(step, jnp.zeros(DIM), tokens)[1]


def random_params(key, scale=2.0):
    k1, k2, k3 = jax.random.split(key, 3)
    return (
        jax.random.normal(k1, (VOCAB, DIM)),
        scale * jax.random.normal(k2, (DIM, DIM)) / np.sqrt(DIM),
        jax.random.normal(k3, (VOCAB, DIM)),
    )


def greedy_reference(logits_fn, prompt, n):
    """Sequential greedy decoding: one model call per token."""
    P = prompt.shape[0]
    buf = jnp.concatenate([prompt, jnp.zeros(n, prompt.dtype)])

    def body(i, buf):
        nxt = jnp.argmax(logits_fn(buf)[P - 1 + i]).astype(buf.dtype)
        return buf.at[P + i].set(nxt)

    return jax.lax.fori_loop(0, n, body, buf)[P:]


N_TOKENS, BATCH = 12, 24


@pytest.fixture(scope="module")
def batch():
    keys = jax.random.split(jax.random.key(0), BATCH)
    params = jax.vmap(random_params)(keys)
    prompts = jax.random.randint(jax.random.key(1), (BATCH, 3), 0, VOCAB)
    ref = jax.jit(
        jax.vmap(lambda p, x: greedy_reference(lambda t: rnn_model(p, t), x, N_TOKENS))
    )(params, prompts)
    return params, prompts, ref


@pytest.mark.parametrize("block_size", [1, 3, 8, 32])
def test_greedy_equals_sequential_batched(batch, block_size):
    params, prompts, ref = batch

    @jax.jit
    @jax.vmap
    def decode(p, x):
        fn = lambda t: rnn_model(p, t)
        return ij.jacobi_decode(fn, x, N_TOKENS, block_size=block_size)

    tokens, stats = decode(params, prompts)
    np.testing.assert_array_equal(tokens, ref)
    assert bool(jnp.all(stats.converged))
    np.testing.assert_array_equal(stats.accepted.sum(-1), N_TOKENS)
    calls = np.asarray(stats.num_calls)
    assert np.all(calls <= N_TOKENS)
    assert np.all(calls == np.count_nonzero(stats.accepted, axis=-1))
    if block_size == 1:
        assert np.all(calls == N_TOKENS)
    else:  # per-element counts, and some fast-forwarding
        assert calls.min() < N_TOKENS and len(set(calls.tolist())) > 1


def test_trajectory_starts_from_the_fill_and_ends_at_the_result(batch):
    params, prompts, ref = batch
    fn = lambda t: rnn_model(jax.tree.map(lambda a: a[2], params), t)
    tokens, stats = ij.jacobi_decode(
        fn, prompts[2], N_TOKENS, block_size=4, return_trajectory=True
    )
    traj, calls = np.asarray(stats.trajectory), int(stats.num_calls)
    assert traj.shape == (N_TOKENS, N_TOKENS)
    np.testing.assert_array_equal(traj[0], prompts[2, -1])
    np.testing.assert_array_equal(
        traj[calls:], np.broadcast_to(ref[2], traj[calls:].shape)
    )
    # Call k saw the tokens accepted by calls < k.
    done = np.cumsum(np.asarray(stats.accepted))
    for k in range(1, calls):
        np.testing.assert_array_equal(traj[k, : done[k - 1]], ref[2, : done[k - 1]])


@pytest.mark.parametrize("block_size", [1, 4, 5])
def test_constant_model_fast_forwards_a_window_per_call(block_size):
    # The first call proves one token; every later call proves a whole window.
    logits_fn = lambda t: jnp.zeros((t.shape[0], VOCAB)).at[:, 2].set(1.0)
    n = 11
    tokens, stats = ij.jacobi_decode(
        logits_fn, jnp.array([0]), n, block_size=block_size
    )
    np.testing.assert_array_equal(tokens, 2)
    assert int(stats.num_calls) == 1 + -(-(n - 1) // block_size)


def test_max_sweeps_reports_non_convergence_and_keeps_the_proven_prefix(batch):
    params, prompts, ref = batch
    fn = lambda t: rnn_model(jax.tree.map(lambda a: a[0], params), t)
    tokens, stats = ij.jacobi_decode(
        fn, prompts[0], N_TOKENS, block_size=1, max_sweeps=5
    )
    assert not bool(stats.converged) and int(stats.num_calls) == 5
    np.testing.assert_array_equal(tokens[:5], ref[0, :5])


# A second-order Markov chain: the next token depends on the last two.
CHAIN_V, CHAIN_N, SAMPLES = 3, 4, 20_000
CHAIN = jax.random.normal(jax.random.key(7), (CHAIN_V, CHAIN_V, CHAIN_V))


def chain_logits(tokens):
    prev = jnp.concatenate([tokens[:1], tokens[:-1]])
    return CHAIN[prev, tokens]


def chain_probabilities(prompt, temperature):
    """Exact probability of every continuation of length CHAIN_N."""
    logp = np.asarray(jax.nn.log_softmax(CHAIN / temperature, axis=-1))
    out = {}
    for seq in itertools.product(range(CHAIN_V), repeat=CHAIN_N):
        full = list(prompt) + list(seq)
        out[seq] = np.exp(
            sum(
                logp[full[i - 1] if i > 0 else full[0], full[i], full[i + 1]]
                for i in range(len(prompt) - 1, len(full) - 1)
            )
        )
    return out


def chi_square(counts, probs):
    expected = np.array([probs[s] for s in probs]) * SAMPLES
    observed = np.array([counts.get(s, 0) for s in probs])
    return float(np.sum((observed - expected) ** 2 / expected)), len(probs) - 1


@pytest.mark.parametrize("block_size,temperature", [(4, 1.0), (2, 0.7)])
def test_speculative_sampling_keeps_the_distribution(block_size, temperature):
    prompt = jnp.array([1, 0], jnp.int32)  # int32 tokens under x64, too
    keys = jax.random.split(jax.random.key(3), SAMPLES)
    sample = jax.jit(
        jax.vmap(
            lambda k: ij.jacobi_decode(
                chain_logits,
                prompt,
                CHAIN_N,
                block_size=block_size,
                temperature=temperature,
                key=k,
            )
        )
    )
    tokens, stats = sample(keys)
    counts = {}
    for row in map(tuple, np.asarray(tokens).tolist()):
        counts[row] = counts.get(row, 0) + 1
    stat, dof = chi_square(counts, chain_probabilities([1, 0], temperature))
    assert stat < scipy.stats.chi2.ppf(0.999, dof), stat
    # The same test rejects the distribution at another temperature.
    wrong, _ = chi_square(counts, chain_probabilities([1, 0], 1.5 * temperature))
    assert wrong > scipy.stats.chi2.ppf(0.999, dof), wrong
    assert bool(jnp.all(stats.converged))
    # Drafts are accepted: fewer calls than tokens on average.
    assert float(jnp.mean(stats.num_calls)) < CHAIN_N


def test_greedy_decode_with_traced_params_under_jit(batch):
    # Params as traced arguments (not constants) of a jitted function.
    params, prompts, ref = batch
    p0 = jax.tree.map(lambda a: a[1], params)
    run = jax.jit(
        lambda p, x: ij.jacobi_decode(lambda t: rnn_model(p, t), x, N_TOKENS)[0]
    )
    np.testing.assert_array_equal(run(p0, prompts[1]), ref[1])


BAD = [
    (dict(num_tokens=0), "num_tokens"),
    (dict(block_size=0), "block_size"),
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=1.0), "key"),
    (dict(context=2), "longer than the context"),
    (dict(context=6), "exceeds the context"),
    (dict(max_sweeps=0), "max_sweeps"),
    (dict(prompt=jnp.zeros((2, 3), jnp.int32)), "1-D int"),
    (dict(prompt=jnp.zeros(3)), "1-D int"),
    (dict(prompt=jnp.zeros(0, jnp.int32)), "at least one token"),
    (dict(logits_fn=lambda t: t.astype(float)), r"\[L, vocab\]"),
    (dict(logits_fn=lambda t: jnp.zeros((t.shape[0] - 1, 4))), r"\[L, vocab\]"),
    (dict(logits_fn=lambda t: jnp.zeros((t.shape[0], 4), int)), r"\[L, vocab\]"),
    (dict(logits_fn=lambda t: (jnp.zeros((t.shape[0], 4)),)), r"\[L, vocab\]"),
]


@pytest.mark.parametrize("kwargs,match", BAD, ids=[m for _, m in BAD])
def test_bad_input_raises_a_clear_error(kwargs, match):
    call = dict(
        logits_fn=lambda t: jnp.zeros((t.shape[0], 4)),
        prompt=jnp.array([0, 1, 2]),
        num_tokens=4,
    )
    call.update(kwargs)
    with pytest.raises(ValueError, match=match):
        ij.jacobi_decode(call.pop("logits_fn"), call.pop("prompt"), **call)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_nan_logits_are_reported_not_accepted(temperature):
    # NaN logits from position 6 on: no guess may be accepted from them
    V = 5

    def logits_fn(tokens):
        base = jax.nn.one_hot((tokens + 1) % V, V) * 3.0
        return jnp.where(jnp.arange(tokens.shape[0])[:, None] >= 6, jnp.nan, base)

    prompt = jnp.array([0, 1, 2])
    _, stats = ij.jacobi_decode(
        logits_fn,
        prompt,
        8,
        block_size=4,
        temperature=temperature,
        key=jax.random.key(1),
    )
    assert bool(stats.nonfinite) and not bool(stats.converged)
    assert int(jnp.sum(stats.accepted)) < 8
    good = lambda tokens: jax.nn.one_hot((tokens + 1) % V, V) * 3.0
    _, ok = ij.jacobi_decode(good, prompt, 8, block_size=4)
    assert bool(ok.converged) and not bool(ok.nonfinite)


def test_text_quality_flags_degenerate_outputs():
    from iterjax.experiments.jacobi_decoding import text_quality

    varied = np.array([[1, 2, 3, 4, 5, 6, 7, 8], [8, 7, 6, 5, 4, 3, 2, 1]])
    q = text_quality(varied)
    assert q["distinct_4"] == 1.0 and q["top_token_share"] == 1 / 8
    stuck = np.array([[1, 2, 3, 4, 5, 6, 7, 8], [3, 3, 3, 3, 3, 3, 3, 9]])
    q = text_quality(stuck)  # "the the the ...": one 4-gram repeated
    assert q["worst_top_token_share"] == 7 / 8
    assert q["distinct_4"] == (1.0 + 2 / 5) / 2
    with pytest.raises(ValueError, match="tokens"):
        text_quality(np.array([1, 2, 3]))


def test_a_degenerate_fine_tuned_model_fails_the_decoding_run():
    from iterjax.experiments.jacobi_decoding import Config, check_not_degenerate
    from iterjax.lab.config import CONFIG_DIR
    from iterjax.lab.runner import prepare

    half = np.array([[1, 2, 3, 4, 5, 6, 7, 8], [3, 3, 3, 3, 5, 6, 7, 9]])
    check_not_degenerate(half, 0.5)  # one token for exactly half: allowed
    stuck = np.array([[1, 2, 3, 4, 5, 6, 7, 8], [3, 3, 3, 3, 3, 6, 7, 9]])
    with pytest.raises(RuntimeError, match="degenerate.*62%.*0.5"):
        check_not_degenerate(stuck, 0.5)
    # the shipped config (whose run gives README's CLLM numbers) holds the bar
    assert Config().max_top_token_share == 0.5
    assert prepare(CONFIG_DIR / "jacobi_decoding.yaml").cfg.max_top_token_share == 0.5


# --- MADE sampling as a causal chain (experiments.common.made) ------------------


@pytest.fixture(scope="module")
def tiny_made():
    return made.MADE(16, 32, nnx.Rngs(0))


def test_made_logit_d_depends_only_on_earlier_pixels(tiny_made):
    x = jnp.asarray(np.random.default_rng(0).random(16), jnp.float32)
    J = np.asarray(jax.jacfwd(tiny_made)(x))  # J[d, j] = d logit_d / d x_j
    assert np.all(np.triu(J) == 0)  # nothing from x_j, j >= d
    assert np.count_nonzero(np.tril(J, -1)) > 0.9 * 16 * 15 / 2


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_made_jacobi_sampling_equals_the_sequential_chain(tiny_made, block_size):
    u = jax.random.uniform(jax.random.key(1), (16,), jnp.float32, 1e-6, 1 - 1e-6)
    x = np.zeros(16, np.float32)
    for d in range(16):  # x_d = 1[u_d < σ(logit_d(x_<d))], one pixel at a time
        p = jax.nn.sigmoid(tiny_made(jnp.asarray(x))[d])
        x[d] = float(u[d] < p)
    tokens, stats = ij.jacobi_decode(
        made.logits_fn(tiny_made, u), jnp.zeros(1, jnp.int32), 16, block_size=block_size
    )
    np.testing.assert_array_equal(tokens, x.astype(np.int32))
    assert bool(stats.converged) and int(stats.num_calls) <= 16
