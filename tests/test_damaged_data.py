"""Damaged data on 2 Ray workers: a truncated tar and corrupt images, counted as they are.

The digits shards (real scikit-learn images) are copied and damaged for real: one training
shard is cut to 55% of its bytes (Python's tarfile then ends the stream without an error), and
three images of another shard are replaced by bytes no decoder reads. What the run counts is
checked against an independent reading of the damaged tar with ``tarfile``.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from distnoisy.data.shards import read_manifest
from distnoisy.data.stream import count_bad, samples_lost
from distnoisy.issues.ranking import rank_by_score
from distnoisy.train import main

CORRUPT = b"\x89PNG\r\n\x1a\n" + b"not an image at all" * 8
CUT_SHARD, CORRUPT_SHARD = 3, 1


def _readable_keys(path: Path) -> set[int]:
    """Keys of the members whose data lies wholly inside the file (read independently)."""
    size = path.stat().st_size
    keys: set[int] = set()
    with tarfile.open(path, "r:") as tf:
        try:
            for m in tf:
                if m.isreg() and m.name.endswith(".png") and m.offset_data + m.size <= size:
                    keys.add(int(m.name.split(".")[0]))
        except tarfile.TarError:
            pass
    return keys


def _corrupt_members(path: Path, keys: list[int]) -> None:
    """Rewrite the shard with the PNG bytes of ``keys`` replaced by undecodable ones."""
    members = []
    with tarfile.open(path, "r:") as tf:
        for m in tf:
            data = tf.extractfile(m).read() if m.isreg() else b""
            if m.name.endswith(".png") and int(m.name.split(".")[0]) in keys:
                data = CORRUPT
            members.append((m.name, data))
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


@pytest.fixture()
def damaged(digits_root: Path, tmp_path: Path) -> dict:
    """A copy of the digits set with a cut shard and three corrupt images."""
    root = tmp_path / "digits"
    shutil.copytree(digits_root, root)
    m = read_manifest(root / "train")
    cut = root / "train" / m.shards[CUT_SHARD].name
    cut.write_bytes(cut.read_bytes()[: int(cut.stat().st_size * 0.55)])
    first, count = m.shards[CUT_SHARD].first_index, m.shards[CUT_SHARD].count
    lost = sorted(set(range(first, first + count)) - _readable_keys(cut))
    start = m.shards[CORRUPT_SHARD].first_index
    corrupt = [start + 3, start + 50, start + 200]
    _corrupt_members(root / "train" / m.shards[CORRUPT_SHARD].name, corrupt)
    return {"root": root, "cut": cut.name, "lost": lost, "corrupt": corrupt, "n": m.num_samples}


def _argv(d: dict, run: Path, *extra: str) -> list[str]:
    return [
        f"data.root={d['root']}",
        f"output_dir={run}",
        "scaling.num_workers=2",
        "tracking.enabled=false",
        "train.epochs=2",
        *extra,
    ]


def test_a_truncated_shard_counts_every_sample_it_lost() -> None:
    """The record of a cut shard stands for its missing samples; its tar error for none."""
    trunc = ("train", "s.tar", "shard yielded 56 of 100 samples (truncated or unreadable)")
    tar_error = ("train", "s.tar", "unreadable tar data: ReadError: unexpected end of data")
    image = ("train", "000000005", "corrupt image in s.tar: ValueError: x")
    assert samples_lost(trunc[2]) == 44 and samples_lost(tar_error[2]) == 0
    # The same sample or shard met by two ranks, the training stream and the final pass: once.
    assert count_bad([trunc, tar_error, image, trunc, image, ("val", *image[1:])]) == 44 + 1 + 1


@pytest.mark.slow
def test_a_truncated_tar_stops_the_run_naming_the_shard(damaged, tmp_path, ray_cluster, capsys):
    run = tmp_path / "run"
    assert main(_argv(damaged, run)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    lost = len(damaged["lost"])
    assert lost > 0.01 * damaged["n"]  # the default data.max_bad_fraction
    assert err.startswith("distnoisy: error: "), err
    total = int(err.split()[2])
    assert lost <= total <= lost + 3, err  # the corrupt images met so far may add to it
    assert f"first: {damaged['cut']}: shard yielded {256 - lost} of 256 samples" in err
    assert not (run / "summary.json").exists()


@pytest.mark.slow
def test_bad_samples_are_counted_once_and_never_trained_rows_rank_last(
    damaged, tmp_path, ray_cluster, capsys
):
    run = tmp_path / "run"
    # split=sample: both ranks read the cut shard; the final pass meets the corrupt images again.
    argv = _argv(damaged, run, "data.max_bad_fraction=0.5", "data.split=sample")
    assert main(argv) == 0
    out = capsys.readouterr().out
    summary = json.loads((run / "summary.json").read_text())
    lost, corrupt = damaged["lost"], damaged["corrupt"]
    assert summary["bad_samples"] == len(lost) + len(corrupt)
    assert f"skipped {len(lost) + len(corrupt)} corrupt or unreadable samples" in out
    listed = {b["key"] for b in summary["bad_sample_list"]}
    assert {f"{i:09d}" for i in corrupt} | {damaged["cut"]} <= listed
    assert summary["history"][-1]["bad_samples"] == len(lost) + len(corrupt)

    issues = pq.read_table(run / "label_issues.parquet").to_pandas()
    trained = issues["trained"].to_numpy()
    never = issues["index"].to_numpy()[~trained]
    assert set(lost) <= set(never.tolist()) and set(corrupt) <= set(never.tolist())
    assert len(never) == summary["num_train"] - summary["num_train_seen"]
    # Every trained row comes first, in score order; the never-trained rows are unflagged.
    assert trained[: trained.sum()].all()
    assert not issues["is_label_issue"].to_numpy()[~trained].any()
    assert (issues["suggested_label"].to_numpy()[~trained] == -1).all()
    scores = issues["score"].to_numpy()[trained]
    assert (rank_by_score(scores) == np.arange(len(scores))).all()


def test_folder_converter_without_resize_names_undecodable_images(tmp_path, caplog) -> None:
    """Stored bytes are not re-encoded without --resize, but a damaged image is still named."""
    from PIL import Image

    from distnoisy.data.folder import convert

    for cls in ("cat", "dog"):
        (tmp_path / "root" / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (16, 16), (40 * i, 80, 120)).save(tmp_path / "root" / cls / f"{i}.jpg")
    good = (tmp_path / "root" / "dog" / "2.jpg").read_bytes()
    (tmp_path / "root" / "dog" / "2.jpg").write_bytes(good[: len(good) // 2])  # truncated JPEG
    with caplog.at_level("WARNING"):
        m = convert(tmp_path / "root", tmp_path / "out", split="train", workers=1)
    assert m.num_samples == 6  # kept, so the indices stay those of the listing
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("dog/2.jpg" in w and "cannot decode the image" in w for w in warnings), warnings
    assert any(w.startswith("train: 1 of 6 images cannot be decoded") for w in warnings), warnings
