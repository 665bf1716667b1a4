"""iterjax.diagnostics' timers, on a fake clock (what they report is what the
calls took), and its compiled-memory numbers."""

import jax
import jax.numpy as jnp
import pytest

import iterjax as ij
import iterjax.diagnostics as diagnostics


@pytest.fixture
def clock(monkeypatch):
    """A clock that only the calls advance: `tick(seconds)` inside a call."""
    now = [0.0]
    monkeypatch.setattr(diagnostics.time, "perf_counter", lambda: now[0])

    def tick(seconds):
        now[0] += seconds

    return tick


def test_timings_report_the_median_and_quartiles_after_a_warm_up(clock):
    took = iter([2.0, 0.005, 0.001, 0.004, 0.002, 0.003])  # warm-up, then 5 runs
    calls = {"f": (lambda: clock(next(took)), ())}
    t = diagnostics.timings(calls, rounds=5)["f"]
    assert (t.rounds, t.compile) == (5, None)  # not a jitted function
    assert (t.q1, t.median, t.q3) == pytest.approx((2.0, 3.0, 4.0))
    assert str(t) == "3 [2, 4]"
    took = iter([2.0, 0.005, 0.001, 0.004, 0.002, 0.003])
    assert diagnostics.time_calls(calls, rounds=5) == {"f": pytest.approx(3.0)}


def test_a_jitted_functions_compilation_is_timed_apart():
    compiled = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, secs, **_: (
            compiled.append(event)
            if event == "/jax/core/compile/backend_compile_duration"
            else None
        )
    )
    f = jax.jit(lambda x: x + 1)
    f(1.0)  # already compiled: a cache hit would hide the compile time
    compiled.clear()
    t = diagnostics.timings({"f": (f, (1.0,))}, rounds=5)["f"]
    assert len(compiled) == 1 and t.compile > 0


def test_every_call_is_timed_round_robin(clock):
    seen = []
    calls = {k: (lambda k=k: seen.append(k), ()) for k in "abc"}
    out = diagnostics.timings(calls, rounds=6)
    assert set(out) == set("abc") and seen[:3] == list("abc")
    rounds = [seen[3 + 3 * i : 6 + 3 * i] for i in range(6)]
    assert all(sorted(r) == list("abc") for r in rounds)
    assert len({tuple(r) for r in rounds}) > 1  # a fresh order each round


@pytest.mark.parametrize("rounds", [4, 5.0, True])
def test_timings_need_five_rounds(rounds):
    with pytest.raises(ValueError, match="timings: `rounds` must be an int >= 5"):
        diagnostics.timings({}, rounds)


def test_eval_counter_counts_every_element_under_vmap():
    counter = diagnostics.EvalCounter(lambda y, a: jnp.cos(y) * a)
    a = jnp.linspace(0.1, 0.5, 4)
    for solver in [ij.Picard(), ij.Anderson()]:
        # y0 is not batched, only a: each element still counts
        solve = lambda a, s=solver: (
            ij.fixed_point(counter.fn, jnp.array(1.0), a, solver=s).num_steps
        )
        counter.reset()
        steps = int(jax.jit(solve)(0.5))
        assert counter.read()["f"] == steps + 1
        counter.reset()
        steps = jax.jit(jax.vmap(solve))(a)
        # every lane is evaluated at each of the slowest lane's steps + 1
        # evaluations (the finished lanes are computed, then masked)
        assert len(set(steps.tolist())) > 1
        assert counter.read()["f"] == a.size * (int(steps.max()) + 1)


def test_compiled_memory_of_a_function_and_of_its_compiled_program_agree():
    from iterjax.diagnostics import compiled_memory, executable_memory

    f = lambda x: jnp.cumsum(jnp.outer(x, x), axis=0)
    x = jnp.ones(64)
    mine = executable_memory(jax.jit(f).lower(x).compile())
    assert mine == compiled_memory(f, x)
    # the output alone (64 x 64 float64) is in the total
    assert mine["total"] >= 64 * 64 * 8 + 64 * 8 and mine["temp"] >= 0
