"""Training/evaluation streams over real tar shards: equal batches on every rank, exactness,
bad data, loader workers, transforms. Ranks are simulated by one stream per rank in-process."""

from __future__ import annotations

import io
import logging
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distnoisy.core.errors import ConfigError, DataError
from distnoisy.data.shards import Manifest, Sample, read_manifest, write_shards
from distnoisy.data.stream import (
    BalancedSubset,
    EvalStream,
    TrainStream,
    assign_shards,
    decode_image_bytes,
    make_transform,
)

# mean 0 / std 1 on the 0..1 scale: a decoded pixel * 255 is the stored uint8 value.
IDENTITY = make_transform("digits", [0.0], [1.0])
CORRUPT_PNG = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + b"not really a png" * 4


def png(value: int) -> bytes:
    """A 4x4 grey PNG whose pixels store the sample's index, to check image/index pairing."""
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 4), value % 256, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_set(
    root: Path, n: int, shard_size: int, corrupt: tuple[int, ...] = (), **kw: object
) -> Manifest:
    samples = (
        Sample(i, CORRUPT_PNG if i in corrupt else png(i), i % 3, None, f"src/{i}.png")
        for i in range(n)
    )
    return write_shards(
        samples,
        root,
        split="train",
        classes=["a", "b", "c"],
        shard_size=shard_size,
        image_ext="png",
        dataset="toy",
        **kw,
    )


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Manifest]:
    root = tmp_path_factory.mktemp("sets")
    return {
        "7-7-3": write_set(root / "a", 17, 7),  # uneven shards
        "5-1": write_set(root / "b", 6, 5),  # 2 shards: fewer than 3 ranks
        "6x8+2": write_set(root / "c", 50, 6),  # 9 shards, enough for 3 ranks
    }


def rank_batches(
    m: Manifest,
    world: int,
    b: int,
    split: str,
    epoch: int = 0,
    seed: int = 0,
    shuffle_buffer: int = 4,
    balanced: BalancedSubset | None = None,
) -> list[list[dict[str, torch.Tensor]]]:
    """Every rank's batches of one epoch, one stream per simulated rank."""
    streams = [
        TrainStream(
            m,
            rank=r,
            world_size=world,
            local_batch_size=b,
            seed=seed,
            split=split,
            transform=IDENTITY,
            shuffle_buffer=shuffle_buffer,
            balanced=balanced,
        )
        for r in range(world)
    ]
    return [list(s.epoch_batches(epoch)) for s in streams]


def assert_images_match(batch: dict[str, torch.Tensor]) -> None:
    stored = (batch["image"][:, 0, 0, 0] * 255).round().long()
    assert torch.equal(stored, batch["index"] % 256)


@pytest.mark.parametrize("split", ["sample", "shard"])
@pytest.mark.parametrize("name", ["7-7-3", "5-1", "6x8+2"])
@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("b", [1, 2])
def test_every_rank_yields_exactly_steps_full_batches(
    sets: dict[str, Manifest], split: str, name: str, world: int, b: int
) -> None:
    m = sets[name]
    steps = m.num_samples // (world * b)
    for batches in rank_batches(m, world, b, split, epoch=1):
        assert len(batches) == steps
        for batch in batches:
            assert batch["image"].shape == (b, 1, 4, 4) and batch["image"].dtype == torch.float32
            assert batch["index"].dtype == torch.long and batch["index"].shape == (b,)
            assert_images_match(batch)


def test_fewer_shards_than_ranks_falls_back_to_sample(
    sets: dict[str, Manifest], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="distnoisy.data.stream"):
        s = TrainStream(
            sets["5-1"],
            rank=2,
            world_size=3,
            local_batch_size=2,
            seed=0,
            split="shard",
            transform=IDENTITY,
        )
    assert s.mode == "sample" and "2 shards for 3 ranks" in caplog.text
    assert s.steps_per_epoch == 1 and s.samples_dropped_per_epoch == 0


