"""Forward and backward loss correction (Patrini et al., CVPR 2017),
docs/methods.md#forward-and-backward-correction.

Both need the noise transition matrix ``T[j, k] = P(noisy label k | true label j)``. Where it
comes from is ``method.transition``:

- ``true``: the realised transition of this run's noisy labels (needs the clean labels; an
  oracle, useful as an upper bound);
- ``estimate``: trained first as a CE reference run (same data, noise, model and schedule), then
  estimated from its final softmax on the un-augmented training set by anchor points
  (:func:`~distnoisy.losses.estimate_transition_matrix`, 97th percentile;
  docs/methods.md#forward-and-backward-correction);
- a path to a ``.json`` file (``{"transition": [[...], ...]}``, e.g. another run's
  ``noise_transition.json``, or a bare nested list) or a ``.npy`` file.

The driver resolves it once (:meth:`TransitionMethod.prepare_resources`); workers receive the
matrix itself as a resource, so they never read files or train anything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from distnoisy.core.errors import ConfigError, DistnoisyError
from distnoisy.core.method_params import MethodParams
from distnoisy.losses import (
    BackwardCorrectionLoss,
    ForwardCorrectionLoss,
    check_transition_matrix,
    estimate_transition_matrix,
)
from distnoisy.methods.base import METHODS, PrepareContext
from distnoisy.methods.loss_method import LossMethod, param_errors

#: ``method.transition`` values that are not file paths (compared case-insensitively: YAML and
#: the command line turn ``transition=true`` into the boolean True, which becomes "True").
TRUE, ESTIMATE = "true", "estimate"
#: Method whose reference run's predictions ``transition=estimate`` uses.
REFERENCE_METHOD = "ce"
#: Outlier cut of the anchor-point estimator (Patrini et al.; LIMIT's baseline code).
ESTIMATE_PERCENTILE = 97.0


def transition_source(params: Any) -> str:
    """``"true"``, ``"estimate"`` or the path that ``method.transition`` names."""
    value = str(params.transition)
    return value.lower() if value.lower() in (TRUE, ESTIMATE) else value


def load_transition_file(path: str | Path) -> list[list[float]]:
    """Read and check a transition matrix from a ``.json`` or ``.npy`` file.

    Raises
    ------
    ConfigError
        If the file is missing, has another suffix, cannot be parsed, or does not hold a square,
        non-negative, row-stochastic matrix; the message names the file (and the bad row).
    """
    p = Path(path).expanduser()
    if p.suffix not in (".json", ".npy"):
        raise ConfigError(
            f"method.transition={str(path)!r} must be 'true', 'estimate' or a path to a .json or "
            ".npy file holding the C x C matrix T[j, k] = P(noisy label k | true label j)"
        )
    if not p.is_file():
        raise ConfigError(f"method.transition: file {str(p)!r} does not exist")
    try:
        if p.suffix == ".npy":
            data: Any = np.load(p, allow_pickle=False)
        else:
            data = json.loads(p.read_text())
            if isinstance(data, dict):
                if "transition" not in data:
                    raise ValueError('a JSON object must hold the matrix under "transition"')
                data = data["transition"]
    except (OSError, ValueError) as err:  # JSONDecodeError is a ValueError
        raise ConfigError(f"method.transition: cannot read {str(p)!r}: {err}") from None
    try:
        return check_transition_matrix(data).tolist()
    except ConfigError as err:
        raise ConfigError(f"method.transition: {str(p)!r}: {err}") from None


def read_reference_probs(path: Path) -> np.ndarray:
    """The ``final_prob`` column (``[N, C]``) of a run's ``sample_stats.parquet`` (or of its
    partitioned ``sample_stats/``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from distnoisy.store.export import INDEX_FILE, SAMPLE_STATS_DIR, iter_parts

    parts = Path(path) / SAMPLE_STATS_DIR
    file = Path(path) / "sample_stats.parquet"
    if (parts / INDEX_FILE).is_file():
        table = pa.Table.from_batches(list(iter_parts(parts)))
    elif not file.is_file():
        raise DistnoisyError(f"reference run output {str(file)!r} does not exist")
    else:
        table = pq.read_table(file)
    if "final_prob" not in table.column_names:
        raise DistnoisyError(f"{str(file)!r} has no 'final_prob' column")
    column = table.column("final_prob").combine_chunks()
    # A fixed-size list column (the store's export) is one flat buffer, reshaped in one go;
    # anything else (variable lists) goes through Python lists. np.array copies: Arrow buffers
    # are read-only, which torch.from_numpy warns about.
    if hasattr(column.type, "list_size"):
        flat = np.array(column.flatten().to_numpy(), dtype=np.float64)
        return flat.reshape(len(column), column.type.list_size)
    return np.array(column.to_pylist(), dtype=np.float64)


@dataclass
class CorrectionParams(MethodParams):
    # "true" (realised T, needs clean labels), "estimate" (from a CE reference run), or a path.
    transition: str = TRUE


