"""Class mix of training batches: class-ordered sources (image folders) must still train on
batches that hold about as many classes as a random draw would."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distnoisy.data import folder
from distnoisy.data.mixing import (
    class_mix,
    distinct_classes,
    expected_distinct_classes,
)
from distnoisy.data.shards import read_labels, read_manifest
from distnoisy.data.stream import TrainStream, _interleave, make_transform

IDENTITY = make_transform("digits", [0.0], [1.0])


def test_expected_distinct_classes_by_hand_and_by_simulation() -> None:
    # Two equal classes, 2 draws: both present unless both draws agree -> 2 - 2 * 0.25 = 1.5.
    assert expected_distinct_classes(np.array([5, 5]), 2) == pytest.approx(1.5)
    # One draw always shows exactly one class.
    assert expected_distinct_classes(np.array([1, 7, 2]), 1) == pytest.approx(1.0)
    counts = np.array([50, 30, 10, 5, 5])
    rng = np.random.default_rng(0)
    draws = rng.choice(5, size=(20000, 8), p=counts / counts.sum())
    simulated = np.mean([len(set(row)) for row in draws.tolist()])
    assert expected_distinct_classes(counts, 8) == pytest.approx(simulated, abs=0.02)
    assert distinct_classes(np.array([3, 3, 1, 3])) == 2
    with pytest.raises(ValueError):
        expected_distinct_classes(np.array([0, 0]), 4)


def test_interleave_yields_every_sample_once_and_mixes_the_open_shards() -> None:
    shards = [[(s, i) for i in range(20)] for s in range(6)]
    readers = [lambda s=s: iter(shards[s]) for s in range(6)]
    out = list(_interleave(readers, [20] * 6, 3, random.Random(1)))
    assert sorted(out) == sorted(x for sh in shards for x in sh)
    # Each shard keeps its own order; the first 30 items come from the first 3 shards, mixed.
    for s in range(6):
        assert [i for t, i in out if t == s] == list(range(20))
    assert {t for t, _ in out[:30]} == {0, 1, 2}
    assert len({t for t, _ in out[:6]}) >= 2
    # Width 1 is plain concatenation; the same seed gives the same order.
    assert list(_interleave(readers, [20] * 6, 1, random.Random(1))) == [
        x for sh in shards for x in sh
    ]
    assert out == list(_interleave(readers, [20] * 6, 3, random.Random(1)))


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """scikit-learn's real digits as an image folder: root/<class>/<n>.png, listed by class."""
    from sklearn.datasets import load_digits

    d = load_digits()
    root = tmp_path_factory.mktemp("digits-folder") / "train"
    pixels = np.round(d.images * 255 / 16).astype(np.uint8)
    for i, (img, label) in enumerate(zip(pixels, d.target.tolist(), strict=True)):
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / str(label) / f"{i:04d}.png")
    return root


def _batch_mix(manifest, *, open_shards: int, shuffle_buffer: int, b: int = 32) -> float:
    """``batch_class_mix`` of one epoch of the training stream over ``manifest``."""
    labels = read_labels(manifest)[0]
    stream = TrainStream(
        manifest,
        rank=0,
        world_size=1,
        local_batch_size=b,
        seed=0,
        transform=IDENTITY,
        shuffle_buffer=shuffle_buffer,
        open_shards=open_shards,
    )
    distinct = [distinct_classes(labels[x["index"].numpy()]) for x in stream.epoch_batches(0)]
    return class_mix(float(np.mean(distinct)), np.bincount(labels), b)


def test_class_ordered_shards_mix_only_with_enough_open_shards(
    digits_folder: Path, tmp_path: Path
) -> None:
    # The failure: shards in folder order (each one class), read one at a time through a
    # small buffer, give batches of about one class.
    m = folder.convert(digits_folder, tmp_path, shard_size=60, seed=None)
    labels = read_labels(m)[0]
    assert np.all(np.diff(labels) >= 0)  # listing order: class by class
    assert _batch_mix(m, open_shards=1, shuffle_buffer=0) < 0.3
    # Enough shards open at once (about the number of classes) mix the very same shards.
    assert _batch_mix(m, open_shards=16, shuffle_buffer=256) > 0.9


def test_folder_converter_shuffles_samples_into_shards(digits_folder: Path, tmp_path: Path) -> None:
    m = folder.convert(digits_folder, tmp_path / "a", shard_size=100)
    labels, _, keys = read_labels(m)
    # Every shard holds (nearly) every class, so even a plain one-shard reader mixes.
    for s in m.shards:
        assert len(set(labels[s.first_index : s.first_index + s.count].tolist())) >= 9
    assert _batch_mix(m, open_shards=1, shuffle_buffer=0) > 0.95
    # Each key still names its image and the image's class folder gives its label.
    assert all(k.split("/")[0] == str(y) for k, y in zip(keys, labels.tolist(), strict=True))
    assert sorted(keys) == sorted(
        str(p.relative_to(digits_folder)) for p in digits_folder.rglob("*.png")
    )
    # Deterministic: the same seed gives the same indices, another seed another order.
    again = read_labels(folder.convert(digits_folder, tmp_path / "b", shard_size=100))[2]
    other = read_labels(folder.convert(digits_folder, tmp_path / "c", shard_size=100, seed=1))[2]
    assert list(again) == list(keys) and list(other) != list(keys)
    assert read_manifest(tmp_path / "a" / "train").params["order"] == "shuffled, seed 0"


@pytest.mark.slow
def test_training_warns_when_batches_are_class_ordered(
    digits_folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from distnoisy.config import load_config
    from distnoisy.train import train

    out = tmp_path / "set"
    folder.convert(digits_folder, out, split="train", shard_size=60, seed=None)
    folder.convert(digits_folder, out, split="test", shard_size=600, clean=True)

    def run(name: str, *extra: str) -> dict:
        cfg = load_config(
            [
                "data.name=shards",
                f"data.urls={out}",
                "train.epochs=1",
                "scaling.launcher=local",
                "scaling.num_workers=1",
                "tracking.enabled=false",
                f"output_dir={tmp_path / name}",
                *extra,
            ]
        )
        train(cfg)
        return json.loads((tmp_path / name / "summary.json").read_text())

    with caplog.at_level(logging.WARNING):
        poor = run("poor", "data.open_shards=1", "data.shuffle_buffer=0")
    assert poor["history"][0]["batch_class_mix"] < 0.3
    assert any("Re-convert the data" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        mixed = run("mixed", "data.open_shards=16", "data.shuffle_buffer=256")
    assert mixed["history"][0]["batch_class_mix"] > 0.9
    assert not any("Re-convert the data" in r.getMessage() for r in caplog.records)
