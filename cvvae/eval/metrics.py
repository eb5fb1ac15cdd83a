"""Reconstruction metrics on frames in [0, 1].

- PSNR: 10 log10(1 / MSE) per frame over all pixels and channels, then averaged over frames
  (the convention of Open-Sora-Plan and WF-VAE evaluations). Identical frames give +inf; callers
  that average cap it (see `psnr`).
- SSIM: Wang et al. 2004 with an 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, data range 1,
  valid (unpadded) filtering, computed per channel and averaged; the same definition as
  scikit-image's `structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
  data_range=1)`.
- Temporal error: per transition t -> t+1, the mean absolute difference between the output's frame-to-frame
  change and the input's, |(y[t+1] - y[t]) - (x[t+1] - x[t])|: what flicker and jumps add, which per-frame PSNR
  averages away.
- Seam ratio: the temporal error of the transitions across each handover between temporal rounds (into and
  out of the shared boundary frame f of released rounds, f-1 -> f and f -> f+1; across the frames a blend mixes
  from both rounds) over that of the transitions 3 to 5 frames before and after it (f-6 -> f-5 .. f-4 -> f-3 and
  f+3 -> f+4 .. f+5 -> f+6 for released rounds), pooled over the handovers: about 1 without seams (the content's
  own variation), above 1 where rounds hand over visibly.
- Motion: a clip's mean absolute frame difference, mean |x[t+1] - x[t]| in 0-255 levels at the evaluated size and
  stride, and its level (`MOTION_LEVELS`): what the compatibility gaps of the slice and random mappings depend on.
"""

from __future__ import annotations

import math

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


SSIM_CHUNK_VALUES = 1 << 22  # frames are scored in groups of about this many values: ~0.5 GB of temporaries


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-frame SSIM of frames (N, C, H, W) in [0, 1] (definition in the module docstring).

    Frames are scored a few at a time, so memory stays bounded whatever N and the frame size (all 17 frames of a
    720p piece at once took 6 GB of float64 temporaries)."""
    step = max(1, SSIM_CHUNK_VALUES // max(1, math.prod(x.shape[1:])))
    if x.shape[0] <= step:
        return _ssim(x, y)
    return torch.cat([_ssim(x[i:i + step], y[i:i + step]) for i in range(0, x.shape[0], step)])


def _ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # The local means run in float32 on values centred at 0 (float64 convolutions have no fast CPU kernel: 8x
    # slower here), with the 11x11 Gaussian split into an 11x1 and a 1x11 pass (22 taps instead of 121) over the
    # five maps at once; the rest is float64. Within 1e-6 of scikit-image's float64 SSIM (tests/test_metrics.py).
    x, y = x.float() - 0.5, y.float() - 0.5
    C = x.shape[1]
    g = _gaussian().float().to(x.device)
    maps = torch.cat([x, y, x * x, y * y, x * y], dim=1)
    blurred = F.conv2d(F.conv2d(maps, g.view(1, 1, 11, 1).expand(5 * C, 1, 11, 1), groups=5 * C),
                       g.view(1, 1, 1, 11).expand(5 * C, 1, 1, 11), groups=5 * C).double()
    mx, my, xx, yy, xy = blurred.split(C, dim=1)
    vx, vy, cxy = xx - mx**2, yy - my**2, xy - mx * my  # shift-invariant: the centred values give the same
    mx, my = mx + 0.5, my + 0.5
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1).float()


SEAM_FAR = (3, 4, 5)  # frames between a handover and the transitions it is compared with


def temporal_error(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(T-1,) temporal error of output frames y against input frames x, both (T, C, H, W) in [0, 1]."""
    x, y = x.double(), y.double()
    return ((y[1:] - y[:-1]) - (x[1:] - x[:-1])).abs().flatten(1).mean(1).float()


def seam_ratio(error: torch.Tensor, spans: list[tuple[int, int]]) -> float | None:
    """Seam ratio (module docstring) of a (T-1,) temporal error (transition t is frame t -> t+1) at the handover
    spans (first, last frame): the transitions into the first through out of the last, over the transitions 3 to 5
    frames before the first and after the last, pooled over the spans whose neighbourhood fits in the clip; None
    when none does."""
    near, far = [], []
    for a, b in spans:
        before = [a - 1 - d for d in SEAM_FAR]  # transition into frame a - d
        after = [b + d for d in SEAM_FAR]  # transition out of frame b + d
        if min(before) >= 0 and max(after) < error.shape[0]:
            near += range(a - 1, b + 1)
            far += before + after
    if not near:
        return None
    return float(error[near].mean() / error[far].mean().clamp_min(1e-12))


# Motion levels by mean frame difference (0-255 levels): the sample media span 1.0 (a near-still zoom) to 15 (a fast
# turn); 2.5 and 6 part them into three groups of similar size, and a static camera with small moving objects
# (vtest 1.6, Megamind 2.7) falls in the first two.
MOTION_LEVELS = (("slow", 2.5), ("moderate", 6.0), ("fast", float("inf")))


def mean_frame_difference(x: torch.Tensor) -> float:
    """Mean |x[t+1] - x[t]| of frames (T, C, H, W) in [0, 1], in 0-255 levels; 0 for a single frame."""
    if x.shape[0] < 2:
        return 0.0
    return float((x[1:].double() - x[:-1].double()).abs().mean() * 255)


def motion_level(difference: float) -> str:
    """The `MOTION_LEVELS` name of a mean frame difference."""
    return next(name for name, upper in MOTION_LEVELS if difference < upper)
