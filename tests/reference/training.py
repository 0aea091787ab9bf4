"""A tiny training loop for tests of label-free regularisers."""
from __future__ import annotations

import torch


def train_label_free(model: torch.nn.Module, loss_fn: torch.nn.Module, train: torch.Tensor, *, steps: int,
                     batch: int, lr: float, generator: torch.Generator) -> None:
    """``steps`` Adam steps of ``loss_fn(model(x), zeros)`` on random batches of ``train``."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        x = train[torch.randint(0, train.shape[0], (batch,), generator=generator)]
        loss = loss_fn(model(x), torch.zeros(batch, dtype=torch.long))
        opt.zero_grad()
        loss.backward()
        opt.step()
