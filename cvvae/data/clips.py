"""Clip sampling and datasets: one reader for training, evaluation and dataset encoding.

:func:`read_clip` turns an item (a video or image path plus caption/metadata) into a sample::

    {"video": float32 (3, T, H, W) in [-1, 1], "path": str, "start": int, "stride": int, "fps": float,
     "crop": (top, left, h, w), "orig_size": (H, W), "caption": str | None, **metadata}

Videos give ``T = spec.frames`` frames ``start, start + stride, ...``: ``start`` is the frame shown at
``start / fps`` seconds, then every ``stride``-th decoded frame (the decode-order index for constant
frame rate videos whose first frame is at time 0). Images give ``T = 1`` (``start = 0``, ``stride = 1``,
``fps = 1.0``). ``crop`` is the box in the *resized* frame; ``orig_size`` the source's ``(H, W)``.
Only the clip's span is decoded (a seek, then ``stride * (frames - 1) + 1`` frames); frames are
resized by swscale (AREA when shrinking) inside :func:`~cvvae.io.video.read_frames`.

Randomness is never global: every clip draws from its own generator, seeded by ``(seed, epoch,
position)``, so a run is reproducible from ``seed`` whatever the number of DataLoader workers, and
workers and DDP ranks (which read disjoint positions) never repeat each other's draws.

Skipped files. A file that cannot be read, is truncated or is too short for one clip is skipped
(never raised) and recorded with a reason (:data:`REASONS`); a warning is logged (``cvvae.data``).
Batches stay full: a skipped file yields nothing.

- In-process (``num_workers=0``) ``dataset.skipped`` maps path -> detailed reason.
- DataLoader workers are separate processes, so each dataset keeps its records in a small *shared
  memory* tensor created by the main process: :class:`ClipDataset` one reason code per item (so
  ``dataset.skipped`` in the main process lists every file skipped by any worker, with its reason
  category), :class:`ShardClipDataset` a count per (shard, reason) for the latest pass over each shard.
  ``dataset.stats()`` gives the totals (distinct files for :class:`ClipDataset`).
- Each DDP rank counts its own skips (reduce ``stats()`` across ranks if you need a global count).
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from cvvae.errors import InputError
from cvvae.io.video import VideoInfo, probe, read_frames, to_tensor

from .sources import Item, ShardSample, as_temp_file, expand_shards, iter_shard_samples, list_items

__all__ = [
    "REASONS",
    "ClipDataset",
    "ClipError",
    "ClipSpec",
    "MixedLoader",
    "ShardClipDataset",
    "collate",
    "read_clip",
    "sample_window",
]

logger = logging.getLogger("cvvae.data")

REASONS = ("unreadable", "truncated", "too short", "error")
"""Why a file is skipped: not a readable video/image; fewer frames decodable than the container says;
fewer frames than one clip needs; anything unexpected (logged with its traceback)."""

# Seed-sequence domains, so that shuffles and clips never share a stream.
_ORDER, _CLIP = 0, 1


class ClipError(InputError):
    """A file gives no clip; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class ClipSpec:
    """What clip to cut from each file.

    Args:
        frames: clip length, ``1 + 4k`` (what the VAE maps to ``1 + k`` latents).
        stride: frame step, an int or an inclusive range ``(lo, hi)`` drawn uniformly per clip.
        short_side: resize so that the shorter side has this length (None: keep the size).
        crop: crop size, an int (square) or ``(h, w)``, or None; frames smaller than the crop are
            enlarged to cover it.
        random_crop: random crop position (training) or the centre (evaluation).
        random_start: random first frame (training) or frame 0 (evaluation).
        fit_stride: when the drawn stride does not fit the video, use the largest one that fits, down to 1
            (training: any motion will do); False: skip the video as "too short" instead (evaluation and
            dataset encoding, whose clips must have the frame rate they record).
    """

    frames: int = 17
    stride: int | tuple[int, int] = (1, 8)
    short_side: int | None = 256
    crop: int | tuple[int, int] | None = 256
    random_crop: bool = True
    random_start: bool = True
    fit_stride: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.frames, int) or self.frames < 1 or (self.frames - 1) % 4:
            raise ValueError(f"frames must be 1 + 4k (1, 5, 9, 13, 17, ...), got {self.frames!r}")
        lo, hi = self.stride_range
        if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi):
            raise ValueError(f"stride must be an int >= 1 or a range (lo, hi) with 1 <= lo <= hi, got {self.stride!r}")
        if self.short_side is not None and (not isinstance(self.short_side, int) or self.short_side < 1):
            raise ValueError(f"short_side must be a positive int or None, got {self.short_side!r}")
        if self.crop is not None:
            size = self.crop_size
            if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
                raise ValueError(f"crop must be a positive int, (h, w) or None, got {self.crop!r}")

    @property
    def stride_range(self) -> tuple[int, int]:
        """``(lo, hi)``, inclusive."""
        return (self.stride, self.stride) if isinstance(self.stride, int) else tuple(self.stride)

    @property
    def crop_size(self) -> tuple[int, int] | None:
        """``(h, w)`` of the crop, or None."""
        if self.crop is None:
            return None
        return (self.crop, self.crop) if isinstance(self.crop, int) else tuple(self.crop)

    def resize_to(self, height: int, width: int) -> tuple[int, int] | None:
        """Size ``(h, w)`` to resize a ``height x width`` frame to, or None to keep it.

        Same rounding as ``read_frames(short_side=...)``; enlarged if needed so that the crop fits.
        """
        scale = self.short_side / min(height, width) if self.short_side else 1.0
        crop = self.crop_size
        if crop is not None:
            scale = max(scale, crop[0] / height, crop[1] / width)
        if scale == 1.0:
            return None
        size = (max(1, math.floor(height * scale + 0.5)), max(1, math.floor(width * scale + 0.5)))
        return size if crop is None else (max(size[0], crop[0]), max(size[1], crop[1]))

    def crop_box(self, height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """``(top, left, h, w)`` of the crop in a ``height x width`` frame."""
        h, w = self.crop_size or (height, width)
        if self.random_crop:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
        return (height - h) // 2, (width - w) // 2, h, w


def sample_window(num_frames: int | None, spec: ClipSpec, rng: np.random.Generator) -> tuple[int, int]:
    """``(start, stride)`` of a clip in a video of ``num_frames`` frames (None: unknown, start at 0).

    Raises :class:`ClipError` ("too short") when even stride 1 does not fit.
    """
    lo, hi = spec.stride_range
    stride = int(rng.integers(lo, hi + 1))
    if spec.frames == 1:
        stride = 1
    if num_frames is None:
        return 0, stride
    if num_frames < spec.frames:
        raise ClipError("too short", f"{num_frames} frames, the clip needs {spec.frames}")
    if spec.frames > 1 and stride * (spec.frames - 1) + 1 > num_frames:
        if not spec.fit_stride:
            raise ClipError("too short", f"{num_frames} frames, {spec.frames} frames at stride {stride} need "
                                         f"{stride * (spec.frames - 1) + 1}")
        stride = (num_frames - 1) // (spec.frames - 1)
    span = stride * (spec.frames - 1) + 1
    start = int(rng.integers(0, num_frames - span + 1)) if spec.random_start else 0
    return start, stride


def read_clip(item: Item | str | os.PathLike[str], spec: ClipSpec, rng: np.random.Generator | int | None = None
              ) -> dict[str, Any]:
    """Read one clip (see the module docstring for the sample keys); raises :class:`ClipError`."""
    item = {"path": str(item), "caption": None} if isinstance(item, (str, os.PathLike)) else item
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    path = item["path"]
    try:
        info = probe(path)
    except InputError as e:
        raise ClipError("unreadable", str(e)) from None
    size = spec.resize_to(info.height, info.width)
    if info.is_image:
        start, stride, frames = 0, 1, np.stack(list(read_frames(path, size=size)))
    else:
        start, stride, frames = _read_video_clip(info, spec, size, rng)
    top, left, h, w = spec.crop_box(frames.shape[1], frames.shape[2], rng)
    video = to_tensor(frames[:, top:top + h, left:left + w])[0]
    metadata = {k: v for k, v in item.items() if k not in ("path", "caption")}
    return {**metadata, "video": video, "path": path, "start": start, "stride": stride, "fps": info.fps,
            "crop": (top, left, h, w), "orig_size": (info.height, info.width), "caption": item.get("caption")}


def _read_video_clip(info: VideoInfo, spec: ClipSpec, size: tuple[int, int] | None, rng: np.random.Generator
                     ) -> tuple[int, int, np.ndarray]:
    """``(start, stride, frames)`` of one clip.

    When the file ends before the span does (the container over-counts its frames, e.g. an AVI with
    dropped frames, or the file is cut), the stride shrinks to fit the frames decoded from ``start``;
    if they are too few for any stride, a new window is drawn among the frames known to exist.
    """
    start, stride = _window(info.num_frames, info, spec, rng)
    for _ in range(3):
        span = stride * (spec.frames - 1) + 1
        kept, count, note = _decode_span(info, start, span, stride, size)
        if count >= span:
            return start, stride, np.stack(kept)
        if count >= spec.frames and spec.fit_stride:
            stride = (count - 1) // (spec.frames - 1)
        elif start > 0 and start + count >= spec.frames:
            start, stride = _window(start + count, info, spec, rng)
        else:
            break
    if info.num_frames is None and start == 0 and not note:
        raise ClipError("too short", f"{info.path}: {count} frames, the clip needs {spec.frames}")
    raise ClipError("truncated", f"{info.path}: decoded only {count} frames from frame {start}, the clip "
                    f"needs {span} (the container says {info.num_frames} in all){note}")


def _window(num_frames: int | None, info: VideoInfo, spec: ClipSpec, rng: np.random.Generator) -> tuple[int, int]:
    try:
        return sample_window(num_frames, spec, rng)
    except ClipError as e:
        raise ClipError(e.reason, f"{info.path}: {e.detail}") from None


def _decode_span(info: VideoInfo, start: int, span: int, stride: int, size: tuple[int, int] | None
                 ) -> tuple[list[np.ndarray], int, str]:
    """Every ``stride``-th of frames ``start .. start + span - 1``, how many of the span were decoded
    (fewer if the file ends early) and a note on why it ended early."""
    if info.fps > 0:
        # Half a frame early, so that timestamps rounded by the container still land on frame `start`.
        seconds, skip = (0.0 if start == 0 else (start - 0.5) / info.fps), 0
    else:  # no frame rate: decode from the beginning and drop the first frames
        seconds, skip = 0.0, start
    kept, count = [], 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            for i, frame in enumerate(read_frames(info.path, start=seconds, max_frames=span + skip, size=size)):
                if i >= skip and (i - skip) % stride == 0:
                    kept.append(frame)
                count += i >= skip
        except InputError as e:
            return kept, count, f": {e}"
    note = "; ".join(str(w.message) for w in caught)
    return kept, count, f": {note}" if note else ""


# --- datasets ---------------------------------------------------------------------------------


def _partition() -> tuple[int, int]:
    """``(index, count)`` of this reader among all DDP ranks x DataLoader workers."""
    info = get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    rank, world = 0, 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    return rank * workers + worker, world * workers


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


class _ClipStream(IterableDataset):
    """Shared parts of :class:`ClipDataset` and :class:`ShardClipDataset`."""

    def __init__(self, spec: ClipSpec, seed: int, shuffle: bool) -> None:
        super().__init__()
        self.spec, self.seed, self.shuffle, self.epoch = spec, int(seed), shuffle, 0
        self._skipped: dict[str, str] = {}

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's shuffle and clips (call before iterating; workers copy the dataset then)."""
        self.epoch = int(epoch)

    def loader(self, batch_size: int, *, num_workers: int = 0, drop_last: bool = False, **kwargs: Any) -> DataLoader:
        """A DataLoader over this dataset with :func:`collate`."""
        return DataLoader(self, batch_size=batch_size, num_workers=num_workers, drop_last=drop_last,
                          collate_fn=collate, **kwargs)

    def _read(self, item: Item, rng: np.random.Generator) -> tuple[dict[str, Any] | None, ClipError | None]:
        try:
            return read_clip(item, self.spec, rng), None
        except ClipError as e:
            return None, e
        except Exception as e:  # a data loader must outlive any single bad file
            logger.warning("unexpected error reading %s", item["path"], exc_info=True)
            return None, ClipError("error", f"{item['path']}: {type(e).__name__}: {e}")

    def _note_skip(self, path: str, error: ClipError) -> None:
        logger.warning("skipped %s", error)
        self._skipped[path] = str(error)

    def stats(self) -> dict[str, Any]:
        """``{"skipped": total, "by_reason": {reason: count}}`` over this process and its workers."""
        by_reason = self._counts_by_reason()
        return {"skipped": sum(by_reason.values()), "by_reason": by_reason}

    def _counts_by_reason(self) -> dict[str, int]:
        raise NotImplementedError


class ClipDataset(_ClipStream):
    """Clips of a list of items (or of anything :func:`~cvvae.data.list_items` takes), one per draw.

    An epoch is ``epoch_length`` draws (default: one per item), each a shuffled pass over the items
    (repeated as needed). Draws are split between DDP ranks and DataLoader workers. Call
    :meth:`set_epoch` for a new shuffle and new clips. Skipped files are described in the module docstring.
    """

    def __init__(self, items: Sequence[Item] | str | os.PathLike[str], spec: ClipSpec, seed: int = 0,
                 epoch_length: int | None = None, *, shuffle: bool = True) -> None:
        super().__init__(spec, seed, shuffle)
        is_item_list = isinstance(items, Sequence) and not isinstance(items, str) and \
            all(isinstance(item, dict) for item in items)
        self.items = list(items) if is_item_list else list_items(items)
        if not self.items:
            raise InputError("no items: the source has no videos or images")
        if epoch_length is not None and epoch_length < 1:
            raise ValueError(f"epoch_length must be >= 1 or None, got {epoch_length!r}")
        self.epoch_length = epoch_length or len(self.items)
        # One reason code per item (0 = not skipped), in shared memory so that workers can write it.
        self._codes = torch.zeros(len(self.items), dtype=torch.uint8).share_memory_()

    def order(self, epoch: int) -> np.ndarray:
        """Item indices of the epoch's draws, in draw order."""
        n, rng = len(self.items), _rng(self.seed, _ORDER, epoch)
        passes = [rng.permutation(n) if self.shuffle else np.arange(n) for _ in range(-(-self.epoch_length // n))]
        return np.concatenate(passes)[:self.epoch_length]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        order, epoch = self.order(self.epoch), self.epoch
        index, count = _partition()
        for position in range(index, len(order), count):
            item = self.items[order[position]]
            sample, error = self._read(item, _rng(self.seed, _CLIP, epoch, position))
            if sample is not None:
                yield sample
            else:
                self._note_skip(item["path"], error)
                self._codes[order[position]] = REASONS.index(error.reason) + 1

    @property
    def skipped(self) -> dict[str, str]:
        """Path -> reason for every item skipped so far (detailed for this process, the category for workers)."""
        codes = self._codes.numpy()
        records = {self.items[i]["path"]: REASONS[codes[i] - 1] for i in np.flatnonzero(codes)}
        return {**records, **self._skipped}

    def _counts_by_reason(self) -> dict[str, int]:
        counts = np.bincount(self._codes.numpy(), minlength=len(REASONS) + 1)
        return {reason: int(counts[i + 1]) for i, reason in enumerate(REASONS) if counts[i + 1]}


class ShardClipDataset(_ClipStream):
    """Clips of webdataset tar shards (a glob, a path or a list), read as a stream.

    Each sample needs a video (``mp4 avi webm mkv mov``) or image (``png jpg jpeg webp bmp``) member;
    its caption is the ``txt`` member, else ``json["caption"]`` (other JSON fields become metadata);
    ``path`` is ``"shard.tar#key"``. Shards are shuffled per epoch and split between DDP ranks and
    workers (give at least as many shards as ranks x workers); ``shuffle_buffer`` > 0 also shuffles
    samples within a buffer of that many encoded samples. ``skipped`` lists this process's skips only;
    :meth:`stats` counts those of the workers too.
    """

    def __init__(self, shards: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], spec: ClipSpec,
                 seed: int = 0, *, shuffle: bool = True, shuffle_buffer: int = 0) -> None:
        super().__init__(spec, seed, shuffle)
        self.shards = expand_shards(shards)
        self.shuffle_buffer = shuffle_buffer
        # Skips per (shard, reason) in the latest pass over each shard; a shard has one reader per pass.
        self._counts = torch.zeros(len(self.shards), len(REASONS), dtype=torch.int64).share_memory_()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch = self.epoch
        n = len(self.shards)
        order = _rng(self.seed, _ORDER, epoch).permutation(n) if self.shuffle else np.arange(n)
        index, count = _partition()
        samples = (s for j in range(index, n, count) for s in self._shard_samples(int(order[j])))
        if self.shuffle_buffer > 0:
            samples = _buffer_shuffle(samples, self.shuffle_buffer, _rng(self.seed, _ORDER, epoch, index, count))
        for shard, number, sample in samples:
            clip, error = self._read_sample(sample, _rng(self.seed, _CLIP, epoch, shard, number))
            if clip is not None:
                yield clip
            else:
                self._note_skip(sample.path, error)
                self._counts[shard, REASONS.index(error.reason)] += 1

    def _shard_samples(self, shard: int) -> Iterator[tuple[int, int, ShardSample]]:
        self._counts[shard] = 0
        number = 0
        try:
            for number, sample in enumerate(iter_shard_samples(self.shards[shard])):
                yield shard, number, sample
        except InputError as e:
            error = ClipError("unreadable", str(e))
            self._note_skip(self.shards[shard], error)
            self._counts[shard, 0] += 1

    def _read_sample(self, sample: ShardSample, rng: np.random.Generator
                     ) -> tuple[dict[str, Any] | None, ClipError | None]:
        if sample.suffix is None:
            return None, ClipError("unreadable", f"{sample.path}: no video or image member")
        with as_temp_file(sample.data, sample.suffix) as tmp:
            clip, error = self._read({**sample.metadata, "path": str(tmp), "caption": sample.caption}, rng)
        if error is not None:
            return None, ClipError(error.reason, error.detail.replace(str(tmp), sample.path))
        clip["path"] = sample.path
        return clip, None

    @property
    def skipped(self) -> dict[str, str]:
        """``"shard.tar#key"`` (or the shard) -> reason, for the skips made in this process."""
        return dict(self._skipped)

    def _counts_by_reason(self) -> dict[str, int]:
        totals = self._counts.sum(0).tolist()
        return {reason: int(totals[i]) for i, reason in enumerate(REASONS) if totals[i]}


def _buffer_shuffle(items: Iterable[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = int(rng.integers(size))
        yield buffer[j]
        buffer[j] = item
    rng.shuffle(buffer)
    yield from buffer


# --- batches ----------------------------------------------------------------------------------


def collate(samples: Sequence[dict[str, Any]], key: str = "video") -> dict[str, Any]:
    """Stack ``key`` (``video``: ``(B, 3, T, H, W)``); every other key becomes a list (None where a sample lacks it)."""
    if not samples:
        raise InputError("collate needs at least one sample")
    shapes = sorted({tuple(s[key].shape) for s in samples})
    if len(shapes) > 1:
        raise InputError(f"cannot stack {key} of different shapes {shapes}: batch samples of one shape (one kind "
                         "of clip and a fixed crop, or one bucket), or use batch_size=1")
    keys = list(dict.fromkeys(k for s in samples for k in s if k != key))
    return {key: torch.stack([s[key] for s in samples]), **{k: [s.get(k) for s in samples] for k in keys}}


class MixedLoader:
    """Batches drawn from several sources by weight; each batch comes from one source (all images or all video).

    Args:
        sources: name -> a :class:`ClipDataset`/:class:`ShardClipDataset` (batched here with
            ``batch_size[name]``, ``num_workers`` and :func:`collate`) or any re-iterable of batches.
        weights: name -> relative frequency of its batches (e.g. ``{"images": 0.5, "videos": 0.5}``).
        batch_size: one size or name -> size.
        seed: seeds the choice of source per step (with the DDP rank added, like the official recipe).
        steps: batches per iteration (None: endless).

    A source that runs out starts its next epoch (``set_epoch``). Every batch gets ``"source": name``.
    Iterating again replays the same sequence. Not compatible with ``persistent_workers`` (epochs
    are set in this process).
    """

    def __init__(self, sources: Mapping[str, Any], weights: Mapping[str, float],
                 batch_size: int | Mapping[str, int] = 1, *, seed: int = 0, steps: int | None = None,
                 num_workers: int = 0, drop_last: bool = True, **loader_kwargs: Any) -> None:
        if set(weights) != set(sources) or not sources:
            raise InputError(f"weights {sorted(weights)} must name the same sources as {sorted(sources)}")
        p = np.array([float(weights[name]) for name in sources])
        if (p < 0).any() or p.sum() <= 0:
            raise InputError(f"weights must be >= 0 with a positive sum, got {dict(weights)}")
        self.names, self.p = list(sources), p / p.sum()
        self.sources = dict(sources)
        self.seed, self.steps = int(seed), steps
        sizes = batch_size if isinstance(batch_size, Mapping) else dict.fromkeys(sources, batch_size)
        self.loaders = {name: src.loader(sizes[name], num_workers=num_workers, drop_last=drop_last, **loader_kwargs)
                        if isinstance(src, _ClipStream) else src for name, src in sources.items()}

    def __len__(self) -> int:
        if self.steps is None:
            raise TypeError("an endless MixedLoader has no length; give steps=")
        return self.steps

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rank = torch.distributed.get_rank() if torch.distributed.is_available() and \
            torch.distributed.is_initialized() else 0
        rng = np.random.default_rng([self.seed, rank])
        streams = {name: self._epochs(name) for name in self.names}
        step = 0
        while self.steps is None or step < self.steps:
            name = self.names[int(rng.choice(len(self.names), p=self.p))]
            yield {**next(streams[name]), "source": name}
            step += 1

    def _epochs(self, name: str) -> Iterator[dict[str, Any]]:
        epoch = 0
        while True:
            source = self.sources[name]
            source = getattr(source, "dataset", source)  # a DataLoader: set its dataset's epoch
            if hasattr(source, "set_epoch"):
                source.set_epoch(epoch)
            count = 0
            for batch in self.loaders[name]:
                count += 1
                yield batch
            if count == 0:
                raise InputError(f"source {name!r} gave no batch in a whole epoch: all its files were skipped "
                                 "or it has fewer clips than one batch")
            epoch += 1

    def stats(self) -> dict[str, dict[str, Any]]:
        """Name -> ``stats()`` of each dataset source."""
        return {name: src.stats() for name, src in self.sources.items() if hasattr(src, "stats")}
