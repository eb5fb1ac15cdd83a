"""diffusers video pipelines that decode with a CV-VAE in video mode (n latents -> 1 + 4(n-1) frames).

Each class is the stock diffusers pipeline with `decode_latents` overridden and nothing else, so
loading (`from_pretrained(..., vae=cvvae)`, `from_pipe(..., vae=cvvae)`), schedulers, callbacks,
`enable_model_cpu_offload` and `output_type` "pil" / "np" / "pt" / "latent" behave as in diffusers,
and `diffusers.utils.export_to_video` (imageio + imageio-ffmpeg) writes the longer frame lists as
they are. With a VAE that is not a CVVAE they decode exactly as the stock pipeline.

Two attributes steer decoding (see `decode.decode_video_latents`):
- `pipe.decode_mode = "video"` (default): the paper's CV-VAE-V; SVD's 25 latents -> 97 frames.
  Decoding runs in temporal rounds of 4 + 1 latents, so `decode_chunk_size` does not apply.
- `pipe.decode_mode = "image"`: the paper's CV-VAE-I; n latents -> n frames, each latent frame a
  1-frame clip, `decode_chunk_size` frames per forward.
- `pipe.decode_dtype`: None (default) computes in the VAE's dtype; "auto"/"bf16"/... as `cvvae.codec`
  (autocast, which needs float32 VAE weights).
- `pipe.decode_chunk_mode`: video mode's temporal rounds, "blend" (default: overlapping, blended, no seams),
  "official" (the released rounds) or "full"; None keeps the VAE's own `chunk_mode`.
"""

from __future__ import annotations

import torch
from diffusers import AnimateDiffPipeline, StableVideoDiffusionPipeline, TextToVideoSDPipeline

from ..errors import InputError
from ..model import CVVAE
from .decode import DECODE_MODES, DecodeMode, decode_video_latents


class CVVAEDecodeMixin:
    """Video-mode or image-mode CV-VAE decoding for a diffusers pipeline with a `vae` component."""

    vae: torch.nn.Module
    decode_dtype: str | torch.dtype | None = None
    decode_chunk_mode: str | None = "blend"

    @property
    def decode_mode(self) -> DecodeMode:
        """"video" (default: n latents -> 1 + 4(n-1) frames) or "image" (n -> n)."""
        return self.__dict__.get("_decode_mode", "video")

    @decode_mode.setter
    def decode_mode(self, mode: DecodeMode) -> None:
        if mode not in DECODE_MODES:  # fail here, not after the denoising loop
            raise InputError(f"decode_mode must be one of {DECODE_MODES}, got {mode!r}")
        self.__dict__["_decode_mode"] = mode

    def _uses_cvvae(self) -> bool:
        return isinstance(getattr(self, "vae", None), CVVAE)

    def decode_cvvae_latents(self, latents: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
        """Scaled latents (B, C, F, h, w) -> video (B, 3, T, H, W) float32, T = 1 + 4(F-1) in video
        mode and F in image mode."""
        return decode_video_latents(self.vae, latents, mode=self.decode_mode, dtype=self.decode_dtype,
                                    chunk_size=chunk_size, chunk_mode=self.decode_chunk_mode)


class StableVideoDiffusionCVVAEPipeline(CVVAEDecodeMixin, StableVideoDiffusionPipeline):
    """`StableVideoDiffusionPipeline` (image-to-video) decoding with a CV-VAE.

    Use the SD2.1-variant CV-VAE (4 latent channels, scaling 0.18215, as SVD). The conditioning
    image is encoded by the stock code path (4-D `vae.encode`, image mode). `num_frames` counts
    latent frames: `num_frames=25` gives 97 frames in video mode.
    """

    def decode_latents(self, latents: torch.Tensor, num_frames: int, decode_chunk_size: int = 14) -> torch.Tensor:
        """Latents (B, F, C, h, w) -> frames (B, 3, T, H, W) float32; T = 1 + 4(F-1) in video mode."""
        if not self._uses_cvvae():
            return super().decode_latents(latents, num_frames, decode_chunk_size)
        return self.decode_cvvae_latents(latents.transpose(1, 2), decode_chunk_size)


class TextToVideoSDCVVAEPipeline(CVVAEDecodeMixin, TextToVideoSDPipeline):
    """`TextToVideoSDPipeline` (ModelScope-style text-to-video, 4-channel latents) decoding with a CV-VAE."""

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, F, h, w) -> frames (B, 3, T, H, W) float32; T = 1 + 4(F-1) in video mode."""
        if not self._uses_cvvae():
            return super().decode_latents(latents)
        return self.decode_cvvae_latents(latents)


class AnimateDiffCVVAEPipeline(CVVAEDecodeMixin, AnimateDiffPipeline):
    """`AnimateDiffPipeline` (text-to-video on an SD1.5-style UNet + motion adapter) decoding with a CV-VAE."""

    def decode_latents(self, latents: torch.Tensor, decode_chunk_size: int = 16) -> torch.Tensor:
        """Latents (B, C, F, h, w) -> frames (B, 3, T, H, W) float32; T = 1 + 4(F-1) in video mode."""
        if not self._uses_cvvae():
            return super().decode_latents(latents, decode_chunk_size)
        return self.decode_cvvae_latents(latents, decode_chunk_size)
