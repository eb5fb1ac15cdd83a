"""The mapping functions psi: which frames of a video each latent frame stands for (paper section 3.2).

A causal 4x temporal VAE maps ``1 + t*k`` frames to ``1 + k`` latent frames. To compare its latents with a 2D image
VAE's, every latent frame needs a target frame: psi picks (or makes) ``1 + k`` frames from the ``1 + t*k``. Training
uses psi for the latent regularisation (the frozen image decoder must turn the video latents into psi(x)), and
evaluation uses the same functions for cross-decoding, so that both measure the same thing.
"""

from __future__ import annotations

import torch
from einops import rearrange

from ..errors import ConfigError

MAPPINGS = ("first", "average", "slice", "random")


def psi(x: torch.Tensor, mapping: str, t: int = 4, generator: torch.Generator | None = None,
        frame_weights: tuple[float, ...] | None = None) -> torch.Tensor:
    """Latent-frame targets of a video (B, C, 1+t*k, H, W): (B, C, 1+k, H, W) (1 frame for `first`).

    Frame 0 always maps to latent 0; group j (frames t*j+1 .. t*j+t) maps to latent j+1 through:
    average -> the group mean; slice -> its last frame (frames 0, t, 2t, ... as released);
    random -> one of its frames, drawn independently for every sample and group (uniformly, or in proportion to
    `frame_weights`, one weight per frame of a group); first -> no target.
    """
    B, C, T, H, W = x.shape
    if (T - 1) % t:
        raise ValueError(f"psi needs 1 + {t}k frames, got {T}")
    if mapping == "first" or T == 1:
        return x[:, :, :1]
    groups = rearrange(x[:, :, 1:], "b c (k t) h w -> b c k t h w", t=t)
    if mapping == "average":
        rest = groups.mean(dim=3)
    elif mapping == "slice":
        rest = groups[:, :, :, -1]
    elif mapping == "random":
        k = groups.shape[2]
        if frame_weights is None:
            pick = torch.randint(0, t, (B, k), generator=generator, device="cpu")
        else:
            probs = torch.tensor(frame_weights, dtype=torch.float64).expand(B * k, t)
            pick = torch.multinomial(probs, 1, replacement=True, generator=generator).view(B, k)
        pick = pick.to(x.device)
        index = pick[:, None, :, None, None, None].expand(B, C, k, 1, H, W)
        rest = groups.gather(3, index).squeeze(3)
    else:
        raise ConfigError(f"unknown mapping {mapping!r}; use one of {MAPPINGS}")
    return torch.cat([x[:, :, :1], rest], dim=2)


def frames_of(video: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) -> (B*T, C, H, W): a video as a batch of frames, for a 2D model."""
    return rearrange(video, "b c t h w -> (b t) c h w")


def videos_of(frames: torch.Tensor, batch: int) -> torch.Tensor:
    """(B*T, C, H, W) -> (B, C, T, H, W): the inverse of :func:`frames_of`."""
    return rearrange(frames, "(b t) c h w -> b c t h w", b=batch)
