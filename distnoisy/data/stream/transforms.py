"""Per-sample image transforms (scale, crop, flip, normalise), seeded per sample and epoch."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from distnoisy.core.errors import ConfigError
from distnoisy.data.stream.seeds import _TAG_AUGMENT, mix_seed

TRANSFORM_KINDS = ("digits", "cifar_train", "cifar_eval", "imagenet_train", "imagenet_eval", "raw")
#: Kinds whose crop, flip and normalisation can run on the training device (``defer``).
DEFERRABLE_KINDS = ("digits", "cifar_train", "cifar_eval", "imagenet_train")
Transform = Callable[[torch.Tensor, int, int], torch.Tensor]


class ImageTransform:
    """Per-sample image transform: uint8 ``C x H x W`` -> normalised float ``C x H x W``.

    Randomness (crops, flips) comes from a ``torch.Generator`` seeded by ``(seed, epoch, index)``,
    so a sample's augmentation does not depend on which rank or loader worker sees it, and a run
    is reproducible. Plain attributes only: instances pickle into loader workers.

    Parameters
    ----------
    kind
        One of :data:`TRANSFORM_KINDS`. ``digits``: scale to 0..1 and normalise, nothing else
        (any image size: digits and Fashion-MNIST, each with its own mean/std).
        ``cifar_train``: pad 4 (zeros), random crop back to the input size, horizontal flip with
        p=0.5. ``cifar_eval``: none. ``imagenet_train``: resize the shorter side to 256, random
        crop 224, flip. ``imagenet_eval``: resize 256, centre crop 224. ``raw``: the decoded
        uint8 image unchanged (its own channel count; for inspecting data).
    mean, std
        Per-channel statistics on the 0..1 scale; their length (1 or 3) sets the channel count
        images are decoded to (grey-scale or RGB). ``None`` only for ``raw``.
    seed
        Seed of the augmentation randomness (pass the run's seed).
    size
        ``imagenet_*`` crop size (224, the protocol); the resize is ``round(size * 256 / 224)``
        (256). Smaller sizes give cheap runs (tests, quick experiments).
    defer
        Leave the crop, flip and normalisation to the training device
        (:class:`distnoisy.data.device_augment.DeviceAugment`, ``data.augment_on=device``): the
        loader batches uint8 images of one size with each sample's crop offsets and flip, drawn here
        from the same generator as the host path. ``imagenet_train`` images whose resized
        size is not square are first cut to their central square (batches need one size).
    encoded
        With ``defer`` and ``imagenet_train`` only (``data.decode=gpu``): the loader does not
        decode at all; it batches the JPEG bytes, and the device decodes, resizes to
        ``resize`` (central square) and augments. The draws assume that square.
    """

    def __init__(
        self,
        kind: str,
        mean: Sequence[float] | None,
        std: Sequence[float] | None,
        seed: int = 0,
        size: int = 224,
        defer: bool = False,
        encoded: bool = False,
    ) -> None:
        if kind not in TRANSFORM_KINDS:
            raise ConfigError(f"unknown transform {kind!r}; choose one of {TRANSFORM_KINDS}")
        if size < 1:
            raise ConfigError(f"the crop size must be at least 1, got {size}")
        if defer and kind not in DEFERRABLE_KINDS:
            raise ConfigError(
                f"transform {kind!r} cannot run on the device; deferrable: {DEFERRABLE_KINDS}"
            )
        if encoded and not (defer and kind == "imagenet_train"):
            raise ConfigError("decoding on the device needs a deferred imagenet_train transform")
        self.kind = kind
        self.defer = bool(defer)
        self.encoded = bool(encoded)
        self.seed = int(seed)
        self.size = int(size)
        self.resize = round(self.size * 256 / 224)
        # Normalisation as one scale and shift per channel: x/255 -> x/(255 std) - mean/std.
        self.affine: list[tuple[float, float]] = []
        if kind == "raw":
            self.mean = self.std = None
            self.channels: int | None = None
            return
        if mean is None or std is None:
            raise ConfigError(f"transform {kind!r} needs mean and std")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        if len(self.mean) != len(self.std) or len(self.mean) not in (1, 3):
            raise ConfigError(
                f"transform {kind!r}: mean {list(self.mean)} and std {list(self.std)} must both "
                "have 1 (grey-scale) or 3 (RGB) values"
            )
        if min(self.std) <= 0:
            raise ConfigError(f"transform {kind!r}: std must be positive, got {list(self.std)}")
        self.channels = len(self.mean)
        self.affine = [(1 / (255 * s), -m / s) for m, s in zip(self.mean, self.std, strict=True)]

    def __repr__(self) -> str:
        return (
            f"ImageTransform({self.kind!r}, mean={self.mean}, std={self.std}, seed={self.seed}, "
            f"size={self.size}, defer={self.defer})"
        )

    def _generator(self, index: int, epoch: int) -> torch.Generator:
        seed = mix_seed(self.seed, epoch, index, _TAG_AUGMENT) & ((1 << 63) - 1)
        return torch.Generator().manual_seed(seed)

    def geometry(self, img: torch.Tensor, index: int, epoch: int) -> torch.Tensor:
        """The resize/pad, crop and flip of ``img``, still uint8 (often a view of it)."""
        import torchvision.transforms.v2.functional as F

        kind = self.kind
        if kind in ("cifar_train", "imagenet_train"):
            gen = self._generator(index, epoch)
            if kind == "cifar_train":
                h, w = int(img.shape[-2]), int(img.shape[-1])
                img = F.pad(img, [4, 4, 4, 4], fill=0)
            else:
                if min(img.shape[-2:]) != self.resize:  # pre-resized shards: nothing to do
                    img = F.resize(img, [self.resize], antialias=True)
                h = w = self.size
            top = int(torch.randint(0, int(img.shape[-2]) - h + 1, (1,), generator=gen))
            left = int(torch.randint(0, int(img.shape[-1]) - w + 1, (1,), generator=gen))
            img = F.crop(img, top, left, h, w)
            if float(torch.rand(1, generator=gen)) < 0.5:
                img = F.horizontal_flip(img)
        elif kind == "imagenet_eval":
            if min(img.shape[-2:]) != self.resize:
                img = F.resize(img, [self.resize], antialias=True)
            img = F.center_crop(img, [self.size, self.size])
        return img

    def draw(self, index: int, epoch: int, height: int, width: int) -> tuple[int, int, int]:
        """``(top, left, flip)`` of the random crop of an ``height x width`` image (after any
        padding), drawn exactly as :meth:`geometry` draws them."""
        h, w = (height - 8, width - 8) if self.kind == "cifar_train" else (self.size, self.size)
        gen = self._generator(index, epoch)
        top = int(torch.randint(0, height - h + 1, (1,), generator=gen))
        left = int(torch.randint(0, width - w + 1, (1,), generator=gen))
        return top, left, int(float(torch.rand(1, generator=gen)) < 0.5)

    def deferred(self, img: torch.Tensor, index: int, epoch: int) -> tuple[torch.Tensor, tuple]:
        if self.encoded:  # JPEG bytes: the device makes the resize x resize square
            return img, self.draw(index, epoch, self.resize, self.resize)
        return self._deferred(img, index, epoch)

    def _deferred(self, img: torch.Tensor, index: int, epoch: int) -> tuple[torch.Tensor, tuple]:
        """The loader's part with ``defer``: the uint8 image to batch and its ``(top, left,
        flip)`` for :class:`distnoisy.data.device_augment.DeviceAugment` (zeros without
        augmentation)."""
        import torchvision.transforms.v2.functional as F

        if self.kind == "imagenet_train":
            if min(img.shape[-2:]) != self.resize:
                img = F.resize(img, [self.resize], antialias=True)
            if img.shape[-2] != img.shape[-1]:
                side = min(img.shape[-2:])
                img = F.center_crop(img, [side, side])
            return img, self.draw(index, epoch, int(img.shape[-2]), int(img.shape[-1]))
        if self.kind == "cifar_train":
            h, w = int(img.shape[-2]), int(img.shape[-1])
            return img, self.draw(index, epoch, h + 8, w + 8)
        return img, (0, 0, 0)

    def normalize_into(self, img: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Write ``(img / 255 - mean) / std`` into the float tensor ``out`` (same shape).

        One conversion pass and one fused scale-and-shift per channel, in place: writing each
        sample straight into its slot of the batch saves a float copy per image and the stack,
        whose fresh memory (page faults) cost more than the arithmetic.
        """
        out.copy_(img)
        for c, (scale, shift) in enumerate(self.affine):
            out[c].mul_(scale).add_(shift)
        return out

    def __call__(self, img: torch.Tensor, index: int, epoch: int) -> torch.Tensor:
        if self.kind == "raw":
            return img
        crop = self.geometry(img, index, epoch)
        return self.normalize_into(crop, torch.empty(crop.shape, dtype=torch.float32))


def make_transform(
    kind: str,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    *,
    seed: int = 0,
    size: int = 224,
    defer: bool = False,
    encoded: bool = False,
) -> ImageTransform:
    """Build the picklable per-sample transform ``f(img_uint8, index, epoch) -> Tensor``.

    See :class:`ImageTransform` for the kinds. Pass the run's ``seed`` so that augmentations
    change with it.
    """
    return ImageTransform(kind, mean, std, seed=seed, size=size, defer=defer, encoded=encoded)
