"""Dataset converters on generated miniatures in the exact distributed layouts, and the Clothing1M
recipe end to end: Clothing1M-layout tree (real JPEGs) -> shards -> 2 Ray workers -> summary."""

from __future__ import annotations

import io
import json
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from distnoisy.config import load_config
from distnoisy.core.errors import ConfigError, DataError
from distnoisy.data import clothing1m as c1m
from distnoisy.data.convert import EncodeOptions, Item, convert_split
from distnoisy.data.prepare import prepare_data
from distnoisy.data.shards import read_labels, read_manifest

RECIPES = Path(c1m.__file__).resolve().parents[1] / "configs"
CORRUPT = 5  # noisy-train index whose JPEG is damaged on disk
OVERLAP = 56


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = c1m.make_miniature(tmp_path_factory.mktemp("c1m") / "root", overlap=OVERLAP)
    key = (root / "noisy_train_key_list.txt").read_text().split()[CORRUPT]
    data = (root / key).read_bytes()
    (root / key).write_bytes(data[:200] + b"\x00garbage" * 20)  # header intact, body broken
    return root


@pytest.fixture(scope="module")
def converted(tree: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("c1m-out")
    doc = c1m.convert(tree, out, resize=40, shard_size=50, workers=2)
    return out, doc


def _kv(path: Path) -> dict[str, int]:
    return {k: int(v) for k, v in (line.split() for line in path.read_text().splitlines())}


def test_conversion_writes_every_split_with_overlap_clean_labels(tree, converted) -> None:
    out, doc = converted
    counts = {s: read_manifest(out / s).num_samples for s in c1m.SPLITS}
    assert counts == {"noisy_train": 280, "clean_train": 28, "clean_val": 56, "clean_test": 56}
    noisy, clean = _kv(tree / "noisy_label_kv.txt"), _kv(tree / "clean_label_kv.txt")
    keys = (tree / "noisy_train_key_list.txt").read_text().split()

    m = read_manifest(out / "noisy_train")
    assert m.num_classes == 14 and list(m.classes) == list(c1m.CLASSES)
    assert not m.has_clean_labels and m.num_clean_labels == OVERLAP
    labels, clean_col, kv_keys = read_labels(m, partial_clean=True)
    assert list(kv_keys) == keys and labels.tolist() == [noisy[k] for k in keys]
    assert clean_col.tolist() == [clean.get(k, -1) for k in keys]
    both = [k for k in keys if k in clean]
    rate = np.mean([noisy[k] != clean[k] for k in both])
    assert doc["noisy_train_with_clean_label"] == OVERLAP
    assert doc["noise_rate_on_overlap"] == pytest.approx(rate)
    val = read_manifest(out / "clean_val")
    assert val.has_clean_labels and read_labels(val)[0].tolist() == [
        clean[k] for k in (tree / "clean_val_key_list.txt").read_text().split()
    ]

    # The tar members (__key__ = global index, see the README's shard format), the image
    # resized to a shorter side of 40.
    with tarfile.open(out / "noisy_train" / m.shards[0].name) as tf:
        members = {x.name: tf.extractfile(x).read() for x in tf.getmembers()}
    meta = json.loads(members["000000000.json"])
    assert meta["key"] == keys[0] and meta["index"] == 0
    assert int(members["000000000.cls"]) == noisy[keys[0]]
    assert ("000000000.clean.cls" in members) == (keys[0] in clean)
    assert min(Image.open(io.BytesIO(members["000000001.jpg"])).size) == 40
    # The damaged JPEG is kept (indices stay aligned with the key list) and reported.
    assert doc["splits"]["noisy_train"]["bad_images"][0]["key"] == keys[CORRUPT]
    # The rate counts every converted image over the time spent converting, which is part of
    # the conversion's wall time.
    assert doc["converted_images"] == 280 + 28 + 56 + 56
    assert doc["conversion_images_per_s"] >= doc["converted_images"] / doc["seconds"]


def test_conversion_resumes_after_an_interruption(tree: Path, tmp_path: Path) -> None:
    items = c1m.read_layout(tree).items("clean_val")
    broken = list(items)
    broken[35] = Item(35, broken[35].source, 99, None, broken[35].key)  # fails in shard 3
    kw = dict(
        split="clean_val",
        classes=list(c1m.CLASSES),
        dataset="clothing1m",
        shard_size=10,
        opts=EncodeOptions(resize=32),
        params={"p": 1},
    )
    with pytest.raises(DataError, match=r"label 99, outside 0..13"):
        convert_split(broken, tmp_path, **kw)
    assert not (tmp_path / "manifest.json").exists()
    done = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("clean_val-*.tar")}
    assert sorted(done) == [f"clean_val-{i:06d}.tar" for i in range(3)]

    again = convert_split(items, tmp_path, **kw)
    assert again.skipped_shards == 3 and again.converted == 56 - 30
    assert {n: (tmp_path / n).stat().st_mtime_ns for n in done} == done  # not rewritten
    assert again.manifest.num_samples == 56 and len(again.manifest.shards) == 6
    assert not (tmp_path / ".progress").exists()
    assert convert_split(items, tmp_path, **kw).converted == 0  # complete: skipped whole
    assert convert_split(items, tmp_path, **{**kw, "params": {"p": 2}}).converted == 56


