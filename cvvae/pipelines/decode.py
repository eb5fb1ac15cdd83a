"""Decode diffusion latents with a CV-VAE in video mode or image mode.

Two ways to read n latent frames (the paper's Table 3):
- "video" mode: the latents are one clip of CV-VAE latents; n latents -> 1 + 4(n-1) frames
  (25 -> 97), decoded with temporal context round by round (`cvvae.codec.decode`), by default in blended
  rounds (`chunk_mode="blend"`, as `cvvae decode`: no seam every 16 frames), or as the VAE is set.
- "image" mode: each latent frame is an SD image latent, decoded as its own 1-frame clip; n -> n.

Latents come scaled as diffusion models see them: they are mapped back with
`z / scaling_factor + shift_factor` (SD/SVD: / 0.18215; SD3: / 1.5305 + 0.0609) before decoding.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch
from diffusers.utils.accelerate_utils import apply_forward_hook

from .. import codec
from ..errors import InputError
from ..model import CVVAE

DecodeMode = Literal["video", "image"]
DECODE_MODES: tuple[str, ...] = ("video", "image")


@apply_forward_hook
def _decode(vae: CVVAE, z: torch.Tensor, dtype: str | torch.dtype) -> torch.Tensor:
    # A function, not a CVVAE method, decorated like `CVVAE.decode`, so that the offload hook of
    # `pipe.enable_model_cpu_offload()` moves the VAE to the accelerator before it is read.
    return codec.decode(vae, z, dtype=dtype)


def decode_video_latents(
    vae: CVVAE,
    latents: torch.Tensor,
    mode: DecodeMode = "video",
    scaling_factor: float | None = None,
    shift_factor: float | None = None,
    dtype: str | torch.dtype | None = None,
    chunk_size: int | None = None,
    chunk_mode: str | None = "blend",
) -> torch.Tensor:
    """Decode scaled latents (B, C, F, h, w) to a video (B, 3, T, 8h, 8w), float32 in [-1, 1].

    Args:
        vae: the CV-VAE.
        latents: (B, C, F, h, w), scaled as the diffusion model produces them.
        mode: "video": T = 1 + 4(F-1), decoded with temporal context; "image": T = F, each latent
            frame decoded as a 1-frame clip.
        scaling_factor, shift_factor: the latents are decoded as `latents / scaling_factor +
            shift_factor`; None takes them from `vae.config` (a missing shift counts as 0). Pass
            1.0 and 0.0 for latents that are not scaled.
        dtype: compute precision: None computes in the VAE's weight dtype (as diffusers pipelines
            do); otherwise as `cvvae.codec.decode` ("auto", "fp32", "bf16", "fp16" or a torch dtype),
            i.e. autocast when the weights are float32, with a float32 recompute of non-finite rounds.
        chunk_size: image mode only: frames decoded per forward (None: all at once). Video mode
            decodes in temporal rounds of 4 + 1 latents, in spatial tiles while `vae.use_tiling` (576 px as
            released), one video at a time after `vae.enable_slicing()`.
        chunk_mode: video mode's rounds: "blend" (overlapping, blended: no seams; the default), "official"
            (the released rounds), "full" (one forward), or None for the VAE's own `chunk_mode`.
    """
    if mode not in DECODE_MODES:
        raise InputError(f"decode mode must be one of {DECODE_MODES}, got {mode!r}")
    channels = vae.config.z_channels
    if latents.ndim != 5 or latents.shape[1] != channels:
        raise InputError(f"expected latents (B, {channels}, F, h, w), got shape {tuple(latents.shape)}")
    if chunk_size is not None and chunk_size < 1:
        raise InputError(f"chunk_size must be at least 1, got {chunk_size}")
    scale = vae.config.scaling_factor if scaling_factor is None else scaling_factor
    shift = (vae.config.get("shift_factor") or 0.0) if shift_factor is None else shift_factor
    z = latents / scale + shift
    dtype = vae.dtype if dtype is None else dtype
    if mode == "video":
        with vae.chunking(chunk_mode) if chunk_mode is not None else contextlib.nullcontext():
            if vae.use_slicing and z.shape[0] > 1:  # `vae.enable_slicing()`: one video at a time
                return torch.cat([_decode(vae, zi, dtype) for zi in z.split(1)])
            return _decode(vae, z, dtype)
    b, _, f = z.shape[:3]
    frames = z.transpose(1, 2).flatten(0, 1).unsqueeze(2)  # (B*F, C, 1, h, w): 1-frame clips
    step = chunk_size or frames.shape[0]
    out = torch.cat([_decode(vae, piece, dtype) for piece in frames.split(step)])  # (B*F, 3, 1, H, W)
    return out.squeeze(2).unflatten(0, (b, f)).transpose(1, 2)
