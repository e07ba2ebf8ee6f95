"""Shard sets: writing, manifest and label table, and the bundled digits."""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from distnoisy.core.errors import ConfigError, DataError
from distnoisy.data.shards import (
    FORMAT,
    Sample,
    read_labels,
    read_manifest,
    write_shards,
)

CLASSES = ["cat", "dog", "eel"]


def png_bytes(value: int, size: int = 4) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size), value % 256, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def make_samples(n: int, *, clean: bool = True) -> list[Sample]:
    return [
        Sample(
            index=i,
            image=png_bytes(i),
            label=i % 3,
            clean_label=((i + 1) % 3 if i % 4 == 0 else i % 3) if clean else None,
            key=f"images/{i % 2}/{i:03d}.v1.png",  # dots and slashes: not usable as tar keys
        )
        for i in range(n)
    ]


def tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers()}


def test_write_read_round_trip(tmp_path: Path) -> None:
    samples = make_samples(11)
    out = tmp_path / "train"
    written = write_shards(
        samples, out, split="train", classes=CLASSES, shard_size=4, image_ext="png", dataset="toy"
    )
    m = read_manifest(out)
    assert m == written
    assert (m.num_samples, m.num_classes, m.classes) == (11, 3, tuple(CLASSES))
    assert [(s.name, s.count, s.first_index) for s in m.shards] == [
        ("train-000000.tar", 4, 0),
        ("train-000001.tar", 4, 4),
        ("train-000002.tar", 3, 8),
    ]
    assert m.has_clean_labels and m.image_ext == "png" and m.split == "train"
    assert m.urls == [str((out / s.name).resolve()) for s in m.shards]
    # Only final files: no temp names left behind, the manifest as documented.
    assert sorted(p.name for p in out.iterdir()) == [
        "labels.parquet",
        "manifest.json",
        "train-000000.tar",
        "train-000001.tar",
        "train-000002.tar",
    ]
    doc = json.loads((out / "manifest.json").read_text())
    assert doc["format"] == FORMAT == "distnoisy-shards/1"
    assert doc["num_samples"] == 11 and doc["dataset"] == "toy"

    members = tar_members(out / "train-000002.tar")
    assert sorted(members) == sorted(
        f"{i:09d}.{ext}" for i in (8, 9, 10) for ext in ("png", "cls", "clean.cls", "json")
    )
    for i in (8, 9, 10):
        s = samples[i]
        assert members[f"{i:09d}.png"] == s.image
        assert members[f"{i:09d}.cls"] == str(s.label).encode()
        assert members[f"{i:09d}.clean.cls"] == str(s.clean_label).encode()
        assert json.loads(members[f"{i:09d}.json"]) == {
            "index": i,
            "key": s.key,
            "label": s.label,
            "clean_label": s.clean_label,
        }

    labels, clean, keys = read_labels(m)
    assert labels.tolist() == [s.label for s in samples]
    assert clean is not None and clean.tolist() == [s.clean_label for s in samples]
    assert keys.tolist() == [s.key for s in samples]
    table = pq.read_table(out / "labels.parquet")
    assert table.column_names == ["index", "key", "label", "clean_label"]
    assert table.column("index").to_pylist() == list(range(11))


def test_unknown_clean_labels_and_jpg(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, format="JPEG")
    samples = [Sample(i, buf.getvalue(), i % 3, None, f"k{i}") for i in range(5)]
    m = write_shards(
        samples,
        tmp_path,
        split="val",
        classes=CLASSES,
        shard_size=10,
        image_ext="jpg",
        dataset="toy",
    )
    assert not m.has_clean_labels and len(m.shards) == 1
    members = tar_members(tmp_path / "val-000000.tar")
    assert "000000003.jpg" in members and "000000003.clean.cls" not in members
    assert json.loads(members["000000003.json"])["clean_label"] == -1
    labels, clean, _ = read_labels(read_manifest(tmp_path))
    assert clean is None and labels.tolist() == [0, 1, 2, 0, 1]
    assert pq.read_table(tmp_path / "labels.parquet").column("clean_label").to_pylist() == [-1] * 5


