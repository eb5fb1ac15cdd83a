"""`cvvae tune-unet`: output-layer tuning of a video diffusion UNet on CV-VAE latents (`cvvae.finetune`)."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path
from typing import Any

from ..finetune import FAMILIES, LAYERS, SUPPORTED, SVDOptions, TuneError
from ..finetune.layers import META, WEIGHTS
from .common import HelpFormatter, report

_SVD_FLAGS = tuple(f.name for f in fields(SVDOptions))


def add_parsers(sub: argparse._SubParsersAction, parents: dict[str, argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "tune-unet", parents=[parents["common"]], formatter_class=HelpFormatter,
        help="train only the output (and input) layer of a video diffusion UNet on CV-VAE latents",
        description="The paper's minimal fine-tuning: freeze a video diffusion UNet except conv_out (and conv_in "
        "with --layers first+last) and train it with its own objective on latents written by "
        "`cvvae encode-dataset`, with zero text/image context unless --encoder-hidden-states is given. "
        "TextToVideoSD and AnimateDiff UNets: a scheduler's DDPM-style loss; SVD: its EDM v-prediction loss "
        "conditioned on the first latent frame (no scheduler; --fps, --motion-bucket-id, ...). Supported UNets: "
        f"{', '.join(SUPPORTED)}. Saves only the tuned layers: OUT/{WEIGHTS} + {META}; load them with "
        "cvvae.finetune.load_tuned_layers(pipe, OUT).")
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


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Load the UNet, scheduler (not for SVD) and latents, tune, print the summary."""
    from ..data import LatentDataset
    from ..finetune import load_scheduler, load_unet, read_context, tune_unet

    unet = load_unet(args.unet, args.subfolder)
    given = {k: getattr(args, k) for k in _SVD_FLAGS if getattr(args, k, None) is not None}
    if FAMILIES[type(unet).__name__] == "edm":
        if args.scheduler:
            raise TuneError("--scheduler does not apply to SVD: it trains with the EDM objective, without a scheduler")
        scheduler, svd = None, SVDOptions(**given)
    elif given:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise TuneError(f"{flags} apply only to SVD's UNetSpatioTemporalConditionModel, not {type(unet).__name__}")
    else:
        scheduler, svd = load_scheduler(args.unet, args.subfolder, args.scheduler), None
    context = read_context(args.encoder_hidden_states) if args.encoder_hidden_states else None
    data = LatentDataset(args.latents, scale=True, seed=args.seed)
    path = tune_unet(unet, scheduler, data, which=args.layers, steps=args.steps, lr=args.lr,
                     batch_size=args.batch_size, mixed_precision=args.mixed_precision,
                     gradient_checkpointing=args.gradient_checkpointing, seed=args.seed, output=args.output,
                     encoder_hidden_states=context, svd=svd)
    summary = {**json.loads((path.parent / META).read_text()), "path": str(path)}
    report(args, summary, [
        f"{path}: {', '.join(summary['layers'])} of {summary['unet_class']} tuned for {summary['steps']} steps "
        f"({summary['objective']} objective, lr {summary['lr']}); loss {summary['loss_first']:.4f} at the first "
        f"step, {summary['loss_last_mean']:.4f} over the last ones"])
    return summary
