"""What a rank trains with, from :func:`distnoisy.engine.components.build_components`: built for
a real 1-worker local digits job and checked for what the Trainer and a reader rely on."""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import pytest
import torch

from distnoisy.config import load_config
from distnoisy.data.noise import load_label_file
from distnoisy.data.prepare import prepare_data
from distnoisy.data.shards import read_labels, read_manifest
from distnoisy.engine.components import (
    Components,
    build_components,
    network_builder,
)
from distnoisy.engine.job import Job, WorkerContext
from distnoisy.engine.step import run_field_specs
from distnoisy.engine.trainer import Trainer


def _no_report(metrics: dict[str, float], checkpoint_dir: object) -> None:
    raise AssertionError("building components must not report")


def _job_and_ctx(digits_root, tmp_path, *overrides: str) -> tuple[Job, WorkerContext]:
    cfg = load_config(
        [
            f"data.root={digits_root}",
            f"output_dir={tmp_path / 'run'}",
            "scaling.launcher=local",
            "scaling.num_workers=1",
            "tracking.enabled=false",
            "train.epochs=4",
            *overrides,
        ]
    )
    ctx = WorkerContext(0, 1, torch.device("cpu"), _no_report, lambda: contextlib.nullcontext())
    return Job(cfg, prepare_data(cfg)), ctx


@pytest.fixture
def built(digits_root, tmp_path, request):
    """(job, components) for ``method.name=<param>``; the store closed afterwards."""
    job, ctx = _job_and_ctx(digits_root, tmp_path, f"method.name={request.param}")
    parts = build_components(job, ctx)
    yield job, parts
    parts.store.close()


@pytest.mark.parametrize("built", ["ce", "elr_plus"], indirect=True)
def test_components_are_frozen_and_one_rank_trains_the_eager_models(built):
    job, parts = built
    assert isinstance(parts, Components)
    for part in (parts, parts.labels, parts.networks, parts.train, parts.eval, parts.eval.test):
        field = dataclasses.fields(part)[0].name
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(part, field, None)
    nets, models = parts.networks.nets, parts.networks.models
    # One rank, no compile: the steps run the eager models themselves (no DDP wrapper), so the
    # optimizers step exactly the parameters that evaluation and checkpoints read.
    assert nets.keys() == models.keys() == parts.optimizers.keys() == parts.schedulers.keys()
    for name, model in models.items():
        assert nets[name] is model
        stepped = [p for group in parts.optimizers[name].param_groups for p in group["params"]]
        assert [id(p) for p in stepped] == [id(p) for p in model.parameters()]
    # One training stream per phase, in the method's phase order; the first is the data's.
    phases = parts.method.phases()
    assert tuple(parts.train.by_phase) == phases
    assert parts.train.first is parts.train.by_phase[phases[0]]
    assert parts.train.local_batch_size == job.config.train.batch_size
    assert parts.train.decode_on is None and parts.train.device_augment is None
    assert parts.precision.name == "fp32" and parts.method.grad_scaler is None
    assert parts.comm_device == torch.device("cpu")


@pytest.mark.parametrize("built", ["ce", "elr_plus"], indirect=True)
def test_the_store_holds_the_runs_fields_and_the_methods(built):
    job, parts = built
    cfg, spec = job.config, job.data
    store = parts.store
    expected = {*run_field_specs(cfg.train.epochs, spec.num_classes), *parts.method.fields()}
    assert set(store.state_dict()) == expected
    assert store.backend == "replicated"  # auto, one worker
    assert parts.method.store is store  # attached: the method's steps write into it
    assert store["loss_hist"].shape == (spec.num_train, cfg.train.epochs)
    if cfg.method.name == "elr_plus":
        assert {"elr_target_net1", "elr_target_net2"} <= expected


@pytest.mark.parametrize("built", ["ce"], indirect=True)
def test_labels_are_the_label_files_and_the_shards_clean_ones(built):
    job, parts = built
    spec, labels = job.data, parts.labels
    _, clean, keys = read_labels(read_manifest(spec.train_dir), partial_clean=True)
    assert spec.label_file is not None  # the default job trains on synthetic noise
    given = load_label_file(spec.label_file, spec.num_train, spec.num_classes).labels
    np.testing.assert_array_equal(labels.given, given)
    np.testing.assert_array_equal(labels.clean, clean)
    assert labels.keys == list(keys)
    assert labels.given.dtype == np.int64
    assert np.shares_memory(labels.given_cpu.numpy(), labels.given)
    assert torch.equal(labels.given_device, labels.given_cpu)
    wrong = labels.given != clean
    assert 0 < wrong.sum() < len(wrong)  # noisy, not all wrong
    np.testing.assert_array_equal(labels.corrupted.numpy(), wrong)
    # Digits knows every clean label: the class mix is measured on them, not on the noise.
    np.testing.assert_array_equal(labels.mix, clean)
    np.testing.assert_array_equal(labels.class_counts, np.bincount(clean, minlength=10))
    test = parts.eval.test
    assert parts.eval.val is None and test is not None and test.noisy is None
    test_labels = read_labels(read_manifest(spec.test_dir))[0]
    np.testing.assert_array_equal(test.labels.numpy(), test_labels)


def test_networks_are_drawn_from_the_seed_with_no_draw_before_them(digits_root, tmp_path):
    """Seeds come first and nothing before the networks draws from torch's generator: the
    initial weights are those of ``manual_seed(seed)`` followed by the network build alone.
    (Reordering the builder, e.g. a stream or the method drawing first, changes them.)"""
    job, ctx = _job_and_ctx(digits_root, tmp_path, "seed=7")
    parts = build_components(job, ctx)
    parts.store.close()
    cfg, spec = job.config, job.data
    torch.manual_seed(7)
    reference = network_builder(cfg, spec.num_classes, spec.in_channels)()
    built = parts.networks.models["model"].state_dict()
    assert built.keys() == reference.state_dict().keys()
    for k, v in reference.state_dict().items():
        assert torch.equal(built[k], v), k
    # numpy's global generator is seeded per rank (seed + rank) and nothing draws from it here.
    after = np.random.get_state()
    np.random.seed(7)
    seeded = np.random.get_state()
    assert np.array_equal(after[1], seeded[1]) and after[2] == seeded[2]


def test_trainer_holds_the_components_and_the_training_state_only(digits_root, tmp_path):
    job, ctx = _job_and_ctx(digits_root, tmp_path)
    trainer = Trainer(job, ctx)
    try:
        assert set(vars(trainer)) == {
            "job",
            "ctx",
            "parts",
            "start_epoch",
            "history",
            "best",
            "best_weights",
            "position",  # where a mid-epoch checkpoint left the epoch (None: at its start)
            "_noticed_preemption",  # a preemption notice already checkpointed for
        }
        assert trainer.start_epoch == 0 and trainer.history == [] and trainer.best is None
    finally:
        trainer.parts.store.close()
