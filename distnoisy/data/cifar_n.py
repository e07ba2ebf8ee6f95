"""CIFAR-10N / CIFAR-100N human noisy labels: ``noise.kind=cifar_n noise.cifar_n=SET``.

The label files users download (``CIFAR-10_human.pt``, ``CIFAR-100_human.pt``) are
``torch.save``'d dicts of numpy arrays, one label per training image in the order of the CIFAR
python batches (the order of distnoisy's CIFAR shards, see :mod:`distnoisy.data.cifar`). They
are read with ``torch.load(weights_only=True)`` with only the numpy globals an array needs
allowed (numpy 1 and 2 module paths), so a tampered file cannot run code.

Label sets (``noise.cifar_n``), the file key they read, and the noise rates the CIFAR-N paper
reports (Wei et al., 2022): see :data:`LABEL_SETS` and the README.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distnoisy.core.errors import ConfigError, DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelSet:
    """One CIFAR-N label set: the dataset it belongs to, its key in the file, the known rate."""

    dataset: str
    key: str
    known_rate: float
    file_name: str
    clean_key: str = "clean_label"
    num_classes: int = 10


_C10, _C100 = "CIFAR-10_human.pt", "CIFAR-100_human.pt"
#: ``noise.cifar_n`` -> its label set (rates from the CIFAR-N paper).
LABEL_SETS: dict[str, LabelSet] = {
    "aggre": LabelSet("cifar10", "aggre_label", 0.0903, _C10),
    "random1": LabelSet("cifar10", "random_label1", 0.1723, _C10),
    "random2": LabelSet("cifar10", "random_label2", 0.1812, _C10),
    "random3": LabelSet("cifar10", "random_label3", 0.1764, _C10),
    "worse": LabelSet("cifar10", "worse_label", 0.4021, _C10),
    "noisy_fine": LabelSet("cifar100", "noisy_label", 0.4020, _C100, num_classes=100),
    # The 20 superclasses: needs CIFAR-100 shards with coarse labels (--coarse).
    "noisy_coarse": LabelSet(
        "cifar100", "noisy_coarse_label", 0.2560, _C100, "clean_coarse_label", num_classes=20
    ),
}
_TRAIN_SIZE = 50_000


def _numpy_globals() -> list[object]:
    """What unpickling a numpy array needs, under numpy 1's and numpy 2's module paths."""
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy 1
        from numpy.core import multiarray
    allowed: list[object] = [np.ndarray, np.dtype]
    for func in ("_reconstruct", "scalar"):
        obj = getattr(multiarray, func)
        allowed += [
            (obj, f"numpy.core.multiarray.{func}"),
            (obj, f"numpy._core.multiarray.{func}"),
        ]
    # numpy >= 1.25 pickles a dtype through its class (numpy.dtypes.Int64DType, ...).
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        allowed += [
            getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType") and n[0].isupper()
        ]
    return allowed


def read_human_file(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Read a CIFAR-N ``*_human.pt`` file: ``{key: 1-D integer array}``, no arbitrary unpickling.

    Raises
    ------
    DataError
        If the file is missing, not a weights-only ``torch.save`` file of numpy arrays (one
        line naming what it holds instead), or holds no integer label arrays.
    """
    import torch

    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(
            f"noise.file={str(path)!r} does not exist; pass noise.file=/path/to/"
            f"{_C10} (CIFAR-10N) or {_C100} (CIFAR-100N), the label file of the CIFAR-N release"
        )
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            loaded = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError (a refused global), RuntimeError (not a zip), ...
        text = " ".join(str(exc).split())
        # torch's message is long (pages of advice); its first sentence names the cause.
        first = text.split(". ")[0][:300] if text else type(exc).__name__
        raise DataError(
            f"noise.file={str(path)!r} is not a CIFAR-N label file (a torch.save'd dict of numpy "
            f"arrays, read weights-only): {first}"
        ) from None
    if not isinstance(loaded, dict) or not loaded:
        raise DataError(
            f"noise.file={str(path)!r} holds a {type(loaded).__name__}, not the dict of label "
            f"arrays of {_C10} / {_C100}"
        )
    arrays: dict[str, np.ndarray] = {}
    for key, value in loaded.items():
        array = np.asarray(value.numpy() if isinstance(value, torch.Tensor) else value)
        if array.ndim == 1 and np.issubdtype(array.dtype, np.integer):
            arrays[str(key)] = array.astype(np.int64)
    if not arrays:
        raise DataError(f"noise.file={str(path)!r} holds no 1-D integer label arrays")
    return arrays


@dataclass(frozen=True)
class HumanLabels:
    """The chosen label set: given labels, the file's clean labels, the known noise rate."""

    labels: np.ndarray
    clean: np.ndarray | None
    label_set: str
    known_rate: float


