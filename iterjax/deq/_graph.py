"""Convergent Graph Solvers: a graph layer whose fixed point exists by construction."""

import jax
import jax.numpy as jnp
from flax import nnx

from .._checks import check_int, check_range
from .._iterate import AbstractFixedPointSolver
from ..fixed_point import Anderson
from ..implicit import AbstractAdjoint, ImplicitAdjoint
from ._layer import DEQ


def graph_transition(logits, adjacency, gamma):
    """A = γ · (a softmax of `logits` over each node's in-neighbours), per head.

    `logits` is [..., n, n, heads] (entry [i, j] scores the edge j -> i),
    `adjacency` is [..., n, n] (True where j sends to i). Each row of A sums to γ,
    or to 0 for a node without in-neighbours, and A >= 0: ||A||_∞ <= γ whatever
    the logits. Returns A as [..., heads, n, n].
    """
    mask = adjacency[..., None]
    masked = jnp.where(mask, logits, -jnp.inf)
    top = jnp.max(masked, axis=-2, keepdims=True)
    top = jax.lax.stop_gradient(jnp.where(jnp.isfinite(top), top, 0.0))
    weights = jnp.exp(masked - top)  # 0 off the edges, gradient included
    total = jnp.sum(weights, axis=-2, keepdims=True)
    weights = weights / jnp.where(total > 0, total, 1.0)
    return gamma * jnp.moveaxis(weights, -1, -3)


class GraphPropagation(nnx.Module):
    """The CGS cell z ↦ σ(A z + b), one propagation per head; its input is (A, b)
    with A [..., heads, n, n] and b, z [..., n, heads]."""

    def __init__(self, activation=lambda u: u):
        self.activation = activation

    def __call__(self, z, inputs):
        a, b = inputs
        return self.activation(jnp.einsum("...hij,...jh->...ih", a, z) + b)


class ConvergentGraphSolver(nnx.Module):
    r"""Convergent Graph Solvers (Park, Choo & Park, ICLR 2022): a graph layer whose
    hidden state is the fixed point of an input-dependent contraction.

    1. Encode: h = relu(E x) per node; per edge j -> i and head, a logit from
       (h_i, h_j, e_ij); per node and head, a source b = B h.
    2. Transition: A(x) = γ · softmax of the logits over each node's in-neighbours
       (`graph_transition`): A >= 0 with rows summing to at most γ < 1.
    3. Solve z* = σ(A(x) z* + b(x)) (`DEQ` of `GraphPropagation`). With σ
       1-Lipschitz, the map is a γ-contraction in the max norm for every input and
       every parameter value: z* exists, is unique, and I - ∂/∂z is invertible
       (the implicit gradient is defined), by Banach's theorem.
    4. Decode: y = D [z*, h] per node.

    Gradients reach the encoder through the fixed point by the chosen adjoint
    (implicit by default: memory independent of the solver's steps). With σ the
    identity, z* = (I - A)⁻¹ b: the layer propagates over the whole graph, not a
    fixed number of hops, which is what an explicit GNN of depth K cannot do for
    dependencies longer than K.

    Graphs are dense: x [..., n, node_features], adjacency [..., n, n] (bool;
    [i, j] True when j sends to i; pad smaller graphs with isolated nodes),
    edges [..., n, n, edge_features] or None. Leading axes are a batch of graphs,
    solved as one fixed point.

    Args:
      node_features, out_features: sizes of x's and y's last axes.
      edge_features: size of the edges' last axis (0: no edge features).
      hidden: size of h.
      heads: number of propagations (z has `heads` channels per node).
      gamma: γ in (0, 1).
      activation: σ, 1-Lipschitz (the caller vouches for this); the identity by
        default, the paper's linear CGS.
      solver, adjoint, atol, max_steps: as for `DEQ`.
      param_dtype: dtype of the parameters.
      rngs: `nnx.Rngs`.

    Examples:
      >>> import jax.numpy as jnp, iterjax
      >>> from flax import nnx
      >>> cgs = iterjax.deq.ConvergentGraphSolver(2, 1, rngs=nnx.Rngs(0))
      >>> ring = jnp.roll(jnp.eye(5, dtype=bool), 1, axis=1)  # j = i + 1 -> i
      >>> y, sol = cgs(jnp.ones((5, 2), jnp.float32), ring, return_solution=True)
      >>> y.shape, bool(sol.converged)
      ((5, 1), True)
    """

    def __init__(
        self,
        node_features: int,
        out_features: int,
        *,
        edge_features: int = 0,
        hidden: int = 32,
        heads: int = 4,
        gamma: float = 0.9,
        activation=lambda u: u,
        solver: AbstractFixedPointSolver = Anderson(),
        adjoint: AbstractAdjoint = ImplicitAdjoint(),
        atol: float = 1e-6,
        max_steps: int = 200,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        owner = "ConvergentGraphSolver"
        check_int(owner, "node_features", node_features, 1)
        check_int(owner, "out_features", out_features, 1)
        check_int(owner, "edge_features", edge_features, 0)
        check_int(owner, "hidden", hidden, 1)
        check_int(owner, "heads", heads, 1)
        check_range(owner, "gamma", gamma, 0.0, 1.0, True, True)
        linear = lambda i, o: nnx.Linear(i, o, param_dtype=param_dtype, rngs=rngs)
        self.encoder = linear(node_features, hidden)
        self.edge = linear(2 * hidden + edge_features, heads)
        self.source = linear(hidden, heads)
        self.decoder = linear(hidden + heads, out_features)
        self.deq = DEQ(
            GraphPropagation(activation),
            solver=solver,
            adjoint=adjoint,
            atol=atol,
            max_steps=max_steps,
        )
        self.gamma = gamma
        self.edge_features = edge_features

    def transition(self, x, adjacency, edges=None):
        """(A, b, h): the contraction's matrix, its source and the node codes."""
        if (edges is None) != (self.edge_features == 0):
            raise ValueError(
                f"ConvergentGraphSolver: built with edge_features="
                f"{self.edge_features}, called with edges "
                f"{'None' if edges is None else jnp.shape(edges)}"
            )
        h = jax.nn.relu(self.encoder(x))
        n = h.shape[-2]
        shape = (*h.shape[:-2], n, n, h.shape[-1])
        receiver = jnp.broadcast_to(h[..., :, None, :], shape)
        sender = jnp.broadcast_to(h[..., None, :, :], shape)
        parts = [receiver, sender] + ([] if edges is None else [edges])
        logits = self.edge(jnp.concatenate(parts, axis=-1))
        a = graph_transition(logits, adjacency, jnp.asarray(self.gamma, h.dtype))
        return a, self.source(h), h

    def __call__(self, x, adjacency, edges=None, *, return_solution: bool = False):
        a, b, h = self.transition(x, adjacency, edges)
        z, sol = self.deq((a, b), jnp.zeros_like(b), return_solution=True)
        y = self.decoder(jnp.concatenate([z, h], axis=-1))
        return (y, sol) if return_solution else y
