"""Training batches on the device: pinned, non-blocking copies of uint8 batches, then the random
crop, flip and normalisation done there (``data.augment_on=device``).

The loader sends a quarter of the bytes (uint8, not float32) and does no per-pixel arithmetic;
the crops and flips are the ones the host path would draw: each sample's ``(top, left, flip)``
comes from the generator seeded by ``(seed, epoch, index)``
(:meth:`distnoisy.data.stream.transforms.ImageTransform.draw`), so results do not depend on the
number of ranks or loader processes. The module imports only torch; torchvision is imported
where an image is resized (:func:`square`) or a batch is decoded (:func:`decode_batch`).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``: through pinned memory without waiting on a CUDA device.

    A copy from pageable memory makes the host wait for the device; pinning first lets the
    copy overlap with the work already queued.
    """
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class DeviceAugment:
    """Crop, flip and normalise a batch on its device, as the host transform would.

    Parameters
    ----------
    kind
        The transform kind (``digits``, ``cifar_train``, ``cifar_eval``, ``imagenet_train``):
        ``cifar_train`` pads 4 zero pixels first and crops back to the input size;
        ``imagenet_train`` crops ``size x size``; the others only normalise.
    mean, std
        Per-channel statistics on the 0..1 scale.
    size
        The ``imagenet_train`` crop size.
    """

    def __init__(self, kind: str, mean: Sequence[float], std: Sequence[float], size: int) -> None:
        self.kind, self.size = kind, int(size)
        # Per channel, as the host path: x * (1 / (255 std)) + (-mean / std), in float32.
        self.scale = [1 / (255 * s) for s in std]
        self.shift = [-m / s for m, s in zip(mean, std, strict=True)]

    def crop_size(self, height: int, width: int) -> tuple[int, int]:
        if self.kind == "imagenet_train":
            return self.size, self.size
        return height, width

    def __call__(self, images: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
        """Float32 ``B x C x h x w`` from uint8 ``images`` (``B x C x H x W``) and ``draws``
        (``B x 3``: top, left, flip), both on the training device."""
        if self.kind in ("cifar_train", "imagenet_train"):
            h, w = self.crop_size(int(images.shape[-2]), int(images.shape[-1]))
            if self.kind == "cifar_train":
                images = F.pad(images, (4, 4, 4, 4))
            images = crop_flip(images, draws, h, w)
        return self.normalize(images)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """``(x / 255 - mean) / std`` per channel, as one multiply and one add in float32."""
        c = images.shape[1]
        scale = torch.tensor(self.scale, dtype=torch.float32, device=images.device)
        shift = torch.tensor(self.shift, dtype=torch.float32, device=images.device)
        return images.float().mul_(scale.view(1, c, 1, 1)).add_(shift.view(1, c, 1, 1))


def crop_flip(images: torch.Tensor, draws: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Per-sample ``h x w`` crops at ``(top, left)``, mirrored where ``flip``: one gather.

    Parameters
    ----------
    images
        ``B x C x H x W`` (any dtype).
    draws
        ``B x 3`` int64 on the same device: top, left, flip (0 or 1).
    """
    b, c = images.shape[:2]
    dev = images.device
    rows = draws[:, 0:1] + torch.arange(h, device=dev)  # B x h
    cols = draws[:, 1:2] + torch.arange(w, device=dev)  # B x w
    # A mirrored crop reads its columns right to left: output column j is left + w - 1 - j.
    cols = torch.where(draws[:, 2:3].bool(), cols.flip(1), cols)
    bi = torch.arange(b, device=dev).view(b, 1, 1, 1)
    ci = torch.arange(c, device=dev).view(1, c, 1, 1)
    return images[bi, ci, rows.view(b, 1, h, 1), cols.view(b, 1, 1, w)]


def square(img: torch.Tensor, side: int) -> torch.Tensor:
    """Shorter side resized to ``side``, then the central ``side x side`` square (uint8): the
    host's deferred ``imagenet_train`` geometry, on the image's own device."""
    import torchvision.transforms.v2.functional as TF

    if min(img.shape[-2:]) != side:
        img = TF.resize(img, [side], antialias=True)
    if img.shape[-2] != img.shape[-1]:
        img = TF.center_crop(img, [side, side])
    return img


def decode_batch(
    jpeg: torch.Tensor, offsets: torch.Tensor, device: torch.device, side: int
) -> tuple[torch.Tensor, list[int]]:
    """Decode a loader's JPEG batch (``data.decode=gpu``) on ``device`` into ``B x 3 x side x
    side`` uint8, and the positions of images that could not be decoded.

    One nvJPEG call for the batch; if it fails, image by image, and an undecodable image is
    replaced by the batch's first good one (the caller logs the positions).
    """
    from distnoisy.data.stream.decode import decode_jpegs

    bounds = offsets.tolist()
    data = [jpeg[a:b] for a, b in itertools.pairwise(bounds)]
    bad: list[int] = []
    try:
        images: list[torch.Tensor | None] = list(decode_jpegs(data, device))
    except Exception:  # one corrupt image fails the whole call: find it
        images = []
        for k, d in enumerate(data):
            try:
                images.append(decode_jpegs([d], device)[0])
            except Exception:
                images.append(None)
                bad.append(k)
    good = [square(img, side) for img in images if img is not None]
    if not good:
        raise ValueError(f"no image of this batch of {len(data)} could be decoded on {device}")
    squares = iter(good)
    return torch.stack([next(squares) if img is not None else good[0] for img in images]), bad
