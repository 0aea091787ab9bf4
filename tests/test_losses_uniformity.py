"""Uniformity regulariser: against a naive double loop (values and gradients), edge cases, and it
spreads held-out embeddings when trained."""
from __future__ import annotations

import math

import pytest
import torch

from deepmetric.errors import ConfigError
from deepmetric.losses import UniformityLoss, build
from deepmetric.losses.uniformity import uniformity_loss
from reference.training import train_label_free


def _naive(x: torch.Tensor, t: float) -> torch.Tensor:
    u = [row / row.norm() for row in x]
    terms = []
    for i in range(len(u)):
        for j in range(len(u)):
            if i != j:
                terms.append(torch.exp(-t * ((u[i] - u[j]) ** 2).sum()))
    return torch.log(torch.stack(terms).mean())


@pytest.mark.parametrize("t", [0.5, 2.0, 5.0])
@pytest.mark.parametrize("batch", [2, 7, 16])
def test_matches_naive_loop_values_and_gradients(t: float, batch: int) -> None:
    g = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 5, generator=g, dtype=torch.float64)
    a = x.clone().requires_grad_()
    b = x.clone().requires_grad_()
    ours = UniformityLoss(t=t)(a, torch.zeros(batch, dtype=torch.long))
    ref = _naive(b, t)
    assert torch.allclose(ours, ref, rtol=1e-10, atol=1e-12), (float(ours), float(ref))
    ours.backward()
    ref.backward()
    assert torch.allclose(a.grad, b.grad, rtol=1e-8, atol=1e-10)


def test_identical_rows_have_finite_gradient_and_spread_is_lower() -> None:
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    out = UniformityLoss()(x, torch.tensor([0, 0, 1]))
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(x.grad).all()
    antipodal = UniformityLoss()(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]), torch.tensor([0, 1]))
    assert float(antipodal) == pytest.approx(-8.0)
    collapsed = UniformityLoss()(torch.ones(4, 3), torch.zeros(4, dtype=torch.long))
    assert float(collapsed) == pytest.approx(0.0, abs=1e-6)  # the maximum: every pair at distance 0


def test_scale_invariant_and_single_sample() -> None:
    x = torch.randn(9, 4, dtype=torch.float64)
    assert torch.allclose(uniformity_loss(x), uniformity_loss(3.7 * x))
    one = torch.randn(1, 4, requires_grad=True)
    out = UniformityLoss()(one, torch.tensor([0]))
    assert float(out.detach()) == 0.0
    out.backward()


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError):
        build("uniformity", t=0)
    with pytest.raises(ConfigError):
        build("uniformity", t=float("nan"))
    x = torch.randn(4, 3)
    with pytest.raises(ConfigError, match="no mined indices"):
        UniformityLoss()(x, torch.tensor([0, 0, 1, 1]), indices=(torch.tensor([0]), torch.tensor([1])))


def test_training_spreads_held_out_embeddings() -> None:
    """A linear map trained on uniformity alone spreads *held-out* inputs: their uniformity value
    falls well below that of the initial (deliberately collapsed) map."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(512, 16, generator=g), torch.randn(256, 16, generator=g)
    model = torch.nn.Linear(16, 8)
    with torch.no_grad():
        model.bias.fill_(3.0)  # every output starts near the same direction: collapsed
        model.weight.mul_(0.1)
    loss_fn = UniformityLoss()
    with torch.no_grad():
        before = float(uniformity_loss(model(test)))
    train_label_free(model, loss_fn, train, steps=150, batch=64, lr=0.05, generator=g)
    with torch.no_grad():
        after = float(uniformity_loss(model(test)))
    assert before > -0.5  # collapsed: close to the maximum 0
    assert after < before - 2.0, (before, after)
    assert after > -4.0 - math.log(2)  # Jensen: log E exp(-2d²) >= -2 E[d²] >= -4·B/(B-1)
