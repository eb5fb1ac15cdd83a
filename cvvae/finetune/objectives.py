"""The training objectives of the video diffusion UNets that output-layer tuning supports (see `tune.py`).

- ``UNet3DConditionModel`` (TextToVideoSD) and ``UNetMotionModel`` (AnimateDiff), objective ``"ddpm"``
  (:func:`diffusion_loss`): MSE between the prediction on ``scheduler.add_noise(x0, noise, t)`` and the noise,
  the velocity or ``x0`` (the scheduler's ``prediction_type``). The text context is zeros unless given;
  AnimateDiff's UNet wants it per frame, ``(B*F, L, D)``, as ``AnimateDiffPipeline`` repeats it: done here.
- ``UNetSpatioTemporalConditionModel`` (SVD, the paper's Table 3), objective ``"edm"`` (:func:`edm_loss`,
  no scheduler): SVD's EDM preconditioning with v-prediction. ``sigma = exp(p_mean + p_std * n)``,
  ``n ~ N(0, 1)`` (0.7, 1.6), ``noisy = x0 + sigma * noise``; the UNet gets ``(B, F, 2C, h, w)`` =
  ``cat([c_in * noisy, image_latents], dim=2)``, the timestep ``c_noise = 0.25 * ln(sigma)``, image embeddings
  ``(B, 1, D)`` (zeros unless given) and ``added_time_ids = [fps - 1, motion_bucket_id, noise_aug_strength]``;
  ``denoised = c_skip * noisy + c_out * F`` and the loss is ``mean((sigma^2 + 1) / sigma^2 * (denoised - x0)^2)``
  with ``c_in = 1 / sqrt(sigma^2 + 1)``, ``c_skip = 1 / (sigma^2 + 1)``, ``c_out = -sigma / sqrt(sigma^2 + 1)``
  (equivalently: the MSE of ``F`` against the velocity ``(noise - sigma * x0) / sqrt(sigma^2 + 1)``). The
  conditioning image latents are the clip's first latent frame, unscaled (CV-VAE encodes the first frame alone,
  as the image VAE SVD conditions on), repeated over the frames; see :class:`SVDOptions`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError

__all__ = ["FAMILIES", "SUPPORTED", "SVDOptions", "TuneError", "diffusion_loss", "edm_loss"]

Objective = Literal["ddpm", "edm"]
# UNet classes tune_unet trains -> their objective: "ddpm" (a scheduler's add_noise, (B, C, F, h, w) latents) or
# "edm" (SVD: EDM v-prediction, (B, F, C, h, w) input with image latents, image embeddings and added_time_ids).
FAMILIES: dict[str, Objective] = {"UNet3DConditionModel": "ddpm", "UNetMotionModel": "ddpm",
                                  "UNetSpatioTemporalConditionModel": "edm"}
SUPPORTED = tuple(FAMILIES)
_KNOWN = (*SUPPORTED, "UNet2DConditionModel")


class TuneError(InputError, ValueError):
    """A UNet, scheduler, batch or argument that output-layer tuning cannot use."""


def _check_family(name: str) -> Objective:
    """The objective of UNet class ``name``; :class:`TuneError` unless :func:`tune_unet` trains it."""
    if name not in FAMILIES:
        raise TuneError(f"tune_unet trains video UNets {', '.join(SUPPORTED)} (not {name})")
    return FAMILIES[name]


def _check_channels(unet: nn.Module, channels: int, objective: Objective) -> None:
    """:class:`TuneError` unless ``unet`` takes latents of ``channels`` channels (SVD: plus as many image latents)."""
    config, factor = unet.config, 2 if objective == "edm" else 1
    if config.in_channels != factor * channels or config.out_channels != channels:
        extra = " (noisy latents + image latents)" if factor == 2 else ""
        raise TuneError(f"{type(unet).__name__} takes in_channels={config.in_channels}{extra} and gives "
                        f"out_channels={config.out_channels}, but the latents have {channels} channels")


def _context(unet: nn.Module, batch: int, given: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """``given`` broadcast to the batch, else zeros ``(B, 1, cross_attention_dim)`` (unconditional tuning)."""
    if given is None:
        dim = unet.config.cross_attention_dim
        return torch.zeros(batch, 1, dim if isinstance(dim, int) else dim[0], device=like.device, dtype=like.dtype)
    given = given.to(like.device, like.dtype)
    if given.ndim == 2:
        given = given[None]
    if given.ndim != 3 or len(given) not in (1, batch):
        raise TuneError(f"encoder_hidden_states must be (L, D), (1, L, D) or (B={batch}, L, D), "
                        f"got shape {tuple(given.shape)}")
    return given.expand(batch, -1, -1) if len(given) == 1 and batch > 1 else given


def diffusion_loss(unet: nn.Module, scheduler: Any, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                   encoder_hidden_states: torch.Tensor | None = None) -> torch.Tensor:
    """The ``"ddpm"`` training loss of a TextToVideoSD or AnimateDiff UNet: MSE between its prediction on
    ``scheduler.add_noise(x0, noise, t)`` and the noise (``epsilon``), the velocity (``v_prediction``) or ``x0``
    (``sample``), in float32.

    ``x0``/``noise``: ``(B, C, F, h, w)``; ``t``: ``(B,)`` integer timesteps; ``encoder_hidden_states``:
    ``(B or 1, L, D)``, default zeros ``(B, 1, cross_attention_dim)``.
    """
    if _check_family(type(unet).__name__) != "ddpm":
        raise TuneError(f"{type(unet).__name__} trains with the EDM objective: use edm_loss")
    return _loss_of(unet, unet, scheduler, x0, noise, t, encoder_hidden_states)


def _loss_of(unet: nn.Module, base: nn.Module, scheduler: Any, x0: torch.Tensor, noise: torch.Tensor,
             t: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
    """:func:`diffusion_loss` through the (possibly wrapped) ``unet``, the context sized by ``base``."""
    kind = scheduler.config.get("prediction_type", "epsilon")
    target = {"epsilon": lambda: noise, "v_prediction": lambda: scheduler.get_velocity(x0, noise, t),
              "sample": lambda: x0}.get(kind)
    if target is None:
        raise TuneError(f"unsupported scheduler prediction_type {kind!r} (epsilon, v_prediction or sample)")
    _check_channels(base, x0.shape[1], "ddpm")
    context = _context(base, len(x0), context, x0)
    if type(base).__name__ == "UNetMotionModel":  # it takes the context per frame, as AnimateDiffPipeline gives it
        context = context.repeat_interleave(x0.shape[2], dim=0)
    pred = unet(scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=context).sample
    return F.mse_loss(pred.float(), target().float())


@dataclass(frozen=True)
class SVDOptions:
    """SVD's noise distribution and micro-conditioning for :func:`tune_unet` (defaults: SVD's own).

    Attributes:
        fps: the ``fps`` a :class:`StableVideoDiffusionPipeline` call will be given (default 7); the UNet is
            conditioned on ``fps - 1``, as the pipeline does. With CV-VAE one latent frame spans 4 video
            frames: encode clips whose frame rate (after ``--stride``) is about ``4 * fps``.
        motion_bucket_id: SVD's motion conditioning (127).
        noise_aug_strength: the value passed in ``added_time_ids`` (0.02, the pipeline's default).
        image_latent_noise: std of Gaussian noise added to the unscaled conditioning image latents. SVD adds
            ``noise_aug_strength`` noise to the image's pixels before encoding it; from latents alone this is a
            latent-space stand-in. Default 0: the first latent frame as it is.
        p_mean, p_std: ``ln(sigma) ~ N(p_mean, p_std^2)`` (0.7, 1.6: the usual SVD fine-tuning values).
    """

    fps: int = 7
    motion_bucket_id: int = 127
    noise_aug_strength: float = 0.02
    image_latent_noise: float = 0.0
    p_mean: float = 0.7
    p_std: float = 1.6

    def __post_init__(self) -> None:
        for name, low in (("fps", 1), ("motion_bucket_id", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise TuneError(f"SVD {name} must be an integer >= {low}, got {value!r}")
        for name in ("noise_aug_strength", "image_latent_noise"):
            if not getattr(self, name) >= 0:
                raise TuneError(f"SVD {name} must be >= 0, got {getattr(self, name)!r}")
        if not self.p_std > 0:
            raise TuneError(f"SVD p_std must be positive, got {self.p_std!r}")

    def time_ids(self, unet: nn.Module, batch: int, like: torch.Tensor) -> torch.Tensor:
        """``added_time_ids`` ``(B, 3)``: ``[fps - 1, motion_bucket_id, noise_aug_strength]`` per sample."""
        ids = [self.fps - 1, self.motion_bucket_id, self.noise_aug_strength]
        expected = getattr(getattr(unet, "add_embedding", None), "linear_1", None)
        if expected is None or expected.in_features != unet.config.addition_time_embed_dim * len(ids):
            raise TuneError(f"{type(unet).__name__} does not take SVD's 3 added_time_ids "
                            "(fps, motion_bucket_id, noise_aug_strength)")
        return torch.tensor([ids], device=like.device, dtype=like.dtype).expand(batch, -1)


def edm_loss(unet: nn.Module, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor,
             image_latents: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
             options: SVDOptions | None = None) -> torch.Tensor:
    """SVD's training loss (EDM preconditioning, v-prediction; see the module docstring), in float32.

    ``x0``/``noise``: scaled latents ``(B, C, F, h, w)`` (transposed to SVD's ``(B, F, C, h, w)`` here);
    ``sigma``: ``(B,)`` noise levels; ``image_latents``: the unscaled conditioning latents ``(B, C, h, w)``;
    ``encoder_hidden_states``: image embeddings ``(B or 1, 1, D)``, default zeros; ``options``: the
    ``added_time_ids`` (default :class:`SVDOptions`).
    """
    if _check_family(type(unet).__name__) != "edm":
        raise TuneError(f"{type(unet).__name__} trains with a scheduler's DDPM-style loss: use diffusion_loss")
    return _edm_loss_of(unet, unet, x0, noise, sigma, image_latents, encoder_hidden_states, options or SVDOptions())


# The EDM terms were checked against (1) diffusers 0.42 EulerDiscreteScheduler with prediction_type="v_prediction"
# and timestep_type="continuous" (SVD's scheduler config): timesteps 0.25 * log(sigma), scale_model_input divides
# by sqrt(sigma^2 + 1), step()'s pred_original_sample = F * -sigma / sqrt(sigma^2 + 1) + sample / (sigma^2 + 1)
# (tests/test_tune.py compares with it); (2) StableVideoDiffusionPipeline: UNet input (B, F, C, h, w), the
# channel concat [scaled noisy latents, image latents] on dim 2, image latents vae.encode(image).mode() unscaled
# and repeated over frames, added_time_ids [fps - 1, motion_bucket_id, noise_aug_strength]; (3) Stability AI's
# generative-models VScalingWithEDMcNoise (same c_skip, c_out, c_in, c_noise); (4) pixeli99/SVD_Xtend train_svd.py
# (sigma lognormal with P_mean 0.7, P_std 1.6, loss weight (1 + sigma^2) / sigma^2). SVD_Xtend passes fps 7 itself
# as the time id and noises the conditioning pixels; here the pipeline's fps - 1 and latents only.
def _edm_loss_of(unet: nn.Module, base: nn.Module, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor,
                 image_latents: torch.Tensor, context: torch.Tensor | None, options: SVDOptions) -> torch.Tensor:
    """:func:`edm_loss` through the (possibly wrapped) ``unet``, sizes and time ids from ``base``."""
    batch, channels, frames = x0.shape[:3]
    _check_channels(base, channels, "edm")
    if tuple(image_latents.shape) != (batch, channels, *x0.shape[3:]):
        raise TuneError(f"image_latents must be (B, C, h, w) = {(batch, channels, *x0.shape[3:])}, "
                        f"got {tuple(image_latents.shape)}")
    if sigma.shape != (batch,) or not bool((sigma > 0).all()):
        raise TuneError(f"sigma must be {batch} positive noise levels, got shape {tuple(sigma.shape)}")
    x0, noise = x0.float().transpose(1, 2), noise.float().transpose(1, 2)  # SVD: (B, F, C, h, w)
    s = sigma.float().view(batch, 1, 1, 1, 1)
    noisy = x0 + s * noise
    c_in, c_skip, c_out = (s**2 + 1).rsqrt(), 1 / (s**2 + 1), -s * (s**2 + 1).rsqrt()
    image = image_latents.float()[:, None].expand(-1, frames, -1, -1, -1)
    out = unet(torch.cat([c_in * noisy, image], dim=2), 0.25 * sigma.float().log(),
               encoder_hidden_states=_context(base, batch, context, x0),
               added_time_ids=options.time_ids(base, batch, x0)).sample
    denoised = c_skip * noisy + c_out * out.float()
    return ((s**2 + 1) / s**2 * (denoised - x0) ** 2).mean()