@pytest.mark.parametrize("world,b", [(2, 2), (3, 2), (2, 3)])
def test_sample_mode_is_world_size_invariant(sets: dict[str, Manifest], world: int, b: int) -> None:
    m = sets["6x8+2"]
    for epoch in (0, 3):
        (single,) = rank_batches(m, 1, world * b, "sample", epoch, shuffle_buffer=7)
        per_rank = rank_batches(m, world, b, "sample", epoch, shuffle_buffer=7)
        assert len(single) == m.num_samples // (world * b)
        for g, batch in enumerate(single):
            union = torch.cat([per_rank[r][g]["index"] for r in range(world)])
            assert torch.equal(union, batch["index"])
            images = torch.cat([per_rank[r][g]["image"] for r in range(world)])
            assert torch.equal(images, batch["image"])


def test_sample_mode_epochs_unique_different_deterministic(sets: dict[str, Manifest]) -> None:
    m = sets["6x8+2"]
    orders = []
    for epoch in (0, 1):
        ranks = rank_batches(m, 2, 3, "sample", epoch)
        seen = torch.cat([b["index"] for r in ranks for b in r]).tolist()
        assert len(seen) == len(set(seen)) == 8 * 6  # 8 steps x 2 ranks x 3; 2 dropped
        orders.append(seen)
        again = rank_batches(m, 2, 3, "sample", epoch)
        assert [[b["index"].tolist() for b in r] for r in ranks] == [
            [b["index"].tolist() for b in r] for r in again
        ]
    assert orders[0] != orders[1]
    other_seed = rank_batches(m, 2, 3, "sample", 0, seed=1)
    assert torch.cat([b["index"] for r in other_seed for b in r]).tolist() != orders[0]


@pytest.mark.parametrize("name,world", [("7-7-3", 2), ("7-7-3", 3), ("6x8+2", 3), ("6x8+2", 2)])
def test_shard_mode_reads_only_own_shards(sets: dict[str, Manifest], name: str, world: int) -> None:
    m = sets[name]
    b = 2
    need = m.num_samples // (world * b) * b
    for epoch in (0, 1):
        assignment = assign_shards([s.count for s in m.shards], world, 0, epoch)
        assert sorted(i for shards in assignment for i in shards) == list(range(len(m.shards)))
        for r, batches in enumerate(rank_batches(m, world, b, "shard", epoch)):
            mine = {
                i
                for k in assignment[r]
                for i in range(m.shards[k].first_index, m.shards[k].first_index + m.shards[k].count)
            }
            seen = torch.cat([x["index"] for x in batches]).tolist()
            assert set(seen) <= mine
            # A rank whose shards hold no more than it needs sees each of its samples.
            if len(mine) <= need:
                assert set(seen) == mine
            else:
                assert len(set(seen)) == len(seen) == need


def test_shard_assignment_is_greedy_and_changes_with_epoch() -> None:
    counts = [7, 7, 3, 5, 5, 1]
    assignments = [assign_shards(counts, 2, 0, e) for e in range(6)]
    for a in assignments:
        # Largest first to the least-loaded rank: 7|7, 5|5, 3 -> rank 0, 1 -> rank 1.
        assert [sum(counts[i] for i in r) for r in a] == [15, 13]
        assert sorted(i for r in a for i in r) == list(range(6))
    assert assignments[0] == assign_shards(counts, 2, 0, 0)  # deterministic
    assert len({str(a) for a in assignments}) > 1  # equal-sized shards swap ranks by epoch


def test_stats(sets: dict[str, Manifest]) -> None:
    s = TrainStream(
        sets["7-7-3"],
        rank=0,
        world_size=2,
        local_batch_size=2,
        seed=0,
        split="shard",
        transform=IDENTITY,
    )
    st = s.stats
    assert (st.mode, st.steps_per_epoch, st.global_batch_size, st.samples_per_epoch) == (
        "shard",
        4,
        4,
        16,
    )
    # Loads 10 / 7 against 8 needed per rank: 2 unused, 1 read twice.
    assert (st.dropped_per_epoch, st.repeated_per_epoch, st.num_bad_samples) == (2, 1, 0)
    s = TrainStream(
        sets["7-7-3"], rank=0, world_size=3, local_batch_size=2, seed=0, transform=IDENTITY
    )
    assert (s.steps_per_epoch, s.samples_dropped_per_epoch) == (2, 5)


