"""Taylor CE, the worked example of docs/adding_a_method.md: value and gradient against a
float64 re-implementation, config keys and registration."""

from __future__ import annotations

import math

import pytest
import torch

from distnoisy.config import load_config
from distnoisy.core.errors import ConfigError
from distnoisy.methods import METHODS
from distnoisy.methods.taylor_ce import TaylorCELoss


def _reference(logits: torch.Tensor, labels: torch.Tensor, order: int) -> torch.Tensor:
    """The formula written out in float64, sample by sample."""
    total = torch.zeros((), dtype=torch.float64)
    for z, y in zip(logits.double(), labels.tolist(), strict=True):
        p_y = torch.exp(z[y]) / torch.exp(z).sum()
        gap = 1.0 - torch.clamp(p_y, 1e-6, 1.0)
        total = total + sum(gap**j / j for j in range(1, order + 1))
    return total / len(labels)


@pytest.mark.parametrize("order", [1, 2, 6])
def test_value_and_gradient_match_a_float64_reimplementation(order: int) -> None:
    g = torch.Generator().manual_seed(order)
    logits = torch.randn(8, 5, generator=g) * 3
    labels = torch.randint(0, 5, (8,), generator=g)
    z = logits.clone().requires_grad_(True)
    loss = TaylorCELoss(order)(z, labels)
    loss.backward()
    z_ref = logits.double().requires_grad_(True)
    expected = _reference(z_ref, labels, order)
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    torch.testing.assert_close(z.grad.double(), z_ref.grad, rtol=1e-5, atol=1e-7)


def test_hand_values_and_limits() -> None:
    # Uniform logits over 4 classes: p_y = 1/4, gap 3/4; t = 2 gives 3/4 + 9/32 = 33/32.
    z = torch.zeros(1, 4)
    assert TaylorCELoss(2)(z, torch.tensor([0])).item() == pytest.approx(33 / 32)
    # Many terms approach CE = log 4.
    assert TaylorCELoss(200)(z, torch.tensor([0])).item() == pytest.approx(math.log(4), rel=1e-6)


def test_registered_with_its_config_keys() -> None:
    cfg = load_config(["method.name=taylor_ce", "method.order=4"])
    assert cfg.method.order == 4
    assert "taylor_ce" in METHODS.names()
    method = METHODS.get("taylor_ce")(cfg.method, num_samples=10, num_classes=3, epochs=1)
    z, y = torch.zeros(2, 3), torch.tensor([0, 2])
    assert method.loss(z, y, torch.arange(2)).loss.item() == pytest.approx(
        sum((2 / 3) ** j / j for j in range(1, 5))
    )
    with pytest.raises(ConfigError, match=r"taylor_ce.*order"):
        load_config(["method.name=taylor_ce", "method.order=0"])
