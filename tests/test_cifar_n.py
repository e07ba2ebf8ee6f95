"""CIFAR-10N/100N human labels (distnoisy.data.cifar_n): files in the release's format, written
here with ``torch.save`` of numpy arrays like ``CIFAR-10_human.pt``, safe reading, one-line
errors, and runs that train on them."""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from local_mlflow import sqlite_uri

from distnoisy.config import load_config
from distnoisy.core.errors import ConfigError, DataError
from distnoisy.data import cifar
from distnoisy.data.cifar_n import LABEL_SETS, human_labels, read_human_file
from distnoisy.data.label_files import read_label_file
from distnoisy.data.prepare import prepare_data

N_PER_BATCH = 12  # 5 training batches: 60 training images, 12 test images


def _batches(root: Path, name: str = "cifar10") -> np.ndarray:
    """Miniature CIFAR python batches in the real format; returns the training labels."""
    rng = np.random.default_rng(0)
    if name == "cifar10":
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        with open(folder / "batches.meta", "wb") as f:
            pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f)
        files = [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]
        counts = [N_PER_BATCH] * 6
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True)
        with open(folder / "meta", "wb") as f:
            pickle.dump(
                {
                    b"fine_label_names": [f"f{i}".encode() for i in range(100)],
                    b"coarse_label_names": [f"s{i}".encode() for i in range(20)],
                },
                f,
            )
        files, counts = ["train", "test"], [5 * N_PER_BATCH, N_PER_BATCH]
    train = []
    for fname, n in zip(files, counts, strict=True):
        fine = rng.integers(0, 100 if name == "cifar100" else 10, n)
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)}
        if name == "cifar10":
            batch[b"labels"] = fine.tolist()
        else:
            batch[b"fine_labels"], batch[b"coarse_labels"] = fine.tolist(), (fine // 5).tolist()
        with open(folder / fname, "wb") as f:
            pickle.dump(batch, f)
        if not fname.startswith("test"):
            train.append(fine)
    return np.concatenate(train)


def _flip(labels: np.ndarray, every: int, num_classes: int) -> np.ndarray:
    """Labels with every ``every``-th one moved to the next class (a known noise rate)."""
    out = labels.copy()
    out[::every] = (out[::every] + 1) % num_classes
    return out


def _cifar10_human(path: Path, clean: np.ndarray) -> dict[str, np.ndarray]:
    """A ``CIFAR-10_human.pt`` in the release's format: torch.save of a dict of numpy arrays."""
    arrays = {
        "clean_label": clean,
        "aggre_label": _flip(clean, 10, 10),
        "worse_label": _flip(clean, 2, 10),
        "random_label1": _flip(clean, 5, 10),
        "random_label2": _flip(clean, 6, 10),
        "random_label3": _flip(clean, 4, 10),
    }
    torch.save(arrays, path)
    return arrays


@pytest.fixture(scope="module")
def cifar10(tmp_path_factory) -> tuple[Path, np.ndarray]:
    tmp = tmp_path_factory.mktemp("c10")
    labels = _batches(tmp / "src")
    assert cifar.main(["--root", str(tmp / "src"), "--out", str(tmp / "out")]) == 0
    return tmp / "out", labels


def _spec(root: Path, *overrides: str, name: str = "cifar10"):
    return prepare_data(
        load_config([f"data.name={name}", f"data.root={root}", "noise.kind=cifar_n", *overrides])
    )


@pytest.mark.parametrize(
    ("label_set", "key", "rate"),
    [
        ("aggre", "aggre_label", 0.1),
        ("worse", "worse_label", 0.5),
        ("random3", "random_label3", 0.25),
    ],
)
def test_label_sets_train_on_the_file_s_labels(cifar10, tmp_path, label_set, key, rate) -> None:
    root, clean = cifar10
    arrays = _cifar10_human(tmp_path / "CIFAR-10_human.pt", clean)
    spec = _spec(root, f"noise.cifar_n={label_set}", f"noise.file={tmp_path / 'CIFAR-10_human.pt'}")
    assert spec.noise_rate == pytest.approx(rate)  # the realised rate of this file
    lf = read_label_file(spec.label_file, 60, 10)
    np.testing.assert_array_equal(lf.labels, arrays[key])
    np.testing.assert_array_equal(lf.clean_labels, clean)


def test_numpy_1_files_load_and_their_arrays_are_exact(cifar10, tmp_path) -> None:
    """The release was written with numpy 1 (``numpy.core.multiarray``); numpy 2 reads it."""
    _, clean = cifar10
    arrays = _cifar10_human(tmp_path / "new.pt", clean)
    with (
        zipfile.ZipFile(tmp_path / "new.pt") as src,
        zipfile.ZipFile(tmp_path / "old.pt", "w") as dst,
    ):
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("data.pkl"):
                assert b"numpy._core.multiarray" in data or b"numpy.core.multiarray" in data
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            dst.writestr(item, data)
    for name in ("new.pt", "old.pt"):
        read = read_human_file(tmp_path / name)
        assert set(read) == set(arrays)
        for key, value in arrays.items():
            np.testing.assert_array_equal(read[key], value)


class _RunsCode:
    """What a malicious pickle looks like: unpickling it would run a command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_files_are_read_without_arbitrary_unpickling(tmp_path) -> None:
    marker = tmp_path / "pwned"
    torch.save({"aggre_label": _RunsCode(marker)}, tmp_path / "evil.pt")
    with pytest.raises(DataError, match="is not a CIFAR-N label file") as exc:
        read_human_file(tmp_path / "evil.pt")
    assert "\n" not in str(exc.value) and not marker.exists()
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="is not a CIFAR-N label file"):
        read_human_file(tmp_path / "junk.pt")
    with pytest.raises(DataError, match="does not exist"):
        read_human_file(tmp_path / "missing.pt")


def test_wrong_files_and_sizes_are_one_line_errors(cifar10, tmp_path) -> None:
    _, clean = cifar10

    def error(arrays: dict, label_set: str = "aggre") -> str:
        torch.save(arrays, tmp_path / "f.pt")
        with pytest.raises((DataError, ConfigError)) as exc:
            human_labels(tmp_path / "f.pt", label_set, "cifar10", clean, 10)
        assert "\n" not in str(exc.value)
        return str(exc.value)

    c100 = {"clean_label": clean, "noisy_label": clean, "noisy_coarse_label": clean // 5}
    assert "has no 'aggre_label'" in error(c100) and "CIFAR-10_human.pt" in error(c100)
    short = {"clean_label": clean[:-1], "aggre_label": clean[:-1]}
    assert "has 59 labels but the training set has 60 images" in error(short)
    shuffled = {"clean_label": clean[::-1], "aggre_label": clean[::-1]}
    assert "differs from the training shards' labels" in error(shuffled)
    out_of_range = {"aggre_label": clean + 10}
    assert "outside the training set's 0..9" in error(out_of_range)
    assert "is a label set of cifar100, not data.name=cifar10" in error(c100, "noisy_fine")


def test_config_errors_are_one_line(cifar10, tmp_path, capsys) -> None:
    from distnoisy.train import main

    root, _ = cifar10
    with pytest.raises(ConfigError, match=r"noise\.kind=cifar_n needs noise\.file"):
        load_config(["data.name=cifar10", "noise.kind=cifar_n"])
    with pytest.raises(ConfigError, match=r"noise\.cifar_n"):
        load_config(["noise.kind=cifar_n", "noise.cifar_n=aggregate", "noise.file=x.pt"])
    out = tmp_path / "run"
    code = main(
        [
            "data.name=cifar10",
            f"data.root={root}",
            "noise.kind=cifar_n",
            f"noise.file={tmp_path / 'nope.pt'}",
            "tracking.enabled=false",
            f"output_dir={out}",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "does not exist" in err
    assert not out.exists()


def test_cifar100_fine_and_coarse(tmp_path) -> None:
    fine = _batches(tmp_path / "src", "cifar100")
    assert (
        cifar.main(
            ["--root", str(tmp_path / "src"), "--out", str(tmp_path / "fine"), "--name", "cifar100"]
        )
        == 0
    )
    args = ["--root", str(tmp_path / "src"), "--out", str(tmp_path / "coarse")]
    assert cifar.main([*args, "--name", "cifar100", "--coarse"]) == 0
    coarse = fine // 5
    torch.save(
        {
            "clean_label": fine,
            "noisy_label": _flip(fine, 3, 100),
            "clean_coarse_label": coarse,
            "noisy_coarse_label": _flip(coarse, 4, 20),
        },
        tmp_path / "CIFAR-100_human.pt",
    )
    file = f"noise.file={tmp_path / 'CIFAR-100_human.pt'}"
    spec = _spec(tmp_path / "fine", "noise.cifar_n=noisy_fine", file, name="cifar100")
    assert spec.num_classes == 100 and spec.noise_rate == pytest.approx(20 / 60)
    spec = _spec(tmp_path / "coarse", "noise.cifar_n=noisy_coarse", file, name="cifar100")
    assert spec.num_classes == 20 and spec.noise_rate == pytest.approx(15 / 60)
    with pytest.raises(ConfigError, match="--coarse"):
        _spec(tmp_path / "fine", "noise.cifar_n=noisy_coarse", file, name="cifar100")


def test_label_sets_name_the_paper_rates() -> None:
    rates = {k: v.known_rate for k, v in LABEL_SETS.items()}
    assert rates["aggre"] == 0.0903 and rates["random1"] == 0.1723 and rates["worse"] == 0.4021
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for name, rate in rates.items():
        assert f"`{name}`" in readme and f"{100 * rate:.2f}%" in readme, name


@pytest.mark.slow
def test_a_run_on_cifar_n_labels_logs_the_realised_rate(cifar10, tmp_path, caplog) -> None:

    from mlflow.tracking import MlflowClient

    from distnoisy.train import train

    root, clean = cifar10
    _cifar10_human(tmp_path / "CIFAR-10_human.pt", clean)
    uri = sqlite_uri(tmp_path)
    with caplog.at_level("INFO", logger="distnoisy.data.cifar_n"):
        summary = train(
            load_config(
                [
                    "data.name=cifar10",
                    f"data.root={root}",
                    "noise.kind=cifar_n",
                    "noise.cifar_n=worse",
                    f"noise.file={tmp_path / 'CIFAR-10_human.pt'}",
                    "model.name=small_cnn",
                    "method.name=ce",
                    "train.epochs=1",
                    "train.batch_size=20",
                    "scaling.launcher=local",
                    "scaling.num_workers=1",
                    f"tracking.uri={uri}",
                    f"output_dir={tmp_path / 'run'}",
                ]
            )
        )
    assert summary["noise_rate_realised"] == pytest.approx(0.5)
    assert (
        "CIFAR-N worse (worse_label): realised noise rate 50.00% (the CIFAR-N paper: 40.21%)"
        in caplog.text
    )
    run = MlflowClient(uri).get_run(summary["mlflow_run_id"])
    assert run.data.params["noise.cifar_n"] == "worse"
    assert run.data.metrics["final_noise_rate_realised"] == pytest.approx(0.5)
    assert json.loads((tmp_path / "run/summary.json").read_text())["noise_kind"] == "cifar_n"
