"""Any timm model as a :class:`FeatureClassifier`: ``model.name=timm/<name>``.

timm is an optional extra (``pip install -e ".[timm]"``). The network is timm's with its
classifier removed (``num_classes=0``, so it returns the penultimate, pooled "pre-logits"
features) followed by a fresh ``nn.Linear`` head for the dataset's classes: post-training
refits that head on those features like for the built-in models. Pretrained weights come from
a local file in timm's format (a ``torch.save``'d or ``.safetensors`` state dict of the timm
model, as ``timm.create_model(name).state_dict()`` gives); nothing is ever downloaded.
"""

from __future__ import annotations

import difflib
import fnmatch
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distnoisy.core.errors import ConfigError
from distnoisy.models.base import FAMILIES, MODELS, FeatureClassifier
from distnoisy.models.weights import key_problems

#: ``model.name`` prefix selecting a timm model.
PREFIX = "timm/"


def _timm() -> Any:
    try:
        import timm
    except ImportError:
        raise ConfigError(
            "model.name=timm/<name> needs the timm package, which is not installed; install "
            "the extra with: pip install -e '.[timm]' (or pip install timm)"
        ) from None
    return timm


def arch_name(name: str) -> str:
    """The timm model name of ``timm/<name>`` (pretrained tags such as ``.a1_in1k`` kept)."""
    timm_name = name[len(PREFIX) :] if name.startswith(PREFIX) else name
    if not timm_name.strip():
        raise ConfigError(
            "model.name=timm/ names no model; pass model.name=timm/<name>, e.g. timm/resnet18 "
            "(list them with: python -m distnoisy.train --list-models '*resnet*')"
        )
    return timm_name


def check_name(name: str) -> str:
    """Return the timm name of ``timm/<name>``, or raise a one-line error with close matches.

    Raises
    ------
    ConfigError
        If timm is not installed or knows no such model.
    """
    timm = _timm()
    timm_name = arch_name(name)
    if not timm.is_model(timm_name):
        arch = timm_name.split(".", 1)[0]
        close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
        hint = " Did you mean " + ", ".join(f"timm/{c}" for c in close) + "?" if close else ""
        raise ConfigError(
            f"unknown timm model {timm_name!r} (model.name={name}).{hint} List the "
            f"{len(timm.list_models())} timm models with: python -m distnoisy.train "
            "--list-models 'PATTERN' (e.g. '*resnet*')"
        )
    return timm_name


class TimmClassifier(FeatureClassifier):
    """A timm network without its classifier (``body``) followed by ``classifier``.

    Parameters
    ----------
    body
        The timm model built with ``num_classes=0``: ``body(x)`` is ``(B, feature_dim)``.
    feature_dim
        Width of those features (timm's ``head_hidden_size``, else ``num_features``).
    num_classes
        Number of logits of the new head.
    """

    def __init__(self, body: nn.Module, feature_dim: int, num_classes: int) -> None:
        super().__init__()
        self.body = body
        self.feature_dim = feature_dim
        self.classifier = nn.Linear(feature_dim, num_classes)
        first_conv = body.pretrained_cfg.get("first_conv")
        if isinstance(first_conv, str):
            self.input_conv_key = f"body.{first_conv}.weight"

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Return timm's pooled pre-logits features ``(B, feature_dim)``."""
        return torch.flatten(self.body(x), 1)


def _read_weights(path: str | os.PathLike[str], name: str) -> dict[str, Any]:
    """Read a timm-format weights file with timm's own local-file reader (weights only)."""
    if not str(path).strip():
        raise ConfigError(
            "model.weights is an empty string; pass model.weights=/path/to/weights.pth (a timm "
            "state dict), or leave it unset (null) for random initialisation"
        )
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(
            f"model weights file {str(path)!r} does not exist; pass model.weights=/path/to/"
            f"file with a state dict of timm's {name} (saved locally: nothing is downloaded), "
            "or leave model.weights unset for random initialisation"
        )
    from timm.models import load_state_dict

    try:
        # weights_only=True: timm's default; never unpickles arbitrary objects.
        state = load_state_dict(str(file), weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError, safetensors errors, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"could not read model weights file {str(path)!r} as a weights-only state dict of "
            f"timm's {name}: {first}"
        ) from exc
    if not isinstance(state, dict) or not state:
        raise ConfigError(
            f"model weights file {str(path)!r} holds no state dict (parameter name -> tensor) "
            f"of timm's {name}"
        )
    return dict(state)


