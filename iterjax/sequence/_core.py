"""The one core behind every parallel-in-time method.

A recurrence s_t = f(s_{t-1}, x_t), t = 1..T, from a fixed s_0, is the fixed point of
the trajectory map

    F(X)_t = f(X_{t-1}, x_t),   X = (s_1, ..., s_T),  X_0 := s_0.

Every method takes sweeps of one update rule,

    X^{k+1}_t = f(X^k_{t-1}, x_t) + A_t (X^{k+1}_{t-1} - X^k_{t-1}),

solved for the correction δ = X^{k+1} - X^k as the linear recurrence

    δ_t = A_t δ_{t-1} + r_t,    r_t = f(X^k_{t-1}, x_t) - X^k_t,   δ_0 = 0,

with `jax.lax.associative_scan` (depth O(log T)). Only A_t differs: 0 (Jacobi),
I (Picard), diag J_t (quasi-Newton), J_t = ∂f/∂s at X^k_{t-1} (Newton, DEER).

Guarantees of the core, whatever A_t is:

* Acceptance (the stopping rule). A position is accepted only when its whole
  prefix is accepted and its value was tested as it stays: its residual
  r_t = f(X_{t-1}, x_t) - X_t against its accepted predecessor passes
  |r_t| <= atol + rtol |X_t| (or it is f of its accepted predecessor, exact).
  So a converged trajectory is lax.scan's trajectory of f perturbed by at most
  the tolerance at each step, whatever the method. A position also needs the
  method's error estimate |δ_t| <= atol + rtol |X_t|, δ the correction of the
  sweep: the residual alone does not bound the error where the recurrence
  amplifies (e_t = Σ_s J_t...J_{s+1} r_s grows along t while every r_s is
  small); for DEER (A_t = J_t) δ is that error to first order, amplification
  included, the papers' own test |X^{k+1} - X^k| <= tol. A position that passes
  both takes its update (X^{k+1}, as those loops return) and becomes a
  candidate: the next sweep accepts it once its residual at the new value (and
  its predecessors) passes too. Positions that pass without moving (δ_t = 0)
  need no second test. When only candidates are left, a sweep evaluates f alone
  (no A_t, no scan): the papers' loops stop one evaluation of f earlier,
  without testing what they return.
* Frozen prefix. Accepted positions never change again (their r is set to 0,
  so δ is exactly 0 there). The first position after them, p, gets
  X_p = f(X_{p-1}, x_p) (f's own value, bitwise) from its accepted predecessor,
  so it is exact and accepted whatever its residual: every sweep accepts at
  least one more position, and every method is exact after at most T sweeps;
  with atol = 0 the result is bitwise f's own values along the trajectory.
* ParaDiGMS's rule (opt-in, `scan(..., acceptance="paradigms")`). A position
  passes on its update alone (|δ_t| <= atol + rtol |X_t|, the loop's
  |X^{k+1} - X^k| test), and a sweep also accepts, untested and with its
  update, the first position after the prefix that passed: its predecessors
  passed, so its new value is f of values within tolerance (to the method's
  accuracy). The window slides one position further per sweep, about one
  evaluation fewer per sweep; in exchange, "converged" bounds neither the
  residuals nor that last position's update.
* Sliding window (`window=W`, ParaDiGMS). A sweep evaluates and updates only the
  W positions from the first unaccepted one; later positions take the window's
  last value (a better guess than s_0). Work and memory per sweep are O(W), and
  the window slides as far as the prefix is accepted.
* No garbage. A position whose update is not finite (a diverging Newton step, an
  overflowing Jacobian) falls back to the Jacobi update f(X^k_{t-1}, x_t), or keeps
  its value when that is not finite either; the number of sweeps with a fallback is
  reported. Non-finite residuals past p are reported as the largest
  float, so that only a non-finite residual at a frozen predecessor (a genuine
  NaN or inf of f) stops the solve as diverged; that position then holds f's
  non-finite value and every later one NaN (`non_finite_tail`), as lax.scan's
  would be non-finite from there on, never a finite guess.

One sweep evaluates f (and A_t) at the current iterate, then updates it, so the
number of sweeps is the number of parallel evaluations of f. The sweeps run on
the fixed-point driver (`iterative_solve`), so stopping rules,
`vmap` with per-element sweep counts and residual traces come from there.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .. import _struct as struct
from .. import _tree as tu
from .._checks import check_int
from .._iterate import AbstractFixedPointSolver
from .._module import Module
from .._types import Array, Bool, Float, Int, PyTree


class AbstractSequenceMethod(Module):
    """How `iterjax.scan` solves a recurrence: the choice of A_t in the core update.

    Subclasses override `linearize` to choose A_t, or `sweep` for updates that are
    not a linear recurrence (`GaussSeidel`, `ELK`).

    Attributes:
      window: sweep only this many positions at a time, from the first unaccepted
        one (a sliding window, as in ParaDiGMS); positions past the window take
        the window's last value. Bounds the work and memory of one sweep (DEER's
        Jacobians are (window, D, D)); None (default) sweeps the whole sequence.
      mesh: a `jax.sharding.Mesh` to shard the time axis over (all its axes, in
        order): every device holds T / devices positions, evaluates f there, and
        the associative scan runs per device with one cross-device combine of the
        devices' totals. T must be divisible by the mesh size. With a `window`,
        the window is what is split (it must be divisible by the mesh size too):
        the devices share its evaluations, Jacobians and scan, and each sweep
        gathers the (T, D) trajectory to slice the window out and put it back.
      jacobian_every: lazy Jacobians (Shamanskii 1967; Doikov, Chayti & Jaggi
        2023, "Second-order optimization with lazy Hessians"): compute A_t on
        sweeps 0, d, 2d, ... and reuse them in between, where a sweep evaluates f
        alone. d = 1 (default) linearises every sweep. Fewer Jacobian evaluations
        for a few more sweeps; still exact after T sweeps. The A_t of the whole
        sequence are carried between sweeps, so it needs `window=None`. Under
        `vmap` both branches of the choice run, so it saves work only unbatched.
    """

    window: int | None = struct.field(pytree_node=False, default=None, kw_only=True)
    mesh: Mesh | None = struct.field(pytree_node=False, default=None, kw_only=True)
    jacobian_every: int = struct.field(pytree_node=False, default=1, kw_only=True)

    def __post_init__(self):
        name = type(self).__name__
        check_int(name, "jacobian_every", self.jacobian_every, 1)
        if self.jacobian_every > 1 and self.window is not None:
            raise ValueError(
                f"{name}: `jacobian_every` > 1 carries every A_t between sweeps; "
                "it does not combine with a sliding `window`"
            )
        if self.window is not None:
            check_int(name, "window", self.window, 1)
        if self.mesh is not None:
            if not isinstance(self.mesh, Mesh):
                raise TypeError(
                    f"{name}: `mesh` must be a jax.sharding.Mesh, got {self.mesh!r}"
                )
            if self.window is not None and self.window % self.mesh.size:
                raise ValueError(
                    f"{name}: `window`={self.window} must be divisible by the "
                    f"{self.mesh.size} devices of `mesh`"
                )

    def linearize(self, cell, prev, xs):
        """`(f(prev_t, x_t), A_t)` for every t: A is None (zero, the default), (T, D)
        diagonal or (T, D, D) dense."""
        return jax.vmap(cell)(prev, xs), None

    def sweep(self, cell, s0, X, xs, r, A, frozen):
        """The correction δ of one sweep, given the residual r (zero on the frozen
        prefix) and the A_t of `linearize`."""
        return linear_recurrence(A, r, self.mesh)

    def exact_on_linear(self) -> bool:
        """Whether the A_t of `linearize` are a linear recurrence's own matrices
        (Newton), so that one `linear_recurrence` solves it: the gradient's
        adjoint recurrence then takes one scan instead of sweeps."""
        return False


def shift(X, s0, mesh=None):
    """The predecessors (s_0, s_1, ..., s_{T-1}) of X = (s_1, ..., s_T).

    With a `mesh` (time axis split over its devices) each device passes its last
    row to the next one (a neighbour exchange), instead of gathering X.
    """
    if mesh is None:
        return jnp.concatenate([s0[None], X[:-1]], axis=0)
    axes = tuple(mesh.axis_names)
    n = mesh.size

    def local(X, s0):
        last = jax.lax.ppermute(X[-1], axes, [(i, i + 1) for i in range(n - 1)])
        first = jnp.where(jax.lax.axis_index(axes) == 0, s0, last)
        return jnp.concatenate([first[None], X[:-1]], axis=0)

    spec = P(axes)
    return jax.shard_map(
        local, mesh=auto_mesh(mesh), in_specs=(spec, P()), out_specs=spec
    )(X, s0)


def _diag_combine(earlier, later):
    a1, b1 = earlier
    a2, b2 = later
    return a2 * a1, a2 * b1 + b2


def _dense_combine(earlier, later):
    a1, b1 = earlier
    a2, b2 = later
    return a2 @ a1, jnp.einsum("...ij,...j->...i", a2, b1) + b2


def prefix_scan(combine, elems, mesh=None):
    """Every prefix composition of `elems` along the time axis, as
    `jax.lax.associative_scan(combine, elems)` (depth O(log T)).

    With a `mesh`, the time axis is split over its devices: each device scans its
    chunk, the chunks' totals are all-gathered and scanned (one element per
    device), and device i composes the total of the devices before it into each
    of its prefixes. The sequence itself never leaves its device.
    """
    if mesh is None:
        return jax.lax.associative_scan(combine, elems)
    axes = tuple(mesh.axis_names)
    tmap = jax.tree_util.tree_map

    def local(elems):
        pre = jax.lax.associative_scan(combine, elems)
        ends = jax.lax.associative_scan(
            combine, jax.lax.all_gather(tmap(lambda a: a[-1], pre), axes)
        )
        i = jax.lax.axis_index(axes)
        before = tmap(
            lambda e, p: jnp.broadcast_to(e[jnp.maximum(i - 1, 0)], p.shape), ends, pre
        )
        return tmap(lambda c, p: jnp.where(i > 0, c, p), combine(before, pre), pre)

    spec = P(axes)
    return jax.shard_map(local, mesh=auto_mesh(mesh), in_specs=(spec,), out_specs=spec)(
        elems
    )


def linear_recurrence(A, b, mesh=None):
    """δ_t = A_t δ_{t-1} + b_t from δ_0 = 0, for all t at once.

    `A` is None (δ = b), an array shaped like `b` (diagonal A_t) or with one more
    trailing axis (dense A_t). Composition of the affine maps δ -> A δ + b is
    associative, so `prefix_scan` solves it in O(log T) depth (over the devices
    of `mesh`, if given).
    """
    if A is None:
        return b
    combine = _diag_combine if A.ndim == b.ndim else _dense_combine
    return prefix_scan(combine, (A, b), mesh)[1]


def shard_time(tree, mesh):
    """Constrain the leading (time) axis of every leaf to be split over `mesh`."""
    if mesh is None:
        return tree
    sharding = NamedSharding(auto_mesh(mesh), P(tuple(mesh.axis_names)))
    put = lambda a: jax.lax.with_sharding_constraint(a, sharding)
    return jax.tree_util.tree_map(put, tree)


def auto_mesh(mesh):
    """`mesh` with every axis in Auto mode: the sweeps slice the time axis by one
    position and cut it into blocks (Gauss-Seidel), which Explicit-mode sharding
    rules reject; in Auto mode XLA's partitioner places those ops."""
    auto = (AxisType.Auto,) * len(mesh.axis_names)
    return Mesh(mesh.devices, mesh.axis_names, axis_types=auto)


