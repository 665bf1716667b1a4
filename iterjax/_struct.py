"""Frozen dataclasses that are pytrees: iterjax's own, so that the numerical
core needs jax alone (flax stays the dependency of `iterjax.deq`).

The same spelling as `flax.struct`: `field(pytree_node=False)` marks a static
field (part of the tree's structure, hashed by `jit`); every other field is a
leaf. `dataclass` decorates a class, `PyTreeNode` makes each subclass one.
Both add `replace(**changes)`.
"""

import dataclasses
from typing import Any, TypeVar

import jax
from typing_extensions import dataclass_transform

T = TypeVar("T")


def field(pytree_node: bool = True, **kwargs) -> Any:
    """A dataclass field; `pytree_node=False` makes it static."""
    metadata = {**kwargs.pop("metadata", {}), "pytree_node": pytree_node}
    return dataclasses.field(metadata=metadata, **kwargs)


def _replace(self, **changes):
    """A copy with `changes` applied (the fields are frozen)."""
    return dataclasses.replace(self, **changes)


@dataclass_transform(field_specifiers=(field,), frozen_default=True)
def dataclass(cls: type[T], **kwargs) -> type[T]:
    """Make `cls` a frozen dataclass registered as a pytree."""
    cls = dataclasses.dataclass(frozen=True, **kwargs)(cls)
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    leaves = [f.name for f in fields if f.metadata.get("pytree_node", True)]
    static = [f.name for f in fields if not f.metadata.get("pytree_node", True)]
    cls.replace = _replace  # type: ignore[attr-defined]
    return jax.tree_util.register_dataclass(cls, leaves, static)


@dataclass_transform(field_specifiers=(field,), frozen_default=True)
class PyTreeNode:
    """Base class: every subclass is a `dataclass` (frozen, a pytree)."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__()
        dataclass(cls, **kwargs)

    def replace(self: T, **changes) -> T:
        return _replace(self, **changes)
