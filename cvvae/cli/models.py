"""`cvvae inflate`, `deflate`, `convert`, `info`: making, exporting and describing model folders."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import InputError
from ..runtime import DTYPES
from .common import HelpFormatter, report, save_model_dir


def add_parsers(sub: argparse._SubParsersAction, parents: dict[str, argparse.ArgumentParser]) -> None:
    common = parents["common"]
    p = sub.add_parser("inflate", parents=[common], formatter_class=HelpFormatter,
                       help="build a CV-VAE from a 2D image VAE (exact on images)",
                       description="Inflate an SD-style 2D image VAE (diffusers AutoencoderKL folder, or an LDM/"
                       "diffusers state dict file) into a CV-VAE folder loadable with CVVAE.from_pretrained.")
    p.add_argument("--from", dest="source", required=True, help="2D VAE folder or weights file")
    p.add_argument("-o", "--output", type=Path, required=True, help="output folder")
    p.add_argument("--norm-num-groups", type=int, help="GroupNorm groups of a state-dict source (SD: 32)")
    p.add_argument("--scaling-factor", type=float, help="latent scaling factor to record (SD2.1: 0.18215)")
    p.add_argument("--spatial-attention-only", action="store_true",
                   help="no temporal attention in the decoder: a model to train further on images only, which "
                   "`cvvae deflate` then exports exactly")
    p.set_defaults(func=inflate)

    p = sub.add_parser("deflate", parents=[common], formatter_class=HelpFormatter,
                       help="export the 2D image VAE a CV-VAE is on single images (diffusers AutoencoderKL)",
                       description="The inverse of inflate: e.g. a CV-VAE trained on images only becomes the "
                       "AutoencoderKL it is (exact), to serve as the frozen image VAE of video training.")
    p.add_argument("weights", help="CV-VAE folder, weights file or hub id")
    p.add_argument("-o", "--output", type=Path, required=True, help="output folder")
    p.add_argument("--subfolder", help="subfolder of the weights")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="store weights in this dtype")
    p.add_argument("--drop-temporal-attention", action="store_true",
                   help="export a decoder whose temporal attention was trained (an inflated CV-VAE trained "
                   "further on images) without it; not exact then, so measure the result")
    p.set_defaults(func=deflate)

    p = sub.add_parser("convert", parents=[common], formatter_class=HelpFormatter,
                       help="any supported checkpoint -> config.json + diffusion_pytorch_model.safetensors")
    p.add_argument("input", help="folder, weights file (.safetensors, .ckpt, .bin) or hub id")
    p.add_argument("-o", "--output", type=Path, required=True, help="output folder")
    p.add_argument("--subfolder", help="subfolder of the input")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="store weights in this dtype")
    p.add_argument("--num-res-blocks", type=int, metavar="N",
                   help="grow to N ResBlocks per level: the new blocks start as the identity (zero conv2), so the "
                   "output is unchanged until training; capacity for a trained model without a restart")
    p.add_argument("--widen", type=int, metavar="F",
                   help="grow to F times the channels at every level: each channel copied F times, the weights that "
                   "read it split over the copies at random, so the output is unchanged (to float rounding) until "
                   "training; F^2 times the parameters and the work")
    p.add_argument("--max-shard-size", metavar="SIZE", help="split the weights into shards of at most SIZE "
                   "(e.g. 200MB) with an index file, as diffusers' save_pretrained does")
    p.set_defaults(func=convert)

    p = sub.add_parser("info", parents=[common], formatter_class=HelpFormatter,
                       help="architecture, channels, parameter count, dtype, compression ratios")
    p.add_argument("weights", help="folder, weights file or hub id")
    p.add_argument("--subfolder", help="subfolder of the weights")
    p.set_defaults(func=info)


def inflate(args: argparse.Namespace) -> None:
    from ..identity import describe
    from ..model.inflate import inflate_from_image_vae

    overrides = {k: v for k, v in dict(norm_num_groups=args.norm_num_groups, scaling_factor=args.scaling_factor).items()
                 if v is not None}
    if args.spatial_attention_only:
        overrides["spatial_attention_only"] = True
    source = Path(args.source)
    if not source.exists():
        raise InputError(f"2D VAE not found: {source}")
    model = inflate_from_image_vae(source, **overrides)
    save_model_dir(model, args.output)
    s = describe(model)
    report(args, dict(output=str(args.output), **s),
           [f"{args.output}: CV-VAE inflated from {source} ({s['parameters']:,} parameters, "
            f"{s['latent_channels']} latent channels)"])


def deflate(args: argparse.Namespace) -> None:
    import torch

    from ..model import CVVAE
    from ..model.inflate import deflate_to_image_vae

    vae2d = deflate_to_image_vae(CVVAE.from_pretrained(args.weights, subfolder=args.subfolder),
                                 drop_temporal_attention=args.drop_temporal_attention)
    if args.dtype:  # torch's to(): diffusers' warns of float32-only modules even when AutoencoderKL has none
        torch.nn.Module.to(vae2d, DTYPES[args.dtype])
    save_model_dir(vae2d, args.output)
    how = ("as the CV-VAE is on single images without its temporal attention" if args.drop_temporal_attention
           else "equal to the CV-VAE on single images")
    report(args, dict(output=str(args.output), parameters=sum(p.numel() for p in vae2d.parameters())),
           [f"{args.output}: diffusers AutoencoderKL {how}"])


def convert(args: argparse.Namespace) -> None:
    import torch

    from ..identity import describe
    from ..model import CVVAE

    grow = args.num_res_blocks is not None or args.widen is not None
    # a grown model is cast once, at the end: widen's split weights rounded straight from their float64 values
    model = CVVAE.from_pretrained(args.input, subfolder=args.subfolder,
                                  torch_dtype=DTYPES[args.dtype] if args.dtype and not grow else None)
    if args.num_res_blocks is not None:
        from ..model.grow import deepen

        model = deepen(model, args.num_res_blocks)
    if args.widen is not None:
        from ..model.grow import widen

        model = widen(model, args.widen)
    if grow and args.dtype:  # torch's to(): diffusers' warns of float32-only modules even when CVVAE has none
        torch.nn.Module.to(model, DTYPES[args.dtype])
    if args.max_shard_size:
        from huggingface_hub.serialization import split_torch_state_dict_into_shards

        from ..io.files import atomic_dir

        try:  # the parser diffusers' save_pretrained uses, before anything is written
            split_torch_state_dict_into_shards({}, max_shard_size=args.max_shard_size)
        except ValueError as e:
            raise InputError(f"--max-shard-size {args.max_shard_size}: {e} (e.g. 200MB)") from None
        with atomic_dir(args.output) as tmp:
            model.save_pretrained(tmp, max_shard_size=args.max_shard_size)
    else:
        save_model_dir(model, args.output)
    summary = describe(model)
    files = sorted(p.name for p in args.output.iterdir())
    report(args, dict(output=str(args.output), files=files, **summary),
           [f"{args.output}: {', '.join(files)} ({summary['variant']})"])


def info(args: argparse.Namespace) -> None:
    from ..identity import describe
    from ..model import CVVAE

    s = describe(CVVAE.from_pretrained(args.weights, subfolder=args.subfolder))
    from ..bundled import MEASURED, bundled_path

    folder = Path(args.weights).expanduser() / (args.subfolder or "")
    if folder.exists() and folder.resolve() == bundled_path().resolve():  # the bundled model: what it measures
        s.update(variant="the bundled demo model", **MEASURED)
    report(args, s, [f"{k.replace('_', ' '):>22}: {v:,}" if isinstance(v, int) and not isinstance(v, bool)
                     else f"{k.replace('_', ' '):>22}: {v}" for k, v in s.items()])
