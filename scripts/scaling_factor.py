"""Measure an image VAE's latent scaling factor and write it into model configs (the `ship` stage of
scripts/reproduce_bundled.sh).

    python scripts/scaling_factor.py VIDEOS_DIR IMAGE_VAE [CONFIG_DIR ...]

scaling_factor = 1 / std of the image VAE's latent means over frames 0, 25, ..., 175 of each .mkv in
VIDEOS_DIR (top-left 128x128), rounded to 5 digits: SD's recipe for its 0.18215. Prints it and sets
"scaling_factor" in the config.json of IMAGE_VAE and of each CONFIG_DIR (the CV-VAE that shares its latents).
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from cvvae.io.files import publish
from cvvae.io.video import read_frames, to_tensor


def measure(videos: Path, vae: AutoencoderKL) -> float:
    latents = []
    for path in sorted(videos.glob("*.mkv")):
        frames = to_tensor(list(itertools.islice(read_frames(path), 0, 200, 25)))[0].transpose(0, 1)
        with torch.no_grad():
            latents.append(vae.encode(frames[..., :128, :128]).latent_dist.mean)
    if not latents:
        sys.exit(f"scaling_factor.py: no .mkv videos in {videos}")
    return round(1 / torch.cat(latents).std().item(), 5)


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__.split("\n\n")[1])
    videos, image_vae, *others = (Path(a) for a in sys.argv[1:])
    scale = measure(videos, AutoencoderKL.from_pretrained(image_vae, torch_dtype=torch.float32).eval())
    for folder in (image_vae, *others):
        path = folder / "config.json"
        tmp = path.with_name(".config.json.partial")  # renamed into place: never a half-written config
        tmp.write_text(json.dumps({**json.loads(path.read_text()), "scaling_factor": scale}, indent=2) + "\n")
        publish(tmp, path)
    print(f"scaling_factor {scale}")


if __name__ == "__main__":
    main()
