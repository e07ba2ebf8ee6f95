"""Features of a finished run: exact, cached, and independent of workers and rank order."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from distnoisy.core.errors import ConfigError
from distnoisy.finished.features import (
    ExtractTask,
    _allocate,
    _split_dirs,
    extract_features,
    extract_rank,
    predicting_networks,
    prediction_head,
    rank_rows,
)
from distnoisy.finished.runs import open_run
from distnoisy.models import build_model


@pytest.fixture(scope="module")
def run(ce_run):
    """The session's short real CE run (digits, with a validation split, local launcher; see
    tests/conftest.py)."""
    return open_run(str(ce_run.run_dir))


def test_features_reproduce_the_runs_predictions(run, tmp_path):
    feats = extract_features(run, launcher="local", num_workers=1, cache_dir=tmp_path)
    assert set(feats) == {"train", "val", "test"}
    w, b = prediction_head(run.weights(), "ce")
    final = run.read_table(columns=["index", "final_prob"])
    for f in feats.values():
        assert f.features.shape[1] == w.shape[1] and not np.isnan(f.features).any()
        # The head on the features gives the logits (float64 reference vs float32 forward).
        np.testing.assert_allclose(f.features.astype(np.float64) @ w.T + b, f.logits, atol=1e-4)
    # ... and the run's own final probabilities on the un-augmented training set.
    probs = torch.softmax(torch.from_numpy(np.array(feats["train"].logits)), 1).numpy()
    np.testing.assert_allclose(probs[final["index"]], final["final_prob"], atol=1e-5)


def test_rank_blocks_are_whole_batches_that_cover_the_split_once():
    for n in (0, 1, 255, 256, 257, 1294, 1437):
        for b in (1, 37, 256):
            k = -(-n // b)  # batches in the split
            for w in (1, 2, 3, 7, 40):
                blocks = [rank_rows(n, b, r, w) for r in range(w)]
                assert blocks[0][0] == 0 and blocks[-1][1] == n
                assert all(blocks[r][1] == blocks[r + 1][0] for r in range(w - 1))
                assert all(lo % b == 0 and lo <= hi for lo, hi in blocks)
                # Whole batches (the last block's end is the split's), shared out evenly.
                assert all(hi % b == 0 or hi == n for _, hi in blocks)
                counts = [-(-(hi - lo) // b) for lo, hi in blocks]
                assert sum(counts) == k and max(counts) - min(counts) <= 1
    # 1437 rows, 2 ranks: they meet at row 768 (3 of the 6 batches each), not at row 718,
    # inside batch 2.
    assert rank_rows(1437, 256, 0, 2) == (0, 768) and rank_rows(1437, 256, 1, 2) == (768, 1437)
    with pytest.raises(ValueError, match=r"rank 2 is not in 0\.\.1"):
        rank_rows(10, 4, 2, 2)


def _task(run, spec, dirs, out, batch_size):
    out.mkdir()
    _allocate(out, dirs, 256, spec.num_classes, "float32")
    return ExtractTask(
        run.config,
        spec,
        str(run.path("weights.pt")),
        ("model",),
        tuple(
            (s, d, str(out / f"{s}.features.npy"), str(out / f"{s}.logits.npy"))
            for s, d in dirs.items()
        ),
        batch_size=batch_size,
    )


def test_one_and_two_workers_and_rank_order_give_identical_features(run, tmp_path):
    # Each rank's block is a run of whole batches, so every sample meets the same batch
    # neighbours whatever the number of ranks: the files are bitwise equal (a CPU convolution
    # may sum in an order that depends on the batch's shape, so equal batches are what this
    # needs; blocks split inside a batch differed by up to 7e-7 on other machines).
    one = extract_features(run, launcher="local", num_workers=1, cache_dir=tmp_path / "a")
    two = extract_features(run, launcher="local", num_workers=2, cache_dir=tmp_path / "b")
    for s in one:
        np.testing.assert_array_equal(one[s].features, two[s].features)
        np.testing.assert_array_equal(one[s].logits, two[s].logits)
    # Another batch size, ranks run by hand in reverse order into freshly allocated files: the
    # same bits as one rank with that batch size.
    from distnoisy.data.prepare import prepare_data

    spec = prepare_data(run.config)
    dirs = _split_dirs(spec, ["train", "test"])
    three = _task(run, spec, dirs, tmp_path / "c", batch_size=37)
    for rank in (2, 0, 1):
        extract_rank(three, rank, 3, torch.device("cpu"))
    single = _task(run, spec, dirs, tmp_path / "d", batch_size=37)
    extract_rank(single, 0, 1, torch.device("cpu"))
    for s in dirs:
        for kind in ("features", "logits"):
            got = np.load(tmp_path / "c" / f"{s}.{kind}.npy")
            np.testing.assert_array_equal(got, np.load(tmp_path / "d" / f"{s}.{kind}.npy"))
    # Batches of 37 and of 256 differ only by float32 rounding: both agree with the float64
    # forward of the same weights on the same inputs to within the rounding a float32 forward
    # can carry. A float32 sum of K terms in any order is off by about sqrt(K) u of its terms'
    # magnitude (u = 2**-24; Higham and Mary, SIAM J. Sci. Comput. 41(5), 2019); the widest
    # sum here has K = 2048 and four layers add theirs: 4 sqrt(2048) u = 1.1e-5 of the largest
    # feature. Seen: about 3e-7 of it. A batch that leaked into a sample's features (e.g. a
    # BatchNorm in training mode) moves them by 1e-2 and more.
    net = build_model("small_cnn", spec.num_classes, spec.in_channels).double().eval()
    net.load_state_dict(run.weights()["model"])
    with torch.no_grad():
        exact = net.forward_features(_inputs(run, spec).double()).numpy()
    tol = 4 * np.sqrt(2048) * 2.0**-24 * np.abs(exact).max()
    batch37 = np.load(tmp_path / "c" / "test.features.npy")
    for got in (batch37, one["test"].features):
        assert np.abs(got.astype(np.float64) - exact).max() <= tol


def _inputs(run, spec) -> torch.Tensor:
    """The evaluation inputs of the test split, as extraction sees them (index order)."""
    from distnoisy.data.shards import read_manifest
    from distnoisy.data.stream import EvalStream, make_transform

    transform = make_transform(
        spec.eval_transform, spec.mean, spec.std, size=run.config.data.image_size
    )
    stream = EvalStream(
        read_manifest(spec.test_dir), rank=0, world_size=1, batch_size=4096, transform=transform
    )
    batches = list(stream.batches())
    index = torch.cat([b["index"] for b in batches])
    assert torch.equal(index, torch.arange(len(index)))
    return torch.cat([b["image"] for b in batches])


def test_second_call_loads_the_cache_and_float16_is_its_own_entry(run, tmp_path):
    first = extract_features(run, ("train",), launcher="local", num_workers=1, cache_dir=tmp_path)
    entry = first["train"].path.parent
    stamp = first["train"].path.stat().st_mtime_ns
    again = extract_features(run, ("train",), launcher="local", num_workers=1, cache_dir=tmp_path)
    assert again["train"].path.stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(first["train"].features, again["train"].features)
    half = extract_features(
        run, ("train",), dtype="float16", launcher="local", num_workers=1, cache_dir=tmp_path
    )
    assert half["train"].path.parent != entry and half["train"].features.dtype == np.float16
    np.testing.assert_allclose(
        half["train"].features, first["train"].features, rtol=2e-3, atol=2e-3
    )
    # No temporary directories are left behind.
    assert [p.name for p in (tmp_path / "features").iterdir() if p.name.startswith(".")] == []


def test_new_weights_are_a_new_cache_entry(run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run.run_dir, copy, ignore=shutil.ignore_patterns("features", "checkpoints"))
    other = open_run(str(copy))
    a = extract_features(other, ("test",), launcher="local", num_workers=1)
    state = torch.load(copy / "weights.pt", weights_only=True)
    state["model"]["classifier.bias"] += 1.0
    torch.save(state, copy / "weights.pt")
    b = extract_features(other, ("test",), launcher="local", num_workers=1)
    assert a["test"].path.parent != b["test"].path.parent
    np.testing.assert_allclose(b["test"].logits, a["test"].logits + 1.0, atol=1e-5)
    np.testing.assert_array_equal(a["test"].features, b["test"].features)


def test_bad_arguments_are_one_line(run, tmp_path):
    with pytest.raises(ConfigError, match="unknown split"):
        extract_features(run, ("training",), cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="choose 'final' or 'best'"):
        extract_features(run, weights="last", cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="float16"):
        extract_features(run, dtype="int8", cache_dir=tmp_path)
    assert not (tmp_path / "features").exists()


def test_two_network_head_is_the_mean_of_both_networks():
    torch.manual_seed(0)
    nets = {k: build_model("small_cnn", 10, 1).eval() for k in predicting_networks("elr_plus")}
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        want = (nets["net1"](x) + nets["net2"](x)) / 2
        h = torch.cat([nets[k].forward_features(x) for k in ("net1", "net2")], 1)
    w, b = prediction_head({k: n.state_dict() for k, n in nets.items()}, "elr_plus")
    np.testing.assert_allclose(h.double().numpy() @ w.T + b, want.numpy(), atol=1e-5)
    assert predicting_networks("limit") == ("classifier",)
    assert predicting_networks("gce") == ("model",)


@pytest.mark.slow
def test_ray_workers_give_the_local_features(run, tmp_path, ray_cluster):
    local = extract_features(run, ("test",), launcher="local", num_workers=1, cache_dir=tmp_path)
    ray = extract_features(
        run, ("test",), launcher="ray", num_workers=2, cache_dir=tmp_path / "ray"
    )
    np.testing.assert_array_equal(local["test"].features, ray["test"].features)
    assert not (ray["test"].path.parent / "ray").exists()