def test_rewrite_replaces_the_old_set(tmp_path: Path) -> None:
    kw = dict(split="train", classes=CLASSES, image_ext="png", dataset="toy")
    write_shards(make_samples(10), tmp_path, shard_size=3, **kw)
    assert len(list(tmp_path.glob("train-*.tar"))) == 4
    m = write_shards(make_samples(5), tmp_path, shard_size=3, **kw)
    assert sorted(p.name for p in tmp_path.glob("train-*.tar")) == [s.name for s in m.shards]
    assert read_manifest(tmp_path).num_samples == 5


def test_write_rejects_bad_samples_and_leaves_no_manifest(tmp_path: Path) -> None:
    kw = dict(split="train", classes=CLASSES, shard_size=2, image_ext="png", dataset="toy")
    bad_label = [*make_samples(3), Sample(3, png_bytes(3), 7, None, "k3")]
    with pytest.raises(DataError, match=r"sample 3 \(k3\) has label 7, outside 0..2"):
        write_shards(bad_label, tmp_path / "a", **kw)
    assert not (tmp_path / "a" / "manifest.json").exists()
    assert not [p for p in (tmp_path / "a").iterdir() if ".tmp-" in p.name]
    out_of_order = make_samples(4)[::-1]
    with pytest.raises(DataError, match="index order"):
        write_shards(out_of_order, tmp_path / "b", **kw)
    with pytest.raises(ConfigError, match="image_ext"):
        write_shards(make_samples(2), tmp_path / "c", **{**kw, "image_ext": "gif"})
    with pytest.raises(ConfigError, match="shard_size"):
        write_shards(make_samples(2), tmp_path / "c", **{**kw, "shard_size": 0})


def test_read_manifest_errors_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=re.escape("python -m distnoisy.train")) as err:
        read_manifest(missing)
    assert str(missing) in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no manifest\.json in .*empty") as err:
        read_manifest(tmp_path / "empty")
    assert "converter" in str(err.value)

    out = tmp_path / "set"
    write_shards(
        make_samples(6),
        out,
        split="train",
        classes=CLASSES,
        shard_size=4,
        image_ext="png",
        dataset="toy",
    )
    (out / "train-000001.tar").unlink()
    with pytest.raises(DataError, match=r"missing: .*train-000001\.tar"):
        read_manifest(out)
    doc = json.loads((out / "manifest.json").read_text())
    doc["format"] = "distnoisy-shards/0"
    (out / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match="format 'distnoisy-shards/0' is not supported"):
        read_manifest(out)


def test_read_labels_validation(tmp_path: Path) -> None:
    write_shards(
        make_samples(6),
        tmp_path,
        split="train",
        classes=CLASSES,
        shard_size=6,
        image_ext="png",
        dataset="toy",
    )
    m = read_manifest(tmp_path)

    def put(index: list[int], label: list[int]) -> None:
        pq.write_table(
            pa.table(
                {
                    "index": pa.array(index, pa.int64()),
                    "key": [f"k{i}" for i in range(len(index))],
                    "label": pa.array(label, pa.int64()),
                    "clean_label": pa.array(label, pa.int64()),
                }
            ),
            tmp_path / "labels.parquet",
        )

    put([5, 4, 3, 2, 1, 0], [0, 1, 2, 0, 1, 2])  # any row order is fine: sorted by index
    labels, _, keys = read_labels(m)
    assert labels.tolist() == [2, 1, 0, 2, 1, 0] and keys.tolist()[0] == "k5"
    put([0, 1, 2, 3, 3, 5], [0] * 6)
    with pytest.raises(DataError, match="index 3 appears 2 times"):
        read_labels(m)
    put([0, 1, 2, 3, 4, 5], [0, 1, 2, 9, 0, 1])
    with pytest.raises(DataError, match=r"index 3 has label 9, outside 0\.\.2"):
        read_labels(m)
    put([0, 1, 2, 3, 4], [0] * 5)
    with pytest.raises(DataError, match="5 rows but the manifest says 6"):
        read_labels(m)


# ----------------------------------------------------------------------------------------------
# digits


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from distnoisy.data.digits import prepare_digits

    root = tmp_path_factory.mktemp("digits")
    prepare_digits(root)
    return root