class TransitionMethod(LossMethod):
    """Shared part of forward and backward correction: resolving ``method.transition``.

    ``prepare_resources`` returns ``{"transition": T (nested lists), "transition_source":
    "true" | "estimate" | <resolved path>}``; the constructor builds the loss from
    ``resources["transition"]``. Constructed without it (the driver's dry build), the method
    raises when it is attached to a store, before any training step.
    """

    Params = CorrectionParams
    loss_class: type[ForwardCorrectionLoss] | type[BackwardCorrectionLoss]

    @classmethod
    def check_params(cls, params: Any) -> None:
        source = transition_source(params)
        if source in (TRUE, ESTIMATE):
            return  # resolved in the driver (prepare_resources)
        cls.loss_class(torch.tensor(load_transition_file(source)))

    @classmethod
    def prepare_resources(cls, params: Any, context: PrepareContext) -> dict[str, Any]:
        source = transition_source(params)
        if source == TRUE:
            if context.noise_transition is None:
                raise ConfigError(
                    f"method.transition=true needs the realised noise transition matrix, but the "
                    f"clean labels of this dataset are unknown; use method.transition=estimate "
                    f"(estimated from a reference {REFERENCE_METHOD} run) or "
                    f"method.transition=PATH (a .json or .npy file)"
                )
            transition = check_transition_matrix(context.noise_transition).tolist()
        elif source == ESTIMATE:
            probs = read_reference_probs(context.train_reference(REFERENCE_METHOD))
            estimate = estimate_transition_matrix(torch.from_numpy(probs), ESTIMATE_PERCENTILE)
            transition = estimate.double().tolist()
        else:
            transition = load_transition_file(source)
            source = str(Path(source).expanduser().resolve())
        size = len(transition)
        if size != context.num_classes:
            raise ConfigError(
                f"method.transition={transition_source(params)!r} gives a {size} x {size} "
                f"matrix but the dataset has {context.num_classes} classes"
            )
        with param_errors(params.name):  # fail in the driver, e.g. a singular T for backward
            cls.loss_class(torch.tensor(transition))
        return {"transition": transition, "transition_source": source}

    def build_loss(self) -> nn.Module | None:
        transition = self.resources.get("transition")
        if transition is None:
            return None
        if len(transition) != self.num_classes:
            raise ConfigError(
                f"resources['transition'] is {len(transition)} x {len(transition)} but the "
                f"dataset has {self.num_classes} classes"
            )
        return self.loss_class(torch.tensor(transition, dtype=torch.float64))

    def require_criterion(self) -> nn.Module:
        if self.criterion is None:
            raise DistnoisyError(
                f"method {self.params.name!r} was built without its transition matrix: "
                f"resources['transition'] is missing (the driver's prepare_resources provides "
                f"it from method.transition={self.params.transition!r})"
            )
        return self.criterion


@METHODS.register("forward")
class ForwardCorrection(TransitionMethod):
    r"""Forward correction: ``L = mean_i -log (Tᵀ p̂_i)_{ỹ_i}``, ``p̂ = clamp(p, 1e-10, 1)``.

    docs/methods.md#forward-and-backward-correction (module
    :class:`~distnoisy.losses.ForwardCorrectionLoss`): the network's softmax models the clean
    posterior and ``Tᵀp`` the noisy-label distribution.

    Keys (defaults)
        ``method.transition = "true"``: where ``T`` comes from (module docstring): ``true``
        (realised T, needs clean labels), ``estimate`` (anchor points on a CE reference run's
        final softmax, 97th percentile; Patrini et al., LIMIT's code), or a ``.json``/``.npy``
        path. Valid: a square, non-negative, row-stochastic (rows sum to 1 within 1e-4) C x C
        matrix.

    Label-issue score: mean training CE on the given label over epochs
    (docs/methods.md#label-issue-scores).
    """

    loss_class = ForwardCorrectionLoss


@METHODS.register("backward")
class BackwardCorrection(TransitionMethod):
    r"""Backward correction: ``L = mean_i [T⁻¹ ℓ(p_i)]_{ỹ_i}``, ``ℓ(p) = (-log p_1, …, -log p_C)``.

    docs/methods.md#forward-and-backward-correction (module
    :class:`~distnoisy.losses.BackwardCorrectionLoss`): unbiased for the clean CE, but ``T⁻¹`` has
    negative entries, so the loss can go negative and training is
    unstable.

    Keys (defaults)
        ``method.transition = "true"``: as for ``forward`` (``true``, ``estimate`` or a
        ``.json``/``.npy`` path). Valid: as for ``forward``, and invertible (condition number
        below 1e8; e.g. symmetric noise rate < (C-1)/C).

    Label-issue score: mean training CE on the given label over epochs
    (docs/methods.md#label-issue-scores).
    """

    loss_class = BackwardCorrectionLoss
