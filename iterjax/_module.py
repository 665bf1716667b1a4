"""`Module`: the base class of iterjax's solvers, adjoints and methods."""

import abc

from . import _struct as struct


class Module(struct.PyTreeNode, metaclass=abc.ABCMeta):
    """A frozen dataclass that is a pytree (`_struct`), with its abstract
    methods enforced: a subclass that leaves one unimplemented cannot be
    instantiated (TypeError naming it).

    One rule for hyperparameters: floats are pytree leaves, so a step size, a
    damping or a tolerance can be vmapped or differentiated over; ints and
    structural choices (a history length, an inner solver, a function) are
    static (`struct.field(pytree_node=False)`), since they fix shapes or code.
    """
