"""Decoding PNG/JPEG bytes to uint8 tensors, with short, comparable error reasons."""

from __future__ import annotations

import io
import re

import torch

# "decode_png, /__w/vision/.../decode_png.cpp:62, " in torchvision messages: noise for users.
_SOURCE_LOCATION = re.compile(r"([\w()]+, )?\S+\.(cpp|cu|h|hpp):\d+,? ?")
# "<_io.BytesIO object at 0x7f...>": addresses differ per call, and reasons must compare equal.
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def decode_image_bytes(data: bytes, channels: int | None) -> torch.Tensor:
    """Decode PNG/JPEG bytes to a uint8 ``C x H x W`` tensor.

    ``channels`` 1 or 3 converts to grey-scale / RGB (e.g. grey or CMYK JPEGs in RGB data);
    ``None`` keeps the file's channels (alpha dropped). torchvision's decoder first, PIL as a
    fallback for what it does not handle.

    Raises
    ------
    ValueError
        Neither decoder can read the bytes (the message has both reasons).
    """
    from torchvision.io import ImageReadMode, decode_image

    mode = {1: ImageReadMode.GRAY, 3: ImageReadMode.RGB}.get(channels, ImageReadMode.UNCHANGED)
    try:
        img = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=mode)
    except Exception as exc:  # torchvision raises RuntimeError/ValueError for bad input
        try:
            img = _decode_pil(data, channels)
        except Exception as exc2:
            raise ValueError(f"{_short(exc)}; PIL: {_short(exc2)}") from None
    if channels is None and img.shape[0] in (2, 4):
        img = img[: img.shape[0] - 1]  # drop alpha
    return img


def _decode_pil(data: bytes, channels: int | None) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        if channels == 1:
            im = im.convert("L")
        elif channels == 3 or im.mode not in ("L", "RGB"):
            im = im.convert("RGB")
        arr = np.array(im, dtype=np.uint8)
    t = torch.from_numpy(arr)
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1).contiguous()


def _short(exc: BaseException, limit: int = 160) -> str:
    """One line: exception type and message, without C++ source locations."""
    lines = str(exc).strip().splitlines()
    text = _ADDRESS.sub("", _SOURCE_LOCATION.sub("", lines[-1] if lines else ""))
    msg = f"{type(exc).__name__}: {text}"
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def _unreadable_tar(exn: BaseException) -> str:
    """The record's reason for a tar-level error, the same from either reader."""
    if isinstance(exn, OSError) and exn.errno is not None:
        first = f"[Errno {exn.errno}] {exn.strerror}"
    else:
        first = str(exn.args[0]) if exn.args else ""
        first = first.split(" @ <", 1)[0]  # tarfile appends " @ <file object>"
    return f"unreadable tar data: {type(exn).__name__}: {first}"[:200]


def jpeg_decode_device(device: torch.device) -> tuple[torch.device, str | None]:
    """Where ``data.decode=gpu`` decodes: ``device`` when torchvision's nvJPEG decoder works
    there, else the CPU with the reason (for a logged notice).

    A one-image probe, so a torchvision built without nvJPEG is found before training starts.
    """
    if device.type != "cuda":
        return torch.device("cpu"), f"the training device is {device.type}, not a CUDA GPU"
    from torchvision.io import decode_jpeg, encode_jpeg

    try:
        probe = encode_jpeg(torch.zeros((3, 8, 8), dtype=torch.uint8))
        decode_jpeg([probe], device=device)
    except Exception as exc:  # no nvJPEG in this torchvision build, or a driver problem
        return torch.device("cpu"), f"torchvision cannot decode JPEGs on {device}: {_short(exc)}"
    return device, None


def decode_jpegs(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Decode a batch of JPEGs (uint8 byte tensors) to RGB ``3 x H x W`` uint8 on ``device``.

    On a CUDA device torchvision decodes the whole list in one nvJPEG call; on the CPU with
    libjpeg, one image after another.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
