"""CV-VAE in diffusers pipelines.

Image pipelines need nothing from here: `StableDiffusionPipeline`, `StableDiffusionImg2ImgPipeline`
(SD2.1 variant) and `StableDiffusion3Pipeline` (SD3 variant) take a `CVVAE` as `vae` unchanged.
Video pipelines decode n latent frames to n frames with any VAE; the subclasses here decode them as
one CV-VAE clip instead, 1 + 4(n-1) frames ("video" mode), or frame by frame ("image" mode):

- `StableVideoDiffusionCVVAEPipeline` (image-to-video), `AnimateDiffCVVAEPipeline` and
  `TextToVideoSDCVVAEPipeline` (text-to-video): stock pipelines with `decode_latents` overridden;
- `CVVAEDecodeMixin`: the same for another pipeline (override its `decode_latents`);
- `decode_video_latents(vae, latents, mode=...)`: the decoding they share.
"""

from __future__ import annotations

from .decode import DECODE_MODES, DecodeMode, decode_video_latents

__all__ = [
    "DECODE_MODES",
    "AnimateDiffCVVAEPipeline",
    "CVVAEDecodeMixin",
    "DecodeMode",
    "StableVideoDiffusionCVVAEPipeline",
    "TextToVideoSDCVVAEPipeline",
    "decode_video_latents",
]

_VIDEO = {"AnimateDiffCVVAEPipeline", "CVVAEDecodeMixin", "StableVideoDiffusionCVVAEPipeline",
          "TextToVideoSDCVVAEPipeline"}


def __getattr__(name: str):
    # The pipeline classes import three diffusers pipeline modules (and transformers' CLIP); load them on use.
    if name in _VIDEO:
        from . import video

        return getattr(video, name)
    raise AttributeError(f"module 'cvvae.pipelines' has no attribute {name!r}")
