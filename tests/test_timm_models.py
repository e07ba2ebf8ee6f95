"""``model.name=timm/<name>`` (distnoisy.models.timm_models): the interface, timm-format
weights written by timm itself, the one-line errors, ``--list-models``, and real runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from local_mlflow import sqlite_uri
from torch import nn

from distnoisy.config import load_config
from distnoisy.core.errors import ConfigError
from distnoisy.models import FeatureClassifier, build_model
from distnoisy.train import main, train

timm = pytest.importorskip("timm")

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A timm-format ResNet-18 weights file, written by timm itself (1000-class head)."""
    torch.manual_seed(1)
    net = timm.create_model("resnet18")
    path = tmp_path_factory.mktemp("timm") / "resnet18.pth"
    state = net.state_dict()
    torch.save(state, path)
    return path, state


@pytest.mark.parametrize("name", ["timm/resnet18", "timm/convnext_atto", "timm/efficientnet_b0"])
def test_logits_features_and_head(name: str) -> None:
    model = build_model(name, num_classes=7, in_channels=3)
    assert isinstance(model, FeatureClassifier)
    assert isinstance(model.classifier, nn.Linear)
    assert (model.classifier.in_features, model.classifier.out_features) == (model.feature_dim, 7)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        logits, features = model(x), model.forward_features(x)
    assert logits.shape == (2, 7) and features.shape == (2, model.feature_dim)
    torch.testing.assert_close(model.classifier(features), logits)
    # The features are timm's own pre-logits: those of the same network's forward_head.
    with torch.no_grad():
        own = model.body.forward_head(model.body.forward_features(x), pre_logits=True)
    torch.testing.assert_close(features, own)


def test_timm_weights_load_and_the_classifier_is_replaced(resnet18_file) -> None:
    path, state = resnet18_file
    model = build_model("timm/resnet18", num_classes=10, in_channels=3, weights=str(path))
    body = model.body.state_dict()
    for key, value in state.items():
        if key.startswith("fc."):
            assert key not in body  # timm's 1000-class head is dropped
        else:
            torch.testing.assert_close(body[key], value, rtol=0, atol=0)
    assert model.classifier.out_features == 10
    # Two builds from the same file differ only in the (fresh) head.
    again = build_model("timm/resnet18", num_classes=10, in_channels=3, weights=str(path))
    x = torch.randn(2, 3, 32, 32)
    model.eval(), again.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), again.forward_features(x))


def test_timm_weights_adapted_to_one_channel(resnet18_file) -> None:
    path, state = resnet18_file
    model = build_model("timm/resnet18", num_classes=10, in_channels=1, weights=str(path))
    # timm sums the RGB filters: exact for a grey image replicated into three channels.
    torch.testing.assert_close(
        model.body.conv1.weight, state["conv1.weight"].sum(dim=1, keepdim=True)
    )
    grey = torch.rand(2, 1, 28, 28)
    rgb_model = build_model("timm/resnet18", num_classes=10, in_channels=3, weights=str(path))
    model.eval(), rgb_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            model.forward_features(grey),
            rgb_model.forward_features(grey.expand(-1, 3, -1, -1)),
            rtol=1e-4,
            atol=1e-5,
        )


def test_unknown_name_is_one_line_with_close_matches() -> None:
    with pytest.raises(ConfigError) as exc:
        build_model("timm/resnet19", 10, 3)
    message = str(exc.value)
    assert "\n" not in message
    assert "unknown timm model 'resnet19'" in message and "timm/resnet18" in message
    assert "--list-models" in message
    with pytest.raises(ConfigError, match="names no model"):
        build_model("timm/", 10, 3)


