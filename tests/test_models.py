"""Tests of the model registry (distnoisy.models): shapes, head/feature split, weights."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from distnoisy.core.errors import ConfigError
from distnoisy.models import MODELS, FeatureClassifier, build_model

EXPECTED_MODELS = {
    "small_cnn",
    "lenet",
    "resnet18",
    "resnet34",
    "resnet50",
    "cifar_resnet18",
    "cifar_resnet34",
    "preact_resnet18",
}
# Inputs for the shape checks, and smaller ones for the backward pass (keeps the file fast).
INPUT_SIZE = {"small_cnn": 8, "lenet": 28, "resnet50": 64}
BACKWARD_SIZE = {"small_cnn": 8, "lenet": 28, "resnet50": 32}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def test_registry_holds_all_models() -> None:
    assert set(MODELS.names()) == EXPECTED_MODELS


@pytest.mark.parametrize("name", sorted(EXPECTED_MODELS))
def test_logits_features_and_head(name: str) -> None:
    num_classes, batch = 5, 3
    in_channels = 1 if name in ("small_cnn", "lenet") else 3
    size = INPUT_SIZE.get(name, 32)
    model = build_model(name, num_classes=num_classes, in_channels=in_channels)
    assert isinstance(model, FeatureClassifier)
    assert isinstance(model.classifier, nn.Linear)
    assert model.classifier.in_features == model.feature_dim
    assert model.classifier.out_features == num_classes

    x = torch.randn(batch, in_channels, size, size)
    model.eval()
    with torch.no_grad():
        logits = model(x)
        features = model.forward_features(x)
    assert logits.shape == (batch, num_classes)
    assert features.shape == (batch, model.feature_dim)
    torch.testing.assert_close(model.classifier(features), logits)

    # Training mode: gradients reach both the head and the first layer.
    model.train()
    small = BACKWARD_SIZE.get(name, 16)
    model(torch.randn(2, in_channels, small, small)).logsumexp(dim=1).sum().backward()
    assert model.classifier.weight.grad is not None
    first = next(model.parameters())
    assert first.grad is not None and first.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "name", ["small_cnn", "lenet", "resnet18", "cifar_resnet18", "preact_resnet18"]
)
def test_other_input_channels(name: str) -> None:
    model = build_model(name, num_classes=4, in_channels=1).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 16, 16)).shape == (2, 4)


def test_unknown_name_lists_valid_choices() -> None:
    with pytest.raises(ConfigError) as info:
        build_model("resnet9000", num_classes=10)
    message = str(info.value)
    assert "resnet9000" in message
    for name in EXPECTED_MODELS:
        assert name in message


@pytest.mark.parametrize(
    ("num_classes", "in_channels"), [(1, 3), (0, 3), (-2, 3), (True, 3), (2.5, 3), (10, 0)]
)
def test_invalid_sizes_raise_config_error(num_classes: object, in_channels: object) -> None:
    with pytest.raises(ConfigError):
        build_model("small_cnn", num_classes=num_classes, in_channels=in_channels)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50"])
def test_imagenet_resnets_match_torchvision_layout(name: str) -> None:
    # Same keys and shapes as torchvision's model (minus the head), so ImageNet files load.
    ours = build_model(name, num_classes=10).state_dict()
    theirs = getattr(torchvision.models, name)(weights=None).state_dict()
    assert {k: v.shape for k, v in ours.items() if not k.startswith("classifier.")} == {
        k: v.shape for k, v in theirs.items() if not k.startswith("fc.")
    }


def test_weights_round_trip(tmp_path: Path) -> None:
    reference = torchvision.models.resnet18(weights=None)  # an ImageNet-format state dict
    with torch.no_grad():
        reference.bn1.running_mean.uniform_()
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)

    model = build_model("resnet18", num_classes=7, weights=str(path))
    torch.testing.assert_close(model.conv1.weight, reference.conv1.weight, rtol=0, atol=0)
    torch.testing.assert_close(model.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    torch.testing.assert_close(model.bn1.running_mean, reference.bn1.running_mean)
    assert model.classifier.weight.shape == (7, 512)
    assert model.classifier.bias.shape == (7,)


def test_weights_wrapped_checkpoint_with_ddp_prefix(tmp_path: Path) -> None:
    reference = torchvision.models.resnet18(weights=None)
    state = {f"module.{k}": v for k, v in reference.state_dict().items()}
    wrapped = {"epoch": 3, "state_dict": state}
    path = tmp_path / "ckpt.pth"
    torch.save(wrapped, path)
    model = build_model("resnet18", num_classes=3, weights=str(path))
    torch.testing.assert_close(model.conv1.weight, reference.conv1.weight, rtol=0, atol=0)


def test_weights_adapted_to_one_input_channel(tmp_path: Path) -> None:
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save({"model": reference.state_dict()}, path)
    model = build_model("resnet18", num_classes=3, in_channels=1, weights=str(path)).eval()
    assert model.conv1.weight.shape == (64, 1, 7, 7)
    # A grey image through the adapted conv equals the RGB-replicated image through the original.
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.conv1(x), reference.conv1(x.expand(-1, 3, -1, -1)))


def test_weights_from_own_checkpoint_drop_the_head(tmp_path: Path) -> None:
    # Any registered model can start from a checkpoint of itself trained with other classes.
    trained = build_model("small_cnn", num_classes=10, in_channels=1)
    path = tmp_path / "small_cnn.pth"
    torch.save(trained.state_dict(), path)
    model = build_model("small_cnn", num_classes=4, in_channels=1, weights=str(path))
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), trained.forward_features(x))
    assert model.classifier.weight.shape == (4, 256)


def test_missing_weights_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "resnet50.pth"
    with pytest.raises(ConfigError, match=re.escape(str(path))) as info:
        build_model("resnet50", num_classes=10, weights=str(path))
    assert "model.weights=" in str(info.value)


def test_weights_of_another_architecture_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), path)
    with pytest.raises(ConfigError, match=r"unexpected keys: layer1\.2\."):
        build_model("resnet18", num_classes=10, weights=str(path))


def test_non_state_dict_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "bad.pth"
    torch.save({"epoch": 3, "lr": torch.tensor(0.1)}, path)
    with pytest.raises(ConfigError, match="not a tensor"):
        build_model("resnet18", num_classes=10, weights=str(path))


def test_torchvision_op_runs() -> None:
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0], [20.0, 20.0, 30.0, 30.0]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    # Box 1 overlaps box 0 with IoU 81/119 > 0.5, so it is suppressed.
    kept = torchvision.ops.nms(boxes, scores, iou_threshold=0.5)
    assert kept.tolist() == [0, 2]


def test_small_cnn_size_and_no_batch_dependent_layers() -> None:
    model = build_model("small_cnn", num_classes=10, in_channels=1)
    # conv 1->32, conv 32->64, conv 64->128 (3x3, with bias), Linear 128*4*4->256, Linear 256->10
    expected = (9 * 32 + 32) + (9 * 32 * 64 + 64) + (9 * 64 * 128 + 128)
    expected += (2048 * 256 + 256) + (256 * 10 + 10)
    assert sum(p.numel() for p in model.parameters()) == expected == 619_786
    assert model.feature_dim == 256
    forbidden = (nn.modules.batchnorm._NormBase, nn.modules.dropout._DropoutNd, nn.GroupNorm)
    assert not any(isinstance(m, forbidden) for m in model.modules())


def test_small_cnn_has_no_batch_dependence() -> None:
    # In training mode too: DDP with 2 workers must see exactly what 1 worker sees.
    model = build_model("small_cnn", num_classes=10, in_channels=1).train()
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        whole = model(x)
        halves = torch.cat([model(x[:2]), model(x[2:])])
        again = model(x)
    torch.testing.assert_close(whole, halves, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(whole, again, rtol=0, atol=0)  # no RNG in forward


@pytest.mark.parametrize("size", [8, 9, 28])
def test_small_cnn_input_sizes(size: int) -> None:
    model = build_model("small_cnn", num_classes=3, in_channels=1)
    assert model(torch.randn(2, 1, size, size)).shape == (2, 3)


def test_lenet_size_and_no_batch_dependent_layers() -> None:
    model = build_model("lenet", num_classes=10, in_channels=1)
    # conv 1->6 and 6->16 (5x5, with bias), Linear 16*7*7->120, Linear 120->10
    expected = (25 * 6 + 6) + (25 * 6 * 16 + 16) + (784 * 120 + 120) + (120 * 10 + 10)
    assert sum(p.numel() for p in model.parameters()) == expected == 97_982
    assert model.feature_dim == 120
    forbidden = (nn.modules.batchnorm._NormBase, nn.modules.dropout._DropoutNd, nn.GroupNorm)
    assert not any(isinstance(m, forbidden) for m in model.modules())
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():  # training mode: a sample's output does not depend on its batch
        torch.testing.assert_close(
            model(x), torch.cat([model(x[:2]), model(x[2:])]), rtol=1e-5, atol=1e-6
        )


def test_lenet_on_28x28_is_two_conv_pool_stages() -> None:
    # The adaptive pooling is exactly LeNet's second 2x2 max-pool on 28x28 inputs.
    model = build_model("lenet", num_classes=10, in_channels=1).eval()
    conv1, conv2, fc = model.features[0], model.features[3], model.features[7]
    x = torch.randn(3, 1, 28, 28)
    f = torch.nn.functional
    with torch.no_grad():
        h = f.max_pool2d(f.relu(conv1(x)), 2)
        h = f.max_pool2d(f.relu(conv2(h)), 2)
        expected = f.relu(fc(h.flatten(1)))
        torch.testing.assert_close(model.forward_features(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("size", [1, 5, 8, 28, 32])
def test_lenet_input_sizes(size: int) -> None:
    model = build_model("lenet", num_classes=3, in_channels=1)
    logits = model(torch.randn(2, 1, size, size))
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()


def test_the_registry_imports_torchvision_only_for_its_resnets() -> None:
    """torchvision takes about a second to import: a driver of a small model never pays it."""
    import subprocess
    import sys

    probe = (
        "import sys; from distnoisy.models import build_model; "
        "build_model('small_cnn', num_classes=10, in_channels=1); "
        "print('torchvision' in sys.modules, end=' '); "
        "build_model('resnet18', num_classes=10); print('torchvision' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.split() == ["False", "True"]
