"""Output-layer tuning: minimal fine-tuning of a video diffusion UNet on CV-VAE latents (the paper's Tables 3 and 5).

Only the UNet's output layer (``conv_out``), optionally also its input layer (``conv_in``), is trained
with the model's own training objective (`objectives.py`: TextToVideoSD, AnimateDiff, SVD) on latents of real
videos encoded by CV-VAE (``cvvae encode-dataset``), ``(B, C, F, h, w)`` and scaled as
:class:`~cvvae.data.LatentDataset` gives them; everything else stays frozen.

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

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .layers import Which, save_tuned_layers, trainable_layers
from .objectives import SVDOptions, TuneError, _check_family, _edm_loss_of, _loss_of

__all__ = ["load_scheduler", "load_unet", "read_context", "tune_unet"]

SVD_SCALING_FACTOR = 0.18215  # SVD's AutoencoderKLTemporalDecoder: latents it conditions on are x / 0.18215


def tune_unet(unet: nn.Module, scheduler: Any, latents: Iterable[dict[str, Any]], *, which: Which = "output",
              steps: int = 1000, lr: float = 1e-5, batch_size: int = 1, mixed_precision: str = "no",
              gradient_checkpointing: bool = False, seed: int = 0, output: str | os.PathLike[str],
              encoder_hidden_states: torch.Tensor | None = None, svd: SVDOptions | None = None) -> Path:
    """Train only ``which`` layers of ``unet`` (in place) with its own objective; save them under ``output``.

    Afterwards, also after an error, ``unet`` is in eval mode with its former ``requires_grad`` flags and
    gradient checkpointing.

    Args:
        unet: a UNet of `objectives.FAMILIES` (TextToVideoSD, AnimateDiff or SVD).
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
    objective, svd = _check(unet, scheduler, latents, steps, lr, batch_size, mixed_precision, gradient_checkpointing,
                            svd)
    scaling = float(getattr(latents, "scaling_factor", SVD_SCALING_FACTOR))
    shift = float(getattr(latents, "shift_factor", 0.0))
    out = Path(output).expanduser()
    out.mkdir(parents=True, exist_ok=True)

    flags = {name: p.requires_grad for name, p in unet.named_parameters()}
    checkpointing = getattr(unet, "is_gradient_checkpointing", False)
    params = trainable_layers(unet, which)
    if gradient_checkpointing and not checkpointing:
        unet.enable_gradient_checkpointing()
    try:
        losses, per_sample_context = _train(unet, scheduler, _batches(latents, batch_size), params, objective, svd,
                                            steps=steps, lr=lr, mixed_precision=mixed_precision, seed=seed,
                                            context=encoder_hidden_states, unscale=(scaling, shift))
    finally:
        unet.eval()  # and as it was: the same requires_grad flags (they select kernels) and checkpointing
        for name, p in unet.named_parameters():
            p.requires_grad_(flags[name])
        if gradient_checkpointing and not checkpointing:
            unet.disable_gradient_checkpointing()

    tail = losses[-min(50, len(losses)):]
    context_kind = "per-sample" if per_sample_context else "zeros" if encoder_hidden_states is None else "given"
    settings = ({"prediction_type": scheduler.config.get("prediction_type", "epsilon")} if objective == "ddpm" else
                {"prediction_type": "v_prediction", "svd": asdict(svd), "image_latents_unscale": [scaling, shift]})
    return save_tuned_layers(params, unet, out, {
        "which": which, "objective": objective, **settings, "steps": steps, "lr": lr, "batch_size": batch_size,
        "mixed_precision": mixed_precision, "seed": seed, "context": context_kind, "loss_first": losses[0],
        "loss_last_mean": sum(tail) / len(tail)})


def _check(unet: nn.Module, scheduler: Any, latents: Any, steps: int, lr: float, batch_size: int,
           mixed_precision: str, gradient_checkpointing: bool, svd: SVDOptions | None) -> tuple[str, SVDOptions | None]:
    """The UNet's objective and SVD options, after checking every argument of :func:`tune_unet`."""
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
    return objective, svd


