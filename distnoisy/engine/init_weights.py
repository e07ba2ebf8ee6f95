"""``train.init_weights``: start a run's networks from a distnoisy weights file.

The file is what training (``weights.pt``, ``weights_best.pt``) and post-training
(``<posttrain out>/weights.pt``: the run's backbone with the refitted head) write:
``{network name: state dict}``, loaded with ``weights_only=True``. Unlike ``model.weights``
(a backbone for a new head), the head is loaded too, so the run continues from that network.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from distnoisy.core.errors import ConfigError


def read_init_weights(path: str) -> dict[str, dict[str, torch.Tensor]]:
    """The ``{network: state dict}`` of ``path``; :class:`ConfigError` (one line) if unusable."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"train.init_weights={path}: no such file; give a run's weights.pt")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # any loader error is the same bad input
        raise ConfigError(
            f"train.init_weights={path}: cannot load it weights-only ({type(exc).__name__}); "
            "give a distnoisy weights.pt"
        ) from None
    if not isinstance(obj, dict) or not all(isinstance(v, dict) for v in obj.values()):
        raise ConfigError(
            f"train.init_weights={path} is not a {{network: state dict}} file; give a "
            "distnoisy weights.pt"
        )
    return obj


def load_init_weights(models: dict[str, nn.Module], path: str) -> None:
    """Load every network of ``models`` from ``path`` (strict: every key must fit).

    Raises
    ------
    ConfigError
        The file lacks one of the networks, or its tensors do not fit the architecture.
    """
    state = read_init_weights(path)
    missing = sorted(set(models) - set(state))
    if missing:
        raise ConfigError(
            f"train.init_weights={path} holds networks {sorted(state)}, not {missing}; give "
            "weights of a run of the same method"
        )
    for name, model in models.items():
        try:
            model.load_state_dict(state[name])
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise ConfigError(
                f"train.init_weights={path}: network {name!r} does not fit ({first}); give "
                "weights of a run with the same model.name and dataset"
            ) from None
