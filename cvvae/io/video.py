"""Streaming video and image I/O with PyAV (FFmpeg): probe, read frame by frame, write atomically.

Frames are RGB ``uint8`` arrays of shape ``(H, W, 3)``. Whole videos are never decoded at once
unless you ask for it with :func:`read_video`. Every problem caused by the input (missing file,
not a video, corrupt data, bad arguments) raises :class:`~cvvae.errors.InputError` with a
one-line message that names the file.

Decisions:

- Images (:data:`IMAGE_SUFFIXES`) are 1-frame videos with ``fps = 1.0``; they are read and written
  with PyAV too (FFmpeg's image demuxers/encoders).
- Any source pixel format (gray, palette, RGBA, 10-bit YUV, odd sizes) is converted to ``rgb24`` by
  swscale; an alpha channel is dropped (colour values are kept as stored, not composited).
- YUV sources that carry no colour tags are converted with BT.601, as FFmpeg does.
- Resizing uses swscale: ``AREA`` when shrinking (no aliasing), ``BICUBIC`` when enlarging.
- Container rotation metadata and non-square sample aspect ratios are ignored: frames come out
  with the stored width and height.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import TracebackType

import av
import numpy as np
import torch
from av.video.reformatter import Interpolation, VideoReformatter

from cvvae.errors import InputError
from cvvae.io.files import AtomicFile

__all__ = [
    "IMAGE_SUFFIXES",
    "VideoInfo",
    "VideoWriter",
    "is_image_path",
    "probe",
    "read_frames",
    "read_video",
    "to_frames",
    "to_tensor",
]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"})

# Errors PyAV raises for bad files: av.error.FFmpegError (a ValueError or an OSError subclass) and
# plain OSError from the file system. Writing adds plain ValueError (unknown format or codec, a codec
# the container cannot hold).
_AV_ERRORS = (av.error.FFmpegError, OSError)
_AV_WRITE_ERRORS = (av.error.FFmpegError, OSError, ValueError)

# Image encoders per suffix: (codec, pixel format, codec options). Lossless where the format allows.
_IMAGE_CODECS: dict[str, tuple[str, str, dict[str, str]]] = {
    ".png": ("png", "rgb24", {}),
    ".jpg": ("mjpeg", "yuvj444p", {"qmin": "1", "qmax": "2"}),
    ".jpeg": ("mjpeg", "yuvj444p", {"qmin": "1", "qmax": "2"}),
    ".bmp": ("bmp", "bgr24", {}),
    ".webp": ("libwebp", "bgra", {"lossless": "1"}),
    ".tif": ("tiff", "rgb24", {}),
    ".tiff": ("tiff", "rgb24", {}),
}
_X264_FAMILY = frozenset({"libx264", "libx264rgb", "libx265"})
_SMPTE170M = 6  # AVCOL_SPC_SMPTE170M (BT.601): the matrix swscale uses for untagged RGB -> YUV
_MPEG_RANGE = 1  # AVCOL_RANGE_MPEG (limited range)


@dataclass(frozen=True)
class VideoInfo:
    """What :func:`probe` found out about a video or image file.

    ``num_frames`` is the count the container stores, else an estimate from duration x fps, else
    ``None``; it is exactly 1 for images. Some files (e.g. AVI with dropped frames) store more frames
    than can be decoded, so treat it as an upper bound. ``fps`` is 1.0 for images.
    """

    path: Path
    width: int
    height: int
    fps: float
    num_frames: int | None
    is_image: bool


def is_image_path(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` has an image suffix (:data:`IMAGE_SUFFIXES`, case-insensitive)."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def _one_line(error: BaseException) -> str:
    text = getattr(error, "strerror", None) if isinstance(error, av.error.FFmpegError) else None
    return " ".join(str(text or error).split()) or type(error).__name__


def _open_input(path: str | os.PathLike[str]) -> tuple[Path, av.container.InputContainer]:
    """Open ``path`` for reading, or raise a one-line :class:`InputError`."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} not found")
    if not path.is_file():
        raise InputError(f"{path} is not a file")
    if path.stat().st_size == 0:
        raise InputError(f"{path} is not a video or image: the file is empty")
    # An image path is a literal file name, never an image2 sequence pattern such as 'img%03d.png'.
    options = {"pattern_type": "none"} if is_image_path(path) else {}
    try:
        container = av.open(str(path), "r", options=options, metadata_errors="replace")
    except av.error.InvalidDataError:
        raise InputError(
            f"{path} is not a video or image that FFmpeg can read (damaged, truncated or another kind of file)"
        ) from None
    except _AV_ERRORS as e:
        raise InputError(f"cannot open {path}: {_one_line(e)}") from None
    if not container.streams.video:
        container.close()
        raise InputError(f"{path} has no video stream")
    return path, container


