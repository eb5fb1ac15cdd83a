"""The official 3D PatchGAN discriminator (`NLayerDiscriminator3D`) and the GAN loss helpers.

Structure, module names and init follow the official `lvdm/modules/autoencoding/lpips/model/model.py`
with the training config (half_3d False, causal False, no ActNorm), so an official discriminator state
dict loads once its `temb_proj` entries are dropped. One deliberate difference: the official
`ResnetBlockDown3D` builds a `temb_proj = Linear(512, out)` that its forward never uses (no time
embedding is passed); those parameters get no gradient, which is why the official config needs DDP
`find_unused_parameters=True`. They are left out here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError


def _pool(x: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, C, ceil(T/2), H//2, W//2): a copy of frame 0 goes in front when T is odd."""
    if x.shape[2] % 2 == 1:
        x = torch.cat([x[:, :, :1], x], dim=2)
    return F.avg_pool3d(x, kernel_size=2, stride=2)


class ResnetBlockDown3D(nn.Module):
    """GN -> SiLU -> conv1 -> [pool] -> GN -> SiLU -> conv2, plus a [pooled] (1x1x1 when widths differ) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, downsample: bool = True, norm_groups: int = 32) -> None:
        super().__init__()
        self.downsample = downsample
        self.norm1 = nn.GroupNorm(norm_groups, in_channels, eps=1e-5)
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(norm_groups, out_channels, eps=1e-5)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, T, H, W) -> (B, C_out, T', H', W'); T' = ceil(T/2), H' = H//2 when downsampling."""
        h = self.conv1(F.silu(self.norm1(x)))
        if self.downsample:
            h, x = _pool(h), _pool(x)
        h = self.conv2(F.silu(self.norm2(h)))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


def weights_init(m: nn.Module) -> None:
    """The official init: weights of every module whose class name contains "Conv" ~ N(0, 0.02); biases kept."""
    if "Conv" in type(m).__name__:
        nn.init.normal_(m.weight, 0.0, 0.02)


class NLayerDiscriminator3D(nn.Module):
    """3D PatchGAN on videos (B, input_nc, T, H, W) in [-1, 1] -> patch logits (B, 1, T', H', W').

    Layers (`main`): Conv3d(input_nc -> ndf, k3, stride 2, pad 1) + LeakyReLU(0.2); for n in
    1 .. n_layers-2 a downsampling `ResnetBlockDown3D` to ndf*min(2^n, 8) + GN + LeakyReLU; two
    non-downsampling blocks to ndf*min(2^n_layers, 8), each + GN + LeakyReLU; Conv3d(-> 1, k3, pad 1).
    Default (ndf 64, n_layers 4): 64 -> 128 (down) -> 256 (down) -> 512 -> 512 -> 1.

    Shapes: T' = ceil(T / 2^(n_layers-1)) (an image, T=1, stays T=1) and
    H' = floor(ceil(H/2) / 2^(n_layers-2)); 17x256x256 -> 3x32x32.
    `norm_groups` (official: 32) must divide every width; the official init (`weights_init`) is applied.
    """

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 4, norm_groups: int = 32) -> None:
        super().__init__()
        widths = [ndf * min(2**n, 8) for n in range(1, n_layers - 1)] + [ndf * min(2**n_layers, 8)] * 2
        if n_layers < 1 or any(c % norm_groups for c in [ndf, *widths]):
            raise ConfigError(f"discriminator needs n_layers >= 1 and norm_groups ({norm_groups}) dividing every "
                              f"width {[ndf, *widths]}")
        layers: list[nn.Module] = [nn.Conv3d(input_nc, ndf, 3, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        c = ndf
        for i, w in enumerate(widths):
            down = i < len(widths) - 2
            layers += [ResnetBlockDown3D(c, w, down, norm_groups), nn.GroupNorm(norm_groups, w, eps=1e-5),
                       nn.LeakyReLU(0.2, True)]
            c = w
        layers.append(nn.Conv3d(c, 1, 3, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(weights_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) -> logits (B, 1, T', H', W'); see the class docstring for T', H'."""
        return self.main(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge discriminator loss 0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake))), a scalar."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_weight(nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, scale: float = 0.5,
                    max: float = 1e4) -> torch.Tensor:  # noqa: A002 - the official name
    """VQGAN's balance: scale * clamp(|d nll/d last| / (|d g/d last| + 1e-4), 0, max), detached (a scalar).

    `last_layer` is the decoder's last weight (official: `decoder.conv_out.weight`); both graphs are kept.
    """
    nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    d = nll_grad.norm() / (g_grad.norm() + 1e-4)
    return d.clamp(0.0, max).detach() * scale
