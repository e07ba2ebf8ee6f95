"""Training methods: one module per method behind one interface (:class:`Method`).

A method is a loss, the per-sample fields it declares in the store, and epoch hooks. It never
knows about Ray or ranks: the trainer hands it the store, and the store handles sharing.
"""

from distnoisy.methods import (  # noqa: F401  (register the methods)
    apl,
    bootstrap,
    ce,
    correction,
    dal,
    elr,
    elr_plus,
    gce,
    label_smoothing,
    limit,
    mae,
    peer,
    sce,
    taylor_ce,
)
from distnoisy.methods.base import METHODS, Method, PrepareContext, StepOutput

__all__ = ["METHODS", "Method", "PrepareContext", "StepOutput"]