def _is_image_container(path: Path, container: av.container.InputContainer) -> bool:
    name = container.format.name
    return is_image_path(path) or name == "image2" or name.endswith("_pipe")


def _stream_fps(stream: av.video.stream.VideoStream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else 0.0


def _num_frames(stream: av.video.stream.VideoStream, container: av.container.InputContainer, fps: float) -> int | None:
    if stream.frames > 0:
        return int(stream.frames)
    seconds = None
    if stream.duration is not None and stream.time_base is not None:
        seconds = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        seconds = container.duration / av.time_base
    if seconds is None or seconds <= 0 or fps <= 0:
        return None
    return max(1, round(seconds * fps))


def probe(path: str | os.PathLike[str]) -> VideoInfo:
    """Size, frame rate and frame count of a video or image; decodes only the first frame.

    Raises :class:`InputError` if the file is missing, is not a video/image, has no video stream
    or no decodable frame.
    """
    path, container = _open_input(path)
    with container:
        stream = container.streams.video[0]
        try:
            first = next(container.decode(stream), None)
        except _AV_ERRORS as e:
            raise InputError(f"cannot decode {path}: {_one_line(e)}") from None
        if first is None:
            raise InputError(f"{path} has no decodable video frames")
        if _is_image_container(path, container):
            return VideoInfo(path, first.width, first.height, 1.0, 1, True)
        fps = _stream_fps(stream)
        return VideoInfo(path, first.width, first.height, fps, _num_frames(stream, container, fps), False)


def _target_size(height: int, width: int, size: tuple[int, int] | None, short_side: int | None) -> tuple[int, int]:
    if size is not None:
        return size
    if short_side is not None:
        scale = short_side / min(height, width)
        return max(1, math.floor(height * scale + 0.5)), max(1, math.floor(width * scale + 0.5))
    return height, width


def _check_read_args(
    start: float, max_frames: int | None, size: tuple[int, int] | None, short_side: int | None
) -> tuple[int, int] | None:
    if not (isinstance(start, (int, float)) and math.isfinite(start) and start >= 0):
        raise InputError(f"start must be a number of seconds >= 0, got {start!r}")
    if max_frames is not None and (not isinstance(max_frames, int) or max_frames < 1):
        raise InputError(f"max_frames must be a positive integer or None, got {max_frames!r}")
    if size is not None and short_side is not None:
        raise InputError("give either size=(height, width) or short_side, not both")
    if short_side is not None and (not isinstance(short_side, int) or short_side < 1):
        raise InputError(f"short_side must be a positive integer, got {short_side!r}")
    if size is not None:
        if not (isinstance(size, Sequence) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size)):
            raise InputError(f"size must be (height, width) with positive integers, got {size!r}")
        return int(size[0]), int(size[1])
    return None


