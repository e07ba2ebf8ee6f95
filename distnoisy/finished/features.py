"""Penultimate features and logits of a finished run, for every sample, by global index.

The later phases (post-training, instance-level analysis) work on the frozen backbone's
features ``h_i = phi(x_i)`` of every training, validation and test sample. :func:`extract_features`
computes them from the run's final (or best-by-validation) weights, in eval mode, with the run's
evaluation transform (no augmentation), and caches them under
``<cache_dir or run_dir>/features/<weights>-<dtype>-<hash of the weights file>/``, so a second
call loads them instead of recomputing.

The work is split like evaluation during training, in contiguous index blocks read with an
:class:`~distnoisy.data.stream.EvalStream`, but each rank's block is a run of whole batches
(:func:`rank_rows`): sample ``i`` is always in batch ``i // BATCH_SIZE``, with the same
neighbours, whatever the number of ranks. A CPU convolution may sum in an order that depends on
the batch's shape, so equal batches are what make the features bitwise independent of the number
of ranks (when every sample decodes: a skipped sample's place in its batch is taken by the next
one). Each rank writes its rows, by global index, into ``.npy`` files the driver created
beforehand (opened as ``np.memmap``); rows never touch each other, so no collective is needed. The
ranks run on the run's launcher (:func:`distnoisy.launch.ranks.run_ranks`: Ray Train workers, or the
local launcher's processes); one rank runs in-process. The files are filled in a temporary
directory that is renamed into place when every rank has finished (a cache entry appears whole or
not at all). Samples that cannot be decoded keep NaN rows.

Which network's features: the network(s) the method predicts with. Most methods have one
(``model``); LIMIT predicts with ``classifier`` (its q-network is only a training aid); ELR+
predicts with the mean of ``net1``'s and ``net2``'s logits. For ELR+ the features are the two
networks' features side by side, ``[h1; h2]``, and :func:`prediction_head` returns the head
``[W1 W2] / 2``, ``(b1 + b2) / 2``: ``features @ W.T + b`` is the method's prediction, exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from distnoisy.core.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from distnoisy.config import Config
    from distnoisy.data.prepare import DataSpec
    from distnoisy.data.shards import Manifest
    from distnoisy.data.stream import EvalStream, Transform
    from distnoisy.finished.runs import FinishedRun
    from distnoisy.launch.ranks import RankGroup

SPLITS = ("train", "val", "test")
WEIGHTS = {"final": "weights.pt", "best": "weights_best.pt"}
DTYPES = ("float32", "float16")
#: Samples per forward pass on each rank.
BATCH_SIZE = 256
#: The networks each method predicts with (every other method: ``model``).
PREDICTING_NETWORKS = {"elr_plus": ("net1", "net2"), "limit": ("classifier",)}


@dataclass(frozen=True)
class Features:
    """One split's features and logits, one row per sample, row = global index.

    Attributes
    ----------
    split
        ``train``, ``val`` or ``test``.
    features
        ``(N, d)`` penultimate features (NaN rows for samples that could not be decoded).
    logits
        ``(N, C)`` logits of the method's prediction.
    path
        The ``.npy`` file ``features`` was loaded from (``logits`` is beside it).
    """

    split: str
    features: np.ndarray
    logits: np.ndarray
    path: Path


@dataclass(frozen=True)
class ExtractTask:
    """What every rank needs (plain values: it travels to Ray workers and spawned processes).

    ``splits`` holds ``(split, shard directory, features .npy, logits .npy)``.
    """

    config: Config
    spec: DataSpec
    weights_path: str
    networks: tuple[str, ...]
    splits: tuple[tuple[str, str, str, str], ...]
    batch_size: int = BATCH_SIZE


def predicting_networks(method_name: str) -> tuple[str, ...]:
    """The networks whose mean logits the method predicts with (see the module docstring)."""
    return PREDICTING_NETWORKS.get(method_name, ("model",))


def prediction_head(
    weights: dict[str, dict[str, Any]], method_name: str
) -> tuple[np.ndarray, np.ndarray]:
    """The linear head ``(W (C, D), b (C,))`` in float64 that maps the extracted features to the
    method's logits (``D`` = the sum of the predicting networks' feature widths)."""
    nets = predicting_networks(method_name)
    k = len(nets)
    ws = [weights[n]["classifier.weight"].double().numpy() for n in nets]
    bs = [weights[n]["classifier.bias"].double().numpy() for n in nets]
    return np.concatenate(ws, axis=1) / k, np.mean(bs, axis=0)


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    """The first 16 hex digits of the SHA-256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()[:16]


