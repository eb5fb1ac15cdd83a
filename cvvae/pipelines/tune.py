"""Minimal fine-tuning of a video diffusion UNet on CV-VAE latents (the paper's Tables 3 and 5).

Only the UNet's output layer (``conv_out``), optionally also its input layer (``conv_in``), is trained
with the model's own training objective on latents of real videos encoded by CV-VAE (``cvvae encode-dataset``);
everything else stays frozen. Supported UNets (:data:`FAMILIES`), latents as :class:`LatentDataset` gives them,
``(B, C, F, h, w)`` and scaled:

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

Only the tuned layers are saved (``OUT/tuned_layers.safetensors`` + ``OUT/tuned_layers.json``, which records
the UNet class, the objective and its settings)::

    unet = UNet3DConditionModel.from_pretrained(folder, subfolder="unet")
    path = tune_unet(unet, DDPMScheduler.from_pretrained(folder, subfolder="scheduler"),
                     LatentDataset("latents/", scale=True), steps=1000, output="tuned/")
    pipe = TextToVideoSDCVVAEPipeline.from_pretrained(folder, vae=cvvae)
    load_tuned_layers(pipe, "tuned/")

    svd = UNetSpatioTemporalConditionModel.from_pretrained(svd_folder, subfolder="unet")
    tune_unet(svd, None, LatentDataset("latents/", scale=True), svd=SVDOptions(fps=7), output="tuned-svd/")
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from cvvae.errors import CheckpointError, InputError

__all__ = ["FAMILIES", "LAYERS", "SUPPORTED", "SVDOptions", "TuneError", "TunedLayersError", "add_parser",
           "diffusion_loss", "edm_loss", "load_tuned_layers", "run", "trainable_layers", "tune_unet"]

Which = Literal["output", "first+last"]
Objective = Literal["ddpm", "edm"]
LAYERS: dict[str, tuple[str, ...]] = {"output": ("conv_out",), "first+last": ("conv_in", "conv_out")}
# UNet classes tune_unet trains -> their objective: "ddpm" (a scheduler's add_noise, (B, C, F, h, w) latents) or
# "edm" (SVD: EDM v-prediction, (B, F, C, h, w) input with image latents, image embeddings and added_time_ids).
FAMILIES: dict[str, Objective] = {"UNet3DConditionModel": "ddpm", "UNetMotionModel": "ddpm",
                                  "UNetSpatioTemporalConditionModel": "edm"}
SUPPORTED = tuple(FAMILIES)
_KNOWN = (*SUPPORTED, "UNet2DConditionModel")
WEIGHTS, META, FORMAT = "tuned_layers.safetensors", "tuned_layers.json", "cvvae-tuned-layers"
SVD_SCALING_FACTOR = 0.18215  # SVD's AutoencoderKLTemporalDecoder: latents it conditions on are x / 0.18215


class TuneError(InputError, ValueError):
    """A UNet, scheduler, batch or argument that output-layer tuning cannot use."""


class TunedLayersError(CheckpointError, ValueError):
    """Saved tuned layers that do not fit the UNet they are loaded into."""


# ------------------------------------------------------------------------------------------ layers
def trainable_layers(unet: nn.Module, which: Which = "output") -> dict[str, nn.Parameter]:
    """Freeze ``unet`` except its output layer (``which="output"``) or its input and output layers
    (``"first+last"``); return the trainable parameters by name (``conv_out.weight``, ...)."""
    if which not in LAYERS:
        raise TuneError(f"which must be one of {sorted(LAYERS)}, got {which!r}")
    layers = {}
    for name in LAYERS[which]:
        layer = getattr(unet, name, None)
        if not isinstance(layer, nn.Module) or not any(True for _ in layer.parameters()):
            raise TuneError(f"{type(unet).__name__} has no {name!r} layer with parameters, so {which!r} tuning "
                            f"does not apply to it (supported: diffusers UNets {', '.join(_KNOWN)})")
        layers[name] = layer
    unet.requires_grad_(False)
    params = {}
    for name, layer in layers.items():
        layer.requires_grad_(True)
        params.update({f"{name}.{p}": param for p, param in layer.named_parameters()})
    return params


def _config_hash(unet: nn.Module) -> str:
    """sha256 of the UNet's config without the private ``_name_or_path``-style keys."""
    config = {k: v for k, v in dict(getattr(unet, "config", {})).items() if not k.startswith("_")}
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


# ------------------------------------------------------------------------------------------ loss
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


