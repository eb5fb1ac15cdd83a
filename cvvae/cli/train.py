"""`cvvae train`: train a CV-VAE from a YAML config (`cvvae.train`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import HelpFormatter, report


def add_parsers(sub: argparse._SubParsersAction, parents: dict[str, argparse.ArgumentParser]) -> None:
    p = sub.add_parser("train", parents=[parents["common"]], formatter_class=HelpFormatter,
                       help="train a CV-VAE (latent regularisation, LPIPS, 3D GAN); torchrun for many processes",
                       description="Train with a YAML config (see configs/) and dotted key=value overrides, e.g. "
                       "`cvvae train configs/tiny.yaml steps=100 loss.mapping=slice`. Under torchrun every process "
                       "trains on its own share of the data (`torchrun --nproc_per_node N --no-python cvvae train ...`).")
    p.add_argument("config", type=Path, help="YAML config")
    p.add_argument("overrides", nargs="*", help="key=value overrides (dotted keys for sections)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from ..allocator import keep_freed_memory
    from ..train.config import load_config
    from ..train.trainer import train

    cfg = load_config(args.config, args.overrides)
    # Training repeats the same shapes every step: reusing freed blocks makes CPU steps ~2x faster. Not for the
    # inference commands, whose heap would grow with the video's length (cvvae/allocator.py).
    keep_freed_memory()
    final = train(cfg, resume=args.resume, quiet=args.quiet)
    done = final.name == "final"
    report(args, dict(output=str(final), finished=done),
           [f"final weights: {final}" if done else f"stopped at {final} (continue with --resume)"])