# -- per rank -----------------------------------------------------------------------------------
def rank_rows(num_samples: int, batch_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank ``rank``'s rows ``[lo, hi)`` of ``num_samples``: a contiguous run of whole batches.

    The split's batches are ``[k B, (k + 1) B)`` (the last may be shorter); rank ``r`` of ``W``
    takes batches ``[K r // W, K (r + 1) // W)`` of the ``K = ceil(N / B)``. A rank holds no rows
    when ``W > K``.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
    k = -(-num_samples // batch_size)
    lo = min(num_samples, batch_size * (k * rank // world_size))
    hi = min(num_samples, batch_size * (k * (rank + 1) // world_size))
    return lo, hi


def _rows_stream(
    manifest: Manifest, rows: tuple[int, int], batch_size: int, transform: Transform
) -> EvalStream:
    """An :class:`EvalStream` over the rows ``[lo, hi)`` (instead of a rank's even share), reading
    only the shards that overlap them."""
    from distnoisy.data.stream import EvalStream

    # EvalStream splits by rank into even shares; here the block is given. Narrow a one-rank
    # stream to it: the rows it yields and the shards it opens.
    stream = EvalStream(manifest, rank=0, world_size=1, batch_size=batch_size, transform=transform)
    lo, hi = rows
    stream.lo, stream.hi = lo, hi
    stream._shards = [
        i
        for i, s in enumerate(manifest.shards)
        if s.first_index < hi and s.first_index + s.count > lo
    ]
    return stream


def _load_networks(task: ExtractTask, device: torch.device) -> list[torch.nn.Module]:
    import torch

    from distnoisy.models import build_model

    state = torch.load(task.weights_path, map_location="cpu", weights_only=True)
    cfg, spec = task.config, task.spec
    nets = []
    for name in task.networks:
        net = build_model(cfg.model.name, spec.num_classes, spec.in_channels, None)
        net.load_state_dict(state[name])
        nets.append(net.to(device).eval())
    return nets


def extract_rank(task: ExtractTask, rank: int, world_size: int, device: torch.device) -> None:
    """Rank ``rank``'s share of every split: features and logits written by global index."""
    import torch

    from distnoisy.data.shards import read_manifest
    from distnoisy.data.stream import make_transform

    spec = task.spec
    transform = make_transform(
        spec.eval_transform, spec.mean, spec.std, size=task.config.data.image_size
    )
    nets = _load_networks(task, device)
    for _split, set_dir, feat_path, logit_path in task.splits:
        manifest = read_manifest(set_dir)
        rows = rank_rows(manifest.num_samples, task.batch_size, rank, world_size)
        stream = _rows_stream(manifest, rows, task.batch_size, transform)
        feats = np.load(feat_path, mmap_mode="r+")
        logits = np.load(logit_path, mmap_mode="r+")
        with torch.no_grad():
            for batch in stream.batches():
                x = batch["image"].to(device)
                hs = [net.forward_features(x) for net in nets]
                zs = [net.classifier(h) for net, h in zip(nets, hs, strict=True)]
                index = batch["index"].numpy()
                feats[index] = torch.cat(hs, dim=1).float().cpu().numpy()
                logits[index] = (torch.stack(zs).mean(0)).float().cpu().numpy()
        feats.flush()
        logits.flush()
        del feats, logits


def rank_device(config: Config, rank: int) -> torch.device:
    """The device of rank ``rank`` (CUDA when ``scaling.use_gpu``, else the CPU)."""
    import torch

    if config.scaling.use_gpu and torch.cuda.is_available():
        return torch.device("cuda", rank % torch.cuda.device_count())
    return torch.device("cpu")


def run_task_rank(task: ExtractTask, rank: int, world_size: int) -> None:
    """Entry point of a launcher's rank (importable by reference)."""
    extract_rank(task, rank, world_size, rank_device(task.config, rank))


# -- driver -------------------------------------------------------------------------------------
def _check_args(splits: Sequence[str], weights: str, dtype: str) -> None:
    bad = [s for s in splits if s not in SPLITS]
    if bad:
        raise ConfigError(f"unknown split(s) {', '.join(bad)}; choose from {', '.join(SPLITS)}")
    if weights not in WEIGHTS:
        raise ConfigError(f"weights={weights!r}; choose 'final' or 'best'")
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r}; choose 'float32' or 'float16'")


def _split_dirs(spec: DataSpec, splits: Sequence[str]) -> dict[str, str]:
    dirs = {"train": spec.train_dir, "val": spec.val_dir, "test": spec.test_dir}
    return {s: dirs[s] for s in splits if dirs[s] is not None}


def _feature_dim(task: ExtractTask) -> int:
    import torch

    nets = _load_networks(task, torch.device("cpu"))
    return sum(int(net.feature_dim) for net in nets)


def _load_entry(entry: Path, splits: Sequence[str]) -> dict[str, Features] | None:
    """The cached features, or None when the entry does not hold every split asked for."""
    meta_path = entry / "meta.json"
    if not meta_path.is_file():
        return None
    held = set(json.loads(meta_path.read_text())["splits"])
    if not set(splits) <= held:
        return None
    out = {}
    for s in splits:
        path = entry / f"{s}.features.npy"
        feats = np.load(path, mmap_mode="r")
        logits = np.load(entry / f"{s}.logits.npy", mmap_mode="r")
        out[s] = Features(s, feats, logits, path)
    return out


def _allocate(tmp: Path, dirs: dict[str, str], dim: int, num_classes: int, dtype: str) -> None:
    from distnoisy.data.shards import read_manifest

    for s, d in dirs.items():
        n = read_manifest(d).num_samples
        for name, width in (("features", dim), ("logits", num_classes)):
            arr = np.lib.format.open_memmap(
                tmp / f"{s}.{name}.npy", mode="w+", dtype=dtype, shape=(n, width)
            )
            arr[:] = np.nan  # rows of undecodable samples stay NaN
            arr.flush()
            del arr


def extract_features(
    run: FinishedRun,
    splits: Sequence[str] = SPLITS,
    *,
    weights: str = "final",
    dtype: str = "float32",
    num_workers: int | None = None,
    launcher: str | None = None,
    cache_dir: Path | None = None,
    ranks: RankGroup | None = None,
) -> dict[str, Features]:
    """Features and logits of every sample of ``splits`` (absent splits are skipped).

    Parameters
    ----------
    run
        The finished run (see :func:`distnoisy.finished.runs.open_run`).
    splits
        Any of ``train``, ``val``, ``test``.
    weights
        ``final`` (``weights.pt``) or ``best`` (``weights_best.pt``, runs with a validation set).
    dtype
        ``float32`` or ``float16`` (half the disk and memory; computed in float32).
    num_workers, launcher
        Ranks and launcher (``ray`` or ``local``); default: the run's ``scaling.*``.
    cache_dir
        Where ``features/`` lives; default: the run directory.
    ranks
        Ranks already started for the caller's job (post-training extracts on the ranks that
        then score its rounds); they replace ``num_workers`` and ``launcher``.

    Returns
    -------
    dict[str, Features]
        One entry per split present in the run, arrays memory-mapped read-only.

    Raises
    ------
    ConfigError
        On an unknown split, weights or dtype, or a run without the weights file.
    """
    from distnoisy.data.prepare import prepare_data

    _check_args(splits, weights, dtype)
    weights_file = run.path(WEIGHTS[weights])
    if not weights_file.is_file():
        raise ConfigError(f"run {run.run_dir} has no {weights_file.name}")
    root = Path(cache_dir or run.run_dir) / "features"
    entry = root / f"{weights}-{dtype}-{file_digest(weights_file)}"
    spec = prepare_data(run.config)
    dirs = _split_dirs(spec, splits)
    cached = _load_entry(entry, list(dirs))
    if cached is not None:
        return cached
    tmp = root / f".{entry.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        task = ExtractTask(
            config=run.config,
            spec=spec,
            weights_path=str(weights_file),
            networks=predicting_networks(run.config.method.name),
            splits=tuple(
                (s, d, str(tmp / f"{s}.features.npy"), str(tmp / f"{s}.logits.npy"))
                for s, d in dirs.items()
            ),
        )
        _allocate(tmp, dirs, _feature_dim(task), spec.num_classes, dtype)
        if ranks is not None:
            ranks.run(run_task_rank, task)
        else:
            _run(task, run, num_workers, launcher, tmp)
        meta = {
            "splits": list(dirs),
            "weights": weights,
            "dtype": dtype,
            "networks": list(task.networks),
            "weights_file": str(weights_file),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        shutil.rmtree(tmp / "ray", ignore_errors=True)  # the Ray launcher's run records
        shutil.rmtree(entry, ignore_errors=True)
        os.replace(tmp, entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    loaded = _load_entry(entry, list(dirs))
    assert loaded is not None
    return loaded


def _run(
    task: ExtractTask,
    run: FinishedRun,
    num_workers: int | None,
    launcher: str | None,
    scratch: Path,
) -> None:
    from distnoisy.launch.ranks import run_ranks

    scaling = run.config.scaling
    world = int(num_workers or scaling.num_workers)
    if world < 1:
        raise ConfigError(f"num_workers must be >= 1, got {world}")
    run_ranks(
        run_task_rank,
        task,
        world_size=world,
        launcher=launcher or scaling.launcher,
        use_gpu=scaling.use_gpu,
        address=scaling.address,
        storage_dir=scratch / "ray",
    )
