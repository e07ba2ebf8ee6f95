"""The controlled long-tail dataset: sizes, shards with the truth in them, frequency recovery."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr

from distnoisy.analyze.knn import knn_density
from distnoisy.config import LongtailConfig, load_config
from distnoisy.core.errors import ConfigError
from distnoisy.data.longtail import (
    held_out_sizes,
    prepare_longtail,
    subpopulation_noise,
    subpopulation_sizes,
    subpopulations,
)
from distnoisy.data.shards import read_labels, read_manifest

SMALL = LongtailConfig(subpopulations=60, max_size=40, num_classes=5)


def _pixels(set_dir) -> np.ndarray:
    """Every image of a shard set, decoded from its PNGs, flattened, in index order."""
    from distnoisy.data.stream import EvalStream, make_transform

    stream = EvalStream(
        read_manifest(set_dir),
        rank=0,
        world_size=1,
        batch_size=256,
        transform=make_transform("raw", None, None),
    )
    rows, index = [], []
    for batch in stream.batches():
        rows.append(batch["image"].reshape(len(batch["index"]), -1).float().numpy())
        index.append(batch["index"].numpy())
    return np.concatenate(rows)[np.argsort(np.concatenate(index))]


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("longtail")
    return prepare_longtail(root, SMALL, shard_size=64)


def test_zipf_sizes_by_hand():
    # round(10 * r**-1) for r = 1..5: 10, 5, 3.33, 2.5 (rounds to even: 2), 2
    assert subpopulation_sizes(5, 1.0, 10).tolist() == [10, 5, 3, 2, 2]
    # the long tail is floored at one instance; zipf=0 makes every subpopulation max_size
    assert subpopulation_sizes(4, 2.0, 4).tolist() == [4, 1, 1, 1]
    assert subpopulation_sizes(3, 0.0, 7).tolist() == [7, 7, 7]
    cfg = LongtailConfig(subpopulations=4, max_size=8, zipf=1.0, test_per_subpopulation=2)
    assert held_out_sizes(cfg).tolist() == [2 + 2, 2 + 1, 2 + 1, 2 + 0]  # + round(0.25 * size)


def test_shards_carry_subpopulation_and_size(small_set):
    train_dir, test_dir = small_set
    sizes = subpopulation_sizes(SMALL.subpopulations, SMALL.zipf, SMALL.max_size)
    ids, size_of = subpopulations(train_dir)
    assert np.bincount(ids, minlength=SMALL.subpopulations).tolist() == sizes.tolist()
    assert np.array_equal(size_of, sizes[ids])
    test_ids, test_size_of = subpopulations(test_dir)
    assert np.bincount(test_ids).tolist() == held_out_sizes(SMALL).tolist()
    assert np.array_equal(test_size_of, sizes[test_ids])
    labels, clean, keys = read_labels(read_manifest(train_dir))
    assert np.array_equal(labels, clean)  # clean shards: noise is added by noise.*
    # a subpopulation has one class; classes are dealt round-robin over the ranks
    assert np.array_equal(labels, ids % SMALL.num_classes)
    assert (
        keys[0] == "longtail/0/0" and read_labels(read_manifest(test_dir))[2][0] == "longtail/0/t0"
    )


def test_cached_set_is_reused(small_set, tmp_path):
    train_dir, _ = small_set
    before = (train_dir / "manifest.json").stat().st_mtime_ns
    prepare_longtail(train_dir.parent, SMALL, shard_size=64)
    assert (train_dir / "manifest.json").stat().st_mtime_ns == before


def test_frequency_score_recovers_subpopulation_sizes(small_set):
    """k-NN density on the decoded images ranks samples like their true subpopulation size."""
    train_dir, test_dir = small_set
    train_px, test_px = _pixels(train_dir), _pixels(test_dir)
    _, train_size = subpopulations(train_dir)
    _, test_size = subpopulations(test_dir)
    rho_train = spearmanr(knn_density(train_px, None, k=5), train_size).statistic
    rho_test = spearmanr(knn_density(test_px, train_px, k=5), test_size).statistic
    assert rho_train >= 0.8, rho_train
    assert rho_test >= 0.8, rho_test


def test_longtail_config_and_instance_noise(tmp_path):
    from distnoisy.data.prepare import prepare_data

    args = [
        "data.name=longtail",
        f"data.root={tmp_path}",
        "data.longtail.subpopulations=30",
        "data.longtail.max_size=20",
        "noise.kind=instance",
        "noise.rate=0.3",
    ]
    spec = prepare_data(load_config(args))
    assert spec.num_classes == 10 and spec.num_train == int(subpopulation_sizes(30, 1.0, 20).sum())
    assert 0.15 < spec.noise_rate < 0.45
    with pytest.raises(ConfigError, match=r"data\.longtail\.zipf must be >= 0"):
        prepare_data(load_config([*args, "data.longtail.zipf=-1"]))
    with pytest.raises(ConfigError, match=r"data\.longtail\.zipff"):
        load_config([*args, "data.longtail.zipff=1"])


def test_subpopulation_dependent_noise_rate(tmp_path):
    """Noise only on the singletons: the tail is corrupted near its rate, the rest never; the
    label file trains as noise.kind=file."""
    from distnoisy.data.noise import save_label_file
    from distnoisy.data.prepare import prepare_data

    cfg = LongtailConfig(subpopulations=300, max_size=20)
    noisy, clean = subpopulation_noise(cfg, rate=0.0, tail_rate=0.5, tail_size=1, seed=3)
    size = subpopulation_sizes(300, 1.0, 20)[
        np.repeat(np.arange(300), subpopulation_sizes(300, 1.0, 20))
    ]
    tail = size == 1
    assert tail.sum() > 150
    assert (noisy[~tail] == clean[~tail]).all()
    assert 0.4 < (noisy[tail] != clean[tail]).mean() < 0.6
    path = tmp_path / "labels.parquet"
    save_label_file(path, noisy, clean, {"kind": "longtail-subpopulation"})
    spec = prepare_data(
        load_config(
            [
                "data.name=longtail",
                f"data.root={tmp_path}",
                "data.longtail.subpopulations=300",
                "data.longtail.max_size=20",
                "noise.kind=file",
                f"noise.file={path}",
            ]
        )
    )
    assert spec.noise_rate == pytest.approx((noisy != clean).mean())


def test_tail_noise_rate_from_the_config(tmp_path):
    """noise.tail_rate: the singletons corrupted near their rate, the rest at noise.rate; the
    label file is made once and reused; the key is refused where subpopulations are unknown."""
    from distnoisy.data.noise import load_label_file
    from distnoisy.data.prepare import prepare_data

    args = [
        "data.name=longtail",
        f"data.root={tmp_path}",
        "data.longtail.subpopulations=300",
        "data.longtail.max_size=20",
        "noise.kind=instance",
        "noise.rate=0.0",
        "noise.tail_rate=0.5",
        "noise.seed=3",
    ]
    spec = prepare_data(load_config(args))
    labels = load_label_file(spec.label_file, spec.num_train, spec.num_classes)
    noisy, clean = labels.labels, labels.clean_labels
    sizes = subpopulation_sizes(300, 1.0, 20)
    tail = sizes[np.repeat(np.arange(300), sizes)] == 1
    assert (noisy[~tail] == clean[~tail]).all()
    assert 0.4 < (noisy[tail] != clean[tail]).mean() < 0.6
    # The same draw as the function behind it, and the file is reused as it is.
    expected, _ = subpopulation_noise(
        LongtailConfig(subpopulations=300, max_size=20), 0.0, 0.5, tail_size=1, seed=3
    )
    assert (noisy == expected).all()
    made = Path(spec.label_file).stat().st_mtime_ns
    assert prepare_data(load_config(args)).label_file == spec.label_file
    assert Path(spec.label_file).stat().st_mtime_ns == made
    with pytest.raises(ConfigError, match=r"noise\.tail_rate applies to data\.name=longtail"):
        load_config(["data.name=digits", "noise.kind=instance", "noise.tail_rate=0.5"])
    with pytest.raises(ConfigError, match=r"noise\.tail_rate must be in \[0, 1\)"):
        load_config([*args, "noise.tail_rate=1.0"])