# ------------------------------------------------------------------------------------------ data
def _stack(values: Sequence[Any]) -> torch.Tensor | None:
    if any(v is None for v in values):
        return None
    tensors = [torch.as_tensor(v) for v in values]
    return torch.cat(tensors) if tensors[0].ndim == 3 else torch.stack(tensors)


def _batches(latents: Iterable[dict[str, Any]], batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Endless ``(x0 (B, C, F, h, w), encoder_hidden_states or None)``: passes over ``latents`` (epochs; a
    :class:`LatentDataset` is reshuffled each epoch), unbatched samples grouped by ``batch_size``."""
    epoch = 0
    while True:
        if hasattr(latents, "set_epoch"):
            latents.set_epoch(epoch)
        seen, group = False, []

        def flush() -> tuple[torch.Tensor, torch.Tensor | None]:
            shapes = {tuple(s["latents"].shape) for s in group}
            if len(shapes) > 1:
                raise TuneError(f"cannot batch latents of different shapes {sorted(shapes)}: use batch_size=1")
            return (torch.stack([s["latents"] for s in group]), _stack([s.get("encoder_hidden_states")
                                                                        for s in group]))

        for item in latents:
            x = torch.as_tensor(item["latents"])
            if x.ndim == 5:
                seen = True
                yield x, item.get("encoder_hidden_states")
            elif x.ndim == 4:
                group.append({**item, "latents": x})
                if len(group) == batch_size:
                    seen = True
                    yield flush()
                    group = []
            else:
                raise TuneError(f"latents must be (C, F, h, w) or (B, C, F, h, w), got shape {tuple(x.shape)}")
        if group:
            seen = True
            yield flush()
        if not seen:
            raise TuneError("the latent data gave no samples (empty, or a one-shot iterator already used up)")
        epoch += 1


# ------------------------------------------------------------------------------------------ tuning
def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def tune_unet(unet: nn.Module, scheduler: Any, latents: Iterable[dict[str, Any]], *, which: Which = "output",
              steps: int = 1000, lr: float = 1e-5, batch_size: int = 1, mixed_precision: str = "no",
              gradient_checkpointing: bool = False, seed: int = 0, output: str | os.PathLike[str],
              encoder_hidden_states: torch.Tensor | None = None, svd: SVDOptions | None = None) -> Path:
    """Train only ``which`` layers of ``unet`` (in place) with its own objective; save them under ``output``.

    Afterwards, also after an error, ``unet`` is in eval mode with its former ``requires_grad`` flags and
    gradient checkpointing.

    Args:
        unet: a UNet of :data:`FAMILIES` (TextToVideoSD, AnimateDiff or SVD).
        scheduler: the training scheduler of a ``"ddpm"`` UNet (``add_noise``, ``num_train_timesteps``,
            ``prediction_type``); not used by SVD's EDM objective (may be None).
        latents: a :class:`~cvvae.data.latents.LatentDataset` made with ``scale=True``, or any re-iterable of
            dicts with ``latents`` ``(C, F, h, w)`` or ``(B, C, F, h, w)`` (already scaled for the UNet) and
            optionally ``encoder_hidden_states`` ``(L, D)``/``(B, L, D)``; passed over repeatedly. SVD's
            conditioning image latents are the first latent frame unscaled with the dataset's
            ``scaling_factor``/``shift_factor`` (0.18215 and 0 for other iterables).
        which: ``"output"`` (``conv_out``) or ``"first+last"`` (``conv_in`` too).
        steps, lr, batch_size: optimiser steps of constant-lr AdamW (the paper: 1e-5), samples per step.
        mixed_precision: ``"no"`` or ``"bf16"`` (autocast; the weights stay float32).
        seed: noise, timesteps/noise levels and the data order.
        encoder_hidden_states: context of samples that carry none: the text encoder's output (e.g. of the
            empty prompt), or for SVD the CLIP image embedding ``(1, 1, 1024)``. Default: zeros
            ``(1, cross_attention_dim)``, i.e. unconditional tuning.
        svd: SVD's noise distribution and micro-conditioning (default :class:`SVDOptions`); SVD only.

    Returns the path of ``output/tuned_layers.safetensors`` (with ``tuned_layers.json``: layers, UNet class
    and config hash, objective and its settings, steps, lr, losses), both written atomically.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from safetensors.torch import save

    objective = _check_family(type(unet).__name__)
    if objective == "edm":
        svd = SVDOptions() if svd is None else svd
    elif svd is not None:
        raise TuneError(f"SVD options apply only to UNetSpatioTemporalConditionModel, not {type(unet).__name__}")
    elif scheduler is None or not hasattr(scheduler, "add_noise"):
        raise TuneError(f"{type(unet).__name__} trains with a DDPM-style scheduler (add_noise): pass one, "
                        "e.g. the pipeline's DDPMScheduler")
    if mixed_precision not in ("no", "bf16"):
        raise TuneError(f"mixed_precision must be 'no' or 'bf16', got {mixed_precision!r}")
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise TuneError(f"{name} must be a positive integer, got {value!r}")
    if not lr > 0:
        raise TuneError(f"lr must be positive, got {lr!r}")
    if gradient_checkpointing and not getattr(unet, "_supports_gradient_checkpointing", False):
        raise TuneError(f"diffusers' {type(unet).__name__} does not support gradient checkpointing: tune without it "
                        "(with which='output' nothing but conv_out's input is kept for backward anyway)")
    if hasattr(latents, "scale") and not latents.scale:
        raise TuneError("the LatentDataset gives unscaled latents: open it with scale=True (the UNet's latent space)")
    scaling = float(getattr(latents, "scaling_factor", SVD_SCALING_FACTOR))
    shift = float(getattr(latents, "shift_factor", 0.0))
    out = Path(output).expanduser()
    out.mkdir(parents=True, exist_ok=True)

    flags = {name: p.requires_grad for name, p in unet.named_parameters()}
    checkpointing = getattr(unet, "is_gradient_checkpointing", False)
    params = trainable_layers(unet, which)
    if gradient_checkpointing and not checkpointing:
        unet.enable_gradient_checkpointing()
    set_seed(seed)
    # Autocast here rather than Accelerator(mixed_precision=...): accelerate's process-wide state refuses a
    # second precision in one process (e.g. two tune_unet calls).
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    optimizer = torch.optim.AdamW(list(params.values()), lr=lr)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    base = accelerator.unwrap_model(unet)
    device, gen = accelerator.device, torch.Generator().manual_seed(seed)
    n_train = int(scheduler.config.num_train_timesteps) if objective == "ddpm" else 0
    data = _batches(latents, batch_size)
    unet.train()
    losses, per_sample_context = [], False
    try:
        for _ in range(steps):
            x0, context = next(data)
            per_sample_context |= context is not None
            context = encoder_hidden_states if context is None else context
            x0 = x0.float()
            noise = torch.randn(x0.shape, generator=gen)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mixed_precision == "bf16"):
                if objective == "edm":
                    sigma = (svd.p_mean + svd.p_std * torch.randn(len(x0), generator=gen)).exp()
                    image = x0[:, :, 0] / scaling + shift
                    if svd.image_latent_noise:
                        image = image + svd.image_latent_noise * torch.randn(image.shape, generator=gen)
                    loss = _edm_loss_of(unet, base, x0.to(device), noise.to(device), sigma.to(device), image.to(device),
                                        context, svd)
                else:
                    t = torch.randint(0, n_train, (len(x0),), generator=gen)
                    loss = _loss_of(unet, base, scheduler, x0.to(device), noise.to(device), t.to(device), context)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
    finally:
        base.eval()  # and as it was: the same requires_grad flags (they select kernels) and checkpointing
        for name, p in base.named_parameters():
            p.requires_grad_(flags[name])
        if gradient_checkpointing and not checkpointing:
            base.disable_gradient_checkpointing()

    tail = losses[-min(50, len(losses)):]
    context_kind = "per-sample" if per_sample_context else "zeros" if encoder_hidden_states is None else "given"
    settings = ({"prediction_type": scheduler.config.get("prediction_type", "epsilon")} if objective == "ddpm" else
                {"prediction_type": "v_prediction", "svd": asdict(svd), "image_latents_unscale": [scaling, shift]})
    meta = {"format": FORMAT, "version": 1, "which": which, "layers": sorted(params),
            "shapes": {k: list(v.shape) for k, v in sorted(params.items())}, "unet_class": type(base).__name__,
            "unet_config_sha256": _config_hash(base), "objective": objective, **settings, "steps": steps, "lr": lr,
            "batch_size": batch_size, "mixed_precision": mixed_precision, "seed": seed, "context": context_kind,
            "loss_first": losses[0], "loss_last_mean": sum(tail) / len(tail)}
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in params.items()}
    _write_atomic(out / META, (json.dumps(meta, indent=2) + "\n").encode())
    _write_atomic(out / WEIGHTS, save(tensors, metadata={"cvvae_tuned_layers": json.dumps(meta)}))
    return out / WEIGHTS