def _train(unet: nn.Module, scheduler: Any, data: Iterator[tuple[torch.Tensor, torch.Tensor | None]],
           params: dict[str, nn.Parameter], objective: str, svd: SVDOptions | None, *, steps: int, lr: float,
           mixed_precision: str, seed: int, context: torch.Tensor | None,
           unscale: tuple[float, float]) -> tuple[list[float], bool]:
    """The optimisation loop; returns the per-step losses and whether samples carried their own context."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    set_seed(seed)
    # Autocast here rather than Accelerator(mixed_precision=...): accelerate's process-wide state refuses a
    # second precision in one process (e.g. two tune_unet calls).
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    optimizer = torch.optim.AdamW(list(params.values()), lr=lr)
    wrapped, optimizer = accelerator.prepare(unet, optimizer)
    device, gen = accelerator.device, torch.Generator().manual_seed(seed)
    n_train = int(scheduler.config.num_train_timesteps) if objective == "ddpm" else 0
    scaling, shift = unscale
    wrapped.train()
    losses, per_sample_context = [], False
    for _ in range(steps):
        x0, given = next(data)
        per_sample_context |= given is not None
        given = context if given is None else given
        x0 = x0.float()
        noise = torch.randn(x0.shape, generator=gen)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mixed_precision == "bf16"):
            if objective == "edm":
                sigma = (svd.p_mean + svd.p_std * torch.randn(len(x0), generator=gen)).exp()
                image = x0[:, :, 0] / scaling + shift
                if svd.image_latent_noise:
                    image = image + svd.image_latent_noise * torch.randn(image.shape, generator=gen)
                loss = _edm_loss_of(wrapped, unet, x0.to(device), noise.to(device), sigma.to(device), image.to(device),
                                    given, svd)
            else:
                t = torch.randint(0, n_train, (len(x0),), generator=gen)
                loss = _loss_of(wrapped, unet, scheduler, x0.to(device), noise.to(device), t.to(device), given)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, per_sample_context


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



def load_unet(folder: str | os.PathLike[str], subfolder: str | None = None) -> nn.Module:
    """The diffusers UNet of ``folder`` (its class read from config.json), if :func:`tune_unet` trains it."""
    import diffusers

    config = Path(folder).expanduser() / (subfolder or "") / "config.json"
    try:
        name = json.loads(config.read_text())["_class_name"]
    except (OSError, ValueError, KeyError) as e:
        raise TuneError(f"{config} is not a diffusers UNet config ({e})") from None
    _check_family(name)
    return getattr(diffusers, name).from_pretrained(str(folder), subfolder=subfolder)


def load_scheduler(unet_folder: str | os.PathLike[str], subfolder: str | None = None,
                   scheduler: str | os.PathLike[str] | None = None) -> Any:
    """The training scheduler of a "ddpm" UNet: ``scheduler`` (a folder), else the UNet's sibling ``scheduler/``,
    else Stable Diffusion's (and TextToVideoSD's) DDPMScheduler, scaled_linear 0.00085-0.012."""
    import diffusers

    unet_dir = Path(unet_folder).expanduser() / (subfolder or "")
    folder = Path(scheduler).expanduser() if scheduler else unet_dir.parent / "scheduler"
    config = folder / "scheduler_config.json"
    if config.is_file():
        cls = getattr(diffusers, json.loads(config.read_text()).get("_class_name", "DDPMScheduler"), None)
        if cls is None or not hasattr(cls, "add_noise"):
            raise TuneError(f"{config}: not a diffusers scheduler with add_noise")
        return cls.from_pretrained(str(folder))
    if scheduler:
        raise TuneError(f"--scheduler {scheduler}: no scheduler_config.json there")
    return diffusers.DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def read_context(path: str | os.PathLike[str]) -> torch.Tensor:
    """The one tensor of a safetensors file: the context given to every sample."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(Path(path).expanduser()))
    except (OSError, SafetensorError) as e:
        raise TuneError(f"--encoder-hidden-states {path}: cannot read it ({e})") from None
    if len(tensors) != 1:
        raise TuneError(f"--encoder-hidden-states {path}: holds {len(tensors)} tensors, expected one (L, D) tensor")
    return next(iter(tensors.values())).float()

