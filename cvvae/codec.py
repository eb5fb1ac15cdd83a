"""Encode and decode videos of any length and size, in memory or as streams, in bounded memory.

Which entry point is for what:
- `cvvae.codec` (this module) is for videos: `encode` -> `Latents` (float32 means, optionally the logvar, and
  the clip's original frame count and size), `decode` / `decode_stream` -> float32 frames trimmed and cropped
  back to that size; any length streams through in bounded memory; `dtype` picks the precision per call.
- `CVVAE.encode` / `CVVAE.decode` are diffusers' API (pipelines call them): tensors in, a posterior or a
  tensor out, in the weights' dtype, padded clips not trimmed back (there is no record to trim them by).

Both follow one contract, because both run the one chunking engine (`model/chunking.py`):
- frames: a clip that is not 1 + 4k frames is padded at the end by repeating its last frame, with a warning;
  never cut. A size not divisible by 8 is padded by replicating the last row and column: this module crops the
  result back (the caller gets the size it gave), the model API warns that it returns the padded size.
- precision: by default the weights' dtype; float32 weights compute in any asked dtype (lower ones by
  autocast, "auto" = bf16 where native; GroupNorm and softmax stay in float32, see layers.py); reduced-precision
  weights compute in their own dtype, and asking this module for another one is an error, not ignored
  (`cvvae.runtime.compute_dtype`). A round whose output is not
  finite is recomputed in float32 when the weights allow, else it warns.
- streaming: frames in -> latents out, latents in -> frames out, one temporal round at a time, so memory does
  not grow with the length of the video. In memory and streaming share one code path (the engine's `windows`),
  so they give the same numbers.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F

from . import __version__
from .errors import InputError
from .identity import fingerprint
from .io.latents import read_latent_file, write_latent_file
from .model import CVVAE, DiagonalGaussian
from .model.chunking import (Fn, decode_overlap, decode_step, decoder_fn, encode_overlap, encode_step, encoder_fn,
                             run_windows, tile_size, windows)
from .model.frames import padding_notice
from .runtime import DTYPES, compute_dtype, native_bf16, resolve_dtype

__all__ = ["DTYPES", "Latents", "StreamEncoder", "decode", "decode_stream", "encode", "load_latents", "native_bf16",
           "resolve_dtype", "save_latents"]


def _weights(model: CVVAE) -> torch.Tensor:
    return next(model.parameters())


def _precise(model: CVVAE, fn: Fn, dtype: str | torch.dtype | None) -> Fn:
    """fn in the precision `dtype` asks for (see the module docstring), float32 out."""
    w = _weights(model)
    dtype = compute_dtype(dtype, w.dtype, w.device)
    autocast = dtype != w.dtype  # float32 weights, a lower compute dtype

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(w.device.type, dtype=dtype, enabled=autocast):
            y = fn(x.to(w.device, w.dtype))
        if dtype != torch.float32 and not torch.isfinite(y).all():
            if w.dtype != torch.float32:
                warnings.warn(f"non-finite values in a {dtype} round; load the model in float32 (on the command "
                              "line: --dtype fp32) to let cvvae recompute such rounds", stacklevel=3)
            else:
                warnings.warn(f"non-finite values in a {dtype} round: recomputed in float32", stacklevel=3)
                y = fn(x.to(w.device, torch.float32))
        return y.float()

    return run


@dataclass
class Latents:
    """Latents of a video, with what decoding needs to restore its length and size."""

    mean: torch.Tensor  # (B, z, t, h, w), not scaled: the posterior mean
    logvar: torch.Tensor | None  # same shape, when kept
    num_frames: int  # frames of the original video (before padding to 1 + 4k)
    height: int
    width: int

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """A draw from the posterior (needs the logvar)."""
        if self.logvar is None:
            raise InputError("these latents hold no logvar (encode with keep_logvar=True to sample)")
        return DiagonalGaussian(torch.cat([self.mean, self.logvar], dim=1)).sample(generator)


class _Frames:
    """Checks pieces (B, C, n, H, W) or single frames (B, C, H, W) and pads them to a multiple of `s` in space;
    counts frames and records the original size. A function of each piece (`map` it over a stream), not a
    generator: a generator would hold the piece it last gave across its `yield`, while the model runs."""

    def __init__(self, s: int, channels: int) -> None:
        self.s, self.channels = s, channels
        self.num_frames, self.height, self.width = 0, 0, 0

    def __call__(self, piece: torch.Tensor) -> torch.Tensor:
        if piece.ndim == 4:
            piece = piece.unsqueeze(2)
        if piece.ndim != 5 or piece.shape[1] != self.channels:
            raise InputError(f"expected frames (B, {self.channels}, [T,] H, W), got shape {tuple(piece.shape)}")
        H, W = piece.shape[-2:]
        if self.num_frames and (H, W) != (self.height, self.width):
            raise InputError(f"frame size changed mid-stream from {self.height}x{self.width} to {H}x{W}")
        self.num_frames += piece.shape[2]
        self.height, self.width = H, W
        ph, pw = -H % self.s, -W % self.s
        return F.pad(piece, (0, pw, 0, ph, 0, 0), mode="replicate") if ph or pw else piece


class StreamEncoder:
    """Iterate to get moments (B, 2z, t_i, h, w) round by round; afterwards `num_frames`,
    `height`, `width` describe the input."""

    def __init__(self, model: CVVAE, pieces: Iterable[torch.Tensor], dtype: str | torch.dtype | None = None):
        self.model, self.pieces = model, pieces
        self.frames = _Frames(model.spatial_compression_ratio, model.config.in_channels)
        self.fn = _precise(model, encoder_fn(model), dtype)  # resolves (and checks) the dtype now

    def __iter__(self) -> Iterator[torch.Tensor]:
        t = self.model.temporal_compression_ratio
        shared, blended = encode_overlap(self.model)
        wins = windows(map(self.frames, self.pieces), encode_step(self.model), pad_to=t, overlap=shared)
        with torch.no_grad():
            yield from run_windows(self.fn, wins, blended)
        n = self.frames.num_frames
        if n == 0:
            raise InputError("no frames to encode")
        if note := padding_notice(n, t):
            warnings.warn(f"{note}; decoding trims back to {n}", stacklevel=2)

    @property
    def num_frames(self) -> int:
        return self.frames.num_frames

    @property
    def height(self) -> int:
        return self.frames.height

    @property
    def width(self) -> int:
        return self.frames.width


def encode(model: CVVAE, video: torch.Tensor | Iterable[torch.Tensor], *, dtype: str | torch.dtype | None = None,
           keep_logvar: bool = False) -> Latents:
    """Encode a video (B, C, T, H, W) in [-1, 1], or an iterable of pieces of one, of any T, H, W."""
    stream = StreamEncoder(model, [video] if isinstance(video, torch.Tensor) else video, dtype)
    moments = torch.cat(list(stream), dim=2)
    mean, logvar = moments.chunk(2, dim=1)
    return Latents(mean, logvar if keep_logvar else None, stream.num_frames, stream.height, stream.width)


def decode_stream(model: CVVAE, latents: torch.Tensor | Latents, *, num_frames: int | None = None,
                  height: int | None = None, width: int | None = None, dtype: str | torch.dtype | None = None,
                  sample: bool = False, generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    """Decode latents (B, z, t, h, w) round by round into video pieces (B, C, n, H, W), trimmed to
    `num_frames` and cropped to `height` x `width` (defaults: those recorded in `Latents`).

    `sample=True` decodes a draw from the posterior (`Latents` with a logvar; `generator` seeds it) instead of
    its mean.

    The stream holds no piece it has given out, so a caller that drops each piece before asking for the next one
    holds one round's frames at a time. A `for` loop's name stays bound while the next round is decoded: end the
    loop's body with `del piece`, or loop over a conversion, `for frames in map(to_frames, stream)`.
    """
    if isinstance(latents, Latents):
        num_frames = num_frames or latents.num_frames
        height, width = height or latents.height, width or latents.width
        latents = latents.sample(generator) if sample else latents.mean
    elif sample:
        raise InputError("sample=True needs Latents with a logvar, not a tensor")
    if latents.ndim != 5 or latents.shape[1] != model.config.z_channels:
        raise InputError(f"expected latents (B, {model.config.z_channels}, t, h, w), got shape {tuple(latents.shape)}"
                         + (" (a latent file of another model?)" if latents.ndim == 5 else ""))
    fn = _precise(model, decoder_fn(model), dtype)
    left = num_frames or model.sample_frames(latents.shape[2])
    shared, blended = decode_overlap(model)
    with torch.no_grad():
        for piece in run_windows(fn, windows([latents], decode_step(model), overlap=shared), blended):
            piece = piece[:, :, :left, : height or None, : width or None]
            left -= piece.shape[2]
            yield piece
            del piece  # before the next round: see the docstring
            if left <= 0:
                return


def decode(model: CVVAE, latents: torch.Tensor | Latents, **kwargs) -> torch.Tensor:
    """Decode to a video (B, C, T, H, W) in [-1, 1], float32; see `decode_stream` for the arguments."""
    return torch.cat(list(decode_stream(model, latents, **kwargs)), dim=2)


def save_latents(path: str, latents: Latents, model: CVVAE, *, model_id: str, **meta) -> dict:
    """Write `latents` to a latent file (`cvvae.io.latents`) that `cvvae decode` reads, recording the model that
    made them (`model_id`, see `cvvae.identity`, and its weights' fingerprint) and how; `meta` adds fields
    (`fps`, `source`, ...). Returns the metadata written."""
    cfg = model.config
    record = dict(num_frames=latents.num_frames, height=latents.height, width=latents.width, **meta, model=model_id,
                  model_sha256=fingerprint(model), z_channels=cfg.z_channels, scaling_factor=cfg.scaling_factor,
                  shift_factor=cfg.shift_factor, chunk_mode=model.chunk_mode, blend_overlap=model.blend_overlap
                  if model.chunk_mode == "blend" else None, tile_spatial_size=tile_size(model),
                  cvvae_version=__version__)
    tensors = {"latents": latents.mean} if latents.logvar is None else {"latents": latents.mean,
                                                                           "logvar": latents.logvar}
    write_latent_file(path, tensors, record)
    return record


def load_latents(path: str) -> tuple[Latents, dict]:
    """(Latents, metadata) of a latent file written by `save_latents` (`cvvae encode`)."""
    tensors, meta = read_latent_file(path)
    return Latents(tensors["latents"], tensors.get("logvar"), meta["num_frames"], meta["height"], meta["width"]), meta