def load_tuned_layers(unet_or_pipeline: Any, path: str | os.PathLike[str]) -> list[str]:
    """Copy layers saved by :func:`tune_unet` (the file or its folder) into a UNet, or a pipeline's ``.unet``.

    Strict: every saved name must be a parameter of the UNet with the same shape, and a supported UNet must be
    of the class the layers were tuned on (SVD's and TextToVideoSD's ``conv_out`` have the same shape), else
    :class:`TunedLayersError` (nothing is changed then). Returns the loaded names.
    """
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    unet = getattr(unet_or_pipeline, "unet", unet_or_pipeline)
    path = Path(path).expanduser()
    file = path / WEIGHTS if path.is_dir() else path
    try:
        tensors = load_file(str(file))
        with safe_open(str(file), "pt") as f:
            tuned_on = json.loads((f.metadata() or {}).get("cvvae_tuned_layers", "{}")).get("unet_class")
    except (OSError, SafetensorError, ValueError, AttributeError) as e:
        raise TunedLayersError(f"cannot read tuned layers {file}: {e}") from None
    own = dict(unet.named_parameters())
    missing = sorted(k for k in tensors if k not in own)
    wrong = sorted(f"{k}: saved {tuple(v.shape)}, UNet {tuple(own[k].shape)}" for k, v in tensors.items()
                   if k in own and own[k].shape != v.shape)
    if missing or wrong:
        raise TunedLayersError(f"{file} does not fit this {type(unet).__name__}: "
                               + "; ".join(([f"not in the UNet: {', '.join(missing)}"] if missing else [])
                                           + ([f"shape mismatch: {'; '.join(wrong)}"] if wrong else [])))
    if tuned_on and type(unet).__name__ in FAMILIES and tuned_on != type(unet).__name__:
        raise TunedLayersError(f"{file} holds layers tuned on a {tuned_on}, not on this {type(unet).__name__}")
    with torch.no_grad():
        for k, v in tensors.items():
            own[k].copy_(v.to(own[k].device, own[k].dtype))
    return sorted(tensors)