def read_frames(
    path: str | os.PathLike[str],
    *,
    start: float = 0.0,
    max_frames: int | None = None,
    size: tuple[int, int] | None = None,
    short_side: int | None = None,
) -> Iterator[np.ndarray]:
    """Stream the frames of a video (or the one frame of an image) as RGB ``uint8`` ``(H, W, 3)`` arrays.

    Args:
        start: first time to read, in seconds from the start of the stream (seeks, then skips the
            frames shown before it); ignored for images.
        max_frames: stop after this many frames.
        size: ``(height, width)`` to resize every frame to exactly.
        short_side: resize so that the shorter side is this long, keeping the aspect ratio (the other
            side is rounded to the nearest integer). At most one of ``size``/``short_side``.

    The file is opened and the arguments are checked when this is called; frames are decoded as you
    iterate. If the data turns corrupt after some frames were read, iteration stops with a warning
    saying how many were read; with none read it raises :class:`InputError`, as it does when no frame
    lies at or after ``start``.
    """
    size = _check_read_args(start, max_frames, size, short_side)
    path, container = _open_input(path)
    return _iter_frames(path, container, float(start), max_frames, size, short_side)


def _iter_frames(
    path: Path,
    container: av.container.InputContainer,
    start: float,
    max_frames: int | None,
    size: tuple[int, int] | None,
    short_side: int | None,
) -> Iterator[np.ndarray]:
    with container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        is_image = _is_image_container(path, container)
        limit = 1 if is_image else max_frames
        reformatter = VideoReformatter()
        count = 0
        try:
            for frame in _frames_from(container, stream, 0.0 if is_image else start):
                height, width = _target_size(frame.height, frame.width, size, short_side)
                if (height, width) == (frame.height, frame.width):
                    rgb = reformatter.reformat(frame, format="rgb24")
                else:
                    shrink = height <= frame.height and width <= frame.width
                    interpolation = Interpolation.AREA if shrink else Interpolation.BICUBIC
                    rgb = reformatter.reformat(frame, width, height, "rgb24", interpolation=interpolation)
                yield rgb.to_ndarray()
                count += 1
                if limit is not None and count >= limit:
                    return
        except _AV_ERRORS as e:
            if count == 0:
                raise InputError(f"cannot decode {path}: {_one_line(e)}") from None
            warnings.warn(f"{path}: stopped after {count} frames, the rest cannot be decoded: {_one_line(e)}",
                          stacklevel=2)
            return
        if count == 0:
            where = f" at or after {start:g} s" if start > 0 else ""
            raise InputError(f"{path} has no decodable video frames{where}" + (" (past the end?)" if where else ""))


def _frames_from(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream, start: float
) -> Iterator[av.VideoFrame]:
    """Decoded frames shown at or after ``start`` seconds (counted from the stream's start time)."""
    origin, time_base = stream.start_time or 0, stream.time_base
    if start <= 0 or not time_base:
        yield from container.decode(stream)
        return

    def shown(frame: av.VideoFrame) -> float:
        return math.inf if frame.pts is None else float((frame.pts - origin) * time_base)

    try:
        container.seek(origin + int(start / time_base), stream=stream, backward=True)
        seeked = True
    except _AV_ERRORS:
        seeked = False  # not seekable: decode from the beginning and skip
    frames = container.decode(stream)
    if seeked:
        first = next(frames, None)
        if first is not None and shown(first) > start + 1e-6:
            # The seek overshot (no key frame index?): decode from the beginning instead.
            container.seek(origin, stream=stream, backward=True)
            frames = container.decode(stream)
        elif first is not None and shown(first) >= start - 1e-6:
            yield first
    for frame in frames:
        if frame.pts is None or shown(frame) >= start - 1e-6:
            yield frame


def read_video(path: str | os.PathLike[str], **kwargs) -> np.ndarray:
    """All frames :func:`read_frames` gives (same keyword arguments), stacked to ``(T, H, W, 3)`` uint8."""
    return np.stack(list(read_frames(path, **kwargs)))


def to_tensor(frames: np.ndarray | Sequence[np.ndarray]) -> torch.Tensor:
    """``(T, H, W, 3)`` uint8 frames (an array or a list of ``(H, W, 3)``) -> ``(1, 3, T, H, W)`` float32 in [-1, 1]."""
    array = np.stack(frames) if isinstance(frames, (list, tuple)) else np.asarray(frames)
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3:
        raise InputError(f"expected uint8 frames of shape (T, H, W, 3), got {array.dtype} {array.shape}")
    video = torch.from_numpy(np.ascontiguousarray(array)).permute(3, 0, 1, 2).unsqueeze(0)
    return video.float().div_(127.5).sub_(1.0)  # in place: one float copy of the frames, not two at once


