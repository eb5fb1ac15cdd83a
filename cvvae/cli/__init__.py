"""The `cvvae` command line: one entry point, one module per command group, each a thin client of the library.

    video.py     reconstruct, encode, decode        models.py   inflate, deflate, convert, info
    dataset.py   encode-dataset                     evaluate.py eval
    train.py     train                              tune.py     tune-unet
    common.py    what they share (parent parsers, loading --weights, output checks, the summary printer)

Every error a user can cause ends in one line on stderr and exit code 2; outputs are written under
a temporary name and renamed when complete, so an interrupted run leaves no broken file behind.
Nothing in the library imports this package (tests/test_structure.py holds that rule).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import warnings

from ..errors import CVVAEError
from . import dataset, evaluate, models, train, tune, video
from .common import parent_parsers

EXAMPLES = """examples:
  cvvae reconstruct clip.mp4 -o recon.mp4 --weights CV-VAE --subfolder vae3d --short-side 256
  cvvae encode clip.mp4 -o clip.latents.safetensors --weights CV-VAE --subfolder vae3d
  cvvae decode clip.latents.safetensors -o clip.mp4
  cvvae inflate --from stable-diffusion-2-1/vae -o cvvae-inflated
  cvvae deflate cvvae-inflated -o vae2d
  cvvae convert CV-VAE/vae3d_sd3 -o cvvae-sd3
  cvvae info CV-VAE/vae3d
  cvvae encode-dataset clips.csv -o latents/ --weights CV-VAE --subfolder vae3d --frames 17 --size 256
  cvvae train configs/tiny.yaml steps=100
  cvvae eval --weights CV-VAE --subfolder vae3d --videos webvid_val.csv --image-vae sd21/vae -o report/
  cvvae tune-unet --unet text-to-video-ms --subfolder unet --latents latents/ -o tuned/
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cvvae", description="CV-VAE: encode, decode and reconstruct videos with a "
                                     "video VAE compatible with Stable Diffusion's latents.",
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parents = parent_parsers()
    for group in (video, models, dataset, evaluate, train, tune):
        group.add_parsers(sub, parents)
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
