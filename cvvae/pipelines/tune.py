"""Minimal fine-tuning of a video diffusion UNet on CV-VAE latents (the paper's Tables 3 and 5).

Only the UNet's output layer (``conv_out``), optionally also its input layer (``conv_in``), is trained
with the model's own diffusion loss on latents of real videos encoded by CV-VAE (``cvvae encode-dataset``);
everything else stays frozen. Supported end to end: ``UNet3DConditionModel`` (TextToVideoSD; ``(B, C, F, H, W)``
latents, epsilon/v/sample prediction under a DDPM-style scheduler). Not supported yet, refused with a clear
error: SVD's ``UNetSpatioTemporalConditionModel`` (EDM v-prediction with image conditioning) and AnimateDiff's
``UNetMotionModel`` (untested here). :func:`trainable_layers` works on all of them.

Only the tuned layers are saved (``OUT/tuned_layers.safetensors`` + ``OUT/tuned_layers.json``)::

    unet = UNet3DConditionModel.from_pretrained(folder, subfolder="unet")
    path = tune_unet(unet, DDPMScheduler.from_pretrained(folder, subfolder="scheduler"),
                     LatentDataset("latents/", scale=True), steps=1000, output="tuned/")
    pipe = TextToVideoSDCVVAEPipeline.from_pretrained(folder, vae=cvvae)
    load_tuned_layers(pipe, "tuned/")
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from cvvae.errors import CheckpointError, InputError

__all__ = ["LAYERS", "SUPPORTED", "TuneError", "TunedLayersError", "add_parser", "diffusion_loss",
           "load_tuned_layers", "run", "trainable_layers", "tune_unet"]

Which = Literal["output", "first+last"]
LAYERS: dict[str, tuple[str, ...]] = {"output": ("conv_out",), "first+last": ("conv_in", "conv_out")}
# UNet classes tune_unet trains: (B, C, F, H, W) latents, timestep, encoder_hidden_states -> .sample.
SUPPORTED = ("UNet3DConditionModel",)
_KNOWN = (*SUPPORTED, "UNetMotionModel", "UNetSpatioTemporalConditionModel", "UNet2DConditionModel")
WEIGHTS, META, FORMAT = "tuned_layers.safetensors", "tuned_layers.json", "cvvae-tuned-layers"


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
def _check_family(name: str) -> None:
    """Raise :class:`TuneError` unless ``name`` is a UNet class :func:`tune_unet` trains."""
    if name == "UNetSpatioTemporalConditionModel":
        raise TuneError("SVD's UNetSpatioTemporalConditionModel (EDM v-prediction with image latents, image "
                        "embeddings and added_time_ids) is not supported by tune_unet yet; supported: "
                        + ", ".join(SUPPORTED))
    if name not in SUPPORTED:
        raise TuneError(f"tune_unet trains video UNets {', '.join(SUPPORTED)} (not yet {name})")


def _context(unet: nn.Module, batch: int, given: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """``given`` broadcast to the batch, else zeros ``(B, 1, cross_attention_dim)`` (unconditional tuning)."""
    if given is None:
        dim = unet.config.cross_attention_dim
        return torch.zeros(batch, 1, dim if isinstance(dim, int) else dim[0], device=like.device, dtype=like.dtype)
    given = given.to(like.device, like.dtype)
    if given.ndim == 2:
        given = given[None]
    return given.expand(batch, -1, -1) if len(given) == 1 and batch > 1 else given


def diffusion_loss(unet: nn.Module, scheduler: Any, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                   encoder_hidden_states: torch.Tensor | None = None) -> torch.Tensor:
    """The UNet's own training loss: MSE between its prediction on ``scheduler.add_noise(x0, noise, t)`` and
    the noise (``epsilon``), the velocity (``v_prediction``) or ``x0`` (``sample``), in float32.

    ``x0``/``noise``: ``(B, C, F, h, w)``; ``t``: ``(B,)`` integer timesteps; ``encoder_hidden_states``:
    ``(B or 1, L, D)``, default zeros ``(B, 1, cross_attention_dim)``.
    """
    _check_family(type(unet).__name__)
    return _loss_of(unet, unet, scheduler, x0, noise, t, encoder_hidden_states)


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
              encoder_hidden_states: torch.Tensor | None = None) -> Path:
    """Train only ``which`` layers of ``unet`` (in place) with its diffusion loss; save them under ``output``.

    Afterwards ``unet`` is in eval mode with its former ``requires_grad`` flags and gradient checkpointing.

    Args:
        unet: a ``UNet3DConditionModel`` (see :data:`SUPPORTED`).
        scheduler: its training scheduler (``add_noise``, ``num_train_timesteps``, ``prediction_type``).
        latents: a :class:`~cvvae.data.latents.LatentDataset` made with ``scale=True``, or any re-iterable of
            dicts with ``latents`` ``(C, F, h, w)`` or ``(B, C, F, h, w)`` (already scaled for the UNet) and
            optionally ``encoder_hidden_states`` ``(L, D)``/``(B, L, D)``; passed over repeatedly.
        which: ``"output"`` (``conv_out``) or ``"first+last"`` (``conv_in`` too).
        steps, lr, batch_size: optimiser steps of constant-lr AdamW (the paper: 1e-5), samples per step.
        mixed_precision: ``"no"`` or ``"bf16"`` (autocast; the weights stay float32).
        seed: noise, timesteps and the data order.
        encoder_hidden_states: text context of samples that carry none, e.g. the text encoder's output for
            the empty prompt. Default: zeros ``(1, cross_attention_dim)``, i.e. unconditional tuning.

    Returns the path of ``output/tuned_layers.safetensors`` (with ``tuned_layers.json``: layers, UNet class
    and config hash, steps, lr, losses), both written atomically.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from safetensors.torch import save

    _check_family(type(unet).__name__)
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
    n_train = int(scheduler.config.num_train_timesteps)
    data = _batches(latents, batch_size)
    unet.train()
    losses = []
    for _ in range(steps):
        x0, context = next(data)
        x0 = x0.float()
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, n_train, (len(x0),), generator=gen)
        x0, noise, t = x0.to(device), noise.to(device), t.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mixed_precision == "bf16"):
            context = encoder_hidden_states if context is None else context
            loss = _loss_of(unet, base, scheduler, x0, noise, t, context)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    base.eval()  # and as it was: the same requires_grad flags (they select kernels) and checkpointing
    for name, p in base.named_parameters():
        p.requires_grad_(flags[name])
    if gradient_checkpointing and not checkpointing:
        base.disable_gradient_checkpointing()

    tail = losses[-min(50, len(losses)):]
    meta = {"format": FORMAT, "version": 1, "which": which, "layers": sorted(params),
            "shapes": {k: list(v.shape) for k, v in sorted(params.items())}, "unet_class": type(base).__name__,
            "unet_config_sha256": _config_hash(base), "steps": steps, "lr": lr, "batch_size": batch_size,
            "mixed_precision": mixed_precision, "seed": seed,
            "prediction_type": scheduler.config.get("prediction_type", "epsilon"),
            "loss_first": losses[0], "loss_last_mean": sum(tail) / len(tail)}
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in params.items()}
    _write_atomic(out / META, (json.dumps(meta, indent=2) + "\n").encode())
    _write_atomic(out / WEIGHTS, save(tensors, metadata={"cvvae_tuned_layers": json.dumps(meta)}))
    return out / WEIGHTS