def test_too_few_samples_for_one_batch(sets: dict[str, Manifest]) -> None:
    with pytest.raises(DataError, match=r"lower train\.batch_size to at most 17"):
        TrainStream(
            sets["7-7-3"], rank=0, world_size=3, local_batch_size=6, seed=0, transform=IDENTITY
        )
    with pytest.raises(ConfigError, match=r"data\.split"):
        TrainStream(
            sets["7-7-3"],
            rank=0,
            world_size=1,
            local_batch_size=1,
            seed=0,
            split="node",
            transform=IDENTITY,
        )


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_eval_stream_covers_each_index_once(sets: dict[str, Manifest], world: int) -> None:
    m = sets["7-7-3"]
    seen: list[int] = []
    for r in range(world):
        e = EvalStream(m, rank=r, world_size=world, batch_size=3, transform=IDENTITY)
        batches = list(e.batches())
        assert all(len(x["index"]) <= 3 for x in batches)
        assert all(len(x["index"]) == 3 for x in batches[:-1])
        for x in batches:
            assert_images_match(x)
        local = torch.cat([x["index"] for x in batches]).tolist() if batches else []
        assert len(local) == e.num_local_samples
        seen += local
    assert sorted(seen) == list(range(17)) and len(seen) == 17


def test_missing_manifest_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "none"))):
        read_manifest(tmp_path / "none")


# ----------------------------------------------------------------------------------------------
# bad data


@pytest.fixture()
def damaged(tmp_path: Path) -> Manifest:
    """24 samples in 3 shards of 8; index 5 is a corrupt PNG; the last shard is cut in half."""
    m = write_set(tmp_path, 24, 8, corrupt=(5,))
    last = tmp_path / m.shards[2].name
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2 + 100])
    return m


@pytest.mark.parametrize("split", ["sample", "shard"])
def test_corrupt_image_and_truncated_tar_are_skipped(damaged: Manifest, split: str) -> None:
    world, b = 2, 4
    streams = [
        TrainStream(
            damaged,
            rank=r,
            world_size=world,
            local_batch_size=b,
            seed=0,
            split=split,
            transform=IDENTITY,
            shuffle_buffer=5,
        )
        for r in range(world)
    ]
    bad: set[tuple[str, str]] = set()
    for s in streams:
        for epoch in (0, 1):
            batches = list(s.epoch_batches(epoch))
            assert len(batches) == 3 and all(len(x["index"]) == b for x in batches)
            for x in batches:
                assert_images_match(x)
                assert 5 not in x["index"].tolist()
        bad |= set(s.bad_samples)
        assert s.num_bad_samples == len(s.bad_samples) == s.stats.num_bad_samples
    keys = {k for k, _ in bad}
    # The truncated shard is named by whichever rank reads it (every rank in "sample" mode).
    assert "train-000002.tar" in keys
    assert any(k == "train-000002.tar" and "of 8 samples" in why for k, why in bad)
    if split == "sample":  # every sample of pass 0 is in some rank's chunk: index 5 is decoded
        assert any(k == "000000005" and "corrupt image" in why for k, why in bad)


