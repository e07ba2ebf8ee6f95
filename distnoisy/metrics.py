"""Ranking metrics of label-issue scores (numpy only), kept here for existing imports.

The implementations live in :mod:`distnoisy.label_issues`.
"""

from __future__ import annotations

from distnoisy.label_issues import auroc, precision_at_k

__all__ = ["auroc", "precision_at_k"]
