"""Tests for the single-network loss methods (``distnoisy.methods``: gce, tgce, dal, mae, sce,
nce_rce, ls, bootstrap, forward, backward, peer).

The loss math itself is tested in ``test_losses.py``; here we check what the method layer adds:
the ``method.*`` config keys and their validation at load time, that ``Method.loss`` is exactly
its loss module, the per-epoch schedules (DAL, peer), and where forward/backward correction get
their transition matrix from. Two slow end-to-end runs train on the real digits data.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from distnoisy.config import load_config
from distnoisy.core.errors import ConfigError, DistnoisyError
from distnoisy.losses import (
    BackwardCorrectionLoss,
    BootstrapLoss,
    DALLoss,
    ForwardCorrectionLoss,
    GCELoss,
    LabelSmoothingLoss,
    MAELoss,
    NCERCELoss,
    PeerLoss,
    SCELoss,
    TruncatedGCELoss,
    dal_lambda,
    dal_q,
    dal_t0,
)
from distnoisy.methods import METHODS, Method, PrepareContext
from distnoisy.methods.peer import peer_seed
from distnoisy.store import FieldSpec, SampleStore

C = 4
NEW_METHODS = (
    "gce",
    "tgce",
    "dal",
    "mae",
    "sce",
    "nce_rce",
    "ls",
    "bootstrap",
    "forward",
    "backward",
    "peer",
)
# A row-stochastic, well-conditioned 4 x 4 transition matrix (rows = true class).
T4 = [
    [0.7, 0.1, 0.1, 0.1],
    [0.05, 0.8, 0.1, 0.05],
    [0.0, 0.2, 0.6, 0.2],
    [0.1, 0.0, 0.0, 0.9],
]


def _build(cfg_method: Any, *, epochs: int = 10, **kwargs: Any) -> Method:
    return METHODS.get(cfg_method.name)(
        cfg_method, num_samples=100, num_classes=C, epochs=epochs, **kwargs
    )


def _context(transition: Any = None, reference: Path | None = None, calls: list | None = None):
    def train_reference(method: str) -> Path:
        if calls is not None:
            calls.append(method)
        if reference is None:
            raise AssertionError("no reference run expected")
        return reference

    return PrepareContext(
        num_classes=C,
        noise_transition=transition,
        run_dir=Path("/nonexistent"),
        train_reference=train_reference,
    )


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, C, generator=g) * 3
    labels = torch.randint(0, C, (16,), generator=g)
    index = torch.randperm(100, generator=g)[:16]
    return logits, labels, index


# -- config keys ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["method.name=gce"], {"q": 0.7}),
        (["method.name=gce", "method.q=0.5"], {"q": 0.5}),
        (
            ["method.name=tgce", "method.k=0.3"],
            {"q": 0.7, "k": 0.3, "prune_start": 40, "prune_every": 10},
        ),
        (
            ["method.name=dal", "method.q_start=0.5"],
            {"q_start": 0.5, "q_end": 1.5, "bootstrap": "soft"},
        ),
        (["method.name=dal", "method.bootstrap=hard"], {"bootstrap": "hard"}),
        (["method.name=mae"], {}),
        (["method.name=sce"], {"alpha": 0.1, "beta": 1.0}),
        (["method.name=nce_rce", "method.alpha=10", "method.beta=0.1"], {"alpha": 10, "beta": 0.1}),
        (["method.name=ls"], {"epsilon": 0.1}),
        (["method.name=ls", "method.epsilon=-0.2"], {"epsilon": -0.2}),
        (["method.name=bootstrap"], {"beta": None, "hard": False}),
        (["method.name=bootstrap", "method.hard=true", "method.beta=0.7"], {"beta": 0.7}),
        (["method.name=forward"], {"transition": "true"}),
        (["method.name=backward", "method.transition=estimate"], {"transition": "estimate"}),
        (["method.name=peer"], {"alpha": 1.0, "alpha_ramp_epochs": 0}),
        (["method.name=peer", "method.alpha_ramp_epochs=5"], {"alpha_ramp_epochs": 5}),
    ],
)
def test_methods_load_from_the_command_line(argv, expected):
    cfg = load_config(argv)
    assert cfg.method.name == argv[0].split("=")[1]
    assert type(cfg.method) is METHODS.get(cfg.method.name).Params
    for key, value in expected.items():
        assert getattr(cfg.method, key) == value, key


def test_every_new_method_is_registered():
    assert set(NEW_METHODS) <= set(METHODS.names())


@pytest.mark.parametrize("name", NEW_METHODS)
def test_typo_key_names_the_method(name):
    with pytest.raises(ConfigError, match=rf"unknown config key 'method.qq' for method '{name}'"):
        load_config([f"method.name={name}", "method.qq=1"])


def test_typo_key_suggests_the_right_one():
    with pytest.raises(ConfigError, match=r"Did you mean 'method.q_start'\?"):
        load_config(["method.name=dal", "method.q_strat=0.5"])


@pytest.fixture
def bad_transition_files(tmp_path) -> dict[str, str]:
    not_stochastic = tmp_path / "not_stochastic.json"
    not_stochastic.write_text(json.dumps({"transition": [[0.9, 0.1], [0.3, 0.6]]}))
    singular = tmp_path / "singular.json"
    singular.write_text(json.dumps([[0.5, 0.5], [0.5, 0.5]]))
    negative = tmp_path / "negative.npy"
    np.save(negative, np.array([[1.2, -0.2], [0.0, 1.0]]))
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    return {
        "not_stochastic": str(not_stochastic),
        "singular": str(singular),
        "negative": str(negative),
        "garbage": str(garbage),
        "missing": str(tmp_path / "missing.json"),
        "txt": str(tmp_path / "matrix.txt"),
    }


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["method.name=gce", "method.q=0"], r"method 'gce'.*q must be in \(0, inf\), got 0"),
        (["method.name=gce", "method.q=-0.5"], r"q must be in \(0, inf\)"),
        (["method.name=tgce", "method.q=0"], r"method 'tgce'.*q must be in"),
        (["method.name=tgce", "method.k=1.0"], r"k must be in \[0, 1\)"),
        (["method.name=dal", "method.q_start=0"], r"method 'dal'.*q_start must be in \(0, inf\)"),
        (
            ["method.name=dal", "method.q_start=1.0", "method.q_end=0.5"],
            r"q_end must be >= q_start",
        ),
        (["method.name=dal", "method.bootstrap=medium"], r"bootstrap must be 'soft' or 'hard'"),
        (["method.name=ls", "method.epsilon=1.5"], r"method 'ls'.*epsilon must be in \[-1, 1\)"),
        (["method.name=ls", "method.epsilon=-2"], r"epsilon must be in \[-1, 1\)"),
        (["method.name=sce", "method.alpha=-1"], r"method 'sce'.*alpha must be in \[0, inf\)"),
        (["method.name=sce", "method.alpha=0", "method.beta=0"], r"must not both be 0"),
        (["method.name=nce_rce", "method.beta=-1"], r"method 'nce_rce'.*beta must be in \[0"),
        (["method.name=bootstrap", "method.beta=1.5"], r"beta must be in \[0, 1\]"),
        (["method.name=peer", "method.alpha=-1"], r"method 'peer'.*alpha must be in \[0, inf\)"),
        (["method.name=peer", "method.alpha_ramp_epochs=-1"], r"alpha_ramp_epochs must be"),
        (["method.name=forward", "method.transition={txt}"], r"must be 'true', 'estimate' or"),
        (["method.name=forward", "method.transition={missing}"], r"missing\.json' does not exist"),
        (
            ["method.name=forward", "method.transition={not_stochastic}"],
            r"not_stochastic\.json'.*row 1 sums to 0\.9, not 1",
        ),
        (["method.name=backward", "method.transition={negative}"], r"negative\.npy'.*row 0"),
        (["method.name=forward", "method.transition={garbage}"], r"cannot read .*garbage\.json"),
        (["method.name=backward", "method.transition={singular}"], r"singular"),
    ],
)
def test_invalid_values_fail_at_load_time(argv, message, bad_transition_files):
    argv = [a.format(**bad_transition_files) for a in argv]
    with pytest.raises(ConfigError, match=message):
        load_config(argv)


def test_singular_file_is_fine_for_forward(bad_transition_files):
    # Forward correction never inverts T; only backward needs it invertible.
    cfg = load_config(
        ["method.name=forward", f"method.transition={bad_transition_files['singular']}"]
    )
    assert cfg.method.transition.endswith("singular.json")


def test_transition_true_survives_yaml_boolean_parsing():
    # `transition=true` is parsed as the boolean True and stored as "True" in the str field.
    cfg = load_config(["method.name=forward", "method.transition=true"])
    resources = METHODS.get("forward").prepare_resources(cfg.method, _context(T4))
    assert resources["transition_source"] == "true"


# -- loss() is the loss module -----------------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "module"),
    [
        (["method.name=gce", "method.q=0.4"], GCELoss(q=0.4)),
        (["method.name=mae"], MAELoss()),
        (["method.name=sce", "method.alpha=0.5", "method.beta=2"], SCELoss(C, 0.5, 2.0)),
        (["method.name=nce_rce"], NCERCELoss(C, 1.0, 1.0)),
        (["method.name=ls", "method.epsilon=-0.3"], LabelSmoothingLoss(C, -0.3)),
        (["method.name=bootstrap"], BootstrapLoss(beta=0.95)),
        (["method.name=bootstrap", "method.hard=true"], BootstrapLoss(beta=0.8, hard=True)),
        (["method.name=forward"], ForwardCorrectionLoss(torch.tensor(T4))),
        (["method.name=backward"], BackwardCorrectionLoss(torch.tensor(T4))),
    ],
)
def test_loss_equals_its_module(argv, module, batch):
    logits, labels, index = batch
    method = _build(load_config(argv).method, resources={"transition": T4})
    method.attach(SampleStore(100))
    assert method.on_epoch_start(0) == {}
    got = method.loss(logits, labels, index).loss
    assert torch.equal(got, module(logits, labels))
    assert got.dim() == 0


def test_tgce_is_gce_until_pruning_then_prunes_low_confidence_samples(batch):
    logits, labels, index = batch
    cfg = load_config(["method.name=tgce", "method.prune_start=2", "method.prune_every=3"]).method
    method = _build(cfg)
    store = SampleStore(100)
    method.attach(store)
    method.on_epoch_start(1)  # before pruning: every weight is 1, the loss is plain GCE
    assert torch.allclose(method.loss(logits, labels, index).loss, GCELoss(q=0.7)(logits, labels))
    store.flush()
    assert store["tgce_keep"].eq(1).all()
    assert [method.is_pruning_epoch(e) for e in range(9)] == [0, 0, 1, 0, 0, 1, 0, 0, 1]

    method.on_epoch_start(2)  # a pruning epoch: weights become [p_y > k] before the loss
    leaf = logits.clone().requires_grad_(True)
    out = method.loss(leaf, labels, index).loss
    out.backward()
    store.flush()
    p_label = torch.softmax(logits, 1).gather(1, labels[:, None])[:, 0]
    expected_keep = (p_label > 0.5).float()
    assert torch.equal(store.get("tgce_keep", index), expected_keep)
    assert 0 < expected_keep.sum() < len(expected_keep)  # the batch has both kinds
    pruned = expected_keep == 0
    assert leaf.grad[pruned].abs().max() == 0  # pruned samples: constant loss, no gradient
    assert leaf.grad[~pruned].abs().max() > 0
    module = TruncatedGCELoss(q=0.7, k=0.5)
    assert torch.allclose(out, module(logits, labels, expected_keep))


def test_dal_loss_equals_its_module_at_a_late_epoch(batch):
    logits, labels, index = batch
    method = _build(load_config(["method.name=dal", "method.bootstrap=hard"]).method, epochs=20)
    method.on_epoch_start(17)  # q > 1 and lambda > 0: both terms are on
    module = DALLoss(C, q_start=0.6, q_end=1.5, epochs=20, bootstrap="hard")
    module.set_epoch(17)
    assert module.lam > 0
    assert torch.equal(method.loss(logits, labels, index).loss, module(logits, labels))


def test_dal_schedule_uses_the_run_epochs_and_is_logged():
    epochs = 150
    method = _build(load_config(["method.name=dal"]).method, epochs=epochs)
    assert method.epochs == epochs
    crossing = int(np.ceil(dal_t0(0.6, 1.5, epochs)))  # t0 = 66.7: q passes 1 during epoch 67
    assert crossing == 67
    for epoch in (0, crossing - 1, crossing, epochs - 1):
        logged = method.on_epoch_start(epoch)
        assert logged == {
            "dal_q": dal_q(epoch, 0.6, 1.5, epochs),
            "dal_lambda": dal_lambda(epoch, 0.6, 1.5, epochs),
        }
    # The values the schedule should have (docs/methods.md#dal), spelled out.
    assert method.on_epoch_start(0) == {"dal_q": 0.6, "dal_lambda": 0.0}
    assert method.on_epoch_start(crossing - 1)["dal_lambda"] == 0.0
    logged = method.on_epoch_start(crossing)
    assert logged["dal_q"] > 1.0 and logged["dal_lambda"] > 0.0
    logged = method.on_epoch_start(epochs - 1)
    assert logged["dal_q"] == pytest.approx(0.6 + 0.9 * 149 / 150)
    assert logged["dal_lambda"] == pytest.approx((149 - 200 / 3) / (150 - 200 / 3))  # ≈ 0.988
    with pytest.raises(ConfigError, match="outside DAL's schedule"):
        method.on_epoch_start(epochs)


def test_peer_loss_equals_its_module_with_the_documented_seed(batch):
    logits, labels, index = batch
    method = _build(load_config(["method.name=peer", "method.alpha=0.5"]).method)
    method.on_epoch_start(3)
    steps = [method.loss(logits, labels, index).loss for _ in range(2)]
    module = PeerLoss(alpha=0.5)
    for step, got in enumerate(steps):
        g = torch.Generator().manual_seed(peer_seed(3, step, index))
        assert torch.equal(got, module(logits, labels, generator=g))
    assert not torch.equal(steps[0], steps[1])  # a new draw at every step


def test_peer_draw_is_reproducible_and_depends_on_the_batch(batch):
    logits, labels, index = batch

    def run(idx: torch.Tensor) -> list[torch.Tensor]:
        method = _build(load_config(["method.name=peer"]).method)
        out = []
        for epoch in range(2):
            method.on_epoch_start(epoch)
            out += [method.loss(logits, labels, idx).loss for _ in range(2)]
        return out

    first, again = run(index), run(index)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    # Another batch (another rank) draws other peers; the seed is a hash of its indices.
    assert peer_seed(0, 0, index) != peer_seed(0, 0, index + 1)
    assert peer_seed(0, 0, index) != peer_seed(1, 0, index) != peer_seed(0, 1, index)


@pytest.mark.parametrize(
    ("ramp", "expected"),
    [(0, [0.8] * 6), (1, [0.0] + [0.8] * 5), (4, [0.0, 0.2, 0.4, 0.6, 0.8, 0.8])],
)
def test_peer_alpha_ramp(ramp, expected):
    cfg = load_config(["method.name=peer", "method.alpha=0.8", f"method.alpha_ramp_epochs={ramp}"])
    method = _build(cfg.method)
    got = [method.on_epoch_start(epoch)["peer_alpha"] for epoch in range(6)]
    assert got == pytest.approx(expected)
    assert method.criterion.alpha == pytest.approx(expected[-1])


# -- where forward/backward get T ----------------------------------------------------------------
@pytest.mark.parametrize("name", ["forward", "backward"])
def test_transition_true_uses_the_realised_matrix(name):
    cfg = load_config([f"method.name={name}"])
    resources = METHODS.get(name).prepare_resources(cfg.method, _context(T4))
    assert resources == {"transition": T4, "transition_source": "true"}
    method = _build(cfg.method, resources=json.loads(json.dumps(resources)))  # as the driver
    assert torch.equal(method.criterion.transition_matrix, torch.tensor(T4, dtype=torch.float64))


def test_transition_true_without_clean_labels_explains_the_alternatives():
    cfg = load_config(["method.name=forward"])
    with pytest.raises(ConfigError, match=r"clean labels .* unknown.*transition=estimate"):
        METHODS.get("forward").prepare_resources(cfg.method, _context(None))


def test_transition_of_the_wrong_size_fails_in_the_driver():
    cfg = load_config(["method.name=forward"])
    three = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    with pytest.raises(ConfigError, match=r"3 x 3 matrix but the dataset has 4 classes"):
        METHODS.get("forward").prepare_resources(cfg.method, _context(three))


def test_backward_with_a_singular_realised_matrix_fails_in_the_driver():
    cfg = load_config(["method.name=backward"])
    singular = [[0.25] * 4] * 4
    with pytest.raises(ConfigError, match=r"method 'backward'.*singular"):
        METHODS.get("backward").prepare_resources(cfg.method, _context(singular))


@pytest.mark.parametrize("name", ["forward", "backward"])
def test_missing_resources_fail_before_training(name, batch):
    # The driver's dry build constructs the method without resources; a worker must not train.
    method = _build(load_config([f"method.name={name}"]).method)
    with pytest.raises(DistnoisyError, match=r"without its transition matrix"):
        method.attach(SampleStore(100))
    with pytest.raises(DistnoisyError, match=r"resources\['transition'\] is missing"):
        method.loss(*batch)


def _reference_probs() -> tuple[np.ndarray, np.ndarray]:
    """Softmax outputs whose anchor-point estimate is known: ``(probs [N, 4], expected T)``.

    Per class j: 15 near-certain outliers (p_j = 0.97, 11% of N, so the 97th percentile of column
    j is 0.97 and they are all cut), one anchor whose whole row is ``expected[j]`` (the largest
    p_j left), and a bulk with every entry <= 0.4, below every anchor's p_j.
    """
    expected = np.array(T4)
    outliers = [np.full(C, 0.01) for _ in range(C)]
    for j, row in enumerate(outliers):
        row[j] = 0.97
    bulk = [np.roll([0.4, 0.3, 0.2, 0.1], k) for k in range(C)] * 20
    rows = [row for row in outliers for _ in range(15)] + list(expected) + bulk
    probs = np.asarray(rows, dtype=np.float32)
    return probs[np.random.default_rng(0).permutation(len(probs))], expected


def test_transition_estimate_reads_the_reference_run(tmp_path):
    probs, expected = _reference_probs()
    store = SampleStore(len(probs))
    store.declare("final_prob", FieldSpec(shape=(C,)))
    store.set("final_prob", torch.arange(len(probs)), torch.from_numpy(probs))
    reference = tmp_path / "reference-ce"
    reference.mkdir()
    store.export_parquet(reference / "sample_stats.parquet", extra={"given_label": probs.argmax(1)})

    calls: list[str] = []
    cfg = load_config(["method.name=forward", "method.transition=estimate"])
    resources = METHODS.get("forward").prepare_resources(
        cfg.method, _context(None, reference, calls)
    )
    assert calls == ["ce"]
    assert resources["transition_source"] == "estimate"
    got = np.array(resources["transition"])
    np.testing.assert_allclose(got, expected, atol=1e-6)
    np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-6)
    json.dumps(resources)  # JSON-able for the workers


def test_transition_estimate_without_predictions_is_a_clear_error(tmp_path):
    cfg = load_config(["method.name=forward", "method.transition=estimate"])
    with pytest.raises(DistnoisyError, match=r"sample_stats\.parquet' does not exist"):
        METHODS.get("forward").prepare_resources(cfg.method, _context(None, tmp_path))


@pytest.mark.parametrize("form", ["json_object", "json_list", "npy"])
def test_transition_file_loads(form, tmp_path, batch):
    if form == "npy":
        path = tmp_path / "t.npy"
        np.save(path, np.array(T4))
    else:
        path = tmp_path / "t.json"
        data = {"classes": list("abcd"), "transition": T4} if form == "json_object" else T4
        path.write_text(json.dumps(data))
    cfg = load_config(["method.name=backward", f"method.transition={path}"])
    resources = METHODS.get("backward").prepare_resources(cfg.method, _context(None))
    assert resources == {"transition": T4, "transition_source": str(path.resolve())}
    method = _build(cfg.method, resources=resources)
    logits, labels, index = batch
    expected = BackwardCorrectionLoss(torch.tensor(T4))(logits, labels)
    assert torch.equal(method.loss(logits, labels, index).loss, expected)


# -- end to end ---------------------------------------------------------------------------------
def _train(
    tmp_path: Path, digits_root: Path, *overrides: str, tracking_uri: str | None = None
) -> tuple[dict[str, Any], Path]:
    from distnoisy.train import train

    run_dir = tmp_path / "run"
    cfg = load_config(
        [
            *overrides,
            "scaling.launcher=local",
            "scaling.num_workers=1",
            *(
                ["tracking.enabled=false"]
                if tracking_uri is None
                else [f"tracking.uri={tracking_uri}"]
            ),
            f"data.root={digits_root}",
            f"output_dir={run_dir}",
        ]
    )
    return train(cfg), run_dir


@pytest.mark.slow
def test_end_to_end_forward_estimate_and_dal(tmp_path, digits_root, mlflow_uri):
    from mlflow.tracking import MlflowClient

    summary, run_dir = _train(
        tmp_path / "forward",
        digits_root,
        "method.name=forward",
        "method.transition=estimate",
        "train.epochs=3",
        tracking_uri=mlflow_uri,
    )
    client = MlflowClient(mlflow_uri)
    reference_id = json.loads((run_dir / "reference-ce" / "run.json").read_text())["mlflow_run_id"]
    reference = client.get_run(reference_id)
    # The CE reference run is nested under the forward run in the MLflow UI.
    assert reference.data.tags["mlflow.parentRunId"] == summary["mlflow_run_id"]
    assert reference.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(summary["mlflow_run_id"])}
    assert "method_resources.json" in artifacts
    assert summary["method"] == "forward" and summary["epochs"] == 3
    assert (run_dir / "reference-ce" / "summary.json").is_file()
    assert json.loads((run_dir / "reference-ce" / "summary.json").read_text())["method"] == "ce"
    resources = json.loads((run_dir / "method_resources.json").read_text())
    assert resources["transition_source"] == "estimate"
    transition = np.array(resources["transition"])
    assert transition.shape == (10, 10)
    assert (transition >= 0).all()
    np.testing.assert_allclose(transition.sum(1), 1.0, atol=1e-5)
    # The estimate comes from the reference run's final predictions, not from the clean labels.
    stats = pq.read_table(run_dir / "reference-ce" / "sample_stats.parquet", columns=["final_prob"])
    assert len(stats) == summary["num_train"]

    summary, _ = _train(
        tmp_path / "dal", digits_root, "method.name=dal", "train.epochs=4", tracking_uri=mlflow_uri
    )
    logged = client.get_metric_history(summary["mlflow_run_id"], "dal_q")
    assert [m.step for m in logged] == [0, 1, 2, 3]  # the schedule is a per-epoch MLflow curve
    assert [m.value for m in logged] == pytest.approx([dal_q(t, 0.6, 1.5, 4) for t in range(4)])
    q = [h["dal_q"] for h in summary["history"]]
    lam = [h["dal_lambda"] for h in summary["history"]]
    assert q == pytest.approx([dal_q(t, 0.6, 1.5, 4) for t in range(4)])
    assert np.all(np.diff(q) > 0)
    assert lam == pytest.approx([dal_lambda(t, 0.6, 1.5, 4) for t in range(4)])
    assert lam[0] == 0.0 and lam[-1] > 0.0  # q passes 1 at t0 = 1.78


def test_peer_alpha_warmup_then_ramp() -> None:
    from distnoisy.methods.peer import peer_alpha

    # 3 CE warm-up epochs, then alpha ramps 0 -> 0.8 over 2 epochs.
    got = [peer_alpha(e, 0.8, ramp_epochs=2, warmup_epochs=3) for e in range(7)]
    assert got == pytest.approx([0.0, 0.0, 0.0, 0.0, 0.4, 0.8, 0.8])
    with pytest.raises(ConfigError, match="warmup_epochs"):
        load_config(["method.name=peer", "method.warmup_epochs=-1"])