def non_finite_tail(X, mesh=None):
    """X with every position after its first non-finite one set to NaN: where f
    produced a NaN or inf, lax.scan's later states are not finite either, and the
    sweeps (stopped there) have only guesses for them."""
    bad = ~jnp.all(jnp.isfinite(X), axis=-1)
    after = (count_upto(bad, mesh) - bad.astype(jnp.int32)) > 0
    return jnp.where(after[:, None], jnp.nan, X)


def position_ok(r, X, atol, rtol):
    """Per position t: |r_t| <= atol + rtol |X_t| in every component."""
    bound = atol + rtol * jnp.abs(X)
    return jnp.all(jnp.abs(r) <= bound, axis=-1)


def count_upto(flags, mesh=None):
    """For every t, how many of flags_1..flags_t are set (a cumulative sum, over
    the devices of `mesh` by `prefix_scan`, so the flags are never gathered)."""
    flags = flags.astype(jnp.int32)
    if mesh is None:
        return jnp.cumsum(flags)
    return prefix_scan(jnp.add, flags, mesh)


class SweepState(NamedTuple):
    residual: Float[
        Array, "T D"
    ]  # max(|r_t|, |δ_t|) where known, else the largest float
    accepted: Int[Array, ""]  # length of the accepted prefix
    fallbacks: Int[Array, ""]  # sweeps in which some position fell back
    jacobians: Int[Array, ""]  # sweeps that computed A_t
    A: PyTree  # the A_t of the last linearisation (lazy Jacobians), else None
    sweeps: Int[Array, ""]  # sweeps taken
    sizes: Float[Array, "2 2"]  # [max |r_t|, max |δ_t|] over the accepted
    # positions (as accepted), then over those and the last sweep's others
    evaluations: Int[Array, ""]  # f evaluations at positions not yet accepted
    candidates: Bool[Array, " T"]  # passed both tests last sweep and took
    # that sweep's update: accepted once their residual passes again