# ------------------------------------------------------------------------------------------ CLI
def _load_unet(folder: str, subfolder: str | None) -> nn.Module:
    import diffusers

    config = Path(folder).expanduser() / (subfolder or "") / "config.json"
    try:
        name = json.loads(config.read_text())["_class_name"]
    except (OSError, ValueError, KeyError) as e:
        raise TuneError(f"{config} is not a diffusers UNet config ({e})") from None
    _check_family(name)
    return getattr(diffusers, name).from_pretrained(folder, subfolder=subfolder)


def _load_scheduler(args: argparse.Namespace) -> Any:
    import diffusers

    unet_dir = Path(args.unet).expanduser() / (args.subfolder or "")
    folder = Path(args.scheduler).expanduser() if args.scheduler else unet_dir.parent / "scheduler"
    config = folder / "scheduler_config.json"
    if config.is_file():
        cls = getattr(diffusers, json.loads(config.read_text()).get("_class_name", "DDPMScheduler"), None)
        if cls is None or not hasattr(cls, "add_noise"):
            raise TuneError(f"{config}: not a diffusers scheduler with add_noise")
        return cls.from_pretrained(str(folder))
    if args.scheduler:
        raise TuneError(f"--scheduler {args.scheduler}: no scheduler_config.json there")
    # Stable Diffusion's (and TextToVideoSD's) training schedule.
    return diffusers.DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


_SVD_FLAGS = tuple(f.name for f in fields(SVDOptions))


