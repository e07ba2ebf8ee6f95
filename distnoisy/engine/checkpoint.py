"""The training checkpoint: a versioned format, atomic writes, every RNG that affects training.

A checkpoint directory holds ``state.pt`` (:data:`STATE_FILE`) and, with a validation set,
``weights_best.pt`` (the best-by-validation weights so far, carried from checkpoint to
checkpoint so a resumed run keeps them). ``state.pt`` is a dict of tensors and plain values
(loadable with ``torch.load(..., weights_only=True)``: no pickled code ever runs):

- ``format``: :data:`FORMAT_VERSION`, checked on load;
- ``epoch``, ``history``: the last finished epoch and the per-epoch metrics so far;
- ``networks``, ``optimizers``, ``schedulers``: state dicts by name;
- ``store``: the per-sample store, whole (replicated backend), or ``{}`` with ``store_parts``:
  the number of ``store-part-<rank>.pt`` files beside ``state.pt``, one per rank of a
  partitioned store (:mod:`distnoisy.store.parts`; format 2);
- ``method``: the method's (rank-independent) state;
- ``rng``: one entry per rank (:func:`capture_rng`): torch CPU, CUDA (when used), numpy's
  global generator, Python's ``random`` and the method's own generators (LIMIT's gradient
  noise); ranks draw different numbers, so each rank restores its own;
- ``best``: ``{"epoch", "val_acc"}`` of the best validation epoch so far, or None;
- ``grad_scaler``: the fp16 gradient scaler's state (its loss scale), or None (optional: a
  checkpoint written without it resumes with a fresh scale);
- ``position`` (optional, format 2): None after a whole epoch; in a mid-epoch checkpoint
  (``train.checkpoint_every_steps``, a preemption notice) where epoch ``epoch + 1`` stopped:
  ``{"epoch", "phase", "step", "done", "epoch_start", "sums"}``: the phase (its number in the
  method's phase order) and the batches of it already trained, the optimizer steps of the
  epoch so far, what ``on_epoch_start`` reported, and each rank's running sums of the
  epoch's training metrics (:class:`distnoisy.engine.trainer.Trainer`).

Checkpoint directories are named by :func:`checkpoint_name`: ``epoch=NNNN`` after epoch NNNN,
``epoch=NNNN-step=SSSSSS`` after optimizer step SSSSSS of epoch NNNN (sorted by
:func:`checkpoint_order`).
"""

from __future__ import annotations

import logging
import os
import pickle
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from distnoisy.core.errors import DistnoisyError
from distnoisy.engine import collectives

if TYPE_CHECKING:
    from distnoisy.methods.base import Method

log = logging.getLogger(__name__)

#: Bump when the layout of ``state.pt`` changes; :func:`load_state` refuses other versions.
#: 2: a partitioned store is saved as per-rank part files (``store_parts``).
FORMAT_VERSION = 2
#: Versions this distnoisy resumes from (1 has no ``store_parts``: its store is whole).
READABLE_FORMATS = (1, 2)
STATE_FILE = "state.pt"
#: Final weights of every network, ``{name: state_dict}`` (in a run's ``outputs/``).
WEIGHTS_FILE = "weights.pt"
#: The weights of the best validation epoch, same layout as :data:`WEIGHTS_FILE`.
BEST_WEIGHTS_FILE = "weights_best.pt"
#: The run's outputs inside its final checkpoint, which the driver publishes into the run dir.
OUTPUTS_DIR = "outputs"


#: The report key of a mid-epoch checkpoint: the optimizer steps of the epoch it follows.
EPOCH_STEP = "epoch_step"


def checkpoint_name(metrics: dict[str, float]) -> str:
    """The directory name of the checkpoint reported with ``metrics``."""
    name = f"epoch={int(metrics['epoch']):04d}"
    if EPOCH_STEP in metrics:
        name += f"-step={int(metrics[EPOCH_STEP]):06d}"
    return name


def checkpoint_order(name: str) -> tuple[int, float]:
    """Sort key of :func:`checkpoint_name`'s names: mid-epoch ones before their epoch's end."""
    epoch, _, step = name.removeprefix("epoch=").partition("-step=")
    return int(epoch), float(step) if step else float("inf")