def _head_keys(body: nn.Module, file_keys: set[str]) -> set[str]:
    """The file's keys of timm's classifier (``pretrained_cfg["classifier"]``): dropped."""
    head = body.pretrained_cfg.get("classifier") or ()
    heads = (head,) if isinstance(head, str) else tuple(head)
    return {k for k in file_keys if any(k.startswith(h + ".") for h in heads)}


def _check_fit(
    body: nn.Module, file_keys: set[str], head_keys: set[str], path: str, name: str
) -> None:
    """Raise if the file's keys (less timm's classifier) are not exactly the body's keys.

    timm loads non-strictly once it drops the classifier, so without this check a file of
    another architecture would leave the network silently random.
    """
    own = body.state_dict()
    missing = [k for k in own if k not in file_keys and not k.endswith(".num_batches_tracked")]
    unexpected = sorted(k for k in file_keys - head_keys if k not in own)
    problems = key_problems(missing, unexpected)
    if problems:
        raise ConfigError(
            f"model weights file {path!r} does not fit timm model {name!r}; "
            + "; ".join(problems)
            + f". Is it the state dict of timm.create_model({name!r})?"
        )


def build_timm_model(
    name: str, num_classes: int, in_channels: int, weights: str | None = None
) -> TimmClassifier:
    """Build ``model.name=timm/<name>`` with a ``num_classes``-way head.

    Parameters
    ----------
    name
        ``timm/<timm model name>`` (e.g. ``timm/resnet18``, ``timm/convnext_atto``).
    num_classes
        Number of logits (the dataset's classes).
    in_channels
        Input channels; timm adapts its first convolution (and, with weights, the pretrained
        filters: summed for one channel).
    weights
        Optional local file in timm's format (a state dict of ``timm.create_model(name)``, any
        head size). It goes through timm's own pretrained-weights loading (``pretrained=True``
        with the file's state dict as the pretrained source): timm's classifier is discarded
        and the input convolution adapted; every other key must fit.

    Returns
    -------
    TimmClassifier

    Raises
    ------
    ConfigError
        Unknown name (with close matches), timm missing, or a weights file that is missing,
        unreadable or of another architecture.
    """
    timm = _timm()
    timm_name = check_name(name)
    kwargs: dict[str, Any] = {"num_classes": 0, "in_chans": in_channels}
    file_keys: set[str] | None = None
    if weights is not None:
        state = _read_weights(weights, timm_name)
        file_keys = set(state)
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"state_dict": state, "file": None})
    try:
        body = timm.create_model(timm_name, **kwargs)
    except (RuntimeError, ValueError, KeyError, AssertionError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if weights is None:
            raise ConfigError(f"could not build timm model {timm_name!r}: {first}") from exc
        if file_keys is not None:
            # Name the keys that do not fit rather than timm's bare KeyError/size message.
            plain = timm.create_model(timm_name, num_classes=0, in_chans=in_channels)
            _check_fit(plain, file_keys, _head_keys(plain, file_keys), str(weights), timm_name)
        raise ConfigError(
            f"model weights file {str(weights)!r} does not fit timm model {timm_name!r}: {first}"
        ) from exc
    if file_keys is not None:
        _check_fit(body, file_keys, _head_keys(body, file_keys), str(weights), timm_name)
    dim = int(getattr(body, "head_hidden_size", None) or body.num_features)
    return TimmClassifier(body, dim, num_classes)


def list_models(pattern: str = "*") -> tuple[list[str], list[str] | None]:
    """Model names matching a shell-style ``pattern`` (``*convnext*``), for ``--list-models``.

    Returns
    -------
    tuple
        The matching built-in names and the matching ``timm/<name>`` names (None when timm
        is not installed). A pattern starting with ``timm/`` matches timm names only.
    """
    timm_pattern = pattern[len(PREFIX) :] if pattern.startswith(PREFIX) else pattern
    builtin = [] if pattern.startswith(PREFIX) else fnmatch.filter(MODELS.names(), pattern)
    try:
        import timm
    except ImportError:
        return builtin, None
    return builtin, [PREFIX + n for n in timm.list_models(timm_pattern)]


FAMILIES[PREFIX] = build_timm_model