def test_digits_split(digits_dir: Path) -> None:
    from sklearn.datasets import load_digits

    train, test = read_manifest(digits_dir / "train"), read_manifest(digits_dir / "test")
    assert train.num_samples + test.num_samples == 1797
    assert test.num_samples == 360  # ceil(0.2 * 1797)
    assert train.num_classes == 10 and train.image_ext == "png"
    assert train.params == {
        "source": "sklearn.datasets.load_digits",
        "version": 1,
        "test_fraction": 0.2,
        "seed": 0,
        "shard_size": 256,
    }
    tr_labels, tr_clean, tr_keys = read_labels(train)
    te_labels, te_clean, te_keys = read_labels(test)
    assert np.array_equal(tr_labels, tr_clean) and np.array_equal(te_labels, te_clean)
    # Stratified: every class in both splits, each with close to 20% of its images in test.
    tr_counts, te_counts = np.bincount(tr_labels, minlength=10), np.bincount(te_labels)
    assert (tr_counts > 0).all() and (te_counts > 0).all()
    assert np.abs(te_counts / (tr_counts + te_counts) - 0.2).max() < 0.01
    # Keys name the original images, each exactly once over both splits.
    orig = sorted(int(k.split("/")[1]) for k in [*tr_keys, *te_keys])
    assert orig == list(range(1797))
    # Pixels: the PNG of a sample is round(v * 255 / 16) of the original image.
    digits = load_digits()
    with tarfile.open(digits_dir / "test" / test.shards[0].name) as tf:
        png = tf.extractfile("000000007.png").read()
    j = int(te_keys[7].split("/")[1])
    pixels = np.asarray(Image.open(io.BytesIO(png)))
    assert np.array_equal(pixels, np.round(digits.images[j] * 255 / 16).astype(np.uint8))
    assert te_labels[7] == digits.target[j]


def test_digits_validation_split(tmp_path: Path) -> None:
    from distnoisy.data.digits import prepare_digits

    prepare_digits(tmp_path, val_fraction=0.1)
    train, val, test = (read_manifest(tmp_path / s) for s in ("train", "val", "test"))
    assert test.num_samples == 360  # the test split does not depend on the validation split
    assert val.num_samples == 144 and train.num_samples == 1797 - 360 - 144
    assert train.params["val_fraction"] == 0.1
    keys = [k for m in (train, val, test) for k in read_labels(m)[2]]
    assert len(set(keys)) == 1797  # disjoint splits covering every image
    val_labels, val_clean, _ = read_labels(val)
    assert np.array_equal(val_labels, val_clean)  # a clean validation set
    assert (np.bincount(val_labels, minlength=10) > 10).all()  # stratified
    with pytest.raises(ConfigError, match=r"data.val_fraction must be in \[0, 1\)"):
        prepare_digits(tmp_path / "bad", val_fraction=1.0)


def test_digits_constants_match_the_data() -> None:
    from sklearn.datasets import load_digits

    from distnoisy.data.digits import DIGITS_MEAN, DIGITS_STD

    x = np.round(load_digits().images * 255 / 16) / 255
    assert abs(DIGITS_MEAN - x.mean()) < 1e-4
    assert abs(DIGITS_STD - x.std()) < 1e-4


def test_digits_cache_hit_and_rebuild(digits_dir: Path) -> None:
    from distnoisy.data.digits import prepare_digits

    files = sorted(digits_dir.rglob("*"))
    stamps = [p.stat().st_mtime_ns for p in files]
    assert prepare_digits(digits_dir) == (digits_dir / "train", digits_dir / "test")
    assert sorted(digits_dir.rglob("*")) == files
    assert [p.stat().st_mtime_ns for p in files] == stamps  # nothing rewritten


def test_digits_other_params_rebuild_and_concurrent_callers(tmp_path: Path) -> None:
    from distnoisy.data.digits import prepare_digits

    prepare_digits(tmp_path, shard_size=500)
    first = read_labels(read_manifest(tmp_path / "test"))[2]
    # Two concurrent callers with other parameters: both succeed, one valid set results.
    errors: list[BaseException] = []

    def call() -> None:
        try:
            prepare_digits(tmp_path, seed=1, shard_size=500)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    test = read_manifest(tmp_path / "test")
    assert test.params is not None and test.params["seed"] == 1
    assert read_labels(test)[2].tolist() != first.tolist()  # another split
    assert sorted(os.listdir(tmp_path)) == ["test", "train"]  # no temp directories left
