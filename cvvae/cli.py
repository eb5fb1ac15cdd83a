"""The `cvvae` command line: one entry point, one subcommand per job, each a thin call into the library.

Every error a user can cause ends in one line on stderr and exit code 2; outputs are written under
a temporary name and renamed when complete, so an interrupted run leaves no broken file behind.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from .allocator import keep_freed_memory
from .errors import CVVAEError, InputError

EXAMPLES = """examples:
  cvvae reconstruct clip.mp4 -o recon.mp4 --weights CV-VAE --subfolder vae3d --short-side 256
  cvvae encode clip.mp4 -o clip.latents.safetensors --weights CV-VAE --subfolder vae3d
  cvvae decode clip.latents.safetensors -o clip.mp4 --weights CV-VAE --subfolder vae3d
  cvvae inflate --from stable-diffusion-2-1/vae -o cvvae-inflated
  cvvae deflate cvvae-inflated -o vae2d
  cvvae convert CV-VAE/vae3d_sd3 -o cvvae-sd3
  cvvae info CV-VAE/vae3d
  cvvae encode-dataset clips.csv -o latents/ --weights CV-VAE --subfolder vae3d --frames 17 --size 256
  cvvae train configs/tiny.yaml steps=100
  cvvae eval --weights CV-VAE --subfolder vae3d --videos webvid_val.csv --image-vae sd21/vae -o report/