class CheckpointError(DistnoisyError):
    """A checkpoint that this version of distnoisy cannot resume from."""


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` to a hidden temporary file, then rename: the file appears whole or not."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_state(path: Path) -> dict[str, Any]:
    """The checkpoint dict of ``path`` (weights only), after checking its format version.

    Raises
    ------
    CheckpointError
        The file is incomplete or damaged, or has no ``format`` or one this version does not
        read.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    # torch's errors for a truncated or corrupt archive; a file cut before its zip header is
    # read as a legacy pickle, which the weights-only unpickler rejects
    except (EOFError, RuntimeError, pickle.UnpicklingError) as e:
        first = str(e).split(". ")[0].splitlines()[0] if str(e).strip() else "end of file"
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({type(e).__name__}: {first}): it was not written "
            "completely, is damaged (a full disk?) or is not a distnoisy checkpoint, so the run "
            "cannot resume from it; start a new run (another output_dir, or resume=false)"
        ) from None
    version = state.get("format") if isinstance(state, dict) else None
    if version not in READABLE_FORMATS:
        raise CheckpointError(
            f"checkpoint {path} has format {version!r}, this distnoisy reads formats "
            f"{', '.join(map(str, READABLE_FORMATS))}; resume it with the distnoisy version that "
            "wrote it, or start a new run (another output_dir, or resume=false)"
        )
    return state


# -- random number generators ---------------------------------------------------------------
def _numpy_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    assert kind == "MT19937"
    # uint32 keys as int64: weights_only loading takes tensors, not numpy arrays
    return {
        "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }


def _set_numpy_state(s: dict[str, Any]) -> None:
    keys = s["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, s["pos"], s["has_gauss"], s["cached_gaussian"]))


def _python_state() -> dict[str, Any]:
    version, internal, gauss_next = random.getstate()
    return {
        "version": int(version),
        "state": torch.tensor(internal, dtype=torch.int64),
        "gauss_next": gauss_next,
    }


def _set_python_state(s: dict[str, Any]) -> None:
    internal = tuple(int(v) for v in s["state"].tolist())
    random.setstate((s["version"], internal, s["gauss_next"]))


def capture_rng(device: torch.device, method: Method) -> dict[str, Any]:
    """Every random number generator of this rank that training draws from.

    Parameters
    ----------
    device
        The rank's training device; its CUDA generator is included when it is a GPU.
    method
        The method, for its own generators (:meth:`Method.rng_state_dict`).
    """
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": _numpy_state(),
        "python": _python_state(),
        "method": method.rng_state_dict(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, Any], device: torch.device, method: Method) -> None:
    """Put back what :func:`capture_rng` returned on this rank."""
    torch.set_rng_state(state["torch"])
    _set_numpy_state(state["numpy"])
    _set_python_state(state["python"])
    method.load_rng_state_dict(state["method"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def gather_rng(device: torch.device, method: Method) -> list[dict[str, Any]]:
    """:func:`capture_rng` of every rank, in rank order (a collective: call on all ranks)."""
    return list(collectives.all_gather_object(capture_rng(device, method)))  # type: ignore[arg-type]


def restore_rank_rng(per_rank: list[dict[str, Any]], device: torch.device, method: Method) -> None:
    """Restore this rank's generators from a checkpoint's per-rank list.

    With another number of workers than the run that wrote the checkpoint (an elastic resize,
    a resume with other ``scaling.num_workers``) there is no matching state: the per-rank
    generators keep their fresh seeds. Training draws nothing from them: augmentation, the
    data order (``data.split=sample``) and LIMIT's noise are keyed by seed, epoch and sample,
    so a CE/ELR/LIMIT run goes on as an unresized one would, up to float summation order.
    (Draws made per local batch, ELR+'s mixup pairs and peer's permutations, follow how the
    global batch is split, so they change with the worker count.)
    """
    if len(per_rank) != collectives.world_size():
        if collectives.rank() == 0:
            log.info(
                "checkpoint written by %d workers, resuming on %d: per-rank random generators "
                "start fresh (training's draws are keyed by sample and step, not by rank)",
                len(per_rank),
                collectives.world_size(),
            )
        return
    restore_rng(per_rank[collectives.rank()], device, method)
