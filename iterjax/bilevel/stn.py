r"""Self-Tuning Networks (MacKay, Vicol, Lorraine, Duvenaud & Grosse 2019): a
network that approximates its own best response to its hyperparameters.

Bilevel hyperparameter tuning asks for w*(λ) = argmin_w L_train(w, λ). An STN
replaces w*(λ) by a cheap parametric approximation around the current λ̂, with
hidden units gated by the hyperparameters (the paper's structured best
response): a dense layer's weights become

    W(λ) = W_elem + diag(V h + c) W_hyper,     h = the hyperparameters' features,

so y = W_elem x + (V h + c) ⊙ (W_hyper x) + b: each output unit is scaled by an
affine function of h. Training alternates two steps, each a plain gradient step:

* **local fit** of (W_elem, W_hyper, V, c, b) to the training loss at sampled
  hyperparameters λ ~ p(λ | λ̂, σ) around λ̂ (so that W(λ) tracks w*(λ) there);
* **hyperparameter step** on λ̂ through the best response: ∇_λ̂ L_val(W(λ̂)).

A discrete hyperparameter (dropout on or off, say) enters h as its sampled value
in the local fit; its probability π is tuned by the exact expectation over its
values in the hyperparameter step (for one binary choice, E = π L(1) + (1 - π)
L(0)). `stn_schedule` (configs) runs the alternation on digits and records
the schedule that λ̂ and π follow.

Needs flax (`pip install 'iterjax[flax]'`); not imported by `iterjax.bilevel`.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from .._checks import check_int


class STNLinear(nnx.Module):
    """A dense layer whose output units are gated by the hyperparameters.

    `layer(x, h) = x W_elem + b + (x W_hyper) ⊙ (h V + c)` for x [..., in] and
    hyperparameter features h [..., hyper] (broadcast against x's batch axes).
    V starts at 0 and c at 1, W_hyper at W_elem's scale / 10, so a new layer's
    output depends on h only once the local fits have taught it to.

    Args:
      in_features, out_features: the sizes of x's and y's last axes.
      hyper_features: the size of h's last axis.
      rngs: `nnx.Rngs`.
      param_dtype: the parameters' dtype.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from iterjax.bilevel.stn import STNLinear
      >>> layer = STNLinear(4, 3, 2, rngs=nnx.Rngs(0))
      >>> layer(jnp.ones((5, 4)), jnp.zeros(2)).shape
      (5, 3)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hyper_features: int,
        *,
        rngs: nnx.Rngs,
        param_dtype=jnp.float32,
    ):
        check_int("STNLinear", "in_features", in_features, 1)
        check_int("STNLinear", "out_features", out_features, 1)
        check_int("STNLinear", "hyper_features", hyper_features, 1)
        init = jax.nn.initializers.lecun_normal()
        shape = (in_features, out_features)
        self.elem = nnx.Param(init(rngs.params(), shape, param_dtype))
        self.hyper = nnx.Param(0.1 * init(rngs.params(), shape, param_dtype))
        self.bias = nnx.Param(jnp.zeros(out_features, param_dtype))
        self.gate = nnx.Param(jnp.zeros((hyper_features, out_features), param_dtype))
        self.gate_bias = nnx.Param(jnp.ones(out_features, param_dtype))
        self.hyper_features = hyper_features

    def __call__(self, x, h):
        h = jnp.asarray(h, x.dtype)
        if jnp.shape(h)[-1:] != (self.hyper_features,):
            raise ValueError(
                f"STNLinear: `h` must have {self.hyper_features} features on its "
                f"last axis, got shape {jnp.shape(h)}"
            )
        y, gated = x @ self.elem[...], x @ self.hyper[...]
        scale = h @ self.gate[...] + _lift(self.gate_bias[...], jnp.ndim(h))
        return y + _lift(self.bias[...], y.ndim) + gated * _lift(scale, y.ndim)


def _lift(a, ndim):
    """`a` with leading axes of size 1 up to `ndim` (explicit broadcasting)."""
    return jnp.reshape(a, (1,) * (ndim - a.ndim) + a.shape)