def to_frames(video: torch.Tensor) -> np.ndarray:
    """``(1, 3, T, H, W)`` or ``(3, T, H, W)`` values in [-1, 1] -> ``(T, H, W, 3)`` uint8 (clamped, rounded)."""
    if video.ndim == 5:
        if video.shape[0] != 1:
            raise InputError(f"to_frames takes one video, got a batch of {video.shape[0]}: index it first")
        video = video[0]
    if video.ndim != 4 or video.shape[0] != 3:
        raise InputError(f"expected a video of shape (1, 3, T, H, W) or (3, T, H, W), got {tuple(video.shape)}")
    pixels = ((video.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return pixels.permute(1, 2, 3, 0).contiguous().cpu().numpy()


class VideoWriter:
    """Write RGB ``uint8`` frames to a video (or a single-frame image) file, atomically.

    Frames go to a hidden temporary file in the destination folder, which is renamed to ``path``
    only when the writer closes normally with at least one frame written; otherwise it is deleted
    and ``path`` is left untouched. Use it as a context manager or call :meth:`close`.

    Args:
        fps: frames per second; fractional rates are kept exactly (29.97 -> 2997/100,
            ``30000 / 1001`` -> 30000/1001).
        crf, preset: quality and speed for libx264/libx265 (ignored by other codecs and for images).
        codec, pix_fmt: the encoder and its pixel format. Chroma-subsampled formats (``yuv420p``...)
            need even sizes, so for an odd width or height the 4:4:4 format of the same depth is
            used instead (``yuv444p``; played by FFmpeg-based players, not by every browser).

    The frame size is fixed by the first frame. YUV output is tagged BT.601 limited range, the
    matrix used for the RGB -> YUV conversion. An image suffix (:data:`IMAGE_SUFFIXES`) writes exactly one
    frame as an image (lossless for png/bmp/webp/tiff, high-quality JPEG otherwise).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        fps: float,
        crf: int = 18,
        codec: str = "libx264",
        pix_fmt: str = "yuv420p",
        preset: str = "medium",
    ) -> None:
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise InputError(f"cannot write {self.path}: the folder {self.path.parent} does not exist")
        if self.path.is_dir():
            raise InputError(f"cannot write {self.path}: it is a folder")
        if isinstance(fps, bool) or not isinstance(fps, (int, float, Fraction)) or not (0 < fps < math.inf):
            raise InputError(f"fps must be a positive number, got {fps!r}")
        self.rate = Fraction(fps).limit_denominator(1001 * 1000)
        if self.rate <= 0:
            raise InputError(f"fps {fps!r} is too small")
        self.crf, self.codec, self.pix_fmt, self.preset = crf, codec, pix_fmt, preset
        self.is_image = is_image_path(self.path)
        self.frames_written = 0
        self._size: tuple[int, int] | None = None
        self._stream: av.video.stream.VideoStream | None = None
        suffix = self.path.suffix
        self._target = AtomicFile(self.path, keep_suffix=True)  # PyAV picks the format by the suffix
        self._tmp = self._target.tmp
        try:
            if self.is_image:
                self._container = av.open(str(self._tmp), "w", format="image2", options={"update": "1"})
            else:
                options = {"movflags": "+faststart"} if suffix.lower() in {".mp4", ".mov", ".m4v"} else {}
                self._container = av.open(str(self._tmp), "w", options=options)
        except _AV_WRITE_ERRORS as e:
            self._target.discard()
            raise InputError(f"cannot write {self.path}: {_one_line(e)} (is '{suffix}' a video or image suffix?)") \
                from None
        self._closed = False

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self._finish(stacklevel=3)
        else:
            self._abort()

    def _add_stream(self, height: int, width: int) -> av.video.stream.VideoStream:
        if self.is_image:
            codec, pix_fmt, options = _IMAGE_CODECS[self.path.suffix.lower()]
            stream = self._container.add_stream(codec, rate=1, options=options)
        else:
            codec, pix_fmt = self.codec, self.pix_fmt
            options = {"crf": str(self.crf), "preset": self.preset} if codec in _X264_FAMILY else {}
            try:
                fmt = av.VideoFormat(pix_fmt, width, height)
            except (ValueError, TypeError):
                raise InputError(f"cannot write {self.path}: unknown pixel format {pix_fmt!r}") from None
            if fmt.components and any(c.width != width or c.height != height for c in fmt.components):
                if width % 2 or height % 2:
                    pix_fmt = _full_chroma(pix_fmt)
            stream = self._container.add_stream(codec, rate=self.rate, options=options)
            if pix_fmt.startswith(("yuv", "nv")) and not pix_fmt.startswith("yuvj"):
                stream.codec_context.colorspace = _SMPTE170M  # the matrix swscale converts RGB with
                stream.codec_context.color_range = _MPEG_RANGE
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        return stream

    def write(self, frame: np.ndarray) -> None:
        """Encode one RGB ``uint8`` frame of shape ``(H, W, 3)``."""
        if self._closed:
            raise InputError(f"{self.path}: the writer is closed")
        if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            got = f"{frame.dtype} {frame.shape}" if isinstance(frame, np.ndarray) else type(frame).__name__
            raise InputError(f"{self.path}: frames must be uint8 arrays of shape (H, W, 3), got {got}")
        height, width = frame.shape[:2]
        if self._size is None:
            self._size = (height, width)
        elif self._size != (height, width):
            raise InputError(f"{self.path}: frame {self.frames_written} is {height}x{width} (HxW), "
                             f"the first frame was {self._size[0]}x{self._size[1]}")
        if self.is_image and self.frames_written >= 1:
            raise InputError(f"{self.path} is an image: it takes exactly one frame, not more")
        try:
            if self._stream is None:
                self._stream = self._add_stream(height, width)
            video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            video_frame.pts = self.frames_written
            for packet in self._stream.encode(video_frame):
                self._container.mux(packet)
        except _AV_WRITE_ERRORS as e:
            raise InputError(f"cannot write {self.path} with {self._stream_desc()}: {_one_line(e)}") from None
        self.frames_written += 1

    def _stream_desc(self) -> str:
        if self.is_image:
            return _IMAGE_CODECS[self.path.suffix.lower()][0]
        return f"{self.codec}/{self._stream.pix_fmt if self._stream else self.pix_fmt}"

    def close(self) -> None:
        """Finish the file and move it to ``path``; with no frame written, write nothing (and warn)."""
        self._finish(stacklevel=3)

    def _finish(self, stacklevel: int) -> None:
        if self._closed:
            return
        if self.frames_written == 0:
            self._abort()
            warnings.warn(f"no frames were written, so {self.path} was not created", stacklevel=stacklevel)
            return
        try:
            for packet in self._stream.encode(None):
                self._container.mux(packet)
            self._container.close()
        except _AV_WRITE_ERRORS as e:
            self._abort()
            raise InputError(f"cannot write {self.path}: {_one_line(e)}") from None
        self._closed = True
        try:
            self._target.commit()
        except OSError as e:
            raise InputError(f"cannot write {self.path}: {_one_line(e)}") from None
        finally:
            self._target.discard()

    def _abort(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._container.close()
        except _AV_WRITE_ERRORS:
            pass
        self._target.discard()


def _full_chroma(pix_fmt: str) -> str:
    """The 4:4:4 planar format with the depth of ``pix_fmt`` (``yuv420p10le`` -> ``yuv444p10le``)."""
    for sub in ("420", "422", "411", "440", "410"):
        if sub in pix_fmt:
            candidate = pix_fmt.replace(sub, "444")
            try:
                av.VideoFormat(candidate)
                return candidate
            except (ValueError, TypeError):
                break
    return "yuv444p"