def _copy_annotations(tree: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in tree.glob("*.txt"):
        shutil.copy(f, dst / f.name)
    (dst / "images").symlink_to(tree / "images")
    return dst


def test_missing_annotation_file_names_it(tree: Path, tmp_path: Path, capsys) -> None:
    root = _copy_annotations(tree, tmp_path / "r")
    (root / "clean_val_key_list.txt").unlink()
    with pytest.raises(DataError, match=r"clean_val_key_list.txt is missing; the Clothing1M"):
        c1m.read_layout(root)
    assert c1m.main(["--root", str(root), "--out", str(tmp_path / "o"), "--workers", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "clean_val_key_list.txt is missing" in err
    assert not (tmp_path / "o").exists()  # nothing written before the layout is checked


def test_label_outside_0_13_names_file_and_line(tree: Path, tmp_path: Path) -> None:
    root = _copy_annotations(tree, tmp_path / "r")
    lines = (root / "noisy_label_kv.txt").read_text().splitlines()
    key = lines[2].split()[0]
    lines[2] = f"{key} 14"
    (root / "noisy_label_kv.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"noisy_label_kv.txt line 3: label 14 is outside 0..13"):
        c1m.read_layout(root)
    lines[2] = f"{key} x"
    (root / "noisy_label_kv.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"line 3: label 'x' is not an integer"):
        c1m.read_layout(root)


def test_clothing1m_rejects_synthetic_noise(converted) -> None:
    out, _ = converted
    cfg = load_config(["data.name=clothing1m", f"data.root={out}", "noise.kind=symmetric"])
    with pytest.raises(ConfigError, match="already noisy"):
        prepare_data(cfg)
    spec = prepare_data(
        load_config(["data.name=clothing1m", f"data.root={out}", "noise.kind=none"])
    )
    assert spec.num_clean_known == OVERLAP and spec.val_dir and spec.test_dir
    assert spec.train_transform == "imagenet_train" and spec.mean == list(c1m.MEAN)


def test_truncated_shard_and_corrupt_jpeg_are_skipped_counted_and_named(converted, tmp_path):
    """A cut tar member and a damaged JPEG: two ranks still run the same number of full
    balanced batches, and both problems are recorded under their names."""
    from distnoisy.data.stream import BalancedSubset, TrainStream, make_transform

    out, _ = converted
    shutil.copytree(out / "noisy_train", tmp_path / "nt")
    m = read_manifest(tmp_path / "nt")
    first = tmp_path / "nt" / m.shards[0].name  # holds the damaged JPEG (index 5)
    cut = tmp_path / "nt" / m.shards[2].name
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    assert first.exists()
    labels = read_labels(m)[0]
    sub = BalancedSubset(labels, 10_000, seed=0)  # every sample: the cap exceeds each class
    streams = [
        TrainStream(
            m,
            rank=r,
            world_size=2,
            local_batch_size=8,
            seed=0,
            split="sample",
            transform=make_transform("imagenet_train", c1m.MEAN, c1m.STD, size=16),
            balanced=sub,
        )
        for r in range(2)
    ]
    per_rank = [list(s.epoch_batches(0)) for s in streams]
    assert [len(b) for b in per_rank] == [280 // 16] * 2
    assert all(b["image"].shape == (8, 3, 16, 16) for bs in per_rank for b in bs)
    bad = dict(streams[0].bad_samples + streams[1].bad_samples)
    assert "corrupt image" in bad.get(f"{CORRUPT:09d}", "")
    assert "truncated" in bad[cut.name] or "unreadable" in bad[cut.name]


def test_missing_weights_file_is_a_clear_error(converted, tmp_path) -> None:
    from distnoisy.train import train

    out, _ = converted
    cfg = load_config(
        [
            "--config",
            str(RECIPES / "clothing1m_ce.yaml"),
            f"data.root={out}",
            f"model.weights={tmp_path / 'resnet50.pth'}",
            f"output_dir={tmp_path / 'run'}",
        ]
    )
    with pytest.raises(ConfigError, match=r"resnet50.pth' does not exist; pass model.weights="):
        train(cfg)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("recipe", sorted(p.name for p in RECIPES.glob("clothing1m_*.yaml")))
def test_recipes_load(recipe: str) -> None:
    cfg = load_config(["--config", str(RECIPES / recipe)])
    assert cfg.data.name == "clothing1m" and cfg.noise.kind == "none"
    assert cfg.model.name == "resnet50" and cfg.train.epochs == 15
    assert cfg.data.balanced_batches * cfg.train.batch_size == 192_000


def _cifar_batches(root: Path, n_per_batch: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """A miniature ``cifar-10-batches-py`` folder in the real format (pickled dicts)."""
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [f"c{i}".encode() for i in range(10)]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names}, f)
    all_x, all_y = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        y = rng.integers(0, 10, n_per_batch).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": x, b"labels": y, b"batch_label": name.encode()}, f)
        all_x.append(x)
        all_y += y
    return np.concatenate(all_x), np.asarray(all_y)


def test_cifar_python_batches_and_human_label_file(tmp_path: Path) -> None:
    from distnoisy.data import cifar

    x, y = _cifar_batches(tmp_path / "src")
    assert cifar.main(["--root", str(tmp_path / "src"), "--out", str(tmp_path / "out")]) == 0
    train = read_manifest(tmp_path / "out" / "train")
    assert train.num_samples == 60 and read_manifest(tmp_path / "out" / "test").num_samples == 12
    labels, clean, _ = read_labels(train)
    assert labels.tolist() == y[:60].tolist() and clean.tolist() == y[:60].tolist()
    with tarfile.open(tmp_path / "out" / "train" / train.shards[0].name) as tf:
        png = tf.extractfile("000000007.png").read()
    img = np.asarray(Image.open(io.BytesIO(png)))
    assert np.array_equal(img, x[7].reshape(3, 32, 32).transpose(1, 2, 0))  # lossless, HWC

    human = (y[:60] + (np.arange(60) % 4 == 0)) % 10  # "CIFAR-10N": every 4th label differs
    np.save(tmp_path / "human.npy", human)
    spec = prepare_data(
        load_config(
            [
                "data.name=cifar10",
                f"data.root={tmp_path / 'out'}",
                "noise.kind=file",
                f"noise.file={tmp_path / 'human.npy'}",
            ]
        )
    )
    assert spec.noise_rate == pytest.approx(0.25) and spec.num_clean_known == 60
    assert spec.train_transform == "cifar_train" and spec.mean == list(cifar.MEAN["cifar10"])


class _RunsCode:
    """What a malicious pickle looks like: unpickling it would call os.system."""

    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > /dev/null",))


def test_cifar_reader_refuses_pickles_that_name_other_globals(tmp_path: Path) -> None:
    from distnoisy.data import cifar

    _cifar_batches(tmp_path / "src")
    batch = tmp_path / "src" / "cifar-10-batches-py" / "data_batch_2"
    with open(batch, "wb") as f:
        pickle.dump({b"data": _RunsCode(), b"labels": [0]}, f)
    with pytest.raises(DataError, match=r"data_batch_2: refusing to unpickle posix.system"):
        cifar.read_cifar(tmp_path / "src", "cifar10")


def test_image_folder(tmp_path: Path) -> None:
    from distnoisy.data import folder

    for c, colour in (("cat", 10), ("dog", 200)):
        (tmp_path / "src" / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (20, 30), (colour, i, 0)).save(tmp_path / "src" / c / f"{i}.jpg")
    m = folder.convert(tmp_path / "src", tmp_path / "out", resize=16, shard_size=4, seed=None)
    assert (m.num_samples, m.classes, len(m.shards)) == (6, ("cat", "dog"), 2)
    labels, _, keys = read_labels(m)
    assert labels.tolist() == [0, 0, 0, 1, 1, 1] and keys[3] == "dog/0.jpg"
    # The default order is a seeded shuffle of the same listing: same pairs, other positions.
    m = folder.convert(tmp_path / "src", tmp_path / "shuffled", resize=16, shard_size=4)
    labels2, _, keys2 = read_labels(m)
    assert sorted(zip(keys2, labels2, strict=True)) == sorted(zip(keys, labels, strict=True))
    assert list(keys2) != list(keys)


@pytest.mark.slow
def test_elr_recipe_trains_on_converted_clothing1m_with_two_workers(
    converted, tmp_path: Path, mlflow_uri: str, ray_cluster, capsys
) -> None:
    from distnoisy.train import main

    out, doc = converted
    argv = [
        "--config",
        str(RECIPES / "clothing1m_elr.yaml"),
        f"data.root={out}",
        "model.name=small_cnn",
        "train.epochs=2",
        "train.batch_size=16",
        "train.lr=0.01",
        "data.balanced_batches=4",
        "data.num_workers=0",
        "data.image_size=32",
        "scaling.num_workers=2",
        "scaling.use_gpu=false",
        f"output_dir={tmp_path / 'run'}",
        f"tracking.uri={mlflow_uri}",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["num_workers"] == 2 and summary["epochs"] == 2
    assert summary["dataset"] == "clothing1m" and summary["num_train"] == 280
    # Evaluated on clean_val (selection) and clean_test (the reported number).
    assert all(0 <= h["val_acc"] <= 1 and 0 <= h["test_acc"] <= 1 for h in summary["history"])
    history = summary["history"]
    best = int(np.argmax([h["val_acc"] for h in history]))
    assert summary["best_val_epoch"] == best
    assert summary["test_acc_at_best_val"] == history[best]["test_acc"]
    # Noise measured on the overlap subset only (56 of 280 have a clean label).
    assert summary["num_clean_known"] == OVERLAP
    assert summary["noise_rate_realised"] == pytest.approx(doc["noise_rate_on_overlap"])
    # Memorization and clean accuracy of the final predictions, on the samples whose clean
    # label is known and whose final pass read them (the damaged JPEG has an all-zero row).
    stats = pq.read_table(tmp_path / "run" / "sample_stats.parquet").to_pandas()
    pred, given = stats["final_pred"].to_numpy(), stats["given_label"].to_numpy()
    clean = stats["clean_label"].to_numpy()
    read = np.stack(stats["final_prob"].to_numpy()).sum(1) > 0
    known = (clean >= 0) & read
    assert known.sum() == OVERLAP - (CORRUPT in np.flatnonzero(clean >= 0))
    noisy = known & (clean != given)
    assert summary["clean_train_acc"] == pytest.approx((pred[known] == clean[known]).mean())
    assert summary["memorized"] == pytest.approx((pred[noisy] == given[noisy]).mean())
    assert 0 < summary["num_train_seen"] <= 2 * 64 < 280  # balanced epochs: 2 x 4 x 16
    assert f"measured on the {OVERLAP} of 280" in printed and "clean val accuracy" in printed
    # The damaged JPEG: skipped, counted and named (final pass over the training set).
    assert summary["bad_samples"] >= 1
    assert any(b["key"] == f"{CORRUPT:09d}" for b in summary["bad_sample_list"])
    issues = pq.read_table(tmp_path / "run" / "label_issues.parquet").to_pandas()
    assert issues["is_corrupted"].notna().sum() == OVERLAP


@pytest.mark.slow
def test_max_bad_fraction_aborts_every_rank_with_one_line(
    converted, tmp_path, mlflow_uri, ray_cluster, capsys
) -> None:
    """Past data.max_bad_fraction every rank stops together (no rank left in a collective) and
    the CLI prints the worker's one-line message, not a Ray traceback."""
    from distnoisy.train import main

    out, _ = converted
    argv = [
        "--config",
        str(RECIPES / "clothing1m_ce.yaml"),
        f"data.root={out}",
        "model.name=small_cnn",
        "train.epochs=2",
        "train.batch_size=8",
        "data.balanced_batches=0",  # every sample in the epoch, the damaged one included
        "data.split=sample",  # 280 = 35 x 8: no reserve, every sample is decoded
        "data.num_workers=0",
        "data.image_size=32",
        "data.max_bad_fraction=0",
        "scaling.num_workers=2",
        "scaling.use_gpu=false",
        f"output_dir={tmp_path / 'run'}",
        f"tracking.uri={mlflow_uri}",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("distnoisy: error: 1 unusable training samples, more than data.max_bad")
    assert f"{CORRUPT:09d}: corrupt image" in err
    assert not (tmp_path / "run" / "summary.json").exists()


@pytest.mark.slow
def test_clothing1m_recipe_shows_step_progress(converted, tmp_path: Path, mlflow_uri: str, caplog):
    """The ELR recipe on the miniature: 4 balanced steps an epoch, a progress line every step
    (not the last: the epoch line reports it), with images/s and ETA, also as step metrics."""
    import logging

    from mlflow.tracking import MlflowClient

    from distnoisy.train import train

    out, _ = converted
    cfg = load_config(
        [
            "--config",
            str(RECIPES / "clothing1m_elr.yaml"),
            f"data.root={out}",
            "model.name=small_cnn",
            "train.epochs=2",
            "train.batch_size=16",
            "data.balanced_batches=4",
            "data.num_workers=0",
            "data.image_size=32",
            "train.log_every_steps=1",
            "scaling.launcher=local",
            "scaling.num_workers=1",
            "scaling.use_gpu=false",
            f"output_dir={tmp_path / 'run'}",
            f"tracking.uri={mlflow_uri}",
        ]
    )
    with caplog.at_level(logging.INFO, logger="distnoisy.engine.progress"):
        summary = train(cfg)
    lines = [r.getMessage() for r in caplog.records if r.name == "distnoisy.engine.progress"]
    assert [line.split("  ")[:2] for line in lines] == [
        [f"epoch {e}/2", f"step {s}/4"] for e in (1, 2) for s in (1, 2, 3)
    ]
    assert all(" images/s  loss " in line and "  ETA epoch " in line for line in lines)
    client = MlflowClient(mlflow_uri)
    history = client.get_metric_history(summary["mlflow_run_id"], "step_images_per_s")
    assert sorted(m.step for m in history) == [1, 2, 3, 5, 6, 7]
    assert all(m.value > 0 for m in history)
    eta = client.get_metric_history(summary["mlflow_run_id"], "step_eta_run_s")
    assert len(eta) == 6 and all(m.value >= 0 for m in eta)