def _tar_with(path: Path, members: list[tuple[str, bytes]]) -> None:
    import tarfile

    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_local_index_reads_what_webdataset_reads(tmp_path: Path) -> None:
    """The member index (local files) and webdataset's streaming reader (URLs) agree on
    samples, bytes and records, on good, cut, missing and oddly named shards."""
    from distnoisy.data import stream

    m = write_set(tmp_path, 24, 8, corrupt=(5,))
    cut = tmp_path / m.shards[2].name
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2 + 100])
    odd = tmp_path / "odd.tar"  # a sample without its image, a stray name, a key out of range
    _tar_with(
        odd,
        [
            ("000000030.cls", b"1"),
            ("000000031.png", png(31)),
            ("000000032.x.png", png(32)),
            ("notanindex.png", png(1)),
            ("000000099.png", png(99)),
            ("000000033.png", b""),
        ],
    )
    shards = [(u, s.count) for u, s in zip(m.urls, m.shards, strict=True)]
    shards += [(str(odd), 6), (str(tmp_path / "missing.tar"), 4)]
    keep = np.ones(40, dtype=bool)
    keep[[2, 3]] = False
    runs = {}
    for name, read in (("index", stream._read_indexed), ("wds", stream._read_webdataset)):
        sink: list[tuple[str, str]] = []
        raws = [
            (i, d if isinstance(d, bytes) else d.read(), k, sh)
            for i, d, k, sh in read(shards, "png", 40, sink, keep)
        ]
        runs[name] = (raws, sorted(set(sink)))
    assert runs["index"][0] == runs["wds"][0]
    indices = [r[0] for r in runs["index"][0]]
    cut_read = [i for i in indices if 16 <= i < 24]
    assert indices == [i for i in range(16) if i not in (2, 3)] + cut_read + [31]
    assert cut_read == list(range(16, 16 + len(cut_read))) and len(cut_read) < 8
    assert runs["index"][1] == runs["wds"][1]
    reasons = dict(runs["index"][1])
    assert "of 8 samples" in reasons[cut.name] or "unreadable" in reasons[cut.name]
    assert "FileNotFoundError" in reasons["missing.tar"]
    assert {"notanindex", "000000099", "000000032", "000000033"} <= set(reasons)
    # The index is built once per process and reused while the file is unchanged.
    first = stream._shard_index(str(odd), "png")
    assert stream._shard_index(str(odd), "png") is first


def test_bad_samples_are_replaced_from_the_reserve(tmp_path: Path) -> None:
    # No shuffling, one shard: positions = indices. N=10, B=4 -> 2 steps; the floor's 2 spare
    # samples (positions 0, 1) come first and stand in for corrupt images, rotated by batch.
    m = write_set(tmp_path, 10, 10, corrupt=(3, 6))
    s = TrainStream(
        m, rank=0, world_size=1, local_batch_size=4, seed=0, transform=IDENTITY, shuffle_buffer=0
    )
    assert s.samples_dropped_per_epoch == 2
    batches = [x["index"].tolist() for x in s.epoch_batches(0)]
    assert batches == [[2, 4, 5, 0], [7, 8, 9, 1]]
    assert [k for k, _ in s.bad_samples] == ["000000003", "000000006"]


def test_eval_stream_skips_bad_samples(damaged: Manifest) -> None:
    e = EvalStream(damaged, rank=0, world_size=1, batch_size=5, transform=IDENTITY)
    seen = torch.cat([x["index"] for x in e.batches()]).tolist()
    assert 5 not in seen and seen == sorted(seen)
    assert set(range(16)) - {5} <= set(seen) and len(seen) < 23
    keys = [k for k, _ in e.bad_samples]
    assert "000000005" in keys and "train-000002.tar" in keys


def test_a_missing_shard_file_does_not_stop_training(tmp_path: Path) -> None:
    m = write_set(tmp_path, 12, 4)
    (tmp_path / m.shards[1].name).unlink()
    s = TrainStream(m, rank=0, world_size=1, local_batch_size=5, seed=0, transform=IDENTITY)
    batches = list(s.epoch_batches(0))
    assert len(batches) == 2 and all(len(x["index"]) == 5 for x in batches)
    assert all(not 4 <= i < 8 for x in batches for i in x["index"].tolist())
    assert any(k == "train-000001.tar" and "FileNotFoundError" in w for k, w in s.bad_samples)
    for p in tmp_path.glob("train-*.tar"):
        p.unlink()
    s = TrainStream(m, rank=0, world_size=1, local_batch_size=5, seed=0, transform=IDENTITY)
    with pytest.raises(DataError, match="no readable sample"):
        list(s.epoch_batches(0))


