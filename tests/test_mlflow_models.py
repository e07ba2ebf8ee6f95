"""The run's networks as MLflow models (distnoisy.driver.export, distnoisy.tracking.models):
``mlflow.pytorch.load_model`` of a finished run predicts what its ``weights.pt`` predicts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from local_mlflow import sqlite_uri
from mlflow.tracking import MlflowClient

from distnoisy.config import load_config
from distnoisy.train import train

pytestmark = pytest.mark.slow


def _test_batches(spec, cfg):
    """``(global index, images)`` of the whole test set after the run's eval transform."""
    from distnoisy.data.shards import read_manifest
    from distnoisy.data.stream import EvalStream, make_transform

    transform = make_transform(spec.eval_transform, spec.mean, spec.std, size=cfg.data.image_size)
    stream = EvalStream(
        read_manifest(spec.test_dir), rank=0, world_size=1, batch_size=100, transform=transform
    )
    for batch in stream.batches():
        yield batch["index"].numpy(), batch["image"].float()


def test_load_model_predicts_like_the_weights_file(tmp_path, digits_root):
    import mlflow
    import mlflow.pytorch

    from distnoisy.data.prepare import prepare_data
    from distnoisy.models import build_model

    uri = sqlite_uri(tmp_path)
    cfg = load_config(
        [
            f"data.root={digits_root}",
            "method.name=ce",
            "train.epochs=2",
            "data.val_fraction=0.1",  # a validation set: the best network is logged too
            "scaling.launcher=local",
            "scaling.num_workers=1",
            f"tracking.uri={uri}",
            "tracking.register_model=digits-cnn",
            f"output_dir={tmp_path / 'run'}",
        ]
    )
    summary = train(cfg)
    run_id = summary["mlflow_run_id"]
    client = MlflowClient(uri)
    assert client.get_run(run_id).info.status == "FINISHED"

    spec = prepare_data(cfg)
    net = build_model(cfg.model.name, spec.num_classes, spec.in_channels)
    net.load_state_dict(torch.load(tmp_path / "run/weights.pt", weights_only=True)["model"])
    net.eval()
    mlflow.set_tracking_uri(uri)
    try:
        loaded = mlflow.pytorch.load_model(f"runs:/{run_id}/model")
        info = mlflow.models.get_model_info(f"runs:/{run_id}/model")
        best = mlflow.pytorch.load_model(f"runs:/{run_id}/model_best")
    finally:
        mlflow.set_tracking_uri(None)
    from distnoisy.data.shards import read_labels, read_manifest

    labels = read_labels(read_manifest(spec.test_dir))[0]
    ours, theirs, truth = [], [], []
    with torch.no_grad():
        for index, x in _test_batches(spec, cfg):
            ours.append(net(x).argmax(1).numpy())
            theirs.append(loaded(x).argmax(1).numpy())
            truth.append(labels[index])
            assert best(x).shape == (len(x), 10)
    ours, theirs, truth = np.concatenate(ours), np.concatenate(theirs), np.concatenate(truth)
    assert len(ours) == 360  # the whole digits test set (20% of 1,797)
    np.testing.assert_array_equal(theirs, ours)
    # The accuracy the summary reports is the one these predictions give.
    assert np.mean(ours == truth) == pytest.approx(summary["test_acc"], abs=1e-6)

    inputs = info.signature.inputs.to_dict()[0]
    assert list(inputs["tensor-spec"]["shape"]) == [-1, 1, 8, 8]
    assert list(info.signature.outputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 10]
    assert info.metadata["mean"] == list(spec.mean) and info.metadata["classes"] == spec.classes
    versions = client.search_model_versions("name='digits-cnn'")
    assert [(int(v.version), v.run_id) for v in versions] == [(1, run_id)]


def test_log_model_false_logs_no_model(tmp_path, digits_root):
    uri = sqlite_uri(tmp_path)
    summary = train(
        load_config(
            [
                f"data.root={digits_root}",
                "method.name=ce",
                "train.epochs=1",
                "scaling.launcher=local",
                "scaling.num_workers=1",
                f"tracking.uri={uri}",
                "tracking.log_model=false",
                f"output_dir={tmp_path / 'run'}",
            ]
        )
    )
    client = MlflowClient(uri)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    models = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert models == []
