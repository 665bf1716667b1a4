"""Preconditioners for the Krylov solvers: M ≈ A^{-1}, built from the operator.

A preconditioner is a value (hashable, so that a solver holding one stays a
static hyperparameter of adjoints and Newton) whose `build(matvec, b)` returns
`(apply, cost, per_apply)`: the function r -> M r, the operator products spent
building it, and the products each application costs. `CG`, `GMRES` and
`BiCGStab` take one as `preconditioner=`; a plain function r -> M r is accepted
too (the hook for learned preconditioners, e.g. Deep Conjugate Direction).
"""

import abc
from collections.abc import Callable

import jax
import jax.numpy as jnp

from .. import _struct as struct
from .. import _tree as tu
from .._checks import check_int, check_range
from .._module import Module


class AbstractPreconditioner(Module):
    """Base class: `build(matvec, b) -> (apply, cost, per_apply)`."""

    @abc.abstractmethod
    def build(self, matvec, b):
        """`(apply, cost, per_apply)` for the operator `matvec`."""

    def prepared(self, matvec):
        """This preconditioner with any host-side setup done from the concrete
        operator (`AbstractLinearSolver.prepared`); itself by default."""
        return self


class FunctionPreconditioner(AbstractPreconditioner):
    """A user's function r -> M r (free of operator products).

    Attributes:
      fn: the function, pytree to pytree like `b`.

    Example:
      >>> import jax.numpy as jnp, iterjax
      >>> A, b = jnp.diag(jnp.array([1.0, 10.0, 100.0])), jnp.ones(3)
      >>> exact = iterjax.linear.FunctionPreconditioner(lambda r: r / jnp.diag(A))
      >>> x, stats = iterjax.CG(preconditioner=exact).solve_with_stats(A, b)
      >>> int(stats.num_matvecs), bool(jnp.allclose(A @ x, b))  # M = A⁻¹: one step
      (1, True)
    """

    fn: Callable = struct.field(pytree_node=False)

    def build(self, matvec, b):
        return self.fn, 0, 0


class JacobiPreconditioner(AbstractPreconditioner):
    """M = diag(A)^{-1}, the diagonal found by probing the matrix-free operator
    (read directly, at no product, from an operator with a `diagonal()` method:
    a dense or BCOO matrix, `iterjax.gallery.Poisson2D`).

    `probes=None` reads the diagonal exactly, e_i·A e_i for every i (n products,
    `batch` at a time); `probes=k` estimates it as the mean of z ⊙ A z over k
    Rademacher vectors z (Bekas, Kokiopoulou & Saad 2007), exact for a diagonal A.

    Attributes:
      probes: None, or the number k >= 1 of random probes.
      batch: basis vectors probed together (memory: batch products at once).
      seed: the probes' PRNG seed.

    Example:
      >>> import jax.numpy as jnp, iterjax
      >>> A, b = jnp.diag(jnp.array([1.0, 10.0, 100.0])), jnp.ones(3)
      >>> cg = iterjax.CG(preconditioner=iterjax.linear.JacobiPreconditioner())
      >>> x, stats = cg.solve_with_stats(A, b)  # D⁻¹ A = I: one step
      >>> bool(stats.converged), bool(jnp.allclose(A @ x, b))
      (True, True)
    """

    probes: int | None = struct.field(pytree_node=False, default=None)
    batch: int = struct.field(pytree_node=False, default=64)
    seed: int = struct.field(pytree_node=False, default=0)

    def __post_init__(self):
        if self.probes is not None:
            check_int("JacobiPreconditioner", "probes", self.probes, 1)
        check_int("JacobiPreconditioner", "batch", self.batch, 1)

    def build(self, matvec, b):
        flat, unravel = tu.ravel(b)
        n = flat.shape[0]
        op = lambda v: tu.ravel(matvec(unravel(v)))[0]
        if callable(getattr(matvec, "diagonal", None)):  # read, not probed
            diag, cost = tu.ravel(matvec.diagonal())[0], 0
            if diag.shape != flat.shape:
                raise ValueError(
                    "JacobiPreconditioner: the operator's diagonal() has "
                    f"{diag.shape[0]} entries, b has {n}"
                )
        elif self.probes is None:
            column = lambda i: op(jnp.zeros_like(flat).at[i].set(1))[i]
            diag = jax.lax.map(column, jnp.arange(n), batch_size=min(self.batch, n))
            cost = n
        else:
            key = jax.random.key(self.seed)
            z = jax.random.rademacher(key, (self.probes, n), flat.dtype)
            diag = jnp.mean(z * jax.vmap(op)(z), axis=0)
            cost = self.probes
        safe = jnp.where(diag != 0, diag, 1)
        return (lambda r: unravel(tu.ravel(r)[0] / safe)), cost, 0


