"""Progress inside an epoch (distnoisy.engine.progress): the interval, the figures, the lines."""

from __future__ import annotations

import logging

import pytest
import torch

from distnoisy.engine import progress
from distnoisy.engine.progress import StepProgress, format_duration, interval


def test_interval_by_epoch_length() -> None:
    assert interval(None, 99) == 0  # short epochs: nothing extra
    assert interval(None, 100) == 10 and interval(None, 1000) == 100
    assert interval(0, 1000) == 0 and interval(7, 20) == 7


def test_format_duration() -> None:
    assert [format_duration(s) for s in (0, 42.4, 185, 3720, 90061)] == [
        "0s",
        "42s",
        "3m05s",
        "1h02m",
        "25h01m",
    ]


def test_figures_against_a_hand_computation(monkeypatch, caplog) -> None:
    """5 steps of 8 images on each of 2 ranks, 0.5 s a step, a line every 2 steps."""
    clock = iter([100.0, 101.0, 102.0])  # start, after step 2, after step 4
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    logged: list[tuple[dict[str, float], int]] = []
    p = StepProgress(
        2, 5, epoch=1, epochs=3, world_size=2, log_metrics=lambda m, s: logged.append((m, s))
    )
    losses = [2.0, 1.0, 0.5, 0.5, 0.25]
    loss_sum, count = torch.zeros((), dtype=torch.float64), 0.0
    with caplog.at_level(logging.INFO, logger="distnoisy.engine.progress"):
        for loss in losses:
            loss_sum += loss * 8
            count += 8
            p.update(8, loss_sum, count)
    assert [s for _, s in logged] == [5 + 2, 5 + 4]  # global steps: epoch 1 of 5-step epochs
    first, second = logged[0][0], logged[1][0]
    assert first["step_images_per_s"] == pytest.approx(2 * 16 / 1.0)
    assert first["step_loss"] == pytest.approx(1.5)  # the epoch's running mean
    assert first["step_eta_epoch_s"] == pytest.approx(3 * 0.5)
    assert first["step_eta_run_s"] == pytest.approx(3 * 0.5 + 1 * 5 * 0.5)
    assert second["step_loss"] == pytest.approx(1.0) and second["step_eta_epoch_s"] == 0.5
    assert caplog.messages == [
        "epoch 2/3  step 2/5  32.0 images/s  loss 1.5000  ETA epoch 2s, run 4s",
        "epoch 2/3  step 4/5  32.0 images/s  loss 1.0000  ETA epoch 0s, run 3s",
    ]


def test_nothing_off_rank_0_or_when_off() -> None:
    logged: list = []
    for p in (
        StepProgress(1, 5, 0, 1, 2, lambda m, s: logged.append(s), enabled=False),
        StepProgress(0, 5, 0, 1, 2, lambda m, s: logged.append(s)),
    ):
        for _ in range(5):
            p.update(8, torch.tensor(1.0), 8.0)
    assert logged == []
