from __future__ import annotations

import pytest

from deepmetric.errors import ConfigError
from deepmetric.registry import Registry


def test_register_build_and_errors() -> None:
    reg: Registry = Registry("widget")

    @reg.register("thing")
    class Thing:
        """A thing for tests."""

        def __init__(self, size: int = 1, *, color: str = "red") -> None:
            self.size, self.color = size, color

    assert reg.names() == ["thing"] and "thing" in reg
    assert reg.describe("thing") == "A thing for tests."
    assert reg.build("thing", size=3, color="blue").size == 3
    with pytest.raises(ConfigError, match="unknown argument.*'colour'.*valid arguments: size, color"):
        reg.build("thing", colour="blue")
    with pytest.raises(ConfigError, match="unknown widget 'thimg'. Did you mean 'thing'"):
        reg.get("thimg")
    with pytest.raises(ValueError, match="already registered"):
        reg.register("thing")(type("Other", (), {}))


def test_distances_smaller_is_closer_and_finite_gradients() -> None:
    import torch

    from deepmetric import distances

    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    for name in distances.names():
        d = distances.pairwise_distance(x, metric=name)
        assert d.shape == (5, 5)
        assert torch.allclose(d.diagonal(), torch.zeros(5, dtype=torch.float64), atol=1e-6)
        assert (d >= -1e-9).all()
        d.sum().backward()
        assert torch.isfinite(x.grad).all()
        x.grad = None
    ref = torch.cdist(x.detach(), x.detach())
    assert torch.allclose(distances.euclidean(x.detach()), ref, atol=1e-6)
    assert torch.allclose(distances.squared_euclidean(x.detach()), ref**2, atol=1e-6)
