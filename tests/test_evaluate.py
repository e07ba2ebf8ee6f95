"""The final prediction pass (:func:`distnoisy.engine.evaluate.predict`) on real digits shards:
every rank's share, in index order, equal to a plain per-batch loop, with corrupt images
skipped (fewer rows than the rank's share)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from test_damaged_data import _corrupt_members

from distnoisy.data.shards import read_manifest
from distnoisy.data.stream import EvalStream, make_transform
from distnoisy.engine.evaluate import predict
from distnoisy.methods.base import Method
from distnoisy.models import build_model


class _OneNetwork:
    """The prediction every one-network method inherits (:meth:`Method.predict`), alone."""

    predict = Method.predict


def _streams(root: Path, world: int) -> list[EvalStream]:
    manifest = read_manifest(root / "train")
    transform = make_transform("digits", [0.5], [0.5], size=8)
    return [
        EvalStream(manifest, rank=r, world_size=world, batch_size=64, transform=transform)
        for r in range(world)
    ]


def _plain(net: torch.nn.Module, stream: EvalStream) -> tuple[torch.Tensor, torch.Tensor]:
    idx, probs = [], []
    with torch.no_grad():
        for batch in stream.batches():
            idx.append(batch["index"])
            probs.append(torch.softmax(net(batch["image"]).float(), dim=1))
    return torch.cat(idx), torch.cat(probs)


def test_predict_equals_a_plain_loop_on_every_rank_with_corrupt_images(digits_root, tmp_path):
    root = tmp_path / "digits"
    shutil.copytree(digits_root, root)
    _corrupt_members(root / "train" / "train-000001.tar", [300, 301, 400])
    torch.manual_seed(0)
    net = build_model("lenet", 10, 1)
    method = _OneNetwork()  # type: ignore[abstract]
    got = []
    for stream in _streams(root, 2):
        index, probs = predict(method, {"model": net}, stream, torch.device("cpu"))
        want_index, want_probs = _plain(net, stream)
        assert torch.equal(index, want_index) and torch.equal(probs, want_probs)
        assert probs.shape[1] == 10 and index.is_contiguous()
        got.append(index)
    every = torch.cat(got)
    assert torch.equal(every, torch.sort(every).values)  # rank blocks in index order
    n = read_manifest(root / "train").num_samples
    assert len(every) == n - 3  # the three corrupt images are skipped
    assert net.training  # predict hands the network back in training mode
