"""Which clip each job of a dataset encoding is: a pure function of (seed, item, clip), so that any process
computes any job identically (see `cvvae.data.encode`).

Each clip is cut exactly as asked: a video too short for ``frames`` at ``stride`` is skipped ("too short"),
never read at a smaller stride, so that every clip of a dataset has the frame rate its ``meta.json`` records.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InputError
from ..io.video import probe
from .clips import ClipError, ClipSpec, read_clip
from .sources import Item, as_temp_file, make_sample, read_members

Bucket = tuple[int, int, int]


def parse_buckets(text: str | Sequence[Sequence[int]]) -> list[Bucket]:
    """``"17x256x256,17x192x320"`` (or a list of ``(T, H, W)``) -> ``[(17, 256, 256), (17, 192, 320)]``."""
    parts = [p.strip() for p in text.split(",") if p.strip()] if isinstance(text, str) else list(text)
    buckets = []
    for part in parts:
        try:
            t, h, w = (int(v) for v in (part.lower().split("x") if isinstance(part, str) else part))
        except (ValueError, TypeError):
            raise InputError(f"bad bucket {part!r}: write FRAMESxHEIGHTxWIDTH, e.g. 17x256x256") from None
        if t < 1 or (t - 1) % 4 or h < 8 or w < 8 or h % 8 or w % 8:
            raise InputError(f"bad bucket {part!r}: frames must be 1 + 4k, height and width multiples of 8")
        buckets.append((t, h, w))
    if not buckets:
        raise InputError("no buckets given (e.g. 17x256x256,17x192x320)")
    return buckets


@dataclass(frozen=True)
class ClipPlan:
    """How every job's clip is cut; a pure function of (seed, item index, clip index)."""

    frames: int
    stride: int
    size: int | None
    buckets: tuple[Bucket, ...] | None
    seed: int
    clips_per_video: int

    def bucket_of(self, height: int, width: int) -> Bucket:
        """The bucket whose aspect ratio H/W is closest to the video's, in log space (first on ties)."""
        aspect = math.log(height / width)
        return min(self.buckets, key=lambda b: abs(math.log(b[1] / b[2]) - aspect))

    def spec(self, height: int | None = None, width: int | None = None) -> tuple[ClipSpec, Bucket | None]:
        """The ClipSpec of a ``height x width`` video (the size matters only with buckets)."""
        if not self.buckets:
            return ClipSpec(frames=self.frames, stride=self.stride, short_side=self.size, crop=self.size,
                            random_crop=False, random_start=True, fit_stride=False), None
        bucket = self.bucket_of(height, width)
        t, bh, bw = bucket
        # Scale so the bucket's crop is covered: max(bh / H, bw / W), as a short side (may shrink or enlarge).
        short = math.ceil(max(bh / height, bw / width) * min(height, width) - 1e-9)
        return ClipSpec(frames=t, stride=self.stride, short_side=max(1, short), crop=(bh, bw), random_crop=False,
                        random_start=True, fit_stride=False), bucket

    def read(self, item: Item, item_index: int, clip_index: int) -> dict[str, Any]:
        """The clip of job ``(item_index, clip_index)``; raises :class:`ClipError`."""
        rng = np.random.default_rng([self.seed, item_index, clip_index])
        if "_error" in item:
            raise ClipError("unreadable", item["_error"])
        if "_tar" not in item:
            return self._read_media(item, rng)
        try:
            sample = make_sample(item["_tar"], item["_key"], read_members(item))
        except InputError as e:
            raise ClipError("unreadable", str(e)) from None
        if sample.suffix is None:
            raise ClipError("unreadable", f"{sample.path}: no video or image member")
        with as_temp_file(sample.data, sample.suffix) as tmp:
            try:
                clip = self._read_media({**sample.metadata, "path": str(tmp), "caption": sample.caption}, rng)
            except ClipError as e:
                raise ClipError(e.reason, e.detail.replace(str(tmp), sample.path)) from None
        clip["path"] = sample.path
        return clip

    def _read_media(self, item: Item, rng: np.random.Generator) -> dict[str, Any]:
        height = width = None
        if self.buckets:
            try:
                info = probe(item["path"])
            except InputError as e:
                raise ClipError("unreadable", str(e)) from None
            height, width = info.height, info.width
        spec, bucket = self.spec(height, width)
        clip = read_clip(item, spec, rng)
        if clip["video"].shape[1] != spec.frames:  # an image, read as 1 frame
            raise ClipError("too short", f"{item['path']}: 1 frame (an image), the clip needs {spec.frames}")
        clip["bucket"] = bucket
        return clip


def digest(items: list[Item]) -> str:
    """sha1 of the items' absolute paths (and shard keys): two runs list the same source iff equal."""
    h = hashlib.sha1()
    for item in items:
        path, _, key = item["path"].partition("#") if "_tar" in item else (item["path"], "", "")
        h.update(f"{os.path.abspath(path)}#{key}\n".encode())
    return h.hexdigest()