def test_weights_of_another_architecture_are_rejected(resnet18_file, tmp_path) -> None:
    path, _ = resnet18_file
    with pytest.raises(ConfigError) as exc:
        build_model("timm/resnet34", 10, 3, weights=str(path))
    message = str(exc.value)
    assert "\n" not in message
    assert "does not fit timm model 'resnet34'" in message and "missing keys: layer1.2." in message
    # Another family: timm's checkpoint filter fails first; the message still lists keys.
    with pytest.raises(ConfigError, match=r"does not fit timm model 'convnext_atto'; missing"):
        build_model("timm/convnext_atto", 10, 3, weights=str(path))
    # Same keys, another width: a shape mismatch.
    torch.save(timm.create_model("resnet18", num_classes=10).state_dict(), tmp_path / "ok.pth")
    build_model("timm/resnet18", 10, 3, weights=str(tmp_path / "ok.pth"))  # any head size fits
    torch.save(timm.create_model("resnet18d").state_dict(), tmp_path / "d.pth")
    with pytest.raises(ConfigError, match="does not fit timm model 'resnet18'"):
        build_model("timm/resnet18", 10, 3, weights=str(tmp_path / "d.pth"))


class _NotWeights:  # pickled by reference: a weights-only load must refuse it
    pass


def test_missing_or_unsafe_weights_files(tmp_path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        build_model("timm/resnet18", 10, 3, weights=str(tmp_path / "nope.pth"))
    torch.save({"conv1.weight": _NotWeights()}, tmp_path / "pickle.pth")
    with pytest.raises(ConfigError, match="as a weights-only state dict") as exc:
        build_model("timm/resnet18", 10, 3, weights=str(tmp_path / "pickle.pth"))
    assert "\n" not in str(exc.value)


def test_list_models(capsys) -> None:
    assert main(["--list-models", "*resnet18*"]) == 0
    names = capsys.readouterr().out.split()
    assert {"resnet18", "cifar_resnet18", "timm/resnet18", "timm/resnet18d"} <= set(names)
    assert main(["--list-models", "timm/convnext_at*"]) == 0
    names = capsys.readouterr().out.split()
    assert names == ["timm/" + n for n in timm.list_models("convnext_at*")] and names


def test_bad_name_fails_the_run_before_it_starts(tmp_path, digits_root, capsys) -> None:
    code = main(
        [
            f"data.root={digits_root}",
            "model.name=timm/resnt18",
            "scaling.launcher=local",
            "scaling.num_workers=1",
            "tracking.enabled=false",
            f"output_dir={tmp_path / 'run'}",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert (
        err.startswith("distnoisy: error: unknown timm model 'resnt18'") and "timm/resnet18" in err
    )
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------
# Real runs


@pytest.mark.slow
def test_timm_resnet18_on_digits_with_two_ray_workers(tmp_path, digits_root, ray_cluster):
    summary = train(
        load_config(
            [
                f"data.root={digits_root}",
                "model.name=timm/resnet18",
                "method.name=ce",
                "train.epochs=4",
                "scaling.num_workers=2",
                "tracking.enabled=false",
                f"output_dir={tmp_path / 'run'}",
            ]
        )
    )
    assert summary["num_workers"] == 2
    # Chance is 0.1; 4 epochs of a ResNet-18 on 8x8 digits with 40% noise learn the signal.
    assert summary["test_acc"] > 0.5, summary["test_acc"]
    state = torch.load(tmp_path / "run/weights.pt", weights_only=True)
    assert state["model"]["classifier.weight"].shape == (10, 512)


@pytest.mark.slow
@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="dataset-fashion-mnist not installed")
def test_timm_resnet18_on_fashion_mnist_with_two_local_processes(tmp_path, monkeypatch):
    # The digits test runs a timm model on Ray Train workers; here the local launcher's ranks
    # (one thread each on 2 cores: the same numbers as two Ray workers, 0.584 measured).
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # where the shard cache goes
    summary = train(
        load_config(
            [
                "data.name=fashion_mnist",
                f"data.root={FASHION_MNIST}",
                "data.train_size=2000",
                "model.name=timm/resnet18",
                "method.name=ce",
                "train.epochs=2",
                "scaling.launcher=local",
                "scaling.num_workers=2",
                "tracking.enabled=false",
                f"output_dir={tmp_path / 'run'}",
            ]
        )
    )
    assert summary["num_workers"] == 2 and summary["num_train"] == 2000
    assert summary["test_acc"] > 0.5, summary["test_acc"]


@pytest.mark.slow
def test_timm_resnet50_fine_tunes_from_a_timm_file(tmp_path, digits_root):
    torch.manual_seed(2)
    pretrained = timm.create_model("resnet50").state_dict()
    torch.save(pretrained, tmp_path / "resnet50.pth")
    summary = train(
        load_config(
            [
                f"data.root={digits_root}",
                "model.name=timm/resnet50",
                f"model.weights={tmp_path / 'resnet50.pth'}",
                "method.name=ce",
                "train.optimizer=sgd",
                "train.lr=0.01",
                "train.epochs=2",
                "scaling.launcher=local",
                "scaling.num_workers=1",
                "tracking.enabled=false",
                f"output_dir={tmp_path / 'run'}",
            ]
        )
    )
    assert summary["test_acc"] > 0.3, summary["test_acc"]
    tuned = torch.load(tmp_path / "run/weights.pt", weights_only=True)["model"]
    fresh = timm.create_model("resnet50", num_classes=0).state_dict()
    # Started from the file and moved away from it a little: every tuned weight is far nearer
    # to the file's than to another initialisation, and some changed.
    changed = compared = 0
    for key, start in pretrained.items():
        if key.startswith("fc.") or not start.is_floating_point():
            continue
        now = tuned[f"body.{key}"].float()
        if key == "conv1.weight":
            start = start.sum(dim=1, keepdim=True)  # adapted to the grey digits
            other = fresh[key].sum(dim=1, keepdim=True)
        else:
            other = fresh[key]
        if "running" in key or start.numel() == 1 or torch.equal(start, other):
            continue  # BatchNorm statistics, and parameters every init sets alike (BN's 1 and 0)
        assert (now - start).norm() < 0.5 * (now - other).norm() + 1e-6, key
        compared += 1
        changed += int(not torch.equal(now, start))
    assert compared == changed == 53  # the 53 convolutions (BatchNorm's 1/0 init is skipped)


@pytest.mark.slow
def test_posttrain_on_a_timm_run(tmp_path, digits_root, capsys):
    from distnoisy.posttrain.cli import main as posttrain

    uri = sqlite_uri(tmp_path)
    summary = train(
        load_config(
            [
                f"data.root={digits_root}",
                "model.name=timm/resnet18",
                "method.name=ce",
                "data.val_fraction=0.1",
                "train.epochs=2",
                "scaling.launcher=local",
                "scaling.num_workers=1",
                f"tracking.uri={uri}",
                f"output_dir={tmp_path / 'run'}",
            ]
        )
    )
    out = tmp_path / "pt"
    args = [
        f"run={summary['mlflow_run_id']}",
        f"tracking.uri={uri}",
        f"output_dir={out}",
        "posttrain.fraction_per_round=0.1",
        "posttrain.max_removed=0.1",
        "posttrain.patience=2",
    ]
    assert posttrain(args) == 0, capsys.readouterr().err
    s = json.loads((out / "summary.json").read_text())
    assert s["test_acc_before"] == pytest.approx(s["test_acc_before_features"], abs=1e-6)
    # Round 1 removes 10% of the training set, capped by max_removed=0.1 (floor: 129 of 1,293);
    # the summary keeps the best round's removal (none when validation did not improve).
    removed = int(np.floor(0.1 * summary["num_train"]))
    assert [r["round"] for r in s["rounds"]] == [0, 1] and s["rounds"][1]["removed"] == removed
    assert s["removed"] in (0, removed)
    refined = torch.load(out / "weights.pt", weights_only=True)["model"]
    assert refined["classifier.weight"].shape == (10, 512)
