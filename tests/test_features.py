"""Features of a finished run: exact, cached, and independent of workers and rank order."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from distnoisy.config import load_config
from distnoisy.core.errors import ConfigError
from distnoisy.finished.features import (
    ExtractTask,
    _allocate,
    _split_dirs,
    extract_features,
    extract_rank,
    predicting_networks,
    prediction_head,
)
from distnoisy.finished.runs import open_run
from distnoisy.models import build_model
from distnoisy.train import train


@pytest.fixture(scope="module")
def run(tmp_path_factory, digits_root):
    """A short real CE run (digits, with a validation split, local launcher)."""
    tmp = tmp_path_factory.mktemp("feat")
    cfg = load_config(
        [
            f"data.root={digits_root}",
            f"output_dir={tmp / 'run'}",
            f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}",
            "method.name=ce",
            "data.val_fraction=0.1",
            "scaling.launcher=local",
            "scaling.num_workers=1",
            "train.epochs=2",
        ]
    )
    train(cfg)
    return open_run(str(tmp / "run"))


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


def test_one_and_two_workers_and_rank_order_give_identical_features(run, tmp_path):
    one = extract_features(run, launcher="local", num_workers=1, cache_dir=tmp_path / "a")
    two = extract_features(run, launcher="local", num_workers=2, cache_dir=tmp_path / "b")
    # Ranks run by hand in reverse order into freshly allocated files.
    from distnoisy.data.prepare import prepare_data

    spec = prepare_data(run.config)
    dirs = _split_dirs(spec, ["train", "test"])
    tmp_path.joinpath("c").mkdir()
    _allocate(tmp_path / "c", dirs, 256, spec.num_classes, "float32")
    task = ExtractTask(
        run.config,
        spec,
        str(run.path("weights.pt")),
        ("model",),
        tuple(
            (
                s,
                d,
                str(tmp_path / "c" / f"{s}.features.npy"),
                str(tmp_path / "c" / f"{s}.logits.npy"),
            )
            for s, d in dirs.items()
        ),
        batch_size=37,  # other batch boundaries too
    )
    for rank in (2, 0, 1):
        extract_rank(task, rank, 3, torch.device("cpu"))
    for s in one:
        np.testing.assert_array_equal(one[s].features, two[s].features)
        np.testing.assert_array_equal(one[s].logits, two[s].logits)
    # Other batch boundaries: equal up to float32 rounding (a multi-threaded CPU convolution
    # may sum in a batch-size-dependent order; with the same batches the files are bitwise
    # equal, as checked above for 1 and 2 workers).
    for s in dirs:
        np.testing.assert_allclose(
            np.load(tmp_path / "c" / f"{s}.features.npy"), one[s].features, rtol=1e-4, atol=1e-5
        )


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