class Sweeps(AbstractFixedPointSolver):
    """Adapter running an `AbstractSequenceMethod` on the fixed-point driver.

    The driver's `fn` is the flat cell `cell(h, x, consts) -> h` and its `args` are
    `(s0, xs, consts)`. One step is one sweep: evaluate f (and A_t) on the window
    at the current iterate, solve for the correction, accept (module docstring),
    update. The driver sees, per position, max(|r_t|, |δ_t|) of the sweep that
    accepted it (0 where exact), or of the last sweep if none did, so its test
    is acceptance; positions never evaluated at their current value report the
    largest float.
    """

    method: AbstractSequenceMethod
    atol: float
    rtol: float
    paradigms: bool = struct.field(pytree_node=False, default=False)

    def summary(self, state):
        return {
            "fallbacks": state.fallbacks,
            "jacobians": state.jacobians,
            "residual": state.sizes[1, 0],
            "update": state.sizes[1, 1],
            "evaluations": state.evaluations,
        }

    def init(self, fn, y0, args):
        big = jnp.finfo(y0.dtype).max
        A = None
        if self.method.jacobian_every > 1:
            s0, xs, consts = args
            cell = lambda h, x: fn(h, x, consts)
            shape = jax.eval_shape(lambda: self.method.linearize(cell, y0, xs)[1])
            A = None if shape is None else jnp.zeros(shape.shape, shape.dtype)
        zero = jnp.int32(0)
        sizes = jnp.stack([jnp.zeros(2, y0.dtype), jnp.full(2, big, y0.dtype)])
        unknown = jnp.full(y0.shape, big)
        none = jnp.zeros(y0.shape[:1], bool)
        return SweepState(unknown, zero, zero, zero, A, zero, sizes, zero, none)

    def _linearize(self, cell, prev, xw, state):
        """`(f, A, computed)`: fresh A_t on every `jacobian_every`-th sweep, else the
        carried ones with f alone."""
        if state.A is None:
            fx, A = self.method.linearize(cell, prev, xw)
            return fx, A, jnp.bool_(A is not None)
        fresh = (state.sweeps % self.method.jacobian_every) == 0
        fx, A = jax.lax.cond(
            fresh,
            lambda: self.method.linearize(cell, prev, xw),
            lambda: (jax.vmap(cell)(prev, xw), state.A),
        )
        return fx, A, fresh

    def step(self, fn, y, args, state):
        s0, xs, consts = args
        cell = lambda h, x: fn(h, x, consts)
        mesh = self.method.mesh
        T = y.shape[0]
        W = T if self.method.window is None else min(self.method.window, T)
        start = jnp.minimum(state.accepted, T - W)
        if W == T:  # static: no slicing (and no gathering of a sharded axis)
            window = lambda a: a
        else:
            window = lambda a: jax.lax.dynamic_slice_in_dim(a, start, W)
        X, prev = window(y), window(shift(y, s0, mesh))
        xw = jax.tree_util.tree_map(window, xs)
        index = start + jnp.arange(W, dtype=jnp.int32)
        candidates = window(state.candidates)
        if W < T:  # the devices of the mesh share the window
            X, prev, xw, index = shard_time((X, prev, xw, index), mesh)
        kept = index < state.accepted  # accepted by earlier sweeps: never change

        big = jnp.finfo(X.dtype).max

        def residual(fx):
            # Past the first position with a large residual, a non-finite one is
            # an artefact of a bad iterate, not of f: make it large but finite.
            r = fx - X
            r_ok = position_ok(r, X, self.atol, self.rtol)
            bad = (count_upto(~r_ok, mesh) > 1)[:, None] & ~jnp.isfinite(r)
            return jnp.where(bad, big, r), r_ok

        def prefix(ok):
            return start + jnp.sum(count_upto(~ok, mesh) == 0, dtype=jnp.int32)

        def verifying(candidates, r_ok):
            return index < prefix(kept | (candidates & r_ok))

        def full():
            fx, A, computed = self._linearize(cell, prev, xw, state)
            r, r_ok = residual(fx)
            frozen = kept if self.paradigms else verifying(candidates, r_ok)
            r_free = jnp.where(frozen[:, None], 0, r)
            delta = self.method.sweep(cell, prev[0], X, xw, r_free, A, frozen)
            return fx, r, r_ok, delta, None if state.A is None else A, computed

        def evaluate():  # every pending position took a tested update: test it
            fx = jax.vmap(cell)(prev, xw)
            r, r_ok = residual(fx)
            return fx, r, r_ok, jnp.zeros_like(fx), state.A, jnp.bool_(False)

        if self.paradigms:
            fx, r, r_ok, delta, A, computed = full()
        else:
            light = jnp.all(kept | candidates)
            fx, r, r_ok, delta, A, computed = jax.lax.cond(light, evaluate, full)

        if self.paradigms:
            # ParaDiGMS's loop: the prefix whose update passes takes it, and so
            # does the position after it, untested (recorded as exact)
            d_ok = position_ok(delta, X, self.atol, self.rtol)
            first = index == state.accepted
            exact = first & jnp.all(jnp.isfinite(fx), axis=-1)
            accepted = prefix(kept | d_ok)
            new, fine = self._update(X, r, delta, fx, first, kept)
            nxt = (index == accepted) & jnp.all(jnp.isfinite(new), axis=-1)
            accepted = accepted + jnp.sum(nxt, dtype=jnp.int32)
            at_zero, untested = first, nxt
            candidates = jnp.zeros_like(kept)
            measured = jnp.ones_like(kept)  # (the update alone, below)
        else:
            # Accepted are: the candidates of the last sweep whose residual passes
            # now (their values, tested as they stay); then positions that pass
            # both tests and that this sweep does not move; then the position
            # after those, f of accepted values, so exact (unless f is not finite
            # there: the solve then stops, as lax.scan's trajectory is not finite
            # from there on). The others are stepped from the accepted prefix, and
            # those that pass both tests become candidates: their update is
            # tested (its residual) by the next sweep before it is accepted.
            verified = verifying(candidates, r_ok)
            passed = r_ok & position_ok(delta, X, self.atol, self.rtol)
            still = passed & jnp.all(delta == 0, axis=-1)
            tested = prefix(verified | still)
            at_zero = index == tested
            exact = at_zero & jnp.all(jnp.isfinite(fx), axis=-1)
            accepted = tested + jnp.sum(exact, dtype=jnp.int32)
            new, fine = self._update(X, r, delta, fx, at_zero, index < tested)
            candidates = passed & (index > tested)
            untested = jnp.zeros_like(kept)
            measured = ~verified | kept  # verified now: residual only

        # Per position, what the stopping test reads: this sweep's |r_t| and
        # |δ_t| (the update alone under ParaDiGMS's rule), 0 where exact; as
        # recorded when accepted, for kept positions.
        res = jnp.where(jnp.isfinite(r), jnp.abs(r), big)
        res = jnp.where(
            at_zero[:, None], jnp.where(exact[:, None], 0, jnp.abs(fx)), res
        )
        upd = jnp.where(jnp.isfinite(delta), jnp.abs(delta), big)
        upd = jnp.where((at_zero | ~measured)[:, None], 0, upd)
        if self.paradigms:
            tested_size = jnp.where(at_zero[:, None], res, upd)
        else:
            tested_size = jnp.maximum(res, upd)
        measure = jnp.where(untested[:, None], 0, tested_size)
        # A position not accepted never passes the driver's test, whatever its
        # own sizes (measured against a predecessor that may have moved): the
        # driver's "converged" is "every position accepted".
        pending = (index >= accepted)[:, None]
        bound = self.atol + self.rtol * jnp.abs(new)
        # (above the bound by a normal number: XLA flushes subnormals to zero)
        failing = jnp.maximum(measure, 2 * bound + jnp.finfo(bound.dtype).tiny)
        measure = jnp.where(pending, failing, measure)
        # Largest residual and update over the accepted positions and the
        # candidates (as they were when they passed: a running maximum), then
        # over those and this sweep's others.
        newly = (((index < accepted) & ~kept & ~untested) | candidates)[:, None]

        def top(mask):
            sizes = [tu.nan_safe_max(jnp.where(mask, x, 0)) for x in (res, upd)]
            return jnp.stack(sizes)

        settled = jnp.maximum(state.sizes[0], top(newly))
        others = top(~newly & ~(kept | untested)[:, None])
        sizes = jnp.stack([settled, jnp.maximum(settled, others)])
        if W == T:
            y_new = new
            residual = jnp.where(kept[:, None], state.residual, measure)
            candidates_all = candidates
        else:
            put = lambda a, b: jax.lax.dynamic_update_slice_in_dim(a, b, start, 0)
            past = jnp.arange(T, dtype=jnp.int32) >= start + W
            y_new = jnp.where(past[:, None], new[-1], put(y, new))
            old = window(state.residual)
            measure = jnp.where(kept[:, None], old, measure)
            residual = jnp.where(past[:, None], big, put(state.residual, measure))
            candidates_all = put(state.candidates, candidates) & ~past
        fallbacks = state.fallbacks + jnp.any(~fine).astype(jnp.int32)
        jacobians = state.jacobians + computed.astype(jnp.int32)
        y_new, residual = shard_time((y_new, residual), mesh)
        A = None if state.A is None else A
        evaluations = state.evaluations + jnp.sum(~kept, dtype=jnp.int32)
        return y_new, SweepState(
            residual,
            accepted,
            fallbacks,
            jacobians,
            A,
            state.sweeps + 1,
            sizes,
            evaluations,
            candidates_all,
        )

    @staticmethod
    def _update(X, r, delta, fx, exact, keep):
        """`(new, fine)`: X + δ, with the Jacobi update f(X_{t-1}) where that is
        not finite (X where neither is; `fine` says where it is finite); f's own
        value at `exact` (bitwise, not X + r); X at `keep`."""
        big = jnp.finfo(r.dtype).max
        new = X + delta
        fine = jnp.all(jnp.isfinite(new), axis=-1)
        jacobi = jnp.where(jnp.abs(r) < big, X + r, X)
        new = jnp.where(fine[:, None], new, jacobi)
        new = jnp.where(exact[:, None], fx, new)
        return jnp.where(keep[:, None], X, new), fine
