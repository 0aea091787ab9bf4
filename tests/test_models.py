"""Tests of the backbones, the Embedder, build_model and the model utilities."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from deepmetric import models
from deepmetric.errors import CheckpointError, ConfigError, DataError
from deepmetric.models.embedder import Embedder, build_model, count_parameters, model_fingerprint
from deepmetric.models.mlp import MLP
from deepmetric.models.resnet18 import ResNet18
from deepmetric.models.resnet50 import ResNet50
from deepmetric.models.small_cnn import SmallCNN

# name -> (backbone kwargs, input shape, out_features): every registered backbone must appear here.
CASES: dict[str, tuple[dict, tuple[int, ...], int]] = {
    "small_cnn": ({}, (2, 1, 28, 28), 128),
    "resnet18": ({}, (2, 3, 64, 64), 512),
    "resnet50": ({}, (2, 3, 32, 32), 2048),
    "mlp": ({"input_dim": 12}, (3, 12), 256),
}


def test_every_registered_backbone_has_a_case() -> None:
    assert set(models.names()) == set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_backbone_and_embedder_shapes_and_gradients(name: str) -> None:
    kwargs, shape, out_features = CASES[name]
    backbone = models.build(name, **kwargs)
    assert backbone.out_features == out_features
    x = torch.randn(*shape)
    assert backbone(x).shape == (shape[0], out_features)
    model = build_model(name, 16, **kwargs)
    out = model(x)
    assert out.shape == (shape[0], 16)
    assert torch.allclose(out.norm(dim=1), torch.ones(shape[0]), atol=1e-5)
    out.pow(3).sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    assert any(p.grad.abs().sum() > 0 for p in model.backbone.parameters())


@pytest.mark.parametrize(
    ("backbone", "shape", "out_features"),
    [
        (SmallCNN(in_channels=3, width=8), (2, 3, 16, 16), 32),
        (SmallCNN(), (2, 1, 4, 5), 128),
        (ResNet18(small_input=True), (2, 3, 28, 28), 512),
        (ResNet18(in_channels=1), (2, 1, 40, 40), 512),
        (ResNet50(small_input=True, in_channels=2), (2, 2, 16, 16), 2048),
        (MLP(input_dim=5, hidden_dims=(7, 9), dropout=0.2, batch_norm=False), (4, 5), 9),
        (MLP(input_dim=5, hidden_dims=()), (4, 5), 5),
    ],
)
def test_backbone_variants(backbone: nn.Module, shape: tuple[int, ...], out_features: int) -> None:
    assert backbone(torch.randn(*shape)).shape == (shape[0], out_features)


def test_small_input_stem() -> None:
    model = ResNet18(small_input=True)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    default = ResNet18()
    assert default.conv1.kernel_size == (7, 7) and default.conv1.stride == (2, 2)
    assert isinstance(default.maxpool, nn.MaxPool2d)


def test_normalize_flag() -> None:
    torch.manual_seed(0)
    backbone = MLP(input_dim=6, hidden_dims=(8,))
    x = torch.randn(5, 6)
    raw = Embedder(backbone, 3, normalize=False)
    raw.eval()
    out = raw(x)
    assert torch.allclose(out, raw.head(backbone(x)))
    assert not torch.allclose(out.norm(dim=1), torch.ones(5))
    unit = Embedder(backbone, 3)
    unit.head.load_state_dict(raw.head.state_dict())
    unit.eval()
    assert torch.allclose(unit(x), out / out.norm(dim=1, keepdim=True), atol=1e-6)
    assert unit.embedding_dim == 3 and unit.normalize and unit.backbone is backbone
    assert isinstance(unit.head, nn.Linear) and unit.config is None


def test_build_model_config_round_trip() -> None:
    model = build_model("mlp", 8, normalize=False, input_dim=4, hidden_dims=(5,), dropout=0.1)
    assert model.config == {
        "name": "mlp", "embedding_dim": 8, "normalize": False, "input_dim": 4, "hidden_dims": (5,), "dropout": 0.1
    }
    again = build_model(**model.config)
    assert model_fingerprint(again) == model_fingerprint(model)
    assert not model.normalize and model.embedding_dim == 8


def test_build_model_errors() -> None:
    with pytest.raises(ConfigError, match="unknown model 'resnet19'.*resnet18"):
        build_model("resnet19")
    with pytest.raises(ConfigError, match="'depth'.*valid arguments: in_channels, width"):
        build_model("small_cnn", depth=3)
    with pytest.raises(ConfigError, match="input_dim"):
        build_model("mlp")  # required argument missing
    bad = [
        ("small_cnn", {"width": 0}, "width"),
        ("small_cnn", {"in_channels": 1.5}, "in_channels"),
        ("mlp", {"input_dim": 4, "dropout": 1.0}, "dropout"),
        ("mlp", {"input_dim": 4, "hidden_dims": (8, -1)}, "hidden_dims"),
        ("mlp", {"input_dim": 4, "hidden_dims": 8}, "hidden_dims"),
        ("resnet18", {"in_channels": 0}, "in_channels"),
        ("resnet18", {"small_input": "yes"}, "small_input"),
    ]
    for name, kwargs, word in bad:
        with pytest.raises(ConfigError, match=word):
            build_model(name, **kwargs)
    with pytest.raises(ConfigError, match="embedding dimension"):
        build_model("mlp", 0, input_dim=4)
    with pytest.raises(ConfigError, match="out_features"):
        Embedder(nn.ReLU(), 2)


def test_wrong_input_shapes_raise_data_error() -> None:
    with pytest.raises(DataError, match=r"\(B, 1, H, W\)"):
        SmallCNN()(torch.zeros(2, 3, 28, 28))
    with pytest.raises(DataError, match="4×4"):
        SmallCNN()(torch.zeros(2, 1, 3, 28))
    with pytest.raises(DataError, match=r"\(B, 3, H, W\)"):
        ResNet18()(torch.zeros(2, 32, 32))
    with pytest.raises(DataError, match=r"\(B, 4\)"):
        MLP(input_dim=4)(torch.zeros(2, 5))


def _bn(prefix: str) -> list[str]:
    return [f"{prefix}.{s}" for s in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]


def _torchvision_keys(bottleneck: bool, layers: tuple[int, int, int, int]) -> list[str]:
    """torchvision.models.resnet state-dict keys (written from its architecture), without fc.*."""
    keys = ["conv1.weight", *_bn("bn1")]
    convs = 3 if bottleneck else 2
    for layer, blocks in enumerate(layers, start=1):
        for block in range(blocks):
            prefix = f"layer{layer}.{block}"
            for c in range(1, convs + 1):
                keys += [f"{prefix}.conv{c}.weight", *_bn(f"{prefix}.bn{c}")]
            # first block: stride 2 (layers 2-4) or channel change (64 -> 256 in ResNet-50's layer1)
            if block == 0 and (layer > 1 or bottleneck):
                keys += [f"{prefix}.downsample.0.weight", *_bn(f"{prefix}.downsample.1")]
    return keys


def test_resnet18_state_dict_keys_match_torchvision() -> None:
    state = ResNet18().state_dict()
    expected = _torchvision_keys(False, (2, 2, 2, 2))
    assert len(expected) == 120  # torchvision's resnet18 has 122 entries: these plus fc.weight, fc.bias
    assert list(state) == expected
    shapes = {
        "conv1.weight": (64, 3, 7, 7),
        "layer1.0.conv1.weight": (64, 64, 3, 3),
        "layer2.0.conv1.weight": (128, 64, 3, 3),
        "layer2.0.downsample.0.weight": (128, 64, 1, 1),
        "layer2.0.downsample.1.running_mean": (128,),
        "layer4.1.conv2.weight": (512, 512, 3, 3),
        "layer4.1.bn2.num_batches_tracked": (),
    }
    for key, shape in shapes.items():
        assert tuple(state[key].shape) == shape, key
    assert count_parameters(ResNet18()) == 11_689_512 - (512 * 1000 + 1000)  # torchvision count minus fc


def test_resnet50_state_dict_keys_match_torchvision() -> None:
    model = ResNet50()
    state = model.state_dict()
    expected = _torchvision_keys(True, (3, 4, 6, 3))
    assert len(expected) == 318  # torchvision's resnet50: 320 entries including fc.weight, fc.bias
    assert list(state) == expected
    assert tuple(state["layer1.0.downsample.0.weight"].shape) == (256, 64, 1, 1)
    assert tuple(state["layer3.0.conv2.weight"].shape) == (256, 256, 3, 3)
    assert model.layer3[0].conv2.stride == (2, 2) and model.layer3[0].conv1.stride == (1, 1)  # v1.5
    assert count_parameters(model) == 25_557_032 - (2048 * 1000 + 1000)


def _torchvision_file(model: nn.Module, path: Path, *, with_fc: bool = True, drop_counters: bool = False) -> Path:
    state = dict(model.state_dict())
    if with_fc:
        state["fc.weight"] = torch.randn(1000, model.out_features)
        state["fc.bias"] = torch.randn(1000)
    if drop_counters:  # torchvision's original ImageNet files predate num_batches_tracked
        state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    torch.save(state, path)
    return path


def _trained_like(model: nn.Module) -> nn.Module:
    """Give the BN running statistics non-trivial values, so eval outputs depend on them."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.1, 0.1)
    return model.eval()