def _loss_of(unet: nn.Module, base: nn.Module, scheduler: Any, x0: torch.Tensor, noise: torch.Tensor,
             t: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
    """:func:`diffusion_loss` through the (possibly wrapped) ``unet``, the context sized by ``base``."""
    kind = scheduler.config.get("prediction_type", "epsilon")
    target = {"epsilon": lambda: noise, "v_prediction": lambda: scheduler.get_velocity(x0, noise, t),
              "sample": lambda: x0}.get(kind)
    if target is None:
        raise TuneError(f"unsupported scheduler prediction_type {kind!r} (epsilon, v_prediction or sample)")
    pred = unet(scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=_context(base, len(x0), context, x0)).sample
    return F.mse_loss(pred.float(), target().float())


def load_tuned_layers(unet_or_pipeline: Any, path: str | os.PathLike[str]) -> list[str]:
    """Copy layers saved by :func:`tune_unet` (the file or its folder) into a UNet, or a pipeline's ``.unet``.

    Strict: every saved name must be a parameter of the UNet with the same shape, else
    :class:`TunedLayersError` (nothing is changed then). Returns the loaded names.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    unet = getattr(unet_or_pipeline, "unet", unet_or_pipeline)
    path = Path(path).expanduser()
    file = path / WEIGHTS if path.is_dir() else path
    try:
        tensors = load_file(str(file))
    except (OSError, SafetensorError) as e:
        raise TunedLayersError(f"cannot read tuned layers {file}: {e}") from None
    own = dict(unet.named_parameters())
    missing = sorted(k for k in tensors if k not in own)
    wrong = sorted(f"{k}: saved {tuple(v.shape)}, UNet {tuple(own[k].shape)}" for k, v in tensors.items()
                   if k in own and own[k].shape != v.shape)
    if missing or wrong:
        raise TunedLayersError(f"{file} does not fit this {type(unet).__name__}: "
                               + "; ".join(([f"not in the UNet: {', '.join(missing)}"] if missing else [])
                                           + ([f"shape mismatch: {'; '.join(wrong)}"] if wrong else [])))
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


def add_parser(sub: argparse._SubParsersAction, parents: Sequence[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add ``tune-unet`` to the ``cvvae`` subcommands (``parents``: cli's ``common``)."""
    from cvvae.cli import _Help

    p = sub.add_parser(
        "tune-unet", parents=list(parents), formatter_class=_Help,
        help="train only the output (and input) layer of a video diffusion UNet on CV-VAE latents",
        description="The paper's minimal fine-tuning: freeze a video diffusion UNet except conv_out (and conv_in "
        "with --layers first+last) and train it with its own diffusion loss on latents written by "
        "`cvvae encode-dataset`, unconditionally (zero text context). Supported UNets: "
        f"{', '.join(SUPPORTED)}. Saves only the tuned layers: OUT/{WEIGHTS} + {META}; load them with "
        "cvvae.pipelines.tune.load_tuned_layers(pipe, OUT).")
    p.add_argument("--unet", required=True, help="diffusers UNet folder (or pipeline folder with --subfolder unet)")
    p.add_argument("--subfolder", help="subfolder of --unet holding the UNet, e.g. unet")
    p.add_argument("--scheduler", help="scheduler folder (default: the UNet's sibling scheduler/ folder, else an "
                   "SD-style DDPMScheduler, scaled_linear 0.00085-0.012)")
    p.add_argument("--latents", required=True, help="latent dataset folder written by cvvae encode-dataset")
    p.add_argument("--layers", default="output", choices=sorted(LAYERS), help="layers to train: conv_out, or "
                   "conv_in and conv_out")
    p.add_argument("--steps", type=int, default=1000, help="optimiser steps")
    p.add_argument("--lr", type=float, default=1e-5, help="constant AdamW learning rate")
    p.add_argument("--batch-size", type=int, default=1, help="clips per step (equal latent shapes)")
    p.add_argument("--mixed-precision", default="no", choices=["no", "bf16"], help="autocast precision")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute UNet activations in backward "
                   "(less memory, slower)")
    p.add_argument("--seed", type=int, default=0, help="seed of noise, timesteps and data order")
    p.add_argument("-o", "--output", type=Path, required=True, help="output folder of the tuned layers")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> dict[str, Any]:
    """``cvvae tune-unet``: load the UNet, scheduler and latents, tune, print the summary."""
    from cvvae.data.latents import LatentDataset

    unet = _load_unet(args.unet, args.subfolder)
    scheduler = _load_scheduler(args)
    data = LatentDataset(args.latents, scale=True, seed=args.seed)
    path = tune_unet(unet, scheduler, data, which=args.layers, steps=args.steps, lr=args.lr,
                     batch_size=args.batch_size, mixed_precision=args.mixed_precision,
                     gradient_checkpointing=args.gradient_checkpointing, seed=args.seed, output=args.output)
    summary = {**json.loads((path.parent / META).read_text()), "path": str(path)}
    if getattr(args, "json", False):
        print(json.dumps(summary, indent=2))
    elif not getattr(args, "quiet", False):
        print(f"{path}: {', '.join(summary['layers'])} of {summary['unet_class']} tuned for {summary['steps']} steps "
              f"(lr {summary['lr']}); loss {summary['loss_first']:.4f} at the first step, "
              f"{summary['loss_last_mean']:.4f} over the last ones")
    return summary
