"""Resume is exact: a run interrupted after a checkpoint and resumed ends where an uninterrupted
run ends (history, weights, every per-sample store field), for every family of method state.

The interruption is real: a finished run's directory is copied and its last checkpoint deleted,
as if the job had died after the previous epoch was checkpointed; ``resume=true`` then trains
the lost epoch again from the checkpoint on disk (a fresh
:class:`~distnoisy.engine.trainer.Trainer`).
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from distnoisy.config import load_config
from distnoisy.core.errors import DistnoisyError
from distnoisy.engine import checkpoint as ckpt
from distnoisy.train import train

#: Epochs of a resume case: the second is lost and trained again from the first's checkpoint.
EPOCHS = 2
_METHOD_NAMES = [
    "backward", "bootstrap", "ce", "dal", "elr", "elr_plus", "forward", "gce", "limit", "ls",
    "mae", "nce_rce", "peer", "sce", "taylor_ce", "tgce",
]  # fmt: skip
COMMON = (
    "scaling.launcher=local",
    "tracking.enabled=false",
)


def _train(run_dir: Path, digits_root: Path, *overrides: str, epochs: int = EPOCHS) -> dict:
    args = [f"data.root={digits_root}", f"output_dir={run_dir}", f"train.epochs={epochs}"]
    return train(load_config([*args, *COMMON, *overrides]))


def _interrupt_and_resume(
    straight: Path, digits_root: Path, *overrides: str, epochs: int = EPOCHS
) -> dict:
    """Copy the finished run ``straight``, lose its last checkpoint, resume it to the end."""
    resumed = straight.parent / "resumed"
    shutil.copytree(straight, resumed)
    for name in ("summary.json", "sample_stats.parquet", "weights.pt", "weights_best.pt"):
        (resumed / name).unlink(missing_ok=True)  # the resumed run must write its own
    last = sorted((resumed / "checkpoints").glob("epoch=*"))[-1]
    assert last.name == f"epoch={epochs - 1:04d}"
    shutil.rmtree(last)
    return _train(resumed, digits_root, *overrides, "resume=true", epochs=epochs)


def _assert_same_weights(a: Path, b: Path, atol: float) -> None:
    wa = torch.load(a, map_location="cpu", weights_only=True)
    wb = torch.load(b, map_location="cpu", weights_only=True)
    assert wa.keys() == wb.keys()
    for net in wa:
        for key, t in wa[net].items():
            if atol == 0 or not t.is_floating_point():
                assert torch.equal(t, wb[net][key]), f"{a.name} {net}.{key}"
            else:
                assert torch.allclose(t, wb[net][key], rtol=0, atol=atol), f"{net}.{key}"


def _column(table, name: str) -> np.ndarray:
    values = table[name].to_numpy(zero_copy_only=False)
    if values.dtype == object and len(values) and isinstance(values[0], np.ndarray):
        return np.stack(values)  # vector fields (loss history, probabilities, targets)
    return values


def _assert_same_store(a: Path, b: Path, atol: float) -> None:
    ta, tb = pq.read_table(a / "sample_stats.parquet"), pq.read_table(b / "sample_stats.parquet")
    assert ta.column_names == tb.column_names
    for name in ta.column_names:
        ca, cb = _column(ta, name), _column(tb, name)
        if ca.dtype.kind == "f":
            np.testing.assert_allclose(ca, cb, rtol=0, atol=atol, equal_nan=True, err_msg=name)
        else:
            assert (ca == cb).all(), name


def _assert_same_history(a: dict, b: dict, atol: float) -> None:
    assert len(a["history"]) == len(b["history"]) == a["epochs"]
    for ha, hb in zip(a["history"], b["history"], strict=True):
        assert ha.keys() == hb.keys()
        for key in ha.keys() - {"epoch_time_s"}:
            assert ha[key] == pytest.approx(hb[key], rel=0, abs=atol), key


def _assert_same_training_state(a: Path, b: Path, epochs: int, atol: float) -> None:
    """The last checkpoints hold the same networks, optimizer and scheduler states, method state
    (ELR+'s EMA networks) and method generators (LIMIT's noise, per rank)."""
    name = f"epoch={epochs - 1:04d}"
    sa, sb = (ckpt.load_state(d / "checkpoints" / name / ckpt.STATE_FILE) for d in (a, b))

    def walk(x, y, where: str) -> None:
        if isinstance(x, dict):
            assert isinstance(y, dict) and x.keys() == y.keys(), where
            for k in x:
                walk(x[k], y[k], f"{where}.{k}")
        elif isinstance(x, (list, tuple)):
            assert len(x) == len(y), where
            for i, (u, v) in enumerate(zip(x, y, strict=True)):
                walk(u, v, f"{where}[{i}]")
        elif isinstance(x, torch.Tensor):
            if atol == 0 or not x.is_floating_point():
                assert torch.equal(x, y), where
            else:
                assert torch.allclose(x, y, rtol=0, atol=atol), where
        else:
            assert x == y, where

    for key in ("networks", "optimizers", "schedulers", "method"):
        walk(sa[key], sb[key], key)
    # Each rank's own method generators (LIMIT's gradient noise).
    walk([r["method"] for r in sa["rng"]], [r["method"] for r in sb["rng"]], "rng.method")


def _check_resume_exact(
    tmp_path: Path, digits_root: Path, atol: float, *overrides: str, epochs: int = EPOCHS
) -> dict:
    straight_dir = tmp_path / "straight"
    straight = _train(straight_dir, digits_root, *overrides, epochs=epochs)
    resumed = _interrupt_and_resume(straight_dir, digits_root, *overrides, epochs=epochs)
    resumed_dir = Path(resumed["output_dir"])
    _assert_same_history(straight, resumed, atol)
    _assert_same_weights(straight_dir / "weights.pt", resumed_dir / "weights.pt", atol)
    _assert_same_store(straight_dir, resumed_dir, atol)
    _assert_same_training_state(straight_dir, resumed_dir, epochs, atol)
    for key in ("test_acc", "memorized", "label_issue_auroc"):
        assert resumed[key] == pytest.approx(straight[key], rel=0, abs=atol), key
    return straight


# Each case protects one kind of state a checkpoint must carry:
# - ce: networks, optimizer, scheduler, the store's loss history and predictions;
# - elr: the method's per-sample targets (a store field written by the loss);
# - elr_plus: two networks, two optimizers, EMA weights (method state), per-network streams,
#   both networks' targets;
# - limit with sample_from_q: LIMIT's gradient noise, drawn from generators keyed by (seed,
#   epoch, sample) (once a per-rank generator that checkpoints had to carry: without it a
#   resumed run drew epoch 0's noise again and diverged);
# - peer: a generator re-seeded from each step's position (must stay exact without state).
@pytest.mark.slow
@pytest.mark.parametrize(
    "method",
    [
        # LIMIT with sampling: the case whose generator was once missing from checkpoints.
        ("method.name=limit", "method.sample_from_q=true"),
        *[(f"method.name={name}",) for name in _METHOD_NAMES],  # every registered method
    ],
    ids=lambda m: "-".join(o.split("=")[1] for o in m),
)
def test_resume_is_bit_exact_on_one_process(tmp_path, digits_root, method):
    _check_resume_exact(tmp_path, digits_root, 0.0, "scaling.num_workers=1", *method)


@pytest.mark.slow
def test_resume_keeps_the_best_validation_weights(tmp_path, digits_root):
    # The best-by-validation weights travel in every checkpoint: a resumed run must end with the
    # same weights_best.pt as an uninterrupted one, and they must be the best epoch's.
    summary = _check_resume_exact(
        tmp_path, digits_root, 0.0, "scaling.num_workers=1", "data.val_fraction=0.1"
    )
    best = summary["best_val_epoch"]
    assert best is not None
    assert summary["test_acc_at_best_val"] == summary["history"][best]["test_acc"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _assert_same_weights(straight / "weights_best.pt", resumed / "weights_best.pt", 0.0)
    final = torch.load(straight / "weights.pt", weights_only=True)
    kept = torch.load(straight / "weights_best.pt", weights_only=True)
    assert final.keys() == kept.keys()  # the same layout as weights.pt
    same = all(torch.equal(final["model"][k], kept["model"][k]) for k in final["model"])
    assert same == (best == EPOCHS - 1)


@pytest.mark.slow
def test_resume_is_exact_with_two_processes(tmp_path, digits_root):
    # Two gloo ranks, each with its own generators (torch, numpy): every rank restores its own.
    # Two epochs (the second one resumed) keep the spawned runs short.
    _check_resume_exact(
        tmp_path,
        digits_root,
        1e-6,
        "scaling.num_workers=2",
        "data.split=sample",
        "method.name=limit",
        "method.sample_from_q=true",
        epochs=2,
    )


def test_no_validation_set_writes_no_best_weights(tmp_path, digits_root):
    run = tmp_path / "run"
    _train(run, digits_root, "train.epochs=1", "scaling.num_workers=1", "method.name=ce")
    assert (run / "weights.pt").exists() and not (run / "weights_best.pt").exists()


# -- the checkpoint format, without training ------------------------------------------------
@pytest.mark.parametrize("version", [None, 0, ckpt.FORMAT_VERSION + 1])
def test_unknown_checkpoint_format_is_a_one_line_error(tmp_path, version):
    state = {"epoch": 0, "history": []}
    if version is not None:
        state["format"] = version
    path = tmp_path / ckpt.STATE_FILE
    ckpt.save_atomic(state, path)
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.load_state(path)
    assert isinstance(err.value, DistnoisyError)
    message = str(err.value)
    assert "\n" not in message and f"format {version!r}" in message and str(path) in message


def test_resume_tests_cover_every_registered_method():
    from distnoisy.methods import METHODS

    assert sorted(_METHOD_NAMES) == METHODS.names()


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    from distnoisy.config import load_config
    from distnoisy.methods import METHODS

    cfg = load_config(["method.name=limit", "method.sample_from_q=true"])
    method = METHODS.get("limit")(cfg.method, num_samples=4, num_classes=3, epochs=1, seed=5)
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    ckpt.save_atomic({"rng": ckpt.capture_rng(torch.device("cpu"), method)}, tmp_path / "s.pt")

    def draw() -> tuple:
        return torch.rand(3), np.random.rand(3), np.random.randn(), random.random()

    expected = draw()
    draw()  # move every generator on
    state = torch.load(tmp_path / "s.pt", weights_only=True)
    ckpt.restore_rng(state["rng"], torch.device("cpu"), method)
    for a, b in zip(expected, draw(), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
