"""Clips with camera motion synthesised from photographs: varied, known motion for the temporal layers, and scenes
that no sample video holds.

A clip is a square window flown over the photograph: its centre, size and angle move from a start pose to an end
pose (smoothstep easing) while the frames are resampled (bilinear, with the photograph first shrunk by an area
filter so that a frame never samples it more finely than its own pixels). The kinds of motion:

- pan: the window slides (up to half the photograph's short side over the clip);
- zoom: the window shrinks or grows (up to 1.8x), about a drifting centre;
- rotate: the window turns (up to 25 degrees) while drifting;
- parallax: two layers, the full frame panning slowly and a central crop (a "near" object) panning 3x faster
  the other way, pasted over it: parts of one frame moving at different speeds.

Every parameter is drawn from a generator seeded by (seed, the photograph's name, clip index), so a clip is a pure
function of its photograph and those numbers.

    python -m cvvae.data.synth PHOTOS_DIR OUT_DIR --clips-per-photo 2 --frames 33 --size 256
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError
from ..io.files import write_atomic
from ..io.video import VideoWriter, read_frames
from .sources import IMAGE_EXTENSIONS

MOTIONS = ("pan", "zoom", "rotate", "parallax")


def _ease(t: torch.Tensor) -> torch.Tensor:
    return t * t * (3 - 2 * t)


def _poses(rng: np.random.Generator, kind: str, frames: int) -> torch.Tensor:
    """(frames, 4): centre x, centre y (in [-1, 1] of the photo), window half-size (fraction of the short side),
    angle (radians) of each frame."""
    cx0, cy0 = rng.uniform(-0.25, 0.25, 2)
    half0 = rng.uniform(0.35, 0.5)
    turn, scale = 0.0, 1.0
    reach = rng.uniform(0.15, 0.5) * rng.choice([-1, 1], 2)
    if kind == "zoom":
        scale = float(rng.uniform(1.3, 1.8)) ** rng.choice([-1, 1])
        reach = reach * 0.3
    elif kind == "rotate":
        turn = math.radians(rng.uniform(8, 25)) * rng.choice([-1, 1])
        reach = reach * 0.3
    t = _ease(torch.linspace(0, 1, frames, dtype=torch.float64))
    half_end = min(0.5, half0 * scale) if scale > 1 else half0 * scale
    return torch.stack([cx0 + reach[0] * t, cy0 + reach[1] * t, half0 + (half_end - half0) * t, turn * t], dim=1)


def _render(photo: torch.Tensor, poses: torch.Tensor, size: int) -> torch.Tensor:
    """Frames (T, 3, size, size) in [0, 1] of the windows `poses` over `photo` (3, H, W) in [0, 1]."""
    _, H, W = photo.shape
    short = min(H, W)
    cx, cy, half, angle = poses.unbind(1)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # affine_grid maps output coordinates in [-1, 1] to input ones; the window's half-size in input units
    sx, sy = half * short / W * 2, half * short / H * 2
    theta = torch.stack([torch.stack([cos * sx, -sin * sy * H / W, cx], 1),
                         torch.stack([sin * sx * W / H, cos * sy, cy], 1)], 1).float()
    grid = F.affine_grid(theta, [len(poses), 3, size, size], align_corners=False)
    return F.grid_sample(photo.expand(len(poses), -1, -1, -1), grid, mode="bilinear", padding_mode="reflection",
                         align_corners=False).clamp(0, 1)


def synth_clip(photo: np.ndarray, kind: str, frames: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 frames (frames, size, size, 3) of a `kind` camera motion (see `MOTIONS`) over an RGB uint8 photo."""
    if kind not in MOTIONS:
        raise InputError(f"motion must be one of {MOTIONS}, got {kind!r}")
    image = torch.from_numpy(photo).permute(2, 0, 1).float() / 255
    short = min(image.shape[1:])
    if short > 2 * size:  # area-shrink first: a window of about half the short side spans `size` pixels
        scale = 2 * size / short
        image = F.interpolate(image[None], scale_factor=scale, mode="area")[0]
    if kind == "parallax":
        far = _render(image, _poses(rng, "pan", frames) * torch.tensor([0.3, 0.3, 1, 0]), size)
        near_poses = _poses(rng, "pan", frames)
        near_poses[:, :2] = near_poses[0, :2] - (near_poses[:, :2] - near_poses[0, :2]) * 3
        near = _render(image, near_poses, size // 2)
        a = size // 4
        far[:, :, a:a + size // 2, a:a + size // 2] = near
        video = far
    else:
        video = _render(image, _poses(rng, kind, frames), size)
    return (video * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def heldout_photo(name: str, fraction: float) -> bool:
    """Whether the photograph `name` (its path in the folder) is held out: a stable function of the name, so that
    adding photographs never moves another one between the splits."""
    return int.from_bytes(_digest(name)[:8], "big") / 2**64 < fraction


def _digest(name: str) -> bytes:
    return hashlib.sha1(name.encode()).digest()


def synth_folder(photos: str | os.PathLike[str], out: str | os.PathLike[str], *, clips_per_photo: int = 2,
                 frames: int = 33, size: int = 256, seed: int = 0, fps: float = 25.0,
                 heldout: float = 0.0) -> list[dict]:
    """Motion clips per (photo, clip index) of a folder of photographs, written losslessly to `out/train` and, for
    the photographs held out (`heldout_photo`, a `heldout` fraction of them), to `out/heldout`: no photograph gives
    clips to both. Returns the record of each clip (photo, motion, split, file), also written to
    `out/clips.json`."""
    import json

    files = sorted(p for p in Path(photos).expanduser().rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise InputError(f"no photographs in {photos}")
    out = Path(out).expanduser()
    records = []
    for path in files:
        name = str(path.relative_to(Path(photos).expanduser()))
        split = "heldout" if heldout_photo(name, heldout) else "train"
        (out / split).mkdir(parents=True, exist_ok=True)
        photo, key = None, int.from_bytes(_digest(name)[:4], "big")
        for j in range(clips_per_photo):
            rng = np.random.default_rng([seed, key, j])
            kind = MOTIONS[int(rng.integers(len(MOTIONS)))]
            target = out / split / f"{path.parent.name}-{path.stem}-{j}-{kind}.mkv"
            if not target.exists():
                photo = next(read_frames(path)) if photo is None else photo
                with VideoWriter(target, fps=fps, crf=0) as writer:
                    for frame in synth_clip(photo, kind, frames, size, rng):
                        writer.write(frame)
            records.append({"photo": name, "motion": kind, "split": split, "clip": f"{split}/{target.name}"})
    write_atomic(out / "clips.json", json.dumps(records, indent=2) + "\n")
    return records


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cvvae.data.synth", description=__doc__.split("\n\n")[0])
    p.add_argument("photos", help="folder of photographs (searched recursively)")
    p.add_argument("out", help="output folder of the clips (and clips.json)")
    p.add_argument("--clips-per-photo", type=int, default=2)
    p.add_argument("--frames", type=int, default=33)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heldout", type=float, default=0.0, help="fraction of the photographs held out (by name)")
    args = p.parse_args(argv)
    try:
        records = synth_folder(args.photos, args.out, clips_per_photo=args.clips_per_photo, frames=args.frames,
                               size=args.size, seed=args.seed, heldout=args.heldout)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    held = sum(r["split"] == "heldout" for r in records)
    print(f"{args.out}: {len(records)} clips, {held} of them held out ({len({r['photo'] for r in records if r['split'] == 'heldout'})} photographs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
