"""The small CV-VAE that ships with the package: a real, offline default, not the released model.

It was trained on this project's CPU with the project's own trainer, on the sample media of
``scripts/get_sample_media.sh`` (six short videos and six photos, 256-px frames, crops of 64 to 256 px; in its
last rounds also camera-motion clips over 36 wallpaper pictures): first a small SD-architecture image VAE, then
that VAE inflated to a CV-VAE and trained on clips with decoder latent regularisation through it. It shows the
method end to end and reconstructs real video: on five whole real videos it never saw it beats a trivial 8x bicubic
codec in PSNR, though not on fast motion, and on camera motion over held-out pictures (many of them smooth renders)
it stays under that codec (`MEASURED`); it has seen a few thousand frames of a few dozen scenes. Use the released
weights (``AILab-CVC/CV-VAE``, subfolder ``vae3d``) for real work. How it was made and what it measures on held-out
clips and unseen scenes: docs/reproduction.md (commands: scripts/reproduce_bundled.sh).

    from cvvae.bundled import load_bundled
    model = load_bundled()               # CVVAE (16 latent channels as SD3's, narrow widths)
    vae2d = load_bundled("image_vae")    # its frozen diffusers AutoencoderKL
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch

from .errors import CheckpointError

__all__ = ["BUNDLED_DIR", "MEASURED", "NOTE", "bundled_path", "load_bundled"]

BUNDLED_DIR = Path(__file__).parent / "assets" / "bundled"
_FOLDERS = {"cvvae": "cvvae", "image_vae": "vae2d"}
# What the bundled model measures on scenes it never saw, next to a trivial codec (docs/reproduction.md, with the
# commands), 33 frames, fp32 (round 18): five whole real videos no training file comes from, and camera-motion clips
# over 12 held-out wallpaper pictures (24 clips).
MEASURED = {"unseen_videos_psnr_256px": 28.05, "unseen_videos_bicubic_8x_psnr_256px": 26.24,
            "unseen_videos_psnr_128px": 26.34, "unseen_videos_bicubic_8x_psnr_128px": 23.84,
            "unseen_motion_clips_psnr_256px": 26.97, "unseen_motion_clips_bicubic_8x_psnr_256px": 28.26,
            "unseen_motion_clips_psnr_128px": 25.71, "unseen_motion_clips_bicubic_8x_psnr_128px": 25.48,
            "measured_in": "docs/reproduction.md (On scenes it has never seen)"}
NOTE = ("using the bundled demo CV-VAE (small, trained on this project's sample videos; not the released "
        "model: pass --weights AILab-CVC/CV-VAE --subfolder vae3d for that)")


def bundled_path(kind: Literal["cvvae", "image_vae"] = "cvvae") -> Path:
    """Folder (config.json + safetensors) of the bundled CV-VAE or of its 2D image VAE."""
    if kind not in _FOLDERS:
        raise ValueError(f"kind must be 'cvvae' or 'image_vae', got {kind!r}")
    path = BUNDLED_DIR / _FOLDERS[kind]
    if not (path / "config.json").is_file():
        raise CheckpointError(f"the bundled weights are missing from {path} (a broken install?); "
                              "pass --weights instead")
    return path


def load_bundled(kind: Literal["cvvae", "image_vae"] = "cvvae", *, dtype: torch.dtype = torch.float32) -> Any:
    """The bundled CV-VAE (:class:`~cvvae.CVVAE`) or its image VAE (diffusers ``AutoencoderKL``), in eval mode.

    The weights are stored in fp16 and loaded as ``dtype`` (fp32 by default).
    """
    path = bundled_path(kind)
    if kind == "cvvae":
        from .model import CVVAE

        model = CVVAE.from_pretrained(path, torch_dtype=dtype)
    else:
        from diffusers import AutoencoderKL

        model = AutoencoderKL.from_pretrained(path, torch_dtype=dtype)
    return model.requires_grad_(False).eval()
