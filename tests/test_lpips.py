"""LPIPS-VGG without torchvision: trunk layout, the formula, the shipped heads, weight loading and errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from cvvae.errors import CheckpointError
from cvvae.eval import lpips as lp
from cvvae.eval.lpips import LPIPS, VGG16Features

# torchvision `vgg16(weights=IMAGENET1K_V1).state_dict()`, the `features.*` part, in file order.
TORCHVISION_VGG16_FEATURES = [
    ("features.0.weight", (64, 3, 3, 3)), ("features.0.bias", (64,)),
    ("features.2.weight", (64, 64, 3, 3)), ("features.2.bias", (64,)),
    ("features.5.weight", (128, 64, 3, 3)), ("features.5.bias", (128,)),
    ("features.7.weight", (128, 128, 3, 3)), ("features.7.bias", (128,)),
    ("features.10.weight", (256, 128, 3, 3)), ("features.10.bias", (256,)),
    ("features.12.weight", (256, 256, 3, 3)), ("features.12.bias", (256,)),
    ("features.14.weight", (256, 256, 3, 3)), ("features.14.bias", (256,)),
    ("features.17.weight", (512, 256, 3, 3)), ("features.17.bias", (512,)),
    ("features.19.weight", (512, 512, 3, 3)), ("features.19.bias", (512,)),
    ("features.21.weight", (512, 512, 3, 3)), ("features.21.bias", (512,)),
    ("features.24.weight", (512, 512, 3, 3)), ("features.24.bias", (512,)),
    ("features.26.weight", (512, 512, 3, 3)), ("features.26.bias", (512,)),
    ("features.28.weight", (512, 512, 3, 3)), ("features.28.bias", (512,)),
]
HEAD_SHAPES = [(1, 64, 1, 1), (1, 128, 1, 1), (1, 256, 1, 1), (1, 512, 1, 1), (1, 512, 1, 1)]


def fake_trunk(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * ((2.0 / torch.Size(s)[1:].numel()) ** 0.5 if len(s) > 1 else 0.1)
            for k, s in TORCHVISION_VGG16_FEATURES}


@pytest.fixture(scope="module")
def trunk_sd() -> dict[str, torch.Tensor]:
    return fake_trunk()


@pytest.fixture(scope="module")
def torchvision_file(tmp_path_factory, trunk_sd) -> str:
    """A torchvision-style file: `features.*` plus (shrunken) `classifier.*` entries."""
    path = tmp_path_factory.mktemp("vgg") / "vgg16-397923af.pth"
    torch.save({**trunk_sd, "classifier.0.weight": torch.randn(8, 16), "classifier.0.bias": torch.randn(8),
                "classifier.6.weight": torch.randn(10, 8), "classifier.6.bias": torch.randn(10)}, path)
    return str(path)


@pytest.fixture(scope="module")
def model(trunk_sd) -> LPIPS:
    return LPIPS(trunk_sd)


def images(n: int = 2, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g) * 2 - 1
    return x, (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(-1, 1)


def test_trunk_keys_match_torchvision():
    assert [(k, tuple(v.shape)) for k, v in VGG16Features().state_dict().items()] == TORCHVISION_VGG16_FEATURES


def test_taps_are_relu_outputs_at_the_lpips_indices():
    taps = VGG16Features()(torch.randn(1, 3, 32, 32))
    assert [tuple(t.shape) for t in taps] == [(1, 64, 32, 32), (1, 128, 16, 16), (1, 256, 8, 8), (1, 512, 4, 4),
                                              (1, 512, 2, 2)]
    assert all((t >= 0).all() for t in taps)


def test_heads_shipped_with_right_shapes_and_nonnegative(model):
    heads = load_file(str(lp.HEADS_PATH))
    assert sorted(heads) == [f"lin{i}.model.1.weight" for i in range(5)]
    for i, shape in enumerate(HEAD_SHAPES):
        w = heads[f"lin{i}.model.1.weight"]
        assert tuple(w.shape) == shape and (w >= 0).all() and w.sum() > 0
        assert torch.equal(model.lins[i].weight, w)
    assert (lp.HEADS_PATH.parent / "LICENSE-lpips.txt").read_text().startswith("Copyright (c) 2018, Richard Zhang")


def test_identical_inputs_give_zero(model):
    x, _ = images()
    torch.testing.assert_close(model(x, x), torch.zeros(2), atol=1e-10, rtol=0)


def hand_lpips(sd: dict, heads: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """LPIPS written out layer by layer from the paper/lpips package definitions, in float64."""
    # lpips' ScalingLayer holds these as float32 tensors; their float32 rounding is part of the metric.
    shift = torch.tensor([-0.030, -0.088, -0.188]).double().view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).double().view(1, 3, 1, 1)
    stages = [[0, 2], [5, 7], [10, 12, 14], [17, 19, 21], [24, 26, 28]]  # convs of each stage; pool between

    def trunk(img: torch.Tensor) -> list[torch.Tensor]:
        h, outs = (img.double() - shift) / scale, []
        for s, convs in enumerate(stages):
            if s > 0:
                h = F.max_pool2d(h, kernel_size=2, stride=2)
            for i in convs:
                h = F.relu(F.conv2d(h, sd[f"features.{i}.weight"].double(), sd[f"features.{i}.bias"].double(),
                                    padding=1))
            outs.append(h)
        return outs

    total = torch.zeros(x.shape[0], dtype=torch.float64)
    for k, (a, b) in enumerate(zip(trunk(x), trunk(y))):
        a = a / (torch.sqrt((a * a).sum(dim=1, keepdim=True)) + 1e-10)
        b = b / (torch.sqrt((b * b).sum(dim=1, keepdim=True)) + 1e-10)
        w = heads[f"lin{k}.model.1.weight"].double().view(1, -1, 1, 1)
        total += ((a - b) ** 2 * w).sum(dim=1).mean(dim=(1, 2))
    return total


def test_matches_hand_computation(trunk_sd):
    x, y = images(n=3)
    expected = hand_lpips(trunk_sd, load_file(str(lp.HEADS_PATH)), x, y)
    got = LPIPS(trunk_sd).double()(x.double(), y.double())
    assert got.shape == (3,) and (expected > 0).all()
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_frozen_eval_but_gradients_reach_inputs(model):
    model.train()
    assert not model.training and not any(m.training for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())
    x, y = images()
    x.requires_grad_(True)
    model(x, y).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_loads_torchvision_style_file_and_env_var(torchvision_file, model, monkeypatch):
    x, y = images()
    from_file = LPIPS(torchvision_file)
    torch.testing.assert_close(from_file(x, y), model(x, y), rtol=0, atol=0)
    monkeypatch.setenv("CVVAE_VGG16", torchvision_file)
    torch.testing.assert_close(LPIPS()(x, y), model(x, y), rtol=0, atol=0)


def test_missing_key_is_named(trunk_sd, tmp_path):
    path = tmp_path / "vgg.pth"
    torch.save({k: v for k, v in trunk_sd.items() if k != "features.28.bias"}, path)
    with pytest.raises(CheckpointError, match=r"missing features\.28\.bias"):
        LPIPS(path)
    with pytest.raises(CheckpointError, match=r"unexpected features\.30\.weight"):
        LPIPS({**trunk_sd, "features.30.weight": torch.zeros(1)})


def test_no_trunk_available(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.delenv("CVVAE_VGG16", raising=False)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(CheckpointError) as info:
        LPIPS()
    assert str(info.value) == ("LPIPS needs ImageNet VGG16 weights: pass a path to vgg16-397923af.pth (torchvision) "
                               "or set CVVAE_VGG16; or train with perceptual_weight 0")
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_random_trunk_is_deterministic():
    x, y = images()
    a, b = LPIPS.random_trunk(seed=3), LPIPS.random_trunk(seed=3)
    torch.testing.assert_close(a(x, y), b(x, y), rtol=0, atol=0)
    assert (a(x, y) > 0).all()