# ----------------------------------------------------------------------------------------------
# loader workers (spawns 2 processes: kept small)


def test_num_workers_gives_the_same_batches_in_the_same_order(tmp_path: Path) -> None:
    samples = []
    rng = np.random.default_rng(0)
    for i in range(45):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(buf, "PNG")
        samples.append(Sample(i, CORRUPT_PNG if i == 7 else buf.getvalue(), 0, None, str(i)))
    m = write_shards(
        samples,
        tmp_path,
        split="train",
        classes=["x"],
        shard_size=8,
        image_ext="png",
        dataset="toy",
    )
    tf = make_transform("cifar_train", [0.5] * 3, [0.25] * 3, seed=3)
    out = {}
    for nw in (0, 2):
        s = TrainStream(
            m,
            rank=1,
            world_size=2,
            local_batch_size=3,
            seed=1,
            transform=tf,
            num_workers=nw,
            shuffle_buffer=10,
        )
        assert s.steps_per_epoch == 7  # odd: the two workers hold 4 and 3 batches
        out[nw] = [list(s.epoch_batches(epoch)) for epoch in (0, 1)]
        out[f"bad{nw}"] = s.bad_samples
        # Resumed mid-epoch at batch 3 (odd: the loader workers' round-robin starts there)
        # and then a whole epoch again: the batches of the uninterrupted epochs.
        out[f"tail{nw}"] = list(s.epoch_batches(1, 3))
        out[f"again{nw}"] = list(s.epoch_batches(0))
        s.close()
    for e0, e2 in zip(out[0], out[2], strict=True):
        assert len(e0) == len(e2) == 7
        for a, b in zip(e0, e2, strict=True):
            assert set(a) == set(b) == {"image", "index"}
            assert torch.equal(a["index"], b["index"]) and torch.equal(a["image"], b["image"])
    assert [x["index"].tolist() for x in out[0][0]] != [x["index"].tolist() for x in out[0][1]]
    for nw in (0, 2):
        for got, whole in ((out[f"tail{nw}"], out[0][1][3:]), (out[f"again{nw}"], out[0][0])):
            assert len(got) == len(whole)
            for a, b in zip(got, whole, strict=True):
                assert torch.equal(a["index"], b["index"]) and torch.equal(a["image"], b["image"])
    # The corrupt image was met (and replaced identically) with and without workers; the
    # workers' records reach the main process.
    assert [k for k, _ in out["bad0"]] == [k for k, _ in out["bad2"]] == ["000000007"]


# ----------------------------------------------------------------------------------------------
# decoding and transforms


def test_decode_png_and_jpeg_to_requested_channels() -> None:
    rgb = np.random.default_rng(1).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    img = decode_image_bytes(buf.getvalue(), 3)
    assert img.shape == (3, 6, 5) and torch.equal(img, torch.from_numpy(rgb).permute(2, 0, 1))
    grey = io.BytesIO()
    Image.fromarray(np.full((8, 8), 200, np.uint8)).save(grey, format="JPEG", quality=95)
    as_rgb = decode_image_bytes(grey.getvalue(), 3)  # grey JPEG in an RGB data set
    assert as_rgb.shape == (3, 8, 8) and abs(float(as_rgb.float().mean()) - 200) < 2
    assert decode_image_bytes(grey.getvalue(), None).shape == (1, 8, 8)
    with pytest.raises(ValueError):
        decode_image_bytes(CORRUPT_PNG, 1)


