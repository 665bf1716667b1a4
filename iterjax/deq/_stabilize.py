"""Stabilisers for training DEQs: a Jacobian penalty and fixed-point correction.

Both take the cell as a function of z alone, `fn(z) -> z` (close over x and the
parameters: `lambda z: cell(z, x)`), so they work for any pytree z and any cell.
"""

import jax
import jax.numpy as jnp

from .. import _tree as tu
from .._checks import check_inexact, check_int, check_range, check_same_structure


def _check_fn(owner, fn, z):
    if not callable(fn):
        raise TypeError(f"{owner}: `fn` must be callable, got {type(fn).__name__}")
    check_inexact(owner, "z", z)
    check_same_structure(owner, "fn(z)", jax.eval_shape(fn, z), tu.tree_structs(z), "z")


def jacobian_penalty(fn, z, key, *, num_samples: int = 1):
    r"""Hutchinson estimate of ||∂fn/∂z||_F² at z (Bai et al. 2021).

    With J = ∂fn/∂z and v ~ N(0, I), E ||J v||² = tr(JᵀJ) = ||J||_F², so

        penalty = (1/S) Σ_s ||J v_s||²,   S = num_samples,

    an unbiased estimate whose variance is 2 ||JᵀJ||_F² / S. Each sample costs one
    Jacobian-vector product (forward mode; differentiable, so the penalty can be a
    loss term: gradients reach whatever `fn` closes over). Adding γ·penalty/dim(z)
    to the training loss keeps the DEQ's fixed point well conditioned and its
    solver steps low.

    Args:
      fn: `fn(z) -> z`, the cell at fixed input and parameters.
      z: the point, usually the (stop-gradient) fixed point; a pytree of real float
        arrays. For a batch, vmap over it, or pass the batched z when the cell acts
        row-wise: the Frobenius norm of the block-diagonal Jacobian is the sum of
        the per-example norms.
      key: a `jax.random` key (`jax.random.key` or a raw `PRNGKey`).
      num_samples: S >= 1.

    Returns:
      A scalar of z's dtype.

    Examples:
      >>> import jax, jax.numpy as jnp, iterjax
      >>> W = jnp.array([[0.5, 0.0], [0.0, 0.5]])
      >>> p = iterjax.deq.jacobian_penalty(lambda z: W @ z, jnp.zeros(2),
      ...                                  jax.random.key(0), num_samples=20000)
      >>> round(float(p), 1)  # exact: 0.5² + 0.5² = 0.5
      0.5
    """
    _check_fn("jacobian_penalty", fn, z)
    check_int("jacobian_penalty", "num_samples", num_samples, 1)
    leaves, treedef = jax.tree.flatten(z)
    for leaf in leaves:
        if jnp.iscomplexobj(leaf):
            raise TypeError("jacobian_penalty: z must be real; got a complex leaf")
    keys = jax.random.split(key, (num_samples, len(leaves)))  # typed or raw keys

    def sample(keys):
        v = [jax.random.normal(k, jnp.shape(x), x.dtype) for k, x in zip(keys, leaves)]
        jv = jax.jvp(fn, (z,), (jax.tree.unflatten(treedef, v),))[1]
        return tu.tree_vdot(jv, jv)

    return jnp.mean(jax.vmap(sample)(keys))


def fixed_point_correction(fn, z, *, steps: int = 3, damping: float = 1.0):
    r"""States for fixed-point-correction training (Bai, Geng & Koltun 2022).

    From z_0 = stop_gradient(z) (z: the solver's answer) take damped steps

        z_{i+1} = (1 - λ) z_i + λ fn(z_i),   i = 0 .. steps-1,

    and return z_1 .. z_k stacked on a new leading axis. The gradient of a loss at
    z_i is the i-step phantom gradient (Geng et al. 2021), which needs no linear
    solve and no Jacobian inverse. Training on Σ_i γ^{k-i} loss(z_i) (γ ≈ 0.8)
    supervises the states as they approach z*, which the DEQ-Flow paper reports
    stabilises training and lowers solver steps; with steps=1, λ=1 it is
    Jacobian-free backpropagation (Fung et al. 2022). (DEQ-Flow also samples states
    from early in the solver path; here the corrections start at the solver's
    answer, which is the same when the solve has converged.)

    Args:
      fn: `fn(z) -> z`, the cell at fixed input and parameters.
      z: the solver's answer (any pytree with fn's structure).
      steps: k >= 1.
      damping: λ in (0, 1].

    Returns:
      A pytree like z whose leaves have a new leading axis of length k.

    Examples:
      >>> import jax.numpy as jnp, iterjax
      >>> zs = iterjax.deq.fixed_point_correction(lambda z: 0.5 * z + 1.0,
      ...                                         jnp.array([2.0]), steps=2)
      >>> zs.shape  # z* = 2 is a fixed point: every state equals it
      (2, 1)
    """
    _check_fn("fixed_point_correction", fn, z)
    check_int("fixed_point_correction", "steps", steps, 1)
    check_range("fixed_point_correction", "damping", damping, 0.0, 1.0, lo_open=True)

    def step(zi, _):
        znext = tu.tree_lerp(damping, zi, fn(zi))
        return znext, znext

    return jax.lax.scan(step, jax.lax.stop_gradient(z), length=steps)[1]
