"""Reconstruction metrics on frames in [0, 1].

- PSNR: 10 log10(1 / MSE) per frame over all pixels and channels, then averaged over frames
  (the convention of Open-Sora-Plan and WF-VAE evaluations). Identical frames give +inf; callers
  that average cap it (see `psnr`).
- SSIM: Wang et al. 2004 with an 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, data range 1,
  valid (unpadded) filtering, computed per channel and averaged; the same definition as
  scikit-image's `structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
  data_range=1)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PSNR_CAP = 100.0  # dB reported for identical frames


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-frame PSNR in dB of frames (N, C, H, W) in [0, 1], capped at PSNR_CAP."""
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(1.0 / mse.clamp_min(10 ** (-PSNR_CAP / 10)))).float()


def _gaussian(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - size // 2) ** 2) / (2 * sigma**2))
    return g / g.sum()


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-frame SSIM of frames (N, C, H, W) in [0, 1] (definition in the module docstring)."""
    x, y = x.double(), y.double()
    C = x.shape[1]
    g = _gaussian().to(x.device)
    w = (g[:, None] * g[None, :]).expand(C, 1, 11, 11)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, w, groups=C)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1).float()