def _read_context(path: Path) -> torch.Tensor:
    """The one tensor of a safetensors file: the context given to every sample."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path.expanduser()))
    except (OSError, SafetensorError) as e:
        raise TuneError(f"--encoder-hidden-states {path}: cannot read it ({e})") from None
    if len(tensors) != 1:
        raise TuneError(f"--encoder-hidden-states {path}: holds {len(tensors)} tensors, expected one (L, D) tensor")
    return next(iter(tensors.values())).float()


def add_parser(sub: argparse._SubParsersAction, parents: Sequence[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add ``tune-unet`` to the ``cvvae`` subcommands (``parents``: cli's ``common``)."""
    from cvvae.cli import _Help

    p = sub.add_parser(
        "tune-unet", parents=list(parents), formatter_class=_Help,
        help="train only the output (and input) layer of a video diffusion UNet on CV-VAE latents",
        description="The paper's minimal fine-tuning: freeze a video diffusion UNet except conv_out (and conv_in "
        "with --layers first+last) and train it with its own objective on latents written by "
        "`cvvae encode-dataset`, with zero text/image context unless --encoder-hidden-states is given. "
        "TextToVideoSD and AnimateDiff UNets: a scheduler's DDPM-style loss; SVD: its EDM v-prediction loss "
        "conditioned on the first latent frame (no scheduler; --fps, --motion-bucket-id, ...). Supported UNets: "
        f"{', '.join(SUPPORTED)}. Saves only the tuned layers: OUT/{WEIGHTS} + {META}; load them with "
        "cvvae.pipelines.tune.load_tuned_layers(pipe, OUT).")
    p.add_argument("--unet", required=True, help="diffusers UNet folder (or pipeline folder with --subfolder unet)")
    p.add_argument("--subfolder", help="subfolder of --unet holding the UNet, e.g. unet")
    p.add_argument("--scheduler", help="scheduler folder (default: the UNet's sibling scheduler/ folder, else an "
                   "SD-style DDPMScheduler, scaled_linear 0.00085-0.012); not for SVD")
    p.add_argument("--latents", required=True, help="latent dataset folder written by cvvae encode-dataset")
    p.add_argument("--layers", default="output", choices=sorted(LAYERS), help="layers to train: conv_out, or "
                   "conv_in and conv_out")
    p.add_argument("--steps", type=int, default=1000, help="optimiser steps")
    p.add_argument("--lr", type=float, default=1e-5, help="constant AdamW learning rate")
    p.add_argument("--batch-size", type=int, default=1, help="clips per step (equal latent shapes)")
    p.add_argument("--mixed-precision", default="no", choices=["no", "bf16"], help="autocast precision")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute UNet activations in backward "
                   "(less memory, slower)")
    p.add_argument("--encoder-hidden-states", type=Path, metavar="FILE", help="safetensors file with one (L, D) "
                   "tensor, the context of every clip (e.g. the empty prompt's text embedding; SVD: a CLIP image "
                   "embedding (1, 1024)); default zeros")
    p.add_argument("--seed", type=int, default=0, help="seed of noise, timesteps and data order")
    p.add_argument("-o", "--output", type=Path, required=True, help="output folder of the tuned layers")
    svd = p.add_argument_group("SVD (UNetSpatioTemporalConditionModel) only")
    svd.add_argument("--fps", type=int, help="the fps the pipeline will be called with; the UNet sees fps - 1 "
                     "(default 7; one CV-VAE latent frame spans 4 video frames)")
    svd.add_argument("--motion-bucket-id", type=int, help="motion conditioning (default 127)")
    svd.add_argument("--noise-aug-strength", type=float, help="noise_aug_strength time id (default 0.02)")
    svd.add_argument("--image-latent-noise", type=float, help="std of noise added to the unscaled conditioning "
                     "latents, a latent-space stand-in for SVD's pixel noise augmentation (default 0)")
    svd.add_argument("--p-mean", type=float, help="mean of ln(sigma) (default 0.7)")
    svd.add_argument("--p-std", type=float, help="std of ln(sigma) (default 1.6)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> dict[str, Any]:
    """``cvvae tune-unet``: load the UNet, scheduler (not for SVD) and latents, tune, print the summary."""
    from cvvae.data.latents import LatentDataset

    unet = _load_unet(args.unet, args.subfolder)
    given = {k: getattr(args, k) for k in _SVD_FLAGS if getattr(args, k, None) is not None}
    if FAMILIES[type(unet).__name__] == "edm":
        if args.scheduler:
            raise TuneError("--scheduler does not apply to SVD: it trains with the EDM objective, without a scheduler")
        scheduler, svd = None, SVDOptions(**given)
    elif given:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise TuneError(f"{flags} apply only to SVD's UNetSpatioTemporalConditionModel, not {type(unet).__name__}")
    else:
        scheduler, svd = _load_scheduler(args), None
    context = _read_context(args.encoder_hidden_states) if getattr(args, "encoder_hidden_states", None) else None
    data = LatentDataset(args.latents, scale=True, seed=args.seed)
    path = tune_unet(unet, scheduler, data, which=args.layers, steps=args.steps, lr=args.lr,
                     batch_size=args.batch_size, mixed_precision=args.mixed_precision,
                     gradient_checkpointing=args.gradient_checkpointing, seed=args.seed, output=args.output,
                     encoder_hidden_states=context, svd=svd)
    summary = {**json.loads((path.parent / META).read_text()), "path": str(path)}
    if getattr(args, "json", False):
        print(json.dumps(summary, indent=2))
    elif not getattr(args, "quiet", False):
        print(f"{path}: {', '.join(summary['layers'])} of {summary['unet_class']} tuned for {summary['steps']} steps "
              f"({summary['objective']} objective, lr {summary['lr']}); loss {summary['loss_first']:.4f} at the first "
              f"step, {summary['loss_last_mean']:.4f} over the last ones")
    return summary