class ChebyshevPreconditioner(AbstractPreconditioner):
    """M = p(A), the degree-k Chebyshev polynomial approximation of A^{-1} on the
    spectrum's interval [λ_min, λ_max], estimated by Lanczos (A symmetric positive
    definite).

    `lanczos_steps` Lanczos steps from b give the Ritz values θ_1 <= ... <= θ_m;
    the interval is [θ_1 / margin, θ_m · margin] (Ritz values lie inside the
    spectrum; the margin covers what they miss at its ends). Applying M runs k + 1
    steps of the Chebyshev semi-iteration for A x = r from x = 0 (Saad 2003,
    Algorithm 12.1), a polynomial of degree k in A: k products. Polynomial
    preconditioning does not lower the total products of CG (CG is optimal in
    its Krylov space), it trades inner products, and so synchronisations and
    memory traffic, for products. The adaptive choice of the polynomial by a
    Krylov minimisation ("Polynomial Preconditioning", in the seeds), CG's own
    polynomial from b, is not positive on the spectrum in general (measured:
    README), so it cannot serve as a fixed preconditioner for CG; re-chosen at
    every step, as in the paper, it is `CG(restart=k + 1)`.

    Attributes:
      degree: k >= 1.
      lanczos_steps: m >= 2.
      margin: >= 1.
    """

    degree: int = struct.field(pytree_node=False, default=4)
    lanczos_steps: int = struct.field(pytree_node=False, default=12)
    margin: float = 1.1

    def __post_init__(self):
        check_int("ChebyshevPreconditioner", "degree", self.degree, 1)
        check_int("ChebyshevPreconditioner", "lanczos_steps", self.lanczos_steps, 2)
        check_range("ChebyshevPreconditioner", "margin", self.margin, lo=1.0)

    def build(self, matvec, b):
        lo, hi = lanczos_bounds(matvec, b, self.lanczos_steps)
        lo, hi = lo / self.margin, hi * self.margin
        theta, delta = (hi + lo) / 2, (hi - lo) / 2

        def apply(r):  # k steps of the Chebyshev iteration on A x = r, x_0 = 0
            d, rho = tu.tree_scale(1 / theta, r), delta / theta
            x, res = d, r
            for _ in range(self.degree):
                res = tu.tree_sub(res, matvec(d))
                d, rho = chebyshev_direction(d, res, rho, theta, delta)
                x = tu.tree_add(x, d)
            return x

        return apply, self.lanczos_steps, self.degree


