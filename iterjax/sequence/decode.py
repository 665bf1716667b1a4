"""Jacobi decoding of causal models: greedy (exact) and speculative (sampling).

Autoregressive decoding is the recurrence x_{i+1} = g(logits(x_{<=i})_i). Jacobi
decoding guesses a window of B future tokens and re-predicts all of them in one
parallel model call, sliding the window past every token that is proven final
(Song et al. 2021; CLLMs, Kou et al. 2024; Speculative Jacobi Decoding, Teng et
al. 2024).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from .. import _struct as struct
from .._checks import check_int, check_range, concrete_number
from .._types import Array, Bool, Float, Int


@struct.dataclass
class DecodeStats:
    """How a `jacobi_decode` call went.

    Attributes:
      num_calls: model calls made (each one parallel forward pass over the window).
      accepted: tokens accepted by each call, shape [num_tokens] (zero after the
        last call); `num_tokens / num_calls` tokens per call on average.
      converged: every token was accepted within `max_sweeps` calls, from finite
        logits.
      nonfinite: the model returned NaN or inf logits inside the window (decoding
        stopped there; `converged` is False).
      trajectory: with `return_trajectory=True`, the generated tokens as the model
        saw them at each call, shape [max_sweeps, num_tokens] (rows after the last
        call repeat the result): the Jacobi trajectory that consistency training
        (CLLM) maps to its fixed point. Else None.
    """

    num_calls: jax.Array
    accepted: jax.Array
    converged: jax.Array
    trajectory: jax.Array | None = None
    nonfinite: jax.Array | None = None


class _State(NamedTuple):
    gen: Int[Array, " N+2*B"]  # accepted tokens, then guesses (padded)
    start: Int[Array, ""]  # tokens accepted so far: the window is gen[start:start + B]
    draft: Float[Array, "B V"]  # distribution each window token was drawn from
    key: jax.Array
    num_calls: jax.Array
    accepted: Int[Array, " N"]  # tokens accepted by each call
    trajectory: jax.Array | None  # [max_sweeps, N] tokens seen by each call
    nonfinite: Bool[Array, ""]  # the model returned NaN or inf logits


def jacobi_decode(
    logits_fn,
    prompt,
    num_tokens: int,
    *,
    block_size: int = 16,
    temperature: float = 0.0,
    key=None,
    max_sweeps: int | None = None,
    context: int | None = None,
    return_trajectory: bool = False,
):
    """Decode `num_tokens` tokens after `prompt` by parallel (Jacobi) sweeps.

    A window of B = `block_size` guessed tokens x_s..x_{s+B-1} follows the s
    tokens accepted so far. One call of `logits_fn` on prompt + tokens predicts
    every window position at once from the current guesses (position i from
    tokens < i, by causality):

    - greedy (`temperature=0`): y_i = argmax logits_{i-1}. The first guess that
      differs from its prediction, i = m, ends what is proven: x_s..x_{m-1} were
      predicted from themselves and y_m from proven tokens, so m - s + 1 tokens
      (the whole window when nothing changed) are accepted, the window takes the
      new predictions and slides on. Exactly the tokens of sequential greedy
      decoding, at least one token per call, so a window of B guesses is final
      after at most B calls and the whole output after at most `num_tokens`.
    - sampling (`temperature > 0`), Speculative Jacobi Decoding: each guess x_i
      was drawn from a draft distribution q_i (a point mass for the initial
      fill, the previous call's p_i afterwards). With p_i = softmax(logits_{i-1} /
      temperature), guesses are accepted in order with probability
      min(1, p_i(x_i) / q_i(x_i)); the first rejected one is redrawn from
      (p_i - q_i)^+ and accepted, and the later ones are redrawn from p_i. This is
      speculative sampling at every position, so the output is distributed
      exactly as sequential sampling at that temperature.

    Guesses start as the last prompt token, and positions entering the window as
    copies of its last token (point-mass drafts). `logits_fn` always sees
    the whole buffer (prompt + num_tokens tokens, with guesses after the window),
    so any causal model works, with no KV cache.

    Args:
      logits_fn: causal model, int tokens [L] -> logits [L, vocab], where row i
        depends on tokens[:i + 1] only. L = len(prompt) + num_tokens.
      prompt: int tokens [P], P >= 1.
      num_tokens: tokens to generate (>= 1).
      block_size: window size B (>= 1; B = 1 is autoregressive decoding).
      temperature: 0 for greedy decoding, > 0 to sample from softmax(logits / T).
      key: PRNG key, required when temperature > 0.
      max_sweeps: at most this many model calls (default: num_tokens, always
        enough); when fewer are needed stats.converged is False and the
        unaccepted tail holds the last guesses.
      context: the model's context length, if it has one: P + num_tokens must
        not exceed it.
      return_trajectory: record every call's tokens in `stats.trajectory`.

    Returns:
      `(tokens, stats)`: the generated tokens [num_tokens] (dtype of `prompt`) and
      a `DecodeStats`.

    Examples:
      >>> import jax, jax.numpy as jnp, iterjax
      >>> logits_fn = lambda t: jax.nn.one_hot((3 * t + 1) % 7, 7)  # next = 3t+1 mod 7
      >>> tokens, stats = iterjax.jacobi_decode(logits_fn, jnp.array([2]), 6)
      >>> tokens.tolist(), int(stats.num_calls)   # a chain: one token per call
      ([0, 1, 4, 6, 5, 2], 6)
      >>> by_position = lambda t: jax.nn.one_hot(jnp.arange(t.shape[0]) % 5, 5)
      >>> tokens, stats = iterjax.jacobi_decode(by_position, jnp.array([2]), 6)
      >>> tokens.tolist(), int(stats.num_calls)   # guesses right after one call
      ([0, 1, 2, 3, 4, 0], 2)
    """
    prompt = jnp.asarray(prompt)
    P, N, B, V = _check_call(
        logits_fn, prompt, num_tokens, block_size, temperature, key, max_sweeps, context
    )
    max_sweeps = N if max_sweeps is None else max_sweeps
    greedy = concrete_number(temperature) == 0.0
    fill = prompt[-1]
    dtype = jnp.result_type(jax.eval_shape(logits_fn, _buffer(prompt, N, fill)))
    state = _State(
        gen=jnp.full((N + 2 * B,), fill, prompt.dtype),
        start=jnp.int32(0),
        draft=jax.nn.one_hot(jnp.full((B,), fill), V, dtype=dtype),
        key=jax.random.key(0) if key is None else key,
        num_calls=jnp.int32(0),
        accepted=jnp.zeros((N,), jnp.int32),
        trajectory=(
            jnp.zeros((max_sweeps, N), prompt.dtype) if return_trajectory else None
        ),
        nonfinite=jnp.bool_(False),
    )

    def cond(state):
        going = (state.start < N) & (state.num_calls < max_sweeps)
        return going & ~state.nonfinite

    def body(state):
        tokens = jnp.concatenate([prompt, state.gen[:N]])
        logits = jnp.pad(logits_fn(tokens), ((0, B), (0, 0)))
        row = P - 1 + state.start
        window = jax.lax.dynamic_slice(logits, (row, jnp.zeros_like(row)), (B, V))
        guess = jax.lax.dynamic_slice(state.gen, (state.start,), (B,))
        valid = state.start + jnp.arange(B, dtype=jnp.int32) < N
        if greedy:
            new, draft, key = _greedy(window, guess, valid, state)
        else:
            new, draft, key = _speculative(window, guess, valid, state, temperature)
        if return_trajectory:
            seen = state.trajectory.at[state.num_calls].set(state.gen[:N])
            state = state._replace(trajectory=seen)
        # NaN logits would accept every guess (no comparison with NaN rejects):
        # stop instead, keeping what was accepted before, and report it.
        bad = jnp.any(valid[:, None] & ~jnp.isfinite(window))
        after = _advance(state, new, draft, key, N)
        kept = state._replace(num_calls=state.num_calls + 1)
        return jax.tree_util.tree_map(
            lambda a, b: jnp.where(bad, a, b), kept, after
        )._replace(nonfinite=bad)

    state = jax.lax.while_loop(cond, body, state)
    tokens = state.gen[:N]
    trajectory = None
    if return_trajectory:
        assert state.trajectory is not None  # allocated when return_trajectory
        done = jnp.arange(max_sweeps, dtype=jnp.int32) >= state.num_calls
        trajectory = jnp.where(done[:, None], tokens, state.trajectory)
    converged = (state.start >= N) & ~state.nonfinite
    stats = DecodeStats(
        state.num_calls, state.accepted, converged, trajectory, state.nonfinite
    )
    return tokens, stats


def _greedy(logits, guess, valid, state):
    """New window tokens, their (point-mass) drafts, and the number proven."""
    new = jnp.argmax(logits, axis=-1).astype(guess.dtype)
    return (new, _first(valid & (new != guess))), state.draft, state.key


def _speculative(logits, guess, valid, state, temperature):
    """Speculative sampling at every window position (see `jacobi_decode`)."""
    B = guess.shape[0]
    key, k_test, k_fix, k_redraw = jax.random.split(state.key, 4)
    p = jax.nn.softmax(logits / jnp.asarray(temperature, logits.dtype), axis=-1)
    q = state.draft
    rows = jnp.arange(B, dtype=jnp.int32)
    p_x, q_x = p[rows, guess], q[rows, guess]
    u = jax.random.uniform(k_test, (B,), p.dtype)
    m = _first(valid & (u * q_x > p_x))  # first rejected guess
    excess = jnp.maximum(p[m] - q[m], 0)
    total = jnp.sum(excess)
    # p = q exactly would have been accepted; the guard keeps the draw finite.
    excess = jnp.where(total > 0, excess / jnp.where(total > 0, total, 1), p[m])
    fixed = jax.random.categorical(k_fix, jnp.log(excess)).astype(guess.dtype)
    redraw = jax.random.categorical(k_redraw, jnp.log(p), axis=-1).astype(guess.dtype)
    new = jnp.where(rows < m, guess, jnp.where(rows == m, fixed, redraw))
    draft = jnp.where((rows > m)[:, None], p, q)
    return (new, m), draft, key


def _first(flags):
    """Index of the first True in `flags`, or len(flags) when there is none."""
    first = jnp.argmax(flags).astype(jnp.int32)
    return jnp.where(jnp.any(flags), first, jnp.int32(flags.shape[0]))


def _advance(state, new_and_m, draft, key, N):
    """Write the window back, accept m + 1 tokens and slide the window past them.

    The positions entering the window start as copies of its last token, drafted
    from a point mass there.
    """
    new, m = new_and_m
    B = new.shape[0]
    n = jnp.minimum(m + 1, jnp.minimum(B, N - state.start))
    gen = jax.lax.dynamic_update_slice(state.gen, new, (state.start,))
    gen = jax.lax.dynamic_update_slice(gen, jnp.full((B,), new[-1]), (state.start + B,))
    rows = jnp.arange(B, dtype=jnp.int32)
    kept = jnp.take(draft, jnp.minimum(rows + n, B - 1), axis=0)
    point = jax.nn.one_hot(new[-1], draft.shape[1], dtype=draft.dtype)
    draft = jnp.where((rows < B - n)[:, None], kept, point)
    return state._replace(
        gen=gen,
        start=state.start + n,
        draft=draft,
        key=key,
        num_calls=state.num_calls + 1,
        accepted=state.accepted.at[state.num_calls].set(n),
    )


def _buffer(prompt, N, fill):
    return jnp.concatenate([prompt, jnp.full((N,), fill, prompt.dtype)])


def _check_call(
    logits_fn, prompt, num_tokens, block_size, temperature, key, max_sweeps, context
):
    """Validate the arguments; return (prompt length, N, window size, vocab)."""
    owner = "jacobi_decode"
    if prompt.ndim != 1 or not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise ValueError(
            f"{owner}: `prompt` must be a 1-D int array of tokens, got shape "
            f"{prompt.shape} and dtype {prompt.dtype} (vmap over a batch of prompts)"
        )
    P = prompt.shape[0]
    if P < 1:
        raise ValueError(f"{owner}: `prompt` must hold at least one token")
    check_int(owner, "num_tokens", num_tokens, 1)
    check_int(owner, "block_size", block_size, 1)
    if max_sweeps is not None:
        check_int(owner, "max_sweeps", max_sweeps, 1)
    check_range(owner, "temperature", temperature, lo=0.0)
    if concrete_number(temperature) is None:
        raise ValueError(
            f"{owner}: `temperature` must be a Python number (0 selects greedy "
            f"decoding at trace time), got a traced value"
        )
    if temperature > 0 and key is None:
        raise ValueError(f"{owner}: sampling (temperature > 0) needs a PRNG `key`")
    if context is not None:
        check_int(owner, "context", context, 1)
        if P > context:
            raise ValueError(
                f"{owner}: the prompt ({P} tokens) is longer than the context "
                f"({context})"
            )
        if P + num_tokens > context:
            raise ValueError(
                f"{owner}: prompt + num_tokens = {P} + {num_tokens} exceeds the "
                f"context ({context}); generate at most {context - P} tokens"
            )
    L = P + num_tokens
    out = jax.eval_shape(logits_fn, _buffer(prompt, num_tokens, prompt[-1]))
    if (
        not isinstance(out, jax.ShapeDtypeStruct)
        or len(out.shape) != 2
        or out.shape[0] != L
        or not jnp.issubdtype(out.dtype, jnp.floating)
    ):
        got = getattr(out, "shape", type(out).__name__)
        raise ValueError(
            f"{owner}: `logits_fn` must map int tokens [L] to float logits "
            f"[L, vocab]; for L = {L} it returned {got}"
            + (f" of dtype {out.dtype}" if hasattr(out, "dtype") else "")
        )
    return P, num_tokens, min(block_size, num_tokens), out.shape[1]
