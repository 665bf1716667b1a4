"""The types of iterjax's public API (jaxtyping: shapes in the annotations, as
optimistix writes them; nothing is checked at run time unless the caller uses
`jaxtyping.jaxtyped`)."""

from collections.abc import Callable
from typing import Any, TypeAlias

from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray, PyTree

Y: TypeAlias = PyTree[ArrayLike]  # the unknown: a pytree of inexact arrays
Args: TypeAlias = PyTree[Any]  # what a function is differentiated or vmapped in
Fn: TypeAlias = Callable[[Any, Any], Any]  # fn(y, args) -> a pytree like y
Norm: TypeAlias = Callable[[Any], Array]  # a pytree -> a scalar
Scalar: TypeAlias = Float[Array, ""]
Flag: TypeAlias = Bool[Array, ""]
Count: TypeAlias = Int[Array, ""]

__all__ = [
    "Args",
    "Array",
    "ArrayLike",
    "Bool",
    "Count",
    "Flag",
    "Float",
    "Fn",
    "Int",
    "Norm",
    "PRNGKeyArray",
    "PyTree",
    "Scalar",
    "Y",
]