def human_labels(
    path: str | os.PathLike[str],
    label_set: str,
    dataset: str,
    shard_labels: np.ndarray,
    num_classes: int,
) -> HumanLabels:
    """The ``noise.cifar_n`` labels of ``path`` for a training set with ``shard_labels``.

    Parameters
    ----------
    path
        The ``CIFAR-10_human.pt`` / ``CIFAR-100_human.pt`` file.
    label_set
        A key of :data:`LABEL_SETS`.
    dataset
        ``data.name`` (``cifar10`` or ``cifar100``).
    shard_labels
        The training shards' (clean) labels in batch order.
    num_classes
        Classes of the training shards.

    Raises
    ------
    ConfigError
        An unknown label set, or one of another dataset.
    DataError
        A wrong file, a size that does not match the training set, labels out of range, or
        clean labels that disagree with the shards' (another order or another dataset).
    """
    if label_set not in LABEL_SETS:
        raise ConfigError(
            f"noise.cifar_n={label_set!r} is not a CIFAR-N label set; valid: "
            + ", ".join(f"{k} ({v.dataset})" for k, v in LABEL_SETS.items())
        )
    spec = LABEL_SETS[label_set]
    if dataset != spec.dataset:
        raise ConfigError(
            f"noise.cifar_n={label_set} is a label set of {spec.dataset}, not data.name={dataset}"
            "; CIFAR-10N: aggre, random1, random2, random3, worse; CIFAR-100N: noisy_fine, "
            "noisy_coarse"
        )
    if num_classes != spec.num_classes:
        raise ConfigError(
            f"noise.cifar_n={label_set} labels {spec.num_classes} classes but the training shards "
            f"have {num_classes}"
            + (
                "; convert CIFAR-100 with its 20 superclasses: python -m distnoisy.data.cifar "
                "--name cifar100 --coarse"
                if label_set == "noisy_coarse"
                else ""
            )
        )
    arrays = read_human_file(path)
    if spec.key not in arrays:
        raise DataError(
            f"noise.file={str(path)!r} has no {spec.key!r} (noise.cifar_n={label_set}); it holds "
            f"{', '.join(sorted(arrays))}. Is it {spec.file_name}?"
        )
    labels = arrays[spec.key]
    n = len(shard_labels)
    if len(labels) != n:
        raise DataError(
            f"noise.file={str(path)!r}: {spec.key} has {len(labels)} labels but the training set "
            f"has {n} images; CIFAR-N labels the {_TRAIN_SIZE:,} CIFAR training images in batch "
            "order (convert them with python -m distnoisy.data.cifar)"
        )
    if labels.min() < 0 or labels.max() >= num_classes:
        raise DataError(
            f"noise.file={str(path)!r}: {spec.key} holds labels in [{labels.min()}, "
            f"{labels.max()}], outside the training set's 0..{num_classes - 1}"
        )
    clean = arrays.get(spec.clean_key)
    if clean is not None and len(clean) == n:
        disagree = float(np.mean(clean != shard_labels))
        if disagree > 0:
            raise DataError(
                f"noise.file={str(path)!r}: its clean_label differs from the training shards' "
                f"labels on {disagree:.1%} of the images; the file and the shards must both be "
                "CIFAR's training images in batch order (python -m distnoisy.data.cifar)"
            )
    realised = float(np.mean(labels != shard_labels))
    log.info(
        "CIFAR-N %s (%s): realised noise rate %.2f%% (the CIFAR-N paper: %.2f%%)",
        label_set,
        spec.key,
        100 * realised,
        100 * spec.known_rate,
    )
    return HumanLabels(labels, clean, label_set, spec.known_rate)


def label_file(
    path: str | os.PathLike[str],
    label_set: str,
    dataset: str,
    shard_labels: np.ndarray,
    num_classes: int,
    cache_dir: str | os.PathLike[str],
) -> tuple[Path, np.ndarray]:
    """Write the chosen CIFAR-N labels as a distnoisy label file (Parquet) the ranks read.

    The file goes to ``cache_dir`` under a name holding the label set and a digest of its
    labels, so that it is written once and reused (atomically replaced if damaged).

    Returns
    -------
    tuple
        The label file's path and the given labels (int64, by training index).
    """
    from distnoisy.data.label_files import read_label_file, save_label_file
    from distnoisy.data.noise import features_digest

    human = human_labels(path, label_set, dataset, shard_labels, num_classes)
    digest = features_digest(human.labels)[:16]
    out = Path(cache_dir) / f"noise-{dataset}-cifar_n-{label_set}-{digest}.parquet"
    if out.is_file():
        try:
            cached = read_label_file(out, len(human.labels), num_classes)
            if np.array_equal(cached.labels, human.labels):
                return out, human.labels
        except DataError:
            pass  # damaged: written again below
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "kind": "cifar_n",
        "cifar_n": label_set,
        "source": Path(path).name,
        "known_rate": human.known_rate,
    }
    save_label_file(out, human.labels, np.asarray(shard_labels, dtype=np.int64), meta)
    return out, human.labels
