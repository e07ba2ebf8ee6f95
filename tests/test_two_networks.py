"""ELR+ and LIMIT: the two-network methods (docs/methods.md#elr-two-networks and #limit).

Unit tests check each rule against its formula on small float64 tensors and real (tiny)
networks; the slow tests train on the real digits data with Ray Train (1 vs 2 workers), resume
from a checkpoint, and reject bad settings before a run starts.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from distnoisy.config import load_config
from distnoisy.core.errors import ConfigError
from distnoisy.losses import limit_terms, sample_grad_noise
from distnoisy.losses.elr_plus import (
    PROB_CLAMP,
    elr_plus_loss,
    elr_plus_target_update,
    ema_decay,
    ema_update,
    mixup_coefficient,
    sigmoid_rampup,
)
from distnoisy.methods import METHODS
from distnoisy.methods.base import StepInput
from distnoisy.methods.elr_plus import ELRPlus
from distnoisy.models import build_model
from distnoisy.store import SampleStore
from distnoisy.train import main, train

C, N, B = 4, 12, 6


def _method(name: str, *overrides: str, num_classes: int = C, seed: int = 0):
    cfg = load_config([f"method.name={name}", *overrides])
    method = METHODS.get(name)(
        cfg.method, num_samples=N, num_classes=num_classes, epochs=3, seed=seed
    )
    store = SampleStore(N)
    method.attach(store)
    return method, store


def _builder(seed: int = 0):
    """Tiny real networks (small_cnn on 1 x 8 x 8 inputs), in float64, reproducibly seeded."""
    gen = iter(range(seed, seed + 100))

    def build(name: str | None = None, weights: str | None = None) -> torch.nn.Module:
        torch.manual_seed(next(gen))
        return build_model(name or "small_cnn", C, 1, weights).double()

    return build


def _batch(seed: int = 0, labels: list[int] | None = None, **kw) -> StepInput:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.tensor(labels if labels is not None else [0, 1, 2, 3, 1, 0])
    index = torch.tensor([7, 2, 9, 0, 4, 11])
    args = {"epoch": 0, "step": 0, "steps_per_epoch": 2, "phase": "net1"} | kw
    return StepInput(x, y, index, **args)


# ---------------------------------------------------------------------------------------------
# ELR+ building blocks
# ---------------------------------------------------------------------------------------------


def test_sigmoid_rampup_and_ema_decay_values() -> None:
    assert sigmoid_rampup(0, 0) == 1.0  # coef_step = 0: no ramp
    assert sigmoid_rampup(0, 100) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(50, 100) == pytest.approx(math.exp(-5 * 0.25))
    assert sigmoid_rampup(100, 100) == sigmoid_rampup(500, 100) == 1.0
    # Ramped (CIFAR): alpha * rampup(t + 1); the first coefficient is tiny (METHODS §2.8 k).
    assert ema_decay(0, 0.997, True, 40000) == pytest.approx(
        0.997 * math.exp(-5 * (1 - 1 / 4e4) ** 2)
    )
    assert ema_decay(0, 0.997, True, 40000) < 0.0068
    assert ema_decay(39999, 0.997, True, 40000) == pytest.approx(0.997)
    # Not ramped (Clothing1M): min(1 - 1/(t + 1), alpha).
    assert ema_decay(0, 0.9999, False, 0) == 0.0
    assert ema_decay(1, 0.9999, False, 0) == 0.5
    assert ema_decay(10**6, 0.9999, False, 0) == 0.9999


def test_ema_update_rule_on_parameters_only() -> None:
    build = _builder()
    net, ema = build(), build()
    ema.train()
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    ema_update(ema, net, 0.9)
    for (name, p_ema), p in zip(ema.named_parameters(), net.parameters(), strict=True):
        torch.testing.assert_close(p_ema, 0.9 * before[name] + 0.1 * p, rtol=0, atol=1e-15)


def test_mixup_coefficient_is_at_least_half_and_beta_distributed() -> None:
    rng = np.random.default_rng(0)
    draws = np.array([mixup_coefficient(1.0, rng) for _ in range(20000)])
    assert draws.min() >= 0.5 and draws.max() <= 1.0
    # Beta(1, 1) folded at 1/2 is uniform on [1/2, 1]: mean 3/4, variance 1/48.
    assert draws.mean() == pytest.approx(0.75, abs=0.005)
    assert draws.var() == pytest.approx(1 / 48, abs=0.001)
    # Same seed, same draw: every rank seeded alike mixes with the same ℓ.
    assert mixup_coefficient(1.5, np.random.default_rng([3, 1, 7])) == mixup_coefficient(
        1.5, np.random.default_rng([3, 1, 7])
    )
    with pytest.raises(ConfigError, match="mixup_alpha"):
        mixup_coefficient(0.0, rng)


def test_elr_plus_target_update_has_no_clamp() -> None:
    old = torch.tensor([[0.2, 0.3, 0.5, 0.0]], dtype=torch.float64)
    z = torch.tensor([[30.0, 0.0, 0.0, 0.0]], dtype=torch.float64)  # saturated softmax
    new = elr_plus_target_update(old, z, 0.7)
    p = torch.softmax(z, 1)
    torch.testing.assert_close(new, 0.7 * old + 0.3 * p)
    assert new[0, 1] < 0.3 * 0.7 + 1e-9  # no 1e-4 floor leaked into the target


def _ref_loss(z, y_mix, q, lam, ramp, reweight):
    y = y_mix * q / (y_mix * q).sum(1, keepdim=True) if reweight else y_mix
    ce = -(y * torch.log_softmax(z, 1)).sum(1).mean()
    p = torch.softmax(z, 1).clamp(PROB_CLAMP, 1 - PROB_CLAMP)
    return ce + ramp * lam * torch.log(1 - (q * p).sum(1)).mean()


@pytest.mark.parametrize("reweight", [False, True])
def test_elr_plus_loss_value_and_gradient(reweight: bool) -> None:
    # Two samples, hand-checkable: sample 1 is saturated (clamped, no regulariser gradient).
    z = torch.tensor([[1.0, 0.0, -1.0], [40.0, 0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    y_mix = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.6, 0.4]], dtype=torch.float64)
    q = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]], dtype=torch.float64)
    loss = elr_plus_loss(z, y_mix, q, lam=3.0, ramp=0.5, reweight=reweight)
    loss.backward()
    z_ref = z.detach().clone().requires_grad_(True)
    expected = _ref_loss(z_ref, y_mix, q, 3.0, 0.5, reweight)
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    torch.testing.assert_close(z.grad, z_ref.grad, rtol=1e-10, atol=1e-14)
    # Sample 0 by hand (no reweighting): CE on the soft label + 1.5 * log(1 - <q, p>) / 2.
    if not reweight:
        p0 = torch.softmax(z.detach()[0], 0)
        ce0 = -(y_mix[0] * torch.log(p0)).sum()
        reg0 = math.log(1 - float((q[0] * p0).sum()))
        p1 = torch.softmax(z.detach()[1], 0).clamp(1e-4, 1 - 1e-4)
        ce1 = -(y_mix[1] * torch.log_softmax(z.detach()[1], 0)).sum()
        reg1 = math.log(1 - float((q[1] * p1).sum()))
        hand = (float(ce0) + float(ce1)) / 2 + 1.5 * (reg0 + reg1) / 2
        assert loss.item() == pytest.approx(hand, rel=1e-12)


def test_reweighting_uses_the_targets() -> None:
    z = torch.zeros(1, 3, dtype=torch.float64)
    y_mix = torch.tensor([[0.5, 0.5, 0.0]], dtype=torch.float64)
    q = torch.tensor([[0.9, 0.1, 0.0]], dtype=torch.float64)
    plain = elr_plus_loss(z, y_mix, q, lam=0.0)
    weighted = elr_plus_loss(z, y_mix, q, lam=0.0, reweight=True)
    # Uniform p: CE is log 3 either way; the gradient tells them apart: p - Y'.
    assert plain.item() == pytest.approx(math.log(3)) == weighted.item()
    zg = z.clone().requires_grad_(True)
    elr_plus_loss(zg, y_mix, q, lam=0.0, reweight=True).backward()
    torch.testing.assert_close(zg.grad, torch.tensor([[1 / 3 - 0.9, 1 / 3 - 0.1, 1 / 3]]).double())


# ---------------------------------------------------------------------------------------------
# ELR+ method
# ---------------------------------------------------------------------------------------------


def _elr_plus(*overrides: str):
    method, store = _method("elr_plus", "method.ema_ramp=false", *overrides)
    nets = method.build_networks(_builder())
    method.setup(nets, torch.device("cpu"))
    opts = method.build_optimizers(nets, lambda params: torch.optim.SGD(params, lr=0.1))
    return method, store, nets, opts


def test_elr_plus_step_targets_from_the_other_networks_ema() -> None:
    method, store, nets, opts = _elr_plus("method.beta=0.7")
    # Make net2's EMA different from net2 itself: targets must come from the EMA.
    with torch.no_grad():
        for p in method.ema["net2"].parameters():
            p.add_(0.05)
    old_t1 = torch.rand(N, C, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    store.set("elr_target_net1", torch.arange(N), old_t1.float())
    batch = _batch(step=0)  # the first step (step number 1): EMA coefficient min(1 - 1/2, α) = 0.5
    ema1_before = [p.clone() for p in method.ema["net1"].parameters()]
    net2_before = [p.clone() for p in nets["net2"].parameters()]
    with torch.no_grad():
        expected = 0.7 * old_t1[batch.index] + 0.3 * torch.softmax(method.ema["net2"](batch.x), 1)
    method.train_step(batch, nets, opts)
    store.flush()
    torch.testing.assert_close(
        store["elr_target_net1"][batch.index].double(), expected, atol=1e-6, rtol=0
    )
    assert (store["elr_target_net2"] == 0).all()  # the other network's targets are untouched
    # net1 took an SGD step, then its EMA moved halfway towards it; net2 did not change.
    for p_ema, before, p in zip(
        method.ema["net1"].parameters(), ema1_before, nets["net1"].parameters(), strict=True
    ):
        torch.testing.assert_close(p_ema, 0.5 * before + 0.5 * p, rtol=0, atol=1e-12)
    assert any(
        not torch.equal(a, b)
        for a, b in zip(ema1_before, method.ema["net1"].parameters(), strict=True)
    )
    for before, p in zip(net2_before, nets["net2"].parameters(), strict=True):
        assert torch.equal(before, p)


def test_elr_plus_step_loss_is_the_formula_on_the_mixed_batch() -> None:
    method, _, nets, opts = _elr_plus()
    batch = _batch(step=0, epoch=2)
    t = batch.iteration
    # Replay the step's draws: ℓ then the pairing, from the same seeded generator.
    lam = mixup_coefficient(1.0, method._rng(batch, 0))
    partner = ELRPlus._partners(batch.index, method._rng(batch, 1))
    assert sorted(partner.tolist()) == list(range(B)) and lam >= 0.5
    net1 = _builder()()
    net1.load_state_dict(nets["net1"].state_dict())
    with torch.no_grad():
        targets = 0.7 * 0 + 0.3 * torch.softmax(method.ema["net2"](batch.x), 1)
    y1 = F.one_hot(batch.y, C).double()
    x_mix = lam * batch.x + (1 - lam) * batch.x[partner]
    y_mix = lam * y1 + (1 - lam) * y1[partner]
    q = lam * targets + (1 - lam) * targets[partner]
    expected = _ref_loss(net1(x_mix), y_mix, q, 3.0, 1.0, False)
    result = method.train_step(batch, nets, opts)
    assert t == 4 and result.loss == pytest.approx(expected.item(), rel=1e-10)


def test_elr_plus_pairing_does_not_depend_on_how_ranks_split_the_batch() -> None:
    index = torch.tensor([5, 1, 9, 3, 7, 0, 8, 2])
    rng = lambda: np.random.default_rng([0, 0, 3])  # noqa: E731
    whole = ELRPlus._partners(index, rng())
    shuffled = torch.tensor([3, 0, 6, 1, 7, 2, 5, 4])  # the same samples gathered in another order
    other = ELRPlus._partners(index[shuffled], rng())
    pairs = {(int(index[i]), int(index[whole[i]])) for i in range(8)}
    pairs_other = {(int(index[shuffled][i]), int(index[shuffled][other[i]])) for i in range(8)}
    assert pairs == pairs_other


def test_elr_plus_prediction_averages_logits_and_scores_mean_targets() -> None:
    method, store, nets, _ = _elr_plus()
    x = _batch().x
    for net in nets.values():
        net.eval()
    torch.testing.assert_close(method.predict(nets, x), (nets["net1"](x) + nets["net2"](x)) / 2)
    t1 = torch.full((N, C), 0.25)
    t2 = torch.zeros(N, C)
    t2[:, 2] = 1.0
    store.set("elr_target_net1", torch.arange(N), t1)
    store.set("elr_target_net2", torch.arange(N), t2)
    given = np.array([2] * 6 + [0] * 6)
    score, suggested = method.label_issue_scores(
        given, np.zeros((N, C)), np.zeros((N, 3)), _whole(store)
    )
    np.testing.assert_allclose(score, [1 - 0.625] * 6 + [1 - 0.125] * 6, rtol=1e-6)
    assert (suggested == 2).all()


def test_elr_plus_reweighting_follows_the_class_count() -> None:
    assert _method("elr_plus", num_classes=100)[0].reweight
    assert not _method("elr_plus", num_classes=10)[0].reweight
    assert _method("elr_plus", "method.target_reweight=always", num_classes=10)[0].reweight


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("method.mixup_alpha=0", "mixup_alpha=0.0 must be > 0"),
        ("method.mixup_alpha=-1", "mixup_alpha=-1.0 must be > 0"),
        ("method.ema_alpha=1.0", "ema_alpha"),
        ("method.target_reweight=on", "target_reweight"),
        ("method.mixup_pairs=ring", "mixup_pairs"),
    ],
)
def test_elr_plus_rejects_bad_settings_at_load_time(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(["method.name=elr_plus", override])


# ---------------------------------------------------------------------------------------------
# LIMIT method
# ---------------------------------------------------------------------------------------------


def _limit(*overrides: str, lr: float = 0.0):
    method, store = _method("limit", *overrides)
    nets = method.build_networks(_builder())
    opts = method.build_optimizers(nets, lambda params: torch.optim.SGD(params, lr=lr))
    return method, store, nets, opts


def _grads(net: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() if p.grad is not None else None for p in net.parameters()]


@pytest.mark.parametrize("variant", ["gaussian", "laplace"])
def test_limit_classifier_gets_the_predicted_gradient_and_nothing_from_the_labels(
    variant: str,
) -> None:
    method, _, nets, opts = _limit(f"method.variant={variant}", "method.grad_weight_decay=0.5")
    cls, qnet = nets["classifier"], nets["qnet"]
    runs = []
    for labels in ([0, 1, 2, 3, 1, 0], [3, 3, 0, 1, 2, 2]):
        batch = _batch(labels=labels)
        method.train_step(batch, nets, opts)  # lr 0: the weights stay, the gradients remain
        runs.append((_grads(cls), _grads(qnet), batch))
    # Labels changed, same inputs and q-network output: the classifier's gradient is identical.
    for a, b in zip(runs[0][0], runs[1][0], strict=True):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1], strict=True))
    # Against the formula: backprop ĝ/B = (softmax(z) - softmax(u))/B through the classifier.
    batch = runs[0][2]
    z = cls(batch.x)
    with torch.no_grad():
        g_hat = torch.softmax(z, 1) - torch.softmax(qnet(batch.x), 1)
    expected = torch.autograd.grad((z * g_hat).sum() / B, list(cls.parameters()))
    for got, want in zip(runs[0][0], expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
    # The q-network's gradient is that of its own loss (Brier or MAE + L‖sg(p) - r‖²).
    u = qnet(batch.x)
    p = torch.softmax(z.detach(), 1)
    r = torch.softmax(u, 1)
    e = F.one_hot(batch.y, C).double()
    fit = ((r - e) ** 2).sum(1) if variant == "gaussian" else 2 * (1 - r[torch.arange(B), batch.y])
    q_loss = fit.mean() + 0.5 * ((p - r) ** 2).sum(1).mean()
    expected_q = torch.autograd.grad(q_loss, list(qnet.parameters()))
    for got, want in zip(runs[0][1], expected_q, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)


def test_limit_warmup_freezes_the_classifier() -> None:
    method, _, nets, opts = _limit("method.warmup_epochs=1", lr=0.1)
    cls_before = [p.clone() for p in nets["classifier"].parameters()]
    q_before = [p.clone() for p in nets["qnet"].parameters()]
    method.train_step(_batch(epoch=0), nets, opts)
    assert all(
        torch.equal(a, b) for a, b in zip(cls_before, nets["classifier"].parameters(), strict=True)
    )
    assert any(
        not torch.equal(a, b) for a, b in zip(q_before, nets["qnet"].parameters(), strict=True)
    )
    method.train_step(_batch(epoch=1), nets, opts)  # after warm-up the classifier learns
    assert any(
        not torch.equal(a, b)
        for a, b in zip(cls_before, nets["classifier"].parameters(), strict=True)
    )


def test_limit_sampled_gradient_noise() -> None:
    gen = torch.Generator().manual_seed(0)
    gauss = sample_grad_noise((200000,), "gaussian", 2.0, gen)
    assert gauss.std().item() == pytest.approx(math.sqrt(1 / 4), rel=0.01)
    lap = sample_grad_noise((200000,), "laplace", 2.0, gen)
    assert lap.abs().mean().item() == pytest.approx(0.5, rel=0.01)  # Laplace(0, b): E|x| = b
    assert abs(lap.mean().item()) < 0.01
    # The noise moves only the classifier's gradient, by exactly noise / B.
    z = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    u = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    noise = torch.randn(3, 4, dtype=torch.float64)
    limit_terms(z, u, torch.tensor([0, 1, 2]), g_noise=noise)[0].backward()
    expected = (torch.softmax(z.detach(), 1) - torch.softmax(u.detach(), 1) + noise) / 3
    torch.testing.assert_close(z.grad, expected)


def test_limit_scores_with_the_q_network(tmp_path: Path) -> None:
    method, store, nets, opts = _limit()
    batch = _batch()
    method.train_step(batch, nets, opts)
    store.flush()
    with torch.no_grad():
        r = torch.softmax(nets["qnet"](batch.x), 1).float()
    torch.testing.assert_close(store["limit_q_prob"][batch.index], r)
    given = np.zeros(N, dtype=np.int64)
    score, _ = method.label_issue_scores(given, np.zeros((N, C)), np.zeros((N, 3)), _whole(store))
    np.testing.assert_allclose(score[batch.index.numpy()], 1 - r[:, 0].numpy(), rtol=1e-6)
    assert np.allclose(np.delete(score, batch.index.numpy()), 1 - 1 / C)  # never visited


def test_limit_q_init_loads_a_run_and_rejects_another_class_count(tmp_path: Path) -> None:
    torch.manual_seed(3)
    ce = build_model("small_cnn", C, 1)
    run = tmp_path / "ce-run"
    run.mkdir()
    torch.save({"model": ce.state_dict()}, run / "weights.pt")
    method, _ = _method("limit", f"method.q_init={run}")
    nets = method.build_networks(lambda name=None, weights=None: build_model("small_cnn", C, 1))
    for a, b in zip(nets["qnet"].state_dict().values(), ce.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    five = tmp_path / "five.pt"
    torch.save(build_model("small_cnn", 5, 1).state_dict(), five)
    method, _ = _method("limit", f"method.q_init={five}")
    with pytest.raises(ConfigError, match="outputs 5 values per sample but the classifier has 4"):
        method.build_networks(lambda name=None, weights=None: build_model("small_cnn", C, 1))
    method, _ = _method("limit", f"method.q_init={tmp_path / 'missing'}")
    with pytest.raises(ConfigError, match="no such file"):
        method.build_networks(lambda name=None, weights=None: build_model("small_cnn", C, 1))


def test_limit_rejects_bad_settings_at_load_time() -> None:
    with pytest.raises(ConfigError, match="variant"):
        load_config(["method.name=limit", "method.variant=cauchy"])
    with pytest.raises(ConfigError, match="grad_weight_decay"):
        load_config(["method.name=limit", "method.grad_weight_decay=-1"])
    with pytest.raises(ConfigError, match="lamb"):
        load_config(["method.name=limit", "method.sample_from_q=true", "method.lamb=0"])


# ---------------------------------------------------------------------------------------------
# End to end on digits: Ray Train with 1 and 2 workers, resume, bad input
# ---------------------------------------------------------------------------------------------


def _cfg(out: Path, digits_root: Path, *overrides: str):
    return load_config(
        [f"data.root={digits_root}", f"output_dir={out}", "tracking.enabled=false", *overrides]
    )


def _column(run_dir: Path, name: str) -> np.ndarray:
    table = pq.read_table(run_dir / "sample_stats.parquet")
    return np.stack(table[name].to_numpy(zero_copy_only=False))


def _final_state(run_dir: Path) -> dict:
    """The last checkpoint's state (Ray: run_dir/ray/train/checkpoint_*; local: checkpoints/)."""
    newest = max(run_dir.rglob("state.pt"), key=lambda p: p.stat().st_mtime)
    return torch.load(newest, map_location="cpu", weights_only=True)


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "optimizer", "fields"),
    [
        # SGD: Adam divides tiny early gradients by their tiny running norms, which turns
        # float summation-order differences (1e-8) into ~1e-3 within two epochs.
        (
            "elr_plus",
            ("train.optimizer=sgd", "train.lr=0.01"),
            {"elr_target_net1": (0.0, 1e-5), "elr_target_net2": (0.0, 1e-5)},
        ),
        # LIMIT's q-net predictions follow its weights, which SGD with momentum lets drift by
        # up to 2e-4 (below): they agreed to 1e-5 on one machine and to 1.3e-5 on another (AMD
        # EPYC), so 1e-4; a wrong reduction differs by ~1e-2.
        ("limit", ("train.optimizer=sgd", "train.lr=0.05"), {"limit_q_prob": (0.1, 1e-4)}),
    ],
)
def test_two_ray_workers_train_what_one_process_trains(
    method, optimizer, fields, tmp_path, digits_root, ray_cluster
) -> None:
    # One global sample order and networks without batch statistics make 1 and 2 workers the
    # same computation up to float summation order; ELR+'s global mixup pairing keeps it so.
    # The one-worker reference runs in one local process (the same engine, without Ray's start).
    common = (f"method.name={method}", "train.epochs=2", "data.split=sample", *optimizer)
    local = ("scaling.launcher=local", "scaling.num_workers=1")
    one = train(_cfg(tmp_path / "one", digits_root, *common, *local))
    two = train(_cfg(tmp_path / "two", digits_root, *common, "scaling.num_workers=2"))
    assert (one["num_workers"], two["num_workers"]) == (1, 2)
    for name, (fill, tolerance) in fields.items():
        a, b = _column(tmp_path / "one", name), _column(tmp_path / "two", name)
        assert np.abs(a - b).max() < tolerance, name
        assert np.abs(a - fill).max() > 0.01, name  # trained state, not the initial fill
    w1 = torch.load(tmp_path / "one/weights.pt", weights_only=True)
    w2 = torch.load(tmp_path / "two/weights.pt", weights_only=True)
    assert (
        sorted(w1)
        == sorted(w2)
        == (["net1", "net2"] if method == "elr_plus" else ["classifier", "qnet"])
    )
    for net in w1:
        # Weights of size ~0.2: SGD with momentum compounds rounding a little (LIMIT's q-net:
        # 8e-5 after two epochs at lr 0.05, while its predictions agree to 1e-5).
        assert _max_diff(w1[net], w2[net]) < 2e-4, net
    if method == "elr_plus":
        s1, s2 = _final_state(tmp_path / "one"), _final_state(tmp_path / "two")
        for net in ("net1", "net2"):
            ema1, ema2 = s1["method"]["ema"][net], s2["method"]["ema"][net]
            assert _max_diff(ema1, ema2) < 1e-5, net
            # The EMA moved away from the live network it started as, yet tracks it.
            assert _max_diff(ema1, w1[net]) > 1e-6
    assert one["test_acc"] == pytest.approx(two["test_acc"], abs=1e-6)


