"""Mid-epoch checkpoints (``train.checkpoint_every_steps``) and the keyed random state that
makes resuming from them exact.

The exactness test interrupts a real run: ``python -m distnoisy.train`` (local launcher) is
SIGKILLed as soon as its first mid-epoch checkpoint appears, then resumed with
``resume=true``; it must end bit-identical (summary figures, every ``sample_stats`` column,
the final weights) to a run that was never interrupted and never checkpointed mid-epoch.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from distnoisy.config import load_config
from distnoisy.core.errors import ConfigError
from distnoisy.engine import checkpoint as ckpt
from distnoisy.store.export import iter_sample_stats
from distnoisy.train import train

EPOCHS = 2  # the kill lands in epoch 0; epoch 1 shows that the resumed run goes on exactly
EVERY = 5  # digits: 22 optimizer steps per epoch at batch 64, so checkpoints at 5, 10, 15, 20
COMMON = ("scaling.launcher=local", "tracking.enabled=false", f"train.epochs={EPOCHS}")
ONE = ("scaling.num_workers=1",)


def _args(digits_root: Path, run_dir: Path, *extra: str) -> list[str]:
    return [f"data.root={digits_root}", f"output_dir={run_dir}", *COMMON, *extra]


def _kill_after_first_mid_epoch_checkpoint(args: list[str], ckpts: Path) -> list[str]:
    """Run ``python -m distnoisy.train args`` and SIGKILL it once a mid-epoch checkpoint is
    there; the checkpoints left (names, oldest first)."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen(
        [sys.executable, "-m", "distnoisy.train", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 600
    try:
        while not any(ckpts.glob("epoch=*-step=*")):
            if proc.poll() is not None:
                pytest.fail(f"the run ended before its first mid-epoch checkpoint: {proc.stderr}")
            if time.monotonic() > deadline:
                pytest.fail("no mid-epoch checkpoint within 600 s")
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate()
    left = sorted((p.name for p in ckpts.glob("epoch=*")), key=ckpt.checkpoint_order)
    assert not (ckpts.parent / "summary.json").exists()
    return left


def _column(table, name: str) -> np.ndarray:
    values = table[name].to_numpy(zero_copy_only=False)
    if values.dtype == object and len(values) and isinstance(values[0], np.ndarray):
        return np.stack(values)
    return values


def _assert_bit_identical(straight: dict, resumed: dict) -> None:
    a, b = Path(straight["output_dir"]), Path(resumed["output_dir"])
    # One file, or one part per rank with a partitioned store.
    ta, tb = (pa.Table.from_batches(list(iter_sample_stats(d))) for d in (a, b))
    assert ta.column_names == tb.column_names
    for name in ta.column_names:
        ca, cb = _column(ta, name), _column(tb, name)
        assert ca.dtype == cb.dtype, name
        if ca.dtype.kind == "f":
            np.testing.assert_array_equal(ca, cb, err_msg=name)  # NaN == NaN here
        else:
            assert (ca == cb).all(), name
    for ha, hb in zip(straight["history"], resumed["history"], strict=True):
        assert ha.keys() == hb.keys()
        assert {k: v for k, v in ha.items() if k != "epoch_time_s"} == {
            k: v for k, v in hb.items() if k != "epoch_time_s"
        }
    assert len(resumed["history"]) == EPOCHS
    for key, value in straight.items():
        if isinstance(value, float) and not key.endswith("_s"):  # not the timings
            assert resumed[key] == value or (np.isnan(value) and np.isnan(resumed[key])), key
    wa = torch.load(a / "weights.pt", weights_only=True)
    wb = torch.load(b / "weights.pt", weights_only=True)
    for net in wa:
        for key, t in wa[net].items():
            assert torch.equal(t, wb[net][key]), f"{net}.{key}"


@pytest.mark.slow
@pytest.mark.parametrize(
    "method",
    [
        ("method.name=ce",),
        ("method.name=elr",),
        ("method.name=elr_plus",),
        ("method.name=limit", "method.sample_from_q=true"),
    ],
    ids=lambda m: m[0].split("=")[1],
)
def test_killed_mid_epoch_and_resumed_is_bit_identical(tmp_path, digits_root, method):
    straight = train(load_config(_args(digits_root, tmp_path / "straight", *ONE, *method)))
    run = tmp_path / "killed"
    args = _args(digits_root, run, *ONE, *method, f"train.checkpoint_every_steps={EVERY}")
    left = _kill_after_first_mid_epoch_checkpoint(args, run / "checkpoints")
    # As if the process died right after its latest mid-epoch checkpoint: a whole-epoch one
    # written in the moment before the kill landed is not the case under test.
    while "-step=" not in left[-1]:
        import shutil

        shutil.rmtree(run / "checkpoints" / left.pop())
    state = ckpt.load_state(run / "checkpoints" / left[-1] / ckpt.STATE_FILE)
    assert state["position"]["done"] % EVERY == 0 and 0 < state["position"]["done"] < 22
    resumed = train(load_config([*args, "resume=true"]))
    _assert_bit_identical(straight, resumed)
    kept = sorted(
        (p.name for p in (run / "checkpoints").glob("epoch=*")), key=ckpt.checkpoint_order
    )
    assert kept[-1] == f"epoch={EPOCHS - 1:04d}"


@pytest.mark.slow
def test_mid_epoch_resume_on_two_processes_with_a_partitioned_store(tmp_path, digits_root):
    # Two gloo ranks, each with its own part of the store and its own running sums.
    extra = ("method.name=elr", "scaling.num_workers=2", "data.split=sample")
    extra += ("store.backend=partitioned",)
    straight = train(load_config(_args(digits_root, tmp_path / "straight", *extra)))
    run = tmp_path / "killed"
    args = _args(digits_root, run, *extra, f"train.checkpoint_every_steps={EVERY}")
    train(load_config(args))
    ckpts = run / "checkpoints"
    import shutil

    for name in ("summary.json", "weights.pt"):
        (run / name).unlink()  # the resumed run must write its own
    shutil.rmtree(run / "sample_stats")
    for path in sorted(ckpts.glob("epoch=*"), key=lambda p: ckpt.checkpoint_order(p.name)):
        if "-step=" not in path.name:  # keep only the mid-epoch checkpoint of the last epoch
            shutil.rmtree(path)
    assert [p.name for p in ckpts.glob("epoch=*")] == [f"epoch={EPOCHS - 1:04d}-step=000020"]
    resumed = train(load_config([*args, "resume=true"]))
    _assert_bit_identical(straight, resumed)


# -- keyed random state, order of checkpoints, config ----------------------------------------
def test_limit_noise_is_keyed_by_seed_epoch_and_sample():
    from distnoisy.methods import METHODS
    from distnoisy.methods.base import StepInput

    cfg = load_config(["method.name=limit", "method.sample_from_q=true"])
    method = METHODS.get("limit")(cfg.method, num_samples=400, num_classes=3, epochs=2, seed=5)

    def noise(index: list[int], epoch: int = 0) -> torch.Tensor:
        inp = StepInput(None, None, torch.tensor(index), epoch, 0, 1, "model")
        out = method._noise(inp, torch.Size([len(index), 3]), torch.device("cpu"))
        assert out is not None
        return out

    whole = noise([3, 7, 11, 40])
    # Another split of the batch (another rank count), another order: the same rows.
    assert torch.equal(torch.cat([noise([3, 7]), noise([11, 40])]), whole)
    assert torch.equal(noise([40, 3]), whole[[3, 0]])
    assert not torch.equal(noise([3, 7, 11, 40], epoch=1), whole)  # a new draw per epoch
    other = METHODS.get("limit")(cfg.method, num_samples=400, num_classes=3, epochs=2, seed=6)
    inp = StepInput(None, None, torch.tensor([3, 7, 11, 40]), 0, 0, 1, "model")
    assert not torch.equal(other._noise(inp, whole.shape, torch.device("cpu")), whole)
    # The law: the default variant's Laplace noise of scale 1 / lamb, std sqrt(2) / lamb.
    assert cfg.method.variant == "laplace"
    many = noise(list(range(400)))
    assert abs(float(many.std()) - 2**0.5 / cfg.method.lamb) < 0.15


def test_checkpoint_names_sort_mid_epoch_ones_before_their_epoch_end():
    names = [
        ckpt.checkpoint_name({"epoch": 1}),
        ckpt.checkpoint_name({"epoch": 2, ckpt.EPOCH_STEP: 10}),
        ckpt.checkpoint_name({"epoch": 1, ckpt.EPOCH_STEP: 5}),
        ckpt.checkpoint_name({"epoch": 2}),
        ckpt.checkpoint_name({"epoch": 0}),
    ]
    assert sorted(names, key=ckpt.checkpoint_order) == [
        "epoch=0000",
        "epoch=0001-step=000005",
        "epoch=0001",
        "epoch=0002-step=000010",
        "epoch=0002",
    ]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.checkpoint_every_steps=-1"], "train.checkpoint_every_steps must be >= 0"),
        (["scaling.min_workers=3"], "scaling.min_workers=3 must be in 1..scaling.num_workers=2"),
        (["scaling.min_workers=0"], "must be in 1..scaling.num_workers"),
        (
            ["scaling.num_workers=4", "scaling.min_workers=2", "data.split=sample"],
            "train.batch_size=64 (the global batch) is not divisible by 3 workers, which "
            "scaling.num_workers/min_workers allow (2..4); use a multiple of 12",
        ),
        (["scaling.min_workers=1", "data.split=shard"], "needs data.split=sample"),
        (
            ["scaling.min_workers=1", "data.split=sample", "scaling.launcher=local"],
            "needs scaling.launcher=ray",
        ),
    ],
)
def test_elastic_config_errors_are_one_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_an_elastic_range_every_count_divides_is_accepted():
    cfg = load_config(
        [
            "scaling.num_workers=4",
            "scaling.min_workers=2",
            "data.split=sample",
            "train.batch_size=48",
        ]
    )
    assert (cfg.scaling.min_workers, cfg.scaling.num_workers) == (2, 4)


def test_the_checkpoint_cost_bench_measures_both_sides():
    from distnoisy.bench.midepoch import MidEpochSettings, render, run

    settings = MidEpochSettings(n=5000, model="small_cnn", image=32, local_batch=4, repeats=1)
    report = run(settings)
    assert [p["rows"] for p in report.per_rank] == [2500, 2500]  # the store is partitioned
    for p in report.per_rank:
        assert p["ckpt_s"][0] > 0 and p["step_s"][0] > 0
    text = render(report, "python -m distnoisy.bench midepoch")
    assert "| K = 100 | K = 500 | K = 1000 |" in text and "N = 5,000 rows" in text