"""


# ------------------------------------------------------------------------------------------ helpers
def _batched(items: Iterable, n: int) -> Iterator[list]:
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def _progress(args, total: int | None, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="frame", disable=args.quiet or args.json, file=sys.stderr,
                dynamic_ncols=True)


def _check_output(path: Path, *inputs: Path) -> None:
    if not path.parent.is_dir():
        raise InputError(f"output folder does not exist: {path.parent}")
    for src in inputs:
        if src.exists() and path.exists() and path.resolve() == src.resolve():
            raise InputError(f"output {path} would overwrite the input")


def _device(name: str | None) -> str:
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda asked for, but no CUDA GPU is available")
    return name


def _load_model(args, *, bundled_default: bool = True):
    """The CV-VAE of --weights/--subfolder; without --weights the bundled demo model (with a note)."""
    from .model import CVVAE

    if args.weights is None:
        if not bundled_default:
            raise InputError("--weights is required (a folder with config.json, a weights file, or a hub id such "
                             "as AILab-CVC/CV-VAE with --subfolder vae3d)")
        if args.subfolder:
            raise InputError("--subfolder needs --weights")
        from .bundled import NOTE, bundled_path

        if not args.quiet and not getattr(args, "json", False):
            print(f"cvvae: note: {NOTE}", file=sys.stderr)
        model = CVVAE.from_pretrained(bundled_path())
    else:
        model = CVVAE.from_pretrained(args.weights, subfolder=args.subfolder)
    tile = getattr(args, "tile_size", None)
    if tile is not None:
        from .errors import ConfigError
        from .model.chunking import check_tiles

        try:
            check_tiles(tile or None, model.config.tile_overlap_ratio, model.spatial_compression_ratio)
        except ConfigError:
            s = model.spatial_compression_ratio
            raise InputError(f"--tile-size must be 0 (no tiling) or a multiple of {s} of at least {4 * s}, "
                             f"got {tile}") from None
        model.register_to_config(tile_spatial_size=tile or None)
    return model.to(_device(args.device)).requires_grad_(False)


def _model_id(args) -> str:
    if args.weights is None:
        return "cvvae-bundled"
    return f"{args.weights}" + (f"/{args.subfolder}" if args.subfolder else "")


def _read_kwargs(args) -> dict:
    if args.short_side and (args.height or args.width):
        raise InputError("use either --short-side or --height/--width, not both")
    if bool(args.height) != bool(args.width):
        raise InputError("--height and --width go together")
    size = (args.height, args.width) if args.height else None
    return dict(start=args.start, max_frames=args.max_frames, size=size, short_side=args.short_side)


def _frame_pieces(frames: Iterable[np.ndarray], bar, n: int = 16):
    """uint8 frames (H, W, 3) -> video pieces (1, 3, n, H, W) in [-1, 1]."""
    from .io.video import to_tensor

    for batch in _batched(frames, n):
        bar.update(len(batch))
        yield to_tensor(np.stack(batch))


def _encode_file(args, model):
    """Encode a video file as a stream. Returns (latents, VideoInfo)."""
    from . import codec
    from .io.video import probe, read_frames

    info = probe(args.input)
    total = info.num_frames if args.max_frames is None else min(args.max_frames, info.num_frames or args.max_frames)
    with _progress(args, total, "encode") as bar:
        frames = read_frames(args.input, **_read_kwargs(args))
        latents = codec.encode(model, _frame_pieces(frames, bar), dtype=args.dtype, keep_logvar=args.sample)
    return latents, info


def _atomic_path(path: Path) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def _report(args, summary: dict, lines: list[str]) -> None:
    if args.json:
        print(json.dumps(summary, indent=2))
    elif not args.quiet:
        print("\n".join(lines))


# ------------------------------------------------------------------------------------------ commands
def cmd_reconstruct(args) -> None:
    import torch

    from . import codec
    from .eval.metrics import psnr, ssim
    from .io.video import VideoWriter, read_frames, to_frames

    _check_output(args.output, args.input)
    model = _load_model(args)
    t0 = time.perf_counter()
    latents, info = _encode_file(args, model)
    if args.sample:
        latents.mean = latents.sample(torch.Generator(latents.mean.device).manual_seed(args.seed))
    psnrs, ssims = [], []
    originals = read_frames(args.input, **_read_kwargs(args))
    with VideoWriter(args.output, fps=info.fps, crf=args.crf) as writer, \
            _progress(args, latents.num_frames, "decode") as bar:
        for piece in codec.decode_stream(model, latents, dtype=args.dtype):
            out = to_frames(piece)
            ref = np.stack([next(originals) for _ in range(len(out))])
            a, b = (torch.from_numpy(f).permute(0, 3, 1, 2).float() / 255 for f in (ref, out))
            psnrs += psnr(a, b).tolist()
            ssims += ssim(a, b).tolist()
            for r, o in zip(ref, out):
                writer.write(np.concatenate([r, o], axis=1) if args.side_by_side else o)
            bar.update(len(out))
    summary = dict(input=str(args.input), output=str(args.output), frames=latents.num_frames,
                   height=latents.height, width=latents.width, fps=info.fps,
                   latent_shape=list(latents.mean.shape), psnr=float(np.mean(psnrs)), ssim=float(np.mean(ssims)),
                   seconds=round(time.perf_counter() - t0, 2))
    _report(args, summary, [
        f"{args.output}: {summary['frames']} frames {summary['width']}x{summary['height']} @ {info.fps:g} fps",
        f"PSNR {summary['psnr']:.2f} dB  SSIM {summary['ssim']:.4f}  ({summary['seconds']} s)"])


def cmd_encode(args) -> None:
    from safetensors.torch import save_file

    from . import __version__
    from .io.files import publish
    from .model.chunking import tile_size

    _check_output(args.output, args.input)
    model = _load_model(args)
    latents, info = _encode_file(args, model)
    tensors = {"latents": latents.mean.cpu().contiguous()}
    if latents.logvar is not None:
        tensors["logvar"] = latents.logvar.cpu().contiguous()
    cfg = model.config
    meta = dict(fps=info.fps, num_frames=latents.num_frames, height=latents.height, width=latents.width,
                source=str(args.input), source_height=info.height, source_width=info.width,
                model=_model_id(args), z_channels=cfg.z_channels, scaling_factor=cfg.scaling_factor,
                shift_factor=cfg.shift_factor, tile_spatial_size=tile_size(model), cvvae_version=__version__)
    tmp = _atomic_path(args.output)
    try:
        save_file(tensors, str(tmp), metadata={k: json.dumps(v) for k, v in meta.items()})
        publish(tmp, args.output)
    finally:
        tmp.unlink(missing_ok=True)
    summary = dict(output=str(args.output), latent_shape=list(latents.mean.shape), **meta)
    _report(args, summary, [f"{args.output}: latents {tuple(latents.mean.shape)} from {latents.num_frames} frames "
                            f"{latents.width}x{latents.height} @ {info.fps:g} fps"])


def _read_latents(path: Path):
    from safetensors import SafetensorError, safe_open

    from .codec import Latents

    if not path.is_file():
        raise InputError(f"latent file not found: {path}")
    try:
        with safe_open(str(path), "pt") as f:
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, json.JSONDecodeError) as e:
        raise InputError(f"{path} is not a cvvae latent file ({e})") from None
    if "latents" not in tensors or "num_frames" not in meta:
        raise InputError(f"{path} is not a cvvae latent file (written by `cvvae encode`)")
    latents = Latents(tensors["latents"], tensors.get("logvar"), meta["num_frames"], meta["height"], meta["width"])
    return latents, meta


def cmd_decode(args) -> None:
    from . import codec
    from .io.video import VideoWriter, to_frames

    _check_output(args.output, args.input)
    latents, meta = _read_latents(args.input)
    model = _load_model(args)
    if latents.mean.shape[1] != model.config.z_channels:
        raise InputError(f"{args.input} holds {latents.mean.shape[1]}-channel latents of {meta.get('model')}, "
                         f"but this model has {model.config.z_channels} latent channels")
    with VideoWriter(args.output, fps=meta.get("fps", 25.0), crf=args.crf) as writer, \
            _progress(args, latents.num_frames, "decode") as bar:
        for piece in codec.decode_stream(model, latents, dtype=args.dtype):
            for frame in to_frames(piece):
                writer.write(frame)
            bar.update(piece.shape[2])
    summary = dict(output=str(args.output), frames=latents.num_frames, height=latents.height,
                   width=latents.width, fps=meta.get("fps"))
    _report(args, summary, [f"{args.output}: {latents.num_frames} frames {latents.width}x{latents.height}"])


def _save_model_dir(model, out: Path) -> None:
    """save_pretrained into a temporary sibling folder, renamed when complete."""
    from .io.files import publish

    if out.exists() and any(out.iterdir()):
        raise InputError(f"output folder {out} exists and is not empty")
    if not out.parent.is_dir():
        raise InputError(f"output folder's parent does not exist: {out.parent}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        if out.exists():
            out.rmdir()
        publish(tmp, out)
    finally:
        if tmp.exists():
            for p in tmp.iterdir():
                p.unlink()
            tmp.rmdir()


def _model_summary(model) -> dict:
    cfg = model.config
    variant = {(4, "zeros"): "SD2.1-compatible (4 latent channels)",
               (16, "replicate"): "SD3-compatible (16 latent channels)"}.get((cfg.z_channels, cfg.padding_mode), "custom")
    dtypes = sorted({str(p.dtype).replace("torch.", "") for p in model.parameters()})
    return dict(variant=variant, latent_channels=cfg.z_channels, block_out_channels=list(cfg.block_out_channels),
                res_blocks_per_level=cfg.num_res_blocks,
                parameters=sum(p.numel() for p in model.parameters()),
                encoder_parameters=sum(p.numel() for p in model.encoder.parameters()),
                decoder_parameters=sum(p.numel() for p in model.decoder.parameters()),
                dtype=",".join(dtypes), spatial_compression=model.spatial_compression_ratio,
                temporal_compression=model.temporal_compression_ratio, decoder_attention=cfg.decoder_attn_type,
                scaling_factor=cfg.scaling_factor, shift_factor=cfg.shift_factor)


def cmd_inflate(args) -> None:
    from .model.inflate import inflate_from_image_vae

    overrides = {k: v for k, v in dict(norm_num_groups=args.norm_num_groups, scaling_factor=args.scaling_factor).items()
                 if v is not None}
    if args.spatial_attention_only:
        overrides["spatial_attention_only"] = True
    source = Path(args.source)
    if not source.exists():
        raise InputError(f"2D VAE not found: {source}")
    model = inflate_from_image_vae(source, **overrides)
    _save_model_dir(model, args.output)
    s = _model_summary(model)
    _report(args, dict(output=str(args.output), **s),
            [f"{args.output}: CV-VAE inflated from {source} ({s['parameters']:,} parameters, "
             f"{s['latent_channels']} latent channels)"])


def cmd_deflate(args) -> None:
    import torch

    from .codec import DTYPES
    from .model import CVVAE
    from .model.inflate import deflate_to_image_vae

    vae2d = deflate_to_image_vae(CVVAE.from_pretrained(args.weights, subfolder=args.subfolder),
                                 drop_temporal_attention=args.drop_temporal_attention)
    if args.dtype:  # torch's to(): diffusers' warns of float32-only modules even when AutoencoderKL has none
        torch.nn.Module.to(vae2d, DTYPES[args.dtype])
    _save_model_dir(vae2d, args.output)
    how = ("as the CV-VAE is on single images without its temporal attention" if args.drop_temporal_attention
           else "equal to the CV-VAE on single images")
    _report(args, dict(output=str(args.output), parameters=sum(p.numel() for p in vae2d.parameters())),
            [f"{args.output}: diffusers AutoencoderKL {how}"])


def cmd_convert(args) -> None:
    from .codec import DTYPES
    from .model import CVVAE

    model = CVVAE.from_pretrained(args.input, subfolder=args.subfolder,
                                  torch_dtype=DTYPES[args.dtype] if args.dtype else None)
    if args.num_res_blocks is not None:
        from .model.grow import deepen

        model = deepen(model, args.num_res_blocks)
    _save_model_dir(model, args.output)
    summary = _model_summary(model)
    _report(args, dict(output=str(args.output), **summary),
            [f"{args.output}: config.json + diffusion_pytorch_model.safetensors ({summary['variant']})"])


def cmd_info(args) -> None:
    from .model import CVVAE

    model = CVVAE.from_pretrained(args.weights, subfolder=args.subfolder)
    s = _model_summary(model)
    _report(args, s, [f"{k.replace('_', ' '):>22}: {v:,}" if isinstance(v, int) and not isinstance(v, bool)
                      else f"{k.replace('_', ' '):>22}: {v}" for k, v in s.items()])


def cmd_train(args) -> None:
    from .train.trainer import load_config, train

    cfg = load_config(args.config, args.overrides)
    # Training repeats the same shapes every step: reusing freed blocks makes CPU steps ~2x faster. Not for the
    # inference commands, whose heap would grow with the video's length (cvvae/allocator.py).
    keep_freed_memory()
    final = train(cfg, resume=args.resume, quiet=args.quiet)
    done = final.name == "final"
    _report(args, dict(output=str(final), finished=done),
            [f"final weights: {final}" if done else f"stopped at {final} (continue with --resume)"])


# ------------------------------------------------------------------------------------------ parser
class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the uninformative None/False ones."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or "%(default)" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    fmt = _Help
    parser = argparse.ArgumentParser(prog="cvvae", description="CV-VAE: encode, decode and reconstruct videos with a "
                                     "video VAE compatible with Stable Diffusion's latents.",
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars or messages")
    common.add_argument("--json", action="store_true", help="print a JSON summary on stdout")

    model = argparse.ArgumentParser(add_help=False)
    model.add_argument("--weights", help="model folder (config.json + safetensors), weights file, or hub id "
                                         "(default for reconstruct/encode/decode: the small bundled demo model)")
    model.add_argument("--subfolder", help="subfolder of --weights, e.g. vae3d or vae3d_sd3 in the official repo")
    model.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                       help="compute precision; auto = bf16 where native (recent GPUs, AVX512-BF16 CPUs), else fp32")
    model.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    model.add_argument("--tile-size", type=int, metavar="PX",
                       help="spatial tiles of this many pixels for frames larger than that (default: the model's, 576 "
                            "for the released weights; 0 = never tile). Smaller tiles need less memory; seams are "
                            "blended, so outputs differ slightly from untiled ones")
    model.add_argument("--crf", type=int, default=18, help="libx264 quality of written videos (0 = lossless)")

    frames = argparse.ArgumentParser(add_help=False)
    frames.add_argument("--height", type=int, help="resize frames to this height (with --width)")
    frames.add_argument("--width", type=int, help="resize frames to this width (with --height)")
    frames.add_argument("--short-side", type=int, help="resize so the short side has this length, keeping aspect")
    frames.add_argument("--max-frames", type=int, help="use at most this many frames")
    frames.add_argument("--start", type=float, default=0.0, help="start time in seconds")
    frames.add_argument("--sample", action="store_true", help="sample the posterior instead of taking its mean")

    p = sub.add_parser("reconstruct", parents=[common, model, frames], formatter_class=fmt,
                       help="encode and decode a video (or image); report PSNR/SSIM",
                       description="Encode and decode a video or image, write the reconstruction, print PSNR/SSIM. "
                       "Keeps fps and aspect ratio; any frame count and size work (padded, then trimmed).")
    p.add_argument("input", type=Path, help="video (mp4, avi, mkv, webm, ...) or image (png, jpg)")
    p.add_argument("-o", "--output", type=Path, required=True, help="output video (or image for image input)")
    p.add_argument("--side-by-side", action="store_true", help="write input | reconstruction next to each other")
    p.add_argument("--seed", type=int, default=0, help="seed for --sample")
    p.set_defaults(func=cmd_reconstruct)

    p = sub.add_parser("encode", parents=[common, model, frames], formatter_class=fmt,
                       help="encode a video to a latent file (.safetensors with metadata)",
                       description="Encode a video to latents (unscaled posterior mean; with --sample also the "
                       "logvar) plus metadata (fps, size, frame count, model, scaling factor).")
    p.add_argument("input", type=Path, help="video or image")
    p.add_argument("-o", "--output", type=Path, required=True, help="latent file, e.g. clip.latents.safetensors")
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("decode", parents=[common, model], formatter_class=fmt,
                       help="decode a latent file back to a video of the original length and size")
    p.add_argument("input", type=Path, help="latent file written by `cvvae encode`")
    p.add_argument("-o", "--output", type=Path, required=True, help="output video or image")
    p.set_defaults(func=cmd_decode)

    p = sub.add_parser("inflate", parents=[common], formatter_class=fmt,
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
    p.set_defaults(func=cmd_inflate)

    p = sub.add_parser("deflate", parents=[common], formatter_class=fmt,
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
    p.set_defaults(func=cmd_deflate)

    p = sub.add_parser("convert", parents=[common], formatter_class=fmt,
                       help="any supported checkpoint -> config.json + diffusion_pytorch_model.safetensors")
    p.add_argument("input", help="folder, weights file (.safetensors, .ckpt, .bin) or hub id")
    p.add_argument("-o", "--output", type=Path, required=True, help="output folder")
    p.add_argument("--subfolder", help="subfolder of the input")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="store weights in this dtype")
    p.add_argument("--num-res-blocks", type=int, metavar="N",
                   help="grow to N ResBlocks per level: the new blocks start as the identity (zero conv2), so the "
                   "output is unchanged until training; capacity for a trained model without a restart")
    p.set_defaults(func=cmd_convert)

    from .data import latents
    from .eval import report
    from .pipelines import tune

    latents.add_parser(sub, [common, model])
    report.add_parser(sub, [common])
    tune.add_parser(sub, [common])

    p = sub.add_parser("train", parents=[common], formatter_class=fmt,
                       help="train a CV-VAE (latent regularisation, LPIPS, 3D GAN); torchrun for many processes",
                       description="Train with a YAML config (see configs/) and dotted key=value overrides, e.g. "
                       "`cvvae train configs/tiny.yaml steps=100 loss.mapping=slice`. Under torchrun every process "
                       "trains on its own share of the data (`torchrun --nproc_per_node N --no-python cvvae train ...`).")
    p.add_argument("config", type=Path, help="YAML config")
    p.add_argument("overrides", nargs="*", help="key=value overrides (dotted keys for sections)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("info", parents=[common], formatter_class=fmt,
                       help="variant, channels, parameter count, dtype, compression ratios")
    p.add_argument("weights", help="folder, weights file or hub id")
    p.add_argument("--subfolder", help="subfolder of the weights")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet = getattr(args, "quiet", False) or getattr(args, "json", False)

    def show(message, category, filename, lineno, file=None, line=None):
        if not quiet:
            from tqdm import tqdm

            tqdm.write(f"cvvae: note: {message}", file=sys.stderr)  # keeps progress bars intact

    warnings.showwarning = show
    if threading.current_thread() is threading.main_thread():
        # `kill` (SIGTERM) unwinds like Ctrl-C, so atomic writers delete their partial files.
        signal.signal(signal.SIGTERM, _terminated)
    try:
        args.func(args)
    except CVVAEError as e:
        print(f"cvvae: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cvvae: interrupted", file=sys.stderr)
        return 130
    except _Terminated:
        print("cvvae: terminated", file=sys.stderr)
        return 143
    return 0


class _Terminated(BaseException):
    """Raised by the SIGTERM handler: unwinds the stack (cleanup runs) without being caught as an Exception."""


def _terminated(signum, frame) -> None:
    raise _Terminated


if __name__ == "__main__":
    sys.exit(main())
