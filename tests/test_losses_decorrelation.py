"""Decorrelation regulariser: against a naive loop over dimension pairs (values and gradients), edge
cases, and training with it decorrelates held-out embeddings."""
from __future__ import annotations

import pytest
import torch

from deepmetric.errors import ConfigError
from deepmetric.losses import DecorrelationLoss, build
from deepmetric.losses.decorrelation import decorrelation_loss
from reference.training import train_label_free


def _naive(x: torch.Tensor, normalize: bool, eps: float) -> torch.Tensor:
    rows = [r / r.norm() for r in x] if normalize else list(x)
    b, d = len(rows), len(rows[0])
    mean = [sum(r[k] for r in rows) / b for k in range(d)]
    z = [[r[k] - mean[k] for k in range(d)] for r in rows]
    std = [torch.sqrt(sum(z[i][k] ** 2 for i in range(b)) / b + eps) for k in range(d)]
    total = 0.0
    for k in range(d):
        for l in range(d):
            if k != l:
                corr = sum(z[i][k] * z[i][l] for i in range(b)) / b / (std[k] * std[l])
                total = total + corr ** 2
    return total / (d * (d - 1))


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("batch,dim", [(2, 3), (9, 4), (6, 7)])
def test_matches_naive_loop_values_and_gradients(normalize: bool, batch: int, dim: int) -> None:
    g = torch.Generator().manual_seed(batch * dim)
    x = torch.randn(batch, dim, generator=g, dtype=torch.float64)
    a = x.clone().requires_grad_()
    b = x.clone().requires_grad_()
    ours = DecorrelationLoss(normalize=normalize)(a, torch.zeros(batch, dtype=torch.long))
    ref = _naive(b, normalize, 1e-6)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-8, atol=1e-10)


def test_extremes_and_edge_cases() -> None:
    line = torch.tensor([[1.0, 2.0], [2.0, 4.0], [-1.0, -2.0], [-3.0, -6.0]])
    assert float(decorrelation_loss(line, normalize=False)) == pytest.approx(1.0, abs=1e-5)
    # the 4 corners of a square: the two coordinates are uncorrelated
    square = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
    assert float(decorrelation_loss(square)) == pytest.approx(0.0, abs=1e-12)
    constant = torch.ones(5, 3, requires_grad=True)  # zero variance: eps keeps it finite
    out = DecorrelationLoss()(constant, torch.zeros(5, dtype=torch.long))
    out.backward()
    assert float(out.detach()) == 0.0 and torch.isfinite(constant.grad).all()
    assert float(decorrelation_loss(torch.randn(1, 4))) == 0.0
    assert float(decorrelation_loss(torch.randn(4, 1))) == 0.0


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError):
        build("decorrelation", eps=0.0)
    with pytest.raises(ConfigError, match="no mined indices"):
        DecorrelationLoss()(torch.randn(4, 3), torch.tensor([0, 0, 1, 1]), indices=(torch.tensor([0]),) * 3)


def test_training_decorrelates_held_out_embeddings() -> None:
    """A linear map whose outputs start on a 2-d subspace of 8 dimensions, trained on the penalty
    alone, spreads held-out embeddings over uncorrelated dimensions."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(1024, 16, generator=g), torch.randn(256, 16, generator=g)
    model = torch.nn.Linear(16, 8)
    with torch.no_grad():
        model.weight.copy_(torch.randn(8, 2, generator=g) @ torch.randn(2, 16, generator=g))  # rank 2
        model.weight.add_(0.01 * torch.randn(8, 16, generator=g))
    with torch.no_grad():
        before = float(decorrelation_loss(model(test)))
    loss_fn = DecorrelationLoss()
    train_label_free(model, loss_fn, train, steps=200, batch=128, lr=0.02, generator=g)
    with torch.no_grad():
        after = float(decorrelation_loss(model(test)))
    assert before > 0.2, before
    assert after < 0.25 * before, (before, after)