@pytest.mark.parametrize("drop_counters", [False, True])
def test_resnet18_weights_round_trip(tmp_path: Path, drop_counters: bool) -> None:
    source = _trained_like(ResNet18())
    path = _torchvision_file(source, tmp_path / "resnet18.pth", drop_counters=drop_counters)
    loaded = ResNet18(weights_path=str(path)).eval()
    fresh = ResNet18().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), source(x))
        assert not torch.allclose(fresh(x), source(x))
    model = build_model("resnet18", 8, weights_path=path)
    assert torch.equal(model.backbone.layer3[1].conv2.weight, source.layer3[1].conv2.weight)


def test_resnet_mismatched_files_raise_checkpoint_error(tmp_path: Path) -> None:
    state = ResNet18().state_dict()
    missing = {k: v for k, v in state.items() if k != "layer1.0.conv1.weight"}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"1 missing key\(s\): layer1.0.conv1.weight"):
        ResNet18(weights_path=tmp_path / "missing.pth")

    torch.save({**state, "layer5.0.conv1.weight": torch.zeros(1)}, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match="unexpected key.*layer5.0.conv1.weight"):
        ResNet18(weights_path=tmp_path / "extra.pth")

    shaped = dict(state)
    shaped["layer2.0.conv1.weight"] = torch.zeros(128, 64, 5, 5)
    torch.save(shaped, tmp_path / "shape.pth")
    with pytest.raises(CheckpointError, match=r"layer2.0.conv1.weight \(128, 64, 5, 5\) vs \(128, 64, 3, 3\)"):
        ResNet18(weights_path=tmp_path / "shape.pth")

    _torchvision_file(ResNet50(), tmp_path / "resnet50.pth")
    with pytest.raises(CheckpointError, match=r"198 unexpected key.*23 shape mismatch") as info:
        ResNet18(weights_path=tmp_path / "resnet50.pth")
    assert "and " in str(info.value) and "more" in str(info.value)  # long lists are cut

    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="not a torchvision-format state dict"):
        ResNet18(weights_path=tmp_path / "list.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        ResNet18(weights_path=tmp_path / "garbage.pth")
    with pytest.raises(DataError, match="does not exist"):
        ResNet18(weights_path=tmp_path / "absent.pth")


@pytest.mark.parametrize("in_channels", [1, 2])
def test_rgb_weights_adapted_to_other_channel_counts(tmp_path: Path, in_channels: int) -> None:
    source = _trained_like(ResNet18())
    path = _torchvision_file(source, tmp_path / "rgb.pth")
    adapted = ResNet18(weights_path=path, in_channels=in_channels).eval()
    assert adapted.conv1.weight.shape == (64, in_channels, 7, 7)
    grey = torch.randn(2, 1, 48, 48)
    with torch.no_grad():
        expected = source(grey.repeat(1, 3, 1, 1))
        actual = adapted(grey.repeat(1, in_channels, 1, 1))
    assert torch.allclose(actual, expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(adapted.layer1[0].conv1.weight, source.layer1[0].conv1.weight)


def test_small_input_skips_large_stem_with_warning(tmp_path: Path) -> None:
    source = _trained_like(ResNet18())
    path = _torchvision_file(source, tmp_path / "rgb.pth")
    with pytest.warns(UserWarning, match="7×7 conv1.weight skipped"):
        model = ResNet18(weights_path=path, small_input=True)
    assert model.conv1.weight.shape == (64, 3, 3, 3)
    assert torch.equal(model.bn1.running_var, source.bn1.running_var)
    assert torch.equal(model.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    # a 3×3 stem saved by a small-input model loads without warning
    small = ResNet18(small_input=True)
    torch.save(small.state_dict(), tmp_path / "small.pth")
    again = ResNet18(weights_path=tmp_path / "small.pth", small_input=True)
    assert torch.equal(again.conv1.weight, small.conv1.weight)


def test_count_parameters() -> None:
    model = build_model("small_cnn", 64)
    assert count_parameters(model.backbone) == 93_120
    assert count_parameters(model) == 101_376  # the PML baseline network of env.md §3d
    model.backbone.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == 128 * 64 + 64
    assert count_parameters(model) == 101_376


def test_model_fingerprint() -> None:
    torch.manual_seed(0)
    a = build_model("mlp", 8, input_dim=4)
    torch.manual_seed(1)
    b = build_model("mlp", 8, input_dim=4)
    fingerprint = model_fingerprint(a)
    assert len(fingerprint) == 64 and int(fingerprint, 16) >= 0
    assert model_fingerprint(b) == fingerprint  # weights do not enter by default
    assert model_fingerprint(a, include_weights=True) != model_fingerprint(b, include_weights=True)
    b.load_state_dict(a.state_dict())
    assert model_fingerprint(a, include_weights=True) == model_fingerprint(b, include_weights=True)
    others = [
        build_model("mlp", 9, input_dim=4),
        build_model("mlp", 8, normalize=False, input_dim=4),
        build_model("mlp", 8, input_dim=4, dropout=0.5),
        build_model("mlp", 8, input_dim=5),
        Embedder(MLP(input_dim=4), 8),  # same shapes, no config
    ]
    assert len({fingerprint, *map(model_fingerprint, others)}) == 1 + len(others)


def test_fingerprint_ignores_weights_path(tmp_path: Path) -> None:
    path = tmp_path / "w.pth"
    torch.save(ResNet18().state_dict(), path)
    assert model_fingerprint(build_model("resnet18", weights_path=str(path))) == model_fingerprint(
        build_model("resnet18")
    )


def test_fingerprint_stable_across_processes() -> None:
    code = (
        "import torch; torch.set_num_threads(1)\n"
        "from deepmetric.models.embedder import build_model, model_fingerprint\n"
        "print(model_fingerprint(build_model('small_cnn', 32, width=8)))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "123", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.strip() == model_fingerprint(build_model("small_cnn", 32, width=8))


def test_public_namespace() -> None:
    assert models.Embedder is Embedder and models.build_model is build_model
    assert models.count_parameters is count_parameters and models.model_fingerprint is model_fingerprint
    assert {"Embedder", "build_model", "count_parameters", "model_fingerprint", "ResNet18"} <= set(models.__all__)
