"""Fashion-MNIST (distnoisy.data.fashion_mnist): the idx reader, shard sets, subset, training.

Tests marked by the ``source`` fixture read the real idx files of the Debian package
``dataset-fashion-mnist`` and skip when it is not installed; the others build small idx files.
"""

from __future__ import annotations

import gzip
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distnoisy.core.errors import ConfigError, DataError
from distnoisy.data import fashion_mnist as fm
from distnoisy.data.shards import read_labels, read_manifest


@pytest.fixture(scope="module")
def source() -> Path:
    """The installed idx files (skips the test when they are absent)."""
    try:
        fm.find_files(fm.DEFAULT_SOURCE)
    except DataError:
        pytest.skip(
            f"Fashion-MNIST idx files not in {fm.DEFAULT_SOURCE}: install the Debian package "
            "dataset-fashion-mnist (apt-get install dataset-fashion-mnist)"
        )
    return fm.DEFAULT_SOURCE


def _idx_bytes(array: np.ndarray) -> bytes:
    """An idx file of a uint8 array, written from the format's definition."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    return header + array.astype(np.uint8).tobytes()


def _write_tiny_source(directory: Path, n_train: int = 40, n_test: int = 20) -> Path:
    """Four small, valid idx files (random pixels, every class present), half of them gzipped."""
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        images_name, labels_name = fm.FILES[split]
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = np.arange(n, dtype=np.uint8) % 10
        (directory / f"{images_name}.gz").write_bytes(gzip.compress(_idx_bytes(images)))
        (directory / labels_name).write_bytes(_idx_bytes(labels))
    return directory


def _one_line_error(exc_info: pytest.ExceptionInfo, path: Path) -> str:
    message = str(exc_info.value)
    assert "\n" not in message and str(path) in message
    return message


# ----------------------------------------------------------------------------------------------
# The idx reader


def test_read_real_files(source: Path) -> None:
    files = fm.find_files(source)
    train_images, train_labels = fm.read_split(*files["train"])
    test_images, test_labels = fm.read_split(*files["test"])
    assert train_images.shape == (60000, 28, 28) and train_images.dtype == np.uint8
    assert test_images.shape == (10000, 28, 28) and test_labels.shape == (10000,)
    # The first training image is an ankle boot (9), the first test image too.
    assert train_labels[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    assert test_labels[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]
    assert fm.CLASSES[9] == "Ankle boot"
    assert np.bincount(train_labels).tolist() == [6000] * 10
    assert np.bincount(test_labels).tolist() == [1000] * 10
    # A pixel against the raw bytes: header of 16 bytes, then row-major 28 x 28 per image.
    raw = gzip.decompress(files["train"][0].read_bytes())
    assert raw[16 + 10 * 28 + 13] == train_images[0, 10, 13] == 193
    assert raw[16 + 784 * 59999 + 27 * 28 + 27] == train_images[-1, 27, 27]


def test_gzipped_and_plain_files_give_the_same_arrays(source: Path, tmp_path: Path) -> None:
    for gz in fm.find_files(source)["test"]:
        plain = tmp_path / gz.name.removesuffix(".gz")
        plain.write_bytes(gzip.decompress(gz.read_bytes()))
        a, b = fm.read_idx(gz), fm.read_idx(plain)
        assert a.dtype == b.dtype and np.array_equal(a, b)
        a[0] = 1  # writable, a copy
    assert fm.read_idx(tmp_path / "t10k-images-idx3-ubyte").shape == (10000, 28, 28)


def test_constants_match_the_training_images(source: Path) -> None:
    images = fm.read_idx(fm.find_files(source)["train"][0]) / 255.0
    assert abs(fm.MEAN - images.mean()) < 1e-4
    assert abs(fm.STD - images.std()) < 1e-4


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda b: b"\x08\x03" + b[2:], "not an idx file (magic number 0803"),
        (lambda b: b[:2] + b"\x07" + b[3:], "not an idx file"),
        (lambda b: b[:2], "not an idx file (magic number 0000;"),
        (lambda b: b[:6], "truncated idx header (6 bytes, 8 needed)"),
        (lambda b: b[:-7], "1 data bytes but its dimensions (8,) need 8"),
        (lambda b: b + b"\0", "9 data bytes but its dimensions (8,) need 8"),
        (lambda b: gzip.compress(b)[:-12], "damaged gzip data"),
    ],
)
def test_damaged_idx_files_are_one_line_errors(tmp_path: Path, damage, expected: str) -> None:
    path = tmp_path / "labels-idx1-ubyte"
    good = _idx_bytes(np.arange(8, dtype=np.uint8))
    path.write_bytes(good)
    assert fm.read_idx(path).tolist() == list(range(8))
    path.write_bytes(damage(good))
    with pytest.raises(DataError) as info:
        fm.read_idx(path)
    assert expected in _one_line_error(info, path)


def test_split_checks_counts_shapes_and_labels(tmp_path: Path) -> None:
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.write_bytes(_idx_bytes(np.zeros((5, 28, 28), np.uint8)))
    labels.write_bytes(_idx_bytes(np.arange(4, dtype=np.uint8)))
    with pytest.raises(DataError) as info:
        fm.read_split(images, labels)
    assert "4 labels but images holds 5 images" in _one_line_error(info, labels)

    labels.write_bytes(_idx_bytes(np.array([0, 1, 2, 3, 10], np.uint8)))
    with pytest.raises(DataError) as info:
        fm.read_split(images, labels)
    assert "label 10 of image 4 is not in 0..9" in _one_line_error(info, labels)

    images.write_bytes(_idx_bytes(np.zeros((5, 32, 32), np.uint8)))
    with pytest.raises(DataError) as info:
        fm.read_split(images, labels)
    assert "found uint8 (5, 32, 32)" in _one_line_error(info, images)


def test_missing_files_error_names_them_and_the_fix(tmp_path: Path) -> None:
    _write_tiny_source(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    (tmp_path / "train-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DataError) as info:
        fm.find_files(tmp_path)
    assert str(info.value) == (
        f"Fashion-MNIST idx files not found in {tmp_path} (train-images-idx3-ubyte[.gz], "
        "t10k-labels-idx1-ubyte[.gz]); install them with 'apt-get install "
        "dataset-fashion-mnist' or pass data.root=DIR"
    )


def test_train_cli_missing_files_is_one_line_and_writes_nothing(tmp_path: Path, capsys) -> None:
    from distnoisy.train import main

    out = tmp_path / "run"
    argv = ["data.name=fashion_mnist", f"data.root={tmp_path / 'none'}", f"output_dir={out}"]
    assert main([*argv, "tracking.enabled=false"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("distnoisy: error: Fashion-MNIST idx files not found in ")
    assert "\n" not in err and "apt-get install dataset-fashion-mnist" in err
    assert not out.exists()


# ----------------------------------------------------------------------------------------------
# The class-balanced subset


def test_balanced_subset_is_balanced_and_seeded() -> None:
    rng = np.random.default_rng(1)
    labels = rng.permutation(np.repeat(np.arange(10), [300] * 9 + [120]))
    subset = fm.balanced_subset(labels, 1003, seed=0)
    assert len(subset) == 1003 and np.array_equal(subset, np.unique(subset))  # sorted, distinct
    counts = np.bincount(labels[subset], minlength=10)
    assert sorted(counts.tolist()) == [100] * 7 + [101] * 3
    assert np.array_equal(fm.balanced_subset(labels, 1003, seed=0), subset)
    other = fm.balanced_subset(labels, 1003, seed=1)
    assert not np.array_equal(other, subset)
    assert np.array_equal(fm.balanced_subset(labels, 0, seed=0), np.arange(len(labels)))
    with pytest.raises(ConfigError, match="at least 10"):
        fm.balanced_subset(labels, 9, seed=0)
    with pytest.raises(ConfigError, match=r"needs 130 images of class .Ankle boot.* has 120"):
        fm.balanced_subset(labels, 1300, seed=0)


# ----------------------------------------------------------------------------------------------
# Shard sets


@pytest.fixture(scope="module")
def converted(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fmnist")
    fm.prepare_fashion_mnist(root, source=source, train_size=300, val_fraction=0.2, shard_size=64)
    return root


def _png_of(set_dir: Path, index: int) -> np.ndarray:
    manifest = read_manifest(set_dir)
    shard = next(s for s in manifest.shards if s.first_index <= index < s.first_index + s.count)
    with tarfile.open(set_dir / shard.name) as tf:
        png = tf.extractfile(f"{index:09d}.png").read()
    image = Image.open(io.BytesIO(png))
    assert image.mode == "L"
    return np.asarray(image)


def test_shards_decode_to_the_exact_pixels(converted: Path, source: Path) -> None:
    files = fm.find_files(source)
    sets = {split: read_manifest(converted / split) for split in ("train", "val", "test")}
    assert {s: m.num_samples for s, m in sets.items()} == {"train": 240, "val": 60, "test": 10000}
    assert all(list(m.classes) == fm.CLASSES and m.image_ext == "png" for m in sets.values())
    for split, origin in (("train", "train"), ("val", "train"), ("test", "test")):
        images, labels = fm.read_split(*files[origin])
        given, clean, keys = read_labels(sets[split])
        assert np.array_equal(given, clean)
        assert all(k.startswith(f"{origin}/") for k in keys)
        pos = np.array([int(k.split("/")[1]) for k in keys])
        assert np.array_equal(given, labels[pos])
        for i in (0, len(keys) // 2, len(keys) - 1):
            assert np.array_equal(_png_of(converted / split, i), images[pos[i]])
    train_keys = set(read_labels(sets["train"])[2]) | set(read_labels(sets["val"])[2])
    assert len(train_keys) == 300  # disjoint
    val_counts = np.bincount(read_labels(sets["val"])[0], minlength=10)
    assert val_counts.tolist() == [6] * 10  # 30 per class in the subset, 20% held out
    params = sets["train"].params
    assert params["train_size"] == 300 and params["val_fraction"] == 0.2
    assert len(params["sha256"]) == 64


def test_cache_is_reused_then_rebuilt_for_other_source_files(tmp_path: Path) -> None:
    src, root = _write_tiny_source(tmp_path / "src"), tmp_path / "cache"
    assert fm.prepare_fashion_mnist(root, source=src) == (root / "train", root / "test")
    files = sorted(root.rglob("*"))
    stamps = [p.stat().st_mtime_ns for p in files]
    fm.prepare_fashion_mnist(root, source=src)
    assert sorted(root.rglob("*")) == files
    assert [p.stat().st_mtime_ns for p in files] == stamps  # nothing rewritten
    assert read_manifest(root / "train").num_samples == 40

    # Other files with the same names (a copy with other pixels): the cache is rebuilt.
    _write_tiny_source(tmp_path / "src2", n_train=30)
    fm.prepare_fashion_mnist(root, source=tmp_path / "src2")
    assert read_manifest(root / "train").num_samples == 30
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_bad_source_leaves_the_cache_as_it_was(tmp_path: Path) -> None:
    src, root = _write_tiny_source(tmp_path / "src"), tmp_path / "cache"
    fm.prepare_fashion_mnist(root, source=src)
    before = json.loads((root / "train" / "manifest.json").read_text())
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    (bad / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(19, np.uint8)))
    with pytest.raises(DataError, match=r"19 labels but t10k-images-idx3-ubyte\.gz holds 20"):
        fm.prepare_fashion_mnist(root, source=bad)
    assert json.loads((root / "train" / "manifest.json").read_text()) == before
    assert sorted(p.name for p in root.iterdir()) == ["test", "train"]


def test_converter_cli(tmp_path: Path, capsys) -> None:
    src, out = _write_tiny_source(tmp_path / "src"), tmp_path / "out"
    argv = ["--root", str(src), "--out", str(out), "--train-size", "20", "--val-fraction", "0.5"]
    assert fm.main(argv) == 0
    sizes = {s: read_manifest(out / s).num_samples for s in ("train", "val", "test")}
    assert sizes == {"train": 10, "val": 10, "test": 20}
    assert fm.main(["--root", str(tmp_path / "none"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.endswith("or pass --root DIR")


# ----------------------------------------------------------------------------------------------
# Training


@pytest.mark.slow
def test_short_training_run_with_lenet(source: Path, tmp_path: Path, monkeypatch) -> None:
    from distnoisy.config import load_config
    from distnoisy.train import train

    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # where the shard cache goes
    summary = train(
        load_config(
            [
                "data.name=fashion_mnist",
                f"data.root={source}",
                "data.train_size=2000",
                "data.val_fraction=0.1",
                "model.name=lenet",
                "train.epochs=2",
                "scaling.launcher=local",
                "scaling.num_workers=1",
                "tracking.enabled=false",
                f"output_dir={tmp_path / 'run'}",
            ]
        )
    )
    cache = tmp_path / "home/.cache/distnoisy/fashion_mnist/train-2000-val-0.1"
    assert read_manifest(cache / "val").num_samples == 200
    assert summary["num_train"] == 1800
    assert 0.3 < summary["noise_rate_realised"] < 0.5  # the default 40% symmetric noise
    # Two epochs on 1,800 noisy images: well above chance (0.1); measured 0.69-0.70.
    assert summary["test_acc"] > 0.6
    assert summary["label_issue_auroc"] > 0.85
