"""PSNR of 2D image VAEs on held-out frames: frames 0, 6 and 12 of every held-out clip, resized to 256x256.

    python scripts/image_vae_psnr.py VIDEO_FOLDER VAE_FOLDER [VAE_FOLDER ...]

The check behind docs/reproduction.md's image-VAE figures for the bundled model's round 2 (posterior means,
fp32, PSNR per frame on [0, 1], averaged).
"""

import argparse
import itertools
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from cvvae.eval.metrics import psnr
from cvvae.io.video import read_frames, to_tensor

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("videos", type=Path, help="folder of held-out .mkv clips (the split's heldout/videos)")
    parser.add_argument("vaes", nargs="+", help="diffusers AutoencoderKL folders")
    args = parser.parse_args()
    clips = [to_tensor(list(itertools.islice(read_frames(f, size=(256, 256)), 0, 13, 6)))[0].transpose(0, 1)
             for f in sorted(args.videos.glob("*.mkv"))]
    x = torch.cat(clips)  # (frames, 3, 256, 256) in [-1, 1]
    for path in args.vaes:
        vae = AutoencoderKL.from_pretrained(path).eval()
        with torch.no_grad():
            rec = torch.cat([vae.decode(vae.encode(b).latent_dist.mean).sample for b in x.split(6)])
        value = psnr((rec.clamp(-1, 1) + 1) / 2, (x + 1) / 2).mean().item()
        print(f"{path}: {value:.2f} dB on {len(x)} frames of {len(clips)} clips")


if __name__ == "__main__":
    main()
