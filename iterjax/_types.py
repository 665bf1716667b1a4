"""Type aliases used across iterjax (documentation only: nothing is checked)."""

from collections.abc import Callable
from typing import Any

PyTree = Any
Y = PyTree  # the unknown: a pytree of inexact arrays
Args = PyTree  # everything a function is differentiated or vmapped with respect to
Fn = Callable[[Y, Args], Y]  # fixed-point map fn(y, args) -> y-like pytree