def test_transforms() -> None:
    img = torch.arange(3 * 32 * 32, dtype=torch.int64).remainder(256).to(torch.uint8)
    img = img.reshape(3, 32, 32)
    tf = make_transform("cifar_train", [0.5, 0.5, 0.5], [0.25, 0.25, 0.25], seed=0)
    a = tf(img, 10, 0)
    assert a.shape == (3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, tf(img, 10, 0))  # a function of (seed, epoch, index) only
    assert torch.equal(a, pickle.loads(pickle.dumps(tf))(img, 10, 0))
    variants = {tf(img, 10, e).sum().item() for e in range(8)}
    assert len(variants) > 1  # crops/flips change with the epoch
    plain = make_transform("cifar_eval", [0.5] * 3, [0.25] * 3)(img, 10, 0)
    # Computed as x * 1/(255 std) - mean/std in float32: within a few ulps of the float64 value.
    expected = (img.double() / 255 - 0.5) / 0.25
    assert torch.allclose(plain.double(), expected, rtol=0, atol=1e-6)

    big = torch.randint(0, 256, (3, 300, 400), dtype=torch.uint8)
    train = make_transform("imagenet_train", [0.4] * 3, [0.2] * 3, seed=1)
    assert train(big, 0, 0).shape == (3, 224, 224)
    assert make_transform("imagenet_eval", [0.4] * 3, [0.2] * 3)(big, 0, 0).shape == (3, 224, 224)

    digits = make_transform("digits", [0.3053], [0.3759])
    px = torch.tensor([[[0, 255]]], dtype=torch.uint8)
    assert digits(px, 0, 0).flatten().tolist() == pytest.approx(
        [(0 - 0.3053) / 0.3759, (1 - 0.3053) / 0.3759], abs=1e-5
    )
    assert make_transform("raw", None, None)(px, 0, 0) is px
    with pytest.raises(ConfigError, match="unknown transform"):
        make_transform("mnist", [0.5], [0.5])
    with pytest.raises(ConfigError, match=r"1 .* or 3"):
        make_transform("digits", [0.5, 0.5], [0.5, 0.5])


# --------------------------------------------------------------------------------------------
# Class-balanced epochs (the Clothing1M protocol)


def test_balanced_subset_caps_classes_and_is_deterministic() -> None:
    labels = np.array([0] * 60 + [1] * 30 + [2] * 4)  # class 2 is rarer than its cap
    sub = BalancedSubset(labels, 30, seed=5)
    assert sub.cap == 10 and sub.size == 24  # 10 + 10 + all 4 of class 2
    a, b = sub.indices(0), sub.indices(1)
    assert len(a) == len(np.unique(a)) == 24 and np.all(np.diff(a) > 0)
    assert np.bincount(labels[a], minlength=3).tolist() == [10, 10, 4]
    assert not np.array_equal(a, b)  # a fresh draw per epoch
    assert np.array_equal(a, BalancedSubset(labels, 30, seed=5).indices(0))  # from the seed
    assert not np.array_equal(a, BalancedSubset(labels, 30, seed=6).indices(0))
    once = BalancedSubset(labels, 30, seed=5, resample=False)
    assert np.array_equal(once.indices(0), once.indices(3))  # the ELR+ code: drawn once
    assert BalancedSubset(labels, 12, seed=0).size == 12  # the total cap binds


@pytest.mark.parametrize("split", ["sample", "shard"])
@pytest.mark.parametrize("name,world", [("7-7-3", 2), ("7-7-3", 3), ("5-1", 3), ("6x8+2", 4)])
def test_balanced_epochs_equal_steps_on_uneven_shards(
    sets: dict[str, Manifest], split: str, name: str, world: int
) -> None:
    """Uneven shards, more ranks than shards: every rank yields the same number of full
    batches, drawn only from the epoch's balanced subset, each sample at most once."""
    m = sets[name]
    labels = np.arange(m.num_samples) % 3
    target = max(world * 2, m.num_samples // 2)
    sub = BalancedSubset(labels, target, seed=1)
    steps = sub.size // (world * 1)
    for epoch in (0, 1):
        per_rank = rank_batches(m, world, 1, split, epoch=epoch, balanced=sub)
        assert [len(b) for b in per_rank] == [steps] * world
        seen = torch.cat([b["index"] for batches in per_rank for b in batches]).tolist()
        assert set(seen) <= set(sub.indices(epoch).tolist())
        if split == "sample":
            assert len(seen) == len(set(seen))  # one global order: no sample twice
        for batches in per_rank:
            for batch in batches:
                assert_images_match(batch)
