"""What every `cvvae` command shares: the help formatter, the parent parsers, loading the model of --weights,
output checks, progress bars and the summary printer. A client of the library: nothing in cvvae imports it."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any

from ..errors import ConfigError, InputError
from ..runtime import DTYPE_CHOICES, resolve_device


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the uninformative None/False ones."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or "%(default)" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def parent_parsers() -> dict[str, argparse.ArgumentParser]:
    """Option groups that several commands share: "common" (-q, --json), "model" (--weights, --subfolder,
    --dtype, --device, --tile-size), "frames" (which frames of a video to read), "video" (--crf of written
    videos)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars or messages")
    common.add_argument("--json", action="store_true", help="print a JSON summary on stdout")

    model = argparse.ArgumentParser(add_help=False)
    model.add_argument("--weights", help="model folder (config.json + safetensors), weights file, or hub id "
                                         "(default for reconstruct/encode: the small bundled demo model; decode: the "
                                         "model recorded in the latent file)")
    model.add_argument("--subfolder", help="subfolder of --weights, e.g. vae3d or vae3d_sd3 in the official repo")
    model.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                       help="compute precision; auto = bf16 where native (recent GPUs, AVX512-BF16 CPUs), else fp32")
    model.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    model.add_argument("--chunk-mode", choices=["blend", "official", "full"], default="blend",
                       help="temporal rounds of a long video: blend = rounds that overlap and are blended (no seams, "
                            "4/3 the compute), official = the released 16-frame rounds (a seam every 16 frames), "
                            "full = the whole clip in one forward (memory grows with its length)")
    model.add_argument("--blend-overlap", type=int, metavar="N",
                       help="latents (4 frames each) two blended rounds share beyond their boundary (default 1, the "
                            "most the released 16-frame rounds allow)")
    model.add_argument("--tile-size", type=int, metavar="PX",
                       help="spatial tiles of this many pixels for frames larger than that (default: the model's, 576 "
                            "for the released weights; 0 = never tile). Smaller tiles need less memory; seams are "
                            "blended, so outputs differ slightly from untiled ones")

    frames = argparse.ArgumentParser(add_help=False)
    frames.add_argument("--height", type=int, help="resize frames to this height (with --width)")
    frames.add_argument("--width", type=int, help="resize frames to this width (with --height)")
    frames.add_argument("--short-side", type=int, help="resize so the short side has this length, keeping aspect")
    frames.add_argument("--max-frames", type=int, help="use at most this many frames")
    frames.add_argument("--start", type=float, default=0.0, help="start time in seconds")

    video = argparse.ArgumentParser(add_help=False)
    video.add_argument("--crf", type=int, default=18, help="libx264 quality of the written video (0 = lossless)")
    return dict(common=common, model=model, frames=frames, video=video)


def note(args: argparse.Namespace, message: str) -> None:
    """A one-line note on stderr, unless -q or --json."""
    if not getattr(args, "quiet", False) and not getattr(args, "json", False):
        print(f"cvvae: note: {message}", file=sys.stderr)


def weights_dtype(args: argparse.Namespace):
    """The dtype to load the weights in: bf16 where a CPU computes in bf16 (--dtype auto on a native-bf16 CPU, or
    bf16): half the memory, no casts per call, channels-last (`set_up`); float32 elsewhere, where autocast picks
    the compute dtype per call and a round that is not finite can be recomputed in float32."""
    import torch

    from ..runtime import native_bf16, resolve_dtype

    device = resolve_device(getattr(args, "device", None))
    with warnings.catch_warnings():  # "no native bf16" is said once, when the codec resolves the same dtype
        warnings.simplefilter("ignore")
        dtype = resolve_dtype(getattr(args, "dtype", "fp32"), device)
    native = device.type == "cpu" and dtype == torch.bfloat16 and native_bf16(device)
    return torch.bfloat16 if native else torch.float32


def load_model(args: argparse.Namespace, *, required: bool = False):
    """(CV-VAE of --weights/--subfolder on --device with --tile-size, its id). Without --weights: the bundled
    demo model (with a note), or an error when the command needs weights (`required`)."""
    from ..bundled import NOTE
    from ..identity import load_model as load, model_id

    if args.weights is None:
        if required:
            raise InputError("--weights is required (a folder with config.json, a weights file, or a hub id such "
                             "as AILab-CVC/CV-VAE with --subfolder vae3d)")
        if args.subfolder:
            raise InputError("--subfolder needs --weights")
        note(args, NOTE)
    model = load(args.weights, args.subfolder, torch_dtype=weights_dtype(args))
    return set_up(model, args), model_id(args.weights, args.subfolder)


def set_up(model, args: argparse.Namespace):
    """`model` with --chunk-mode/--blend-overlap and --tile-size applied, on --device, without gradients; bf16
    weights laid out channels-last (the layout the CPU's bf16 convolutions run fastest in, docs/benchmarks.md)."""
    import torch

    mode, overlap = getattr(args, "chunk_mode", None), getattr(args, "blend_overlap", None)
    if overlap is not None and mode != "blend":
        raise InputError("--blend-overlap applies to --chunk-mode blend only")
    try:
        if mode is not None:
            model.chunk_mode = mode
        if overlap is not None:
            model.blend_overlap = overlap
    except ConfigError as e:
        raise InputError(str(e).replace("blend_overlap", "--blend-overlap")) from None

    tile = getattr(args, "tile_size", None)
    if tile == 0:
        model.disable_tiling()
    elif tile is not None:
        try:
            model.enable_tiling(tile)
        except ConfigError:
            s = model.spatial_compression_ratio
            raise InputError(f"--tile-size must be 0 (no tiling) or a multiple of {s} of at least {4 * s}, "
                             f"got {tile}") from None
    model = model.to(resolve_device(args.device)).requires_grad_(False)
    if next(model.parameters()).dtype == torch.bfloat16 and model.device.type == "cpu":
        model.to(memory_format=torch.channels_last_3d)
    return model


def read_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """`read_frames` arguments of the "frames" options."""
    if args.short_side and (args.height or args.width):
        raise InputError("use either --short-side or --height/--width, not both")
    if bool(args.height) != bool(args.width):
        raise InputError("--height and --width go together")
    size = (args.height, args.width) if args.height else None
    return dict(start=args.start, max_frames=args.max_frames, size=size, short_side=args.short_side)


def check_output(path: Path, *inputs: Path) -> None:
    if not path.parent.is_dir():
        raise InputError(f"output folder does not exist: {path.parent}")
    for src in inputs:
        if src.exists() and path.exists() and path.resolve() == src.resolve():
            raise InputError(f"output {path} would overwrite the input")


def progress(args: argparse.Namespace, total: int | None, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="frame", disable=args.quiet or args.json, file=sys.stderr,
                dynamic_ncols=True)


def report(args: argparse.Namespace, summary: dict, lines: list[str]) -> None:
    """The command's summary: JSON with --json, the lines otherwise, nothing with -q."""
    if getattr(args, "json", False):
        print(json.dumps(summary, indent=2))
    elif not getattr(args, "quiet", False):
        print("\n".join(lines))


def save_model_dir(model, out: Path) -> None:
    """save_pretrained into a new (or empty) folder, atomically."""
    from ..io.files import atomic_dir

    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
