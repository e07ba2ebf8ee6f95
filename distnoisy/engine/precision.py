"""How the hot path uses the device: autocast precision, gradient scaling, memory layout and
``torch.compile``, each falling back cleanly (with one logged notice) where unsupported.

Only torch is imported here: the GPU benchmark (:mod:`distnoisy.bench.gpu`) runs on machines
without the rest of the stack.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

#: ``train.precision`` -> autocast dtype (None = autocast off).
DTYPES: dict[str, torch.dtype | None] = {
    "fp32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


@dataclass(frozen=True)
class Precision:
    """The precision a run actually uses on its device.

    Attributes
    ----------
    name
        ``fp32``, ``bf16`` or ``fp16`` (after any fallback).
    device_type
        ``cuda`` or ``cpu``: the autocast device type.
    """

    name: str
    device_type: str

    @property
    def dtype(self) -> torch.dtype | None:
        return DTYPES[self.name]

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The forward passes' context: autocast to :attr:`dtype`, or nothing for fp32."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """A gradient scaler for fp16 (its small exponent range underflows gradients)."""
        if self.name != "fp16":
            return None
        return torch.amp.GradScaler(self.device_type)


def resolve_precision(name: str, device: torch.device) -> Precision:
    """The precision ``train.precision=name`` gets on ``device``; a notice on fallback.

    bf16 autocast works on CUDA (Ampere and later run it at full speed) and on CPUs (slowly but
    correctly). fp16 on a CPU falls back to fp32: its convolutions are not worth running there
    and the gradient scaler exists for GPUs.
    """
    if name not in DTYPES:
        raise ValueError(f"unknown precision {name!r}; choose one of {tuple(DTYPES)}")
    kind = device.type
    if name == "fp16" and kind != "cuda":
        log.warning("train.precision=fp16 is not supported on %s: training in fp32", kind)
        return Precision("fp32", kind)
    if name == "bf16" and kind == "cuda" and not torch.cuda.is_bf16_supported():
        log.warning("train.precision=bf16 is not supported by this GPU: training in fp32")
        return Precision("fp32", kind)
    return Precision(name, kind)


def to_channels_last(model: nn.Module, enabled: bool) -> nn.Module:
    """``model`` with its 4-d parameters and buffers in channels-last layout (in place)."""
    if enabled:
        model.to(memory_format=torch.channels_last)
    return model


def input_layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``x`` in the layout the networks expect (channels-last for 4-d image batches)."""
    if channels_last and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


class CompiledOrEager(nn.Module):
    """``torch.compile(module)`` that falls back to ``module`` if compiling fails.

    torch compiles on the first call, so a failure (no C++ compiler, an unsupported operator)
    shows there: it is logged once and every later call runs eagerly. The eager module is the
    only registered child, so parameters, ``state_dict`` and optimizers see it alone.
    """

    def __init__(self, module: nn.Module, name: str = "model", backend: Any = "inductor") -> None:
        super().__init__()
        self.module = module
        self.name = name
        # Not a registered child: its parameters are the module's own.
        object.__setattr__(self, "_compiled", torch.compile(module, backend=backend))
        self.failed = False

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self.failed:
            try:
                return self._compiled(*args, **kwargs)
            except Exception as exc:  # any compiler failure: run eagerly instead
                first = (str(exc).strip().splitlines() or [""])[0][:200]
                log.warning(
                    "train.compile: compiling network %r failed (%s: %s); running it eagerly",
                    self.name,
                    type(exc).__name__,
                    first,
                )
                self.failed = True
        return self.module(*args, **kwargs)


def maybe_compile(module: nn.Module, enabled: bool, name: str = "model") -> nn.Module:
    """``module`` compiled with an eager fallback when ``enabled``, else ``module`` itself."""
    return CompiledOrEager(module, name) if enabled else module
