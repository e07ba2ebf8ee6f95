"""The base of every method's ``method.*`` parameter dataclass.

Torch-free on purpose: :mod:`distnoisy.config` builds its schema on it, and every method
module (:mod:`distnoisy.methods`) subclasses it, so neither has to import the other at
module level (no import cycle between ``config`` and ``methods``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class MethodParams:
    """Base of every method's ``method.*`` schema; subclasses add their own keys."""

    name: str = "elr"
