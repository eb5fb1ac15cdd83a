"""The official 3D PatchGAN: shape rule, parameter count, init, official key layout; hinge loss, adaptive weight."""

from __future__ import annotations

import math

import pytest
import torch

from cvvae.errors import ConfigError
from cvvae.train.discriminator import NLayerDiscriminator3D, _pool, adaptive_weight, hinge_d_loss


def small(**kw) -> NLayerDiscriminator3D:
    torch.manual_seed(0)
    return NLayerDiscriminator3D(**{"ndf": 8, "norm_groups": 4, **kw})


def expected_shape(b: int, t: int, h: int, w: int, n_layers: int = 4) -> tuple[int, ...]:
    # conv0 (k3, s2, p1): n -> floor((n - 1) / 2) + 1 = ceil(n / 2) on T, H and W.
    # each of the n_layers - 2 downsampling blocks: T -> ceil(T / 2) (frame 0 prepended when odd, then pool 2),
    # H -> floor(H / 2) (avg_pool3d drops an odd last row); the last two blocks and the k3 p1 head keep shapes.
    t, h, w = math.ceil(t / 2), math.ceil(h / 2), math.ceil(w / 2)
    for _ in range(n_layers - 2):
        t, h, w = math.ceil(t / 2), h // 2, w // 2
    return (b, 1, t, h, w)


@pytest.mark.parametrize("t,h,w", [(17, 64, 64), (16, 64, 64), (1, 64, 64), (5, 40, 24)])
def test_shape_rule(t, h, w):
    d = small()
    with torch.no_grad():
        out = d(torch.randn(1, 3, t, h, w))
    assert tuple(out.shape) == expected_shape(1, t, h, w)


def test_shape_examples():
    assert expected_shape(1, 17, 256, 256) == (1, 1, 3, 32, 32)  # the official figure
    assert expected_shape(1, 17, 64, 64) == (1, 1, 3, 8, 8)  # T 17 -> 9 -> 5 -> 3; H 64 -> 32 -> 16 -> 8
    assert expected_shape(2, 1, 64, 64) == (2, 1, 1, 8, 8)  # an image stays T = 1


def test_other_depths():
    with torch.no_grad():
        for n in (2, 3, 5):
            out = small(n_layers=n)(torch.randn(1, 3, 9, 64, 64))
            assert tuple(out.shape) == expected_shape(1, 9, 64, 64, n)


def test_odd_frame_count_prepends_frame_zero_before_pooling():
    x = torch.tensor([1.0, 5.0, 9.0]).view(1, 1, 3, 1, 1).expand(1, 1, 3, 2, 2)
    assert _pool(x).flatten().tolist() == [1.0, 7.0]  # pairs (1, 1) and (5, 9)
    assert _pool(x[:, :, 1:]).flatten().tolist() == [7.0]


def default_param_count() -> int:
    conv = lambda cin, cout, k=3: cin * cout * k**3 + cout  # noqa: E731
    gn = lambda c: 2 * c  # noqa: E731

    def block(cin: int, cout: int) -> int:
        return gn(cin) + conv(cin, cout) + gn(cout) + conv(cout, cout) + (conv(cin, cout, 1) if cin != cout else 0)

    widths = [(64, 128), (128, 256), (256, 512), (512, 512)]
    return conv(3, 64) + sum(block(a, b) + gn(b) for a, b in widths) + conv(512, 1)


def test_default_parameter_count_and_official_layout():
    d = NLayerDiscriminator3D()
    assert default_param_count() == 28_292_737  # the official adds 722_304 unused temb_proj parameters
    assert sum(p.numel() for p in d.parameters()) == 28_292_737
    keys = set(d.state_dict())
    assert {"main.0.weight", "main.2.norm1.weight", "main.2.nin_shortcut.weight", "main.3.weight",
            "main.11.conv2.bias", "main.12.bias", "main.14.weight"} <= keys
    assert "main.11.nin_shortcut.weight" not in keys and not any("temb_proj" in k for k in keys)
    blocks = [d.main[i] for i in (2, 5, 8, 11)]
    assert [b.conv2.out_channels for b in blocks] == [128, 256, 512, 512]
    assert [b.downsample for b in blocks] == [True, True, False, False]


def test_init_std():
    torch.manual_seed(0)
    d = NLayerDiscriminator3D()
    w = torch.cat([m.weight.flatten() for m in d.modules() if isinstance(m, torch.nn.Conv3d)])
    assert abs(w.std().item() - 0.02) < 2e-4 and abs(w.mean().item()) < 2e-4
    gn = [m for m in d.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in gn)  # norms are not touched


def test_bad_groups():
    with pytest.raises(ConfigError, match="norm_groups"):
        NLayerDiscriminator3D(ndf=8)


def test_hinge_loss():
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - real) = 0, 0.5, 2 -> mean 5/6
    fake = torch.tensor([-2.0, 0.0, 1.0])  # relu(1 + fake) = 0, 1, 2  -> mean 1
    torch.testing.assert_close(hinge_d_loss(real, fake), torch.tensor(0.5 * (5 / 6 + 1)))
    assert hinge_d_loss(torch.full((4,), 3.0), torch.full((4,), -3.0)).item() == 0.0


def test_adaptive_weight():
    last = torch.zeros(2, requires_grad=True)
    h = 3 * last
    nll = (torch.tensor([1.0, 4.0 / 3.0]) * h).sum()  # d nll / d last = (3, 4): norm 5
    g = (torch.tensor([0.4, 0.0]) * h).sum()  # d g / d last = (1.2, 0): norm 1.2
    d = adaptive_weight(nll, g, last)
    torch.testing.assert_close(d, torch.tensor(0.5 * 5 / (1.2 + 1e-4)))
    assert not d.requires_grad
    (nll + d * g).backward()  # both graphs were retained
    torch.testing.assert_close(last.grad, torch.tensor([3.0 + d.item() * 1.2, 4.0]))

    h = 3 * last
    nll = (torch.tensor([1.0, 4.0 / 3.0]) * h).sum()
    flat = (0 * h).sum()  # zero generator gradient: 5 / 1e-4 = 5e4 is clamped to max
    assert adaptive_weight(nll, flat, last, scale=1.0).item() == pytest.approx(1e4)
    assert adaptive_weight(nll, flat, last, scale=0.5, max=10.0).item() == pytest.approx(5.0)