@pytest.mark.slow
def test_two_network_bad_input_fails_before_the_run(tmp_path, digits_root, capsys) -> None:
    out = tmp_path / "out"
    base = [f"data.root={digits_root}", f"output_dir={out}", "tracking.enabled=false"]
    assert main([*base, "method.name=elr_plus", "method.mixup_alpha=0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "method.mixup_alpha=0.0 must be > 0" in err
    five = tmp_path / "five-classes.pt"
    torch.save({"model": build_model("small_cnn", 5, 1).state_dict()}, five)
    assert main([*base, "method.name=limit", f"method.q_init={five}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "outputs 5 values per sample but the classifier has 10" in err
    assert not out.exists()


@pytest.mark.slow
def test_limit_q_init_from_a_finished_ce_run(tmp_path, digits_root, monkeypatch) -> None:
    # The official "loaded" variant: q starts as a CE-trained classifier. A relative run path
    # works from the driver's directory (it is made absolute before workers start).
    monkeypatch.chdir(tmp_path)
    args = ("train.epochs=1", "scaling.launcher=local", "scaling.num_workers=1")
    train(_cfg(Path("ce-run"), digits_root, "method.name=ce", *args))
    ce = torch.load(tmp_path / "ce-run/weights.pt", weights_only=True)["model"]
    # SGD with a vanishing lr: the q-network must still hold the CE weights after one epoch.
    train(
        _cfg(
            Path("limit-run"),
            digits_root,
            "method.name=limit",
            "method.q_init=ce-run",
            "train.optimizer=sgd",
            "train.momentum=0",
            "train.lr=1e-12",
            *args,
        )
    )
    limit = torch.load(tmp_path / "limit-run/weights.pt", weights_only=True)
    assert _max_diff(limit["qnet"], ce) < 1e-9
    assert _max_diff(limit["classifier"], ce) > 1e-3  # the classifier started elsewhere
    resources = (tmp_path / "limit-run/method_resources.json").read_text()
    assert str(tmp_path / "ce-run") in resources


def _whole(store) -> dict[str, torch.Tensor]:
    """Every field of a store, all rows (what the run's outputs pass to label_issue_scores)."""
    return {name: store[name] for name in store.specs}