class NystromPreconditioner(AbstractPreconditioner):
    r"""Randomized Nyström preconditioner for A = K + μI, K positive semidefinite
    (Frangella, Tropp & Udell 2023, "Randomized Nyström preconditioning").

    A rank-ℓ sketch of K from ℓ products, K Ω = A Ω - μ Ω with Ω a random
    orthonormal n x ℓ matrix, gives the Nyström approximation K̂ = U Λ Uᵀ
    (computed stably with a small shift ν), and

        M = (λ_ℓ + μ) U (Λ + μ I)⁻¹ Uᵀ + (I - U Uᵀ)  ≈ A⁻¹ up to scale,

    which maps the ℓ largest eigenvalues of A to about λ_ℓ + μ: CG then
    converges at the rate of the spectrum's tail. Built once per solve (ℓ
    products, counted); each application is two n x ℓ products, no operator
    product. For kernel ridge regression, Gaussian-process and other dense
    regularised systems whose spectrum decays fast.

    Attributes:
      rank: ℓ >= 1, at most n.
      shift: μ >= 0, the regularisation that A includes (0 for a plain positive
        definite A; then λ_ℓ + μ stands for the smallest eigenvalue kept).
      seed: the sketch's PRNG seed.

    Example:
      >>> import jax, jax.numpy as jnp, iterjax
      >>> Q, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(0), (60, 60)))
      >>> decay = jnp.diag(0.7 ** jnp.arange(60.0))          # a decaying spectrum
      >>> A = Q @ decay @ Q.T + 1e-3 * jnp.eye(60)
      >>> P = iterjax.linear.NystromPreconditioner(rank=20, shift=1e-3)
      >>> _, plain = iterjax.CG(rtol=1e-5).solve_with_stats(A, jnp.ones(60))
      >>> _, pre = iterjax.CG(rtol=1e-5, preconditioner=P).solve_with_stats(
      ...     A, jnp.ones(60))
      >>> int(pre.num_matvecs) < int(plain.num_matvecs)     # 20 to build included
      True
    """

    rank: int = struct.field(pytree_node=False, default=50)
    shift: float = 0.0
    seed: int = struct.field(pytree_node=False, default=0)

    def __post_init__(self):
        check_int("NystromPreconditioner", "rank", self.rank, 1)
        check_range("NystromPreconditioner", "shift", self.shift, lo=0.0)

    def build(self, matvec, b):
        flat, unravel = tu.ravel(b)
        n, ell = flat.shape[0], self.rank
        if ell > n:
            raise ValueError(
                f"NystromPreconditioner: `rank` {ell} exceeds the dimension {n}"
            )
        op = lambda v: tu.ravel(matvec(unravel(v)))[0]
        sketch = jax.random.normal(jax.random.key(self.seed), (n, ell), flat.dtype)
        omega, _ = jnp.linalg.qr(sketch)
        mu = jnp.asarray(self.shift, flat.dtype)
        Y = jax.vmap(op, in_axes=1, out_axes=1)(omega) - mu * omega  # K Ω
        nu = jnp.sqrt(n) * jnp.finfo(flat.dtype).eps * jnp.linalg.norm(Y, 2)
        Y = Y + nu * omega
        C = jnp.linalg.cholesky(omega.T @ Y)  # lower: Ωᵀ Y = C Cᵀ
        B = jax.scipy.linalg.solve_triangular(C, Y.T, lower=True).T  # Y C⁻ᵀ
        U, sigma, _ = jnp.linalg.svd(B, full_matrices=False)
        lam = jnp.maximum(sigma**2 - nu, 0.0)
        scale = (lam[-1] + mu) / jnp.maximum(lam + mu, jnp.finfo(flat.dtype).tiny)

        def apply(r):
            v = tu.ravel(r)[0]
            coeff = U.T @ v
            return unravel(v + U @ ((scale - 1.0) * coeff))

        return apply, ell, 0


def chebyshev_direction(d, res, rho, theta, delta):
    """The next update of the Chebyshev semi-iteration on the interval
    [θ - δ, θ + δ] (Saad 2003, Algorithm 12.1): `(d_new, ρ_new)` with
    ρ_new = 1 / (2θ/δ - ρ) and d_new = ρ_new ρ d + (2 ρ_new / δ) res."""
    rho_new = 1 / (2 * theta / delta - rho)
    d = tu.tree_add(
        tu.tree_scale(rho_new * rho, d), tu.tree_scale(2 * rho_new / delta, res)
    )
    return d, rho_new


def lanczos_bounds(matvec, b, steps):
    """(θ_min, θ_max): the extreme Ritz values of `steps` Lanczos steps from b."""
    flat, unravel = tu.ravel(b)
    op = lambda v: tu.ravel(matvec(unravel(v)))[0]
    norm = jnp.linalg.norm(flat)
    v = flat / jnp.where(norm > 0, norm, 1)

    def step(carry, _):
        v, v_prev, beta = carry
        w = op(v) - beta * v_prev
        alpha = jnp.vdot(v, w).real
        w = w - alpha * v
        beta_new = jnp.linalg.norm(w)
        v_new = w / jnp.where(beta_new > 0, beta_new, 1)
        return (v_new, v, beta_new), (alpha, beta_new)

    zero = jnp.zeros((), jnp.real(flat).dtype)
    _, (alphas, betas) = jax.lax.scan(
        step, (v, jnp.zeros_like(v), zero), None, length=steps
    )
    tridiagonal = jnp.diag(alphas) + jnp.diag(betas[:-1], 1) + jnp.diag(betas[:-1], -1)
    ritz = jnp.linalg.eigvalsh(tridiagonal)
    return ritz[0], ritz[-1]


def as_preconditioner(p):
    """None, an `AbstractPreconditioner`, or a function r -> M r (wrapped in a
    `FunctionPreconditioner`)."""
    if p is None or isinstance(p, AbstractPreconditioner):
        return p
    if callable(p):
        return FunctionPreconditioner(p)
    raise TypeError(
        "preconditioner must be an iterjax preconditioner (JacobiPreconditioner, "
        f"ChebyshevPreconditioner) or a function r -> M r, got {p!r}"
    )
