"""Initialising a model from a local pretrained state dict (nothing is ever downloaded)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from distnoisy.core.errors import ConfigError

#: Heads of the checkpoints we accept: torchvision (``fc``), ours (``classifier``) and the
#: DivideMix/ELR CIFAR nets (``linear``). They are dropped: the new head has another size.
HEAD_PREFIXES = ("fc.", "classifier.", "linear.")
#: Keys under which training checkpoints commonly nest the state dict.
_WRAPPER_KEYS = ("state_dict", "model")
#: Prefixes added by DistributedDataParallel / DataParallel and by torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_MAX_LISTED = 6


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    more = len(keys) - _MAX_LISTED
    return shown + (f" (and {more} more)" if more > 0 else "")


def key_problems(
    missing: Sequence[str], unexpected: Sequence[str], mismatched: Sequence[str] = ()
) -> list[str]:
    """What a weights file lacks or has in excess, as the error lines of a file that does not fit
    (empty when it fits)."""
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches (file vs model): {_listing(mismatched)}")
    return problems


def _strip_prefixes(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    return key


def _unwrap(obj: object, where: str) -> dict[str, torch.Tensor]:
    """Find the ``name -> tensor`` dict inside a loaded checkpoint and normalise its keys."""
    # A few levels at most, e.g. {"model": {"state_dict": {...}}}.
    for _ in range(3):
        if not isinstance(obj, Mapping):
            break
        inner = next(
            (obj[k] for k in _WRAPPER_KEYS if k in obj and isinstance(obj[k], Mapping)), None
        )
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not obj:
        raise ConfigError(
            f"model weights file {where} holds a {type(obj).__name__}, not a non-empty state "
            "dict (parameter name -> tensor)"
        )
    state: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ConfigError(
                f"model weights file {where}: entry {key!r} is a {type(value).__name__}, not a "
                "tensor; expected a state dict (parameter name -> tensor), optionally nested "
                "under 'state_dict' or 'model'"
            )
        state[_strip_prefixes(key)] = value
    return state


def adapt_input_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Adapt a pretrained first-convolution weight ``(out, c, kh, kw)`` to ``in_channels``.

    For one channel the filters are summed over the input channels, which is exact for a
    grey image replicated into ``c`` channels. Otherwise the channels are tiled and scaled by
    ``c / in_channels`` so that activations keep roughly the same magnitude.

    Parameters
    ----------
    weight
        The pretrained weight.
    in_channels
        The number of input channels of the new model.

    Returns
    -------
    torch.Tensor
        A weight of shape ``(out, in_channels, kh, kw)``.
    """
    old = weight.shape[1]
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    reps = math.ceil(in_channels / old)
    return weight.repeat(1, reps, 1, 1)[:, :in_channels] * (old / in_channels)


def load_pretrained(
    model: nn.Module, path: str | os.PathLike[str], model_name: str = "resnet50"
) -> None:
    """Load a local state dict into ``model``, except its classification head.

    Accepts a bare state dict or a checkpoint nesting it under ``state_dict`` or ``model``;
    ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) key prefixes are stripped. Head keys
    (``fc.*``, ``classifier.*``, ``linear.*``) are dropped since the model's head has
    ``num_classes`` outputs, and a 3-channel first convolution is adapted with
    :func:`adapt_input_conv` when the model has another number of input channels. Every other
    parameter and buffer of the model must be present with the right shape, and nothing else
    may be in the file.

    Parameters
    ----------
    model
        The freshly built model; modified in place.
    path
        Local path of the file written by ``torch.save`` (loaded with ``weights_only=True``).
    model_name
        Registry name of the model, used in error messages.

    Raises
    ------
    ConfigError
        If the file is missing or unreadable, or its keys or shapes do not fit the model.
    """
    if not str(path).strip():
        raise ConfigError(
            "model.weights is an empty string; pass model.weights=/path/to/"
            f"{model_name}.pth, or leave it unset (null) for random initialisation"
        )
    file = Path(path).expanduser()
    where = repr(str(path))
    if str(file.absolute()) != str(path):
        where += f" (resolved to {str(file.absolute())!r})"
    if not file.is_file():
        raise ConfigError(
            f"model weights file {where} does not exist; pass "
            f"model.weights=/path/to/{model_name}.pth with an ImageNet state dict (e.g. "
            f"torchvision's {model_name} weights, saved locally since nothing is downloaded), "
            "or leave model.weights unset for random initialisation"
        )
    try:
        loaded = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types (UnpicklingError, RuntimeError, ...)
        raise ConfigError(
            f"could not read model weights file {where} as a weights-only state dict: {exc}"
        ) from exc
    state = {k: v for k, v in _unwrap(loaded, where).items() if not k.startswith(HEAD_PREFIXES)}

    own = model.state_dict()
    conv_key = getattr(model, "input_conv_key", None)
    if conv_key in state and conv_key in own:
        theirs, ours = state[conv_key], own[conv_key]
        if (
            theirs.ndim == ours.ndim == 4
            and theirs.shape[1] != ours.shape[1]
            and theirs.shape[0] == ours.shape[0]
            and theirs.shape[2:] == ours.shape[2:]
        ):
            state[conv_key] = adapt_input_conv(theirs, ours.shape[1])

    # Old checkpoints lack BatchNorm's num_batches_tracked; BatchNorm fills it in itself.
    missing = [
        k
        for k in own
        if k not in state
        and not k.startswith(HEAD_PREFIXES)
        and not k.endswith(".num_batches_tracked")
    ]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in state
        if k in own and state[k].shape != own[k].shape
    ]
    problems = key_problems(missing, unexpected, mismatched)
    if problems:
        raise ConfigError(
            f"model weights file {where} does not fit model {model_name!r}; "
            + "; ".join(problems)
            + f". Is it a state dict of {model_name} (e.g. torchvision's ImageNet weights)?"
        )
    model.load_state_dict(state, strict=False)
