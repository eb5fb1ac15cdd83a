"""LPIPS (Zhang et al. 2018), VGG16 variant with the v0.1 linear heads, without torchvision.

The distance is exactly the `lpips` package's `LPIPS(net="vgg", version="0.1")`:
inputs in [-1, 1] are shifted and scaled per channel (`ScalingLayer`), run through the VGG16 conv
trunk, and at each of the taps relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 the features are
unit-normalised over channels (eps 1e-10), differenced, squared, weighted by a non-negative 1x1 head
(no bias), averaged over space and summed over taps.

Weights:
- The heads (~6 KB) ship with cvvae in `assets/lpips_vgg_v0.1.safetensors`, converted from
  `lpips==0.1.4` `lpips/weights/v0.1/vgg.pth` (BSD-2-Clause, `assets/LICENSE-lpips.txt`).
- The trunk is torchvision's ImageNet VGG16 (`vgg16-397923af.pth`, 528 MB), which cvvae does not
  ship: pass its path, a safetensors file or a state dict with the same `features.*` keys, or set
  CVVAE_VGG16; otherwise torch.hub's cache or download is tried.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from ..errors import CheckpointError, InputError

VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
HEADS_PATH = Path(__file__).resolve().parent / "assets" / "lpips_vgg_v0.1.safetensors"
NO_TRUNK = ("LPIPS needs ImageNet VGG16 weights: pass a path to vgg16-397923af.pth (torchvision) or set "
            "CVVAE_VGG16; or train with perceptual_weight 0")

# torchvision vgg16 `features` up to relu5_3 (its final max-pool, index 30, is not needed): ints are
# 3x3 convs (padding 1) each followed by a ReLU, "M" a 2x2 max-pool.
_CFG: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
TAPS = (3, 8, 15, 22, 29)  # `features` indices whose outputs are relu1_2 ... relu5_3
CHANNELS = (64, 128, 256, 512, 512)


class VGG16Features(nn.Module):
    """The VGG16 conv trunk; `state_dict()` keys equal torchvision's `features.0.weight` ... `features.28.bias`."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = 3
        for v in _CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, int(v), 3, padding=1), nn.ReLU()]
                c = int(v)
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(N, 3, H, W) normalised images -> the 5 tap activations, (N, C_k, H / 2^k, W / 2^k)."""
        taps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in TAPS:
                taps.append(x)
        return taps


def _read(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"VGG16 weights not found: {path}")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's checkpoint problem
        raise CheckpointError(f"cannot read VGG16 weights {path}: {type(e).__name__}: {e}".splitlines()[0]) from None
    if not isinstance(sd, dict):
        raise CheckpointError(f"VGG16 weights {path} hold a {type(sd).__name__}, not a state dict")
    return sd


def _trunk_state(trunk: str | Path | dict | None) -> tuple[dict[str, torch.Tensor], str]:
    """Resolve `trunk` (see `LPIPS`) to a state dict and a description of where it came from."""
    if isinstance(trunk, dict):
        return trunk, "the given state dict"
    if trunk is not None:
        return _read(trunk), str(trunk)
    env = os.environ.get("CVVAE_VGG16")
    if env:
        return _read(env), f"CVVAE_VGG16={env}"
    try:
        sd = torch.hub.load_state_dict_from_url(VGG16_URL, map_location="cpu", progress=False, check_hash=True,
                                                weights_only=True)
    except Exception:  # noqa: BLE001 - offline, blocked, corrupt cache: all mean "no trunk"
        raise CheckpointError(NO_TRUNK) from None
    return sd, VGG16_URL


def _features_only(sd: dict[str, torch.Tensor], source: str, expected: dict[str, torch.Size]) -> dict:
    """Keep the `features.*` entries (torchvision's `classifier.*` is ignored); check names and shapes."""
    feats = {k: v for k, v in sd.items() if k.startswith("features.")}
    missing = [k for k in expected if k not in feats]
    extra = [k for k in feats if k not in expected]
    if missing or extra:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + ([f"unexpected {', '.join(extra)}"]
                                                                         if extra else [])
        raise CheckpointError(f"VGG16 weights from {source} do not fit the trunk: {'; '.join(parts)}")
    bad = [f"{k} {tuple(v.shape)} != {tuple(expected[k])}" for k, v in feats.items() if v.shape != expected[k]]
    if bad:
        raise CheckpointError(f"VGG16 weights from {source} have wrong shapes: {', '.join(bad)}")
    return feats


class LPIPS(nn.Module):
    """Frozen LPIPS-VGG v0.1 distance; a training loss, so gradients flow to its inputs.

    `trunk`: a path to torchvision's `vgg16-397923af.pth` (or any torch/safetensors file with its
    `features.*` keys), a state dict, or None (CVVAE_VGG16, then the torch.hub cache/download).
    Raises CheckpointError when no trunk can be had or it does not fit.
    """

    def __init__(self, trunk: str | Path | dict | None = None) -> None:
        super().__init__()
        self.net = VGG16Features()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in CHANNELS)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)

        sd, source = _trunk_state(trunk)
        self.net.load_state_dict(_features_only(sd, source, {k: v.shape for k, v in self.net.state_dict().items()}))
        self._load_heads()
        self.requires_grad_(False)
        self.eval()

    def _load_heads(self) -> None:
        try:
            heads = load_file(str(HEADS_PATH))
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"cannot read the LPIPS heads {HEADS_PATH}: {e}".splitlines()[0]) from None
        for i, lin in enumerate(self.lins):
            lin.weight.data.copy_(heads[f"lin{i}.model.1.weight"])

    @classmethod
    def random_trunk(cls, seed: int = 0) -> LPIPS:
        """For tests only: a randomly initialised trunk (Kaiming weights, small biases) with the real heads."""
        g = torch.Generator().manual_seed(seed)
        sd = {}
        for k, v in VGG16Features().state_dict().items():
            if k.endswith("weight"):
                sd[k] = torch.randn(v.shape, generator=g) * (2.0 / v[0].numel()) ** 0.5
            else:
                sd[k] = 0.01 * torch.randn(v.shape, generator=g)
        return cls(trunk=sd)

    def train(self, mode: bool = True) -> LPIPS:
        """Always stays in eval mode (it is a fixed metric)."""
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """LPIPS between images x and y, both (N, 3, H, W) in [-1, 1] -> (N,)."""
        if x.ndim != 4 or x.shape[1] != 3 or x.shape != y.shape:
            raise InputError(f"LPIPS takes two (N, 3, H, W) batches of equal shape, got {tuple(x.shape)} and "
                             f"{tuple(y.shape)}")
        dtype = self.shift.dtype
        n = x.shape[0]
        z = (torch.cat([x, y]).to(dtype) - self.shift) / self.scale
        dist = z.new_zeros(n)
        for f, lin in zip(self.net(z), self.lins):
            f = f / (f.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            dist = dist + lin((f[:n] - f[n:]).pow(2)).mean((1, 2, 3))
        return dist


def local_lpips(trunk: str | Path | None = None) -> LPIPS | None:
    """LPIPS for evaluation without a download: from `trunk`, else CVVAE_VGG16, else torch.hub's cached
    `vgg16-397923af.pth`; None when none of them is on this machine (the report then says LPIPS is n/a)."""
    if trunk is None and not os.environ.get("CVVAE_VGG16"):
        cached = Path(torch.hub.get_dir()) / "checkpoints" / VGG16_URL.rsplit("/", 1)[1]
        if not cached.is_file():
            return None
        trunk = cached
    return LPIPS(trunk)
