"""Encode and decode videos of any length and size, in memory or as streams, in bounded memory.

This is the layer users and the CLI call. It adds to the chunking engine (`model/chunking.py`):
- any frame count: the clip is padded at the end (last frame repeated) to 1 + 4k frames, and
  decoding trims back to the recorded length; any size: replicate-padded to a multiple of 8 and
  cropped back;
- streaming: frames in -> latents out, latents in -> frames out, one temporal round at a time,
  so memory does not grow with the length of the video;
- precision: compute in float32, bfloat16 or float16 (CUDA only) by autocast; GroupNorm and
  softmax stay in float32 (layers.py); a round whose output is not finite is recomputed in
  float32, with a warning.

In memory and streaming share one code path (the engine's `windows`), so they give the same numbers.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F

from .errors import InputError
from .model import CVVAE, DiagonalGaussian
from .model.chunking import Fn, decode_step, decoder_fn, encode_step, encoder_fn, run_windows, windows
from .model.frames import padded_frames

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """True where bfloat16 is fast: CUDA GPUs that support it, CPUs with AVX512-BF16 or AMX."""
    if torch.device(device).type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device | str = "cpu") -> torch.dtype:
    """'auto' (or None): bfloat16 where it is native (see `native_bf16`), else float32.

    float16 is refused on CPU (about 3 GFLOP/s there); bfloat16 on a CPU without native support
    works but is 30-90x slower than float32, so it warns.
    """
    device = torch.device(device)
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise InputError(f"unknown dtype {dtype!r}; use auto, fp32, bf16 or fp16")
        dtype = DTYPES[dtype]
    if device.type == "cpu" and dtype == torch.float16:
        raise InputError("fp16 is not supported on CPU (it is ~50x slower than fp32); use fp32 or bf16")
    if device.type == "cpu" and dtype == torch.bfloat16 and not native_bf16(device):
        warnings.warn("this CPU has no native bfloat16 (AVX512-BF16/AMX): bf16 will be far slower than fp32",
                      stacklevel=2)
    return dtype


def _device(model: CVVAE) -> torch.device:
    return next(model.parameters()).device


def _precise(model: CVVAE, fn: Fn, dtype: torch.dtype) -> Fn:
    """fn under autocast to `dtype`, with a float32 recompute of any round that is not finite."""
    device = _device(model)
    weights = next(model.parameters()).dtype
    autocast = dtype != torch.float32 and weights == torch.float32

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            y = fn(x.to(device, torch.float32 if autocast else weights))
        if dtype != torch.float32 and not torch.isfinite(y).all():
            if weights != torch.float32:
                warnings.warn("non-finite values in a reduced-precision round; load the model in float32 "
                              "to let cvvae recompute such rounds", stacklevel=3)
            else:
                warnings.warn(f"non-finite values in a {dtype} round: recomputed in float32", stacklevel=3)
                y = fn(x.to(device, torch.float32))
        return y.float()

    return run


@dataclass
class Latents:
    """Latents of a video, with what decoding needs to restore its length and size."""

    mean: torch.Tensor  # (B, z, t, h, w), not scaled
    logvar: torch.Tensor | None  # same shape, when kept
    num_frames: int  # frames of the original video (before padding to 1 + 4k)
    height: int
    width: int

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.logvar is None:
            raise InputError("these latents hold no logvar (encode with keep_logvar=True to sample)")
        return DiagonalGaussian(torch.cat([self.mean, self.logvar], dim=1)).sample(generator)


class _Frames:
    """Pieces (B, C, n, H, W) or single frames (B, C, H, W), padded to a multiple of `s` in space;
    counts frames and records the original size."""

    def __init__(self, pieces: Iterable[torch.Tensor], s: int, channels: int) -> None:
        self.pieces, self.s, self.channels = pieces, s, channels
        self.num_frames, self.height, self.width = 0, 0, 0

    def __iter__(self) -> Iterator[torch.Tensor]:
        for piece in self.pieces:
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
            yield F.pad(piece, (0, pw, 0, ph, 0, 0), mode="replicate") if ph or pw else piece


class StreamEncoder:
    """Iterate to get moments (B, 2z, t_i, h, w) round by round; afterwards `num_frames`,
    `height`, `width` describe the input."""

    def __init__(self, model: CVVAE, pieces: Iterable[torch.Tensor], dtype: str | torch.dtype | None = "fp32"):
        self.model = model
        self.frames = _Frames(pieces, model.spatial_compression_ratio, model.config.in_channels)
        self.dtype = resolve_dtype(dtype, _device(model))

    def __iter__(self) -> Iterator[torch.Tensor]:
        t = self.model.temporal_compression_ratio
        fn = _precise(self.model, encoder_fn(self.model), self.dtype)
        with torch.no_grad():
            yield from run_windows(fn, windows(self.frames, encode_step(self.model), pad_to=t))
        n = self.frames.num_frames
        if n == 0:
            raise InputError("no frames to encode")
        if (n - 1) % t:
            warnings.warn(f"{n} frames is not 1 + {t}k: padded to {padded_frames(n, t)} by repeating the last "
                          f"frame; decoding trims back to {n}", stacklevel=2)

    @property
    def num_frames(self) -> int:
        return self.frames.num_frames

    @property
    def height(self) -> int:
        return self.frames.height

    @property
    def width(self) -> int:
        return self.frames.width


def encode(model: CVVAE, video: torch.Tensor | Iterable[torch.Tensor], *, dtype: str | torch.dtype | None = "fp32",
           keep_logvar: bool = False) -> Latents:
    """Encode a video (B, C, T, H, W) in [-1, 1], or an iterable of pieces of one, of any T, H, W."""
    stream = StreamEncoder(model, [video] if isinstance(video, torch.Tensor) else video, dtype)
    moments = torch.cat(list(stream), dim=2)
    mean, logvar = moments.chunk(2, dim=1)
    return Latents(mean, logvar if keep_logvar else None, stream.num_frames, stream.height, stream.width)


def decode_stream(model: CVVAE, latents: torch.Tensor | Latents, *, num_frames: int | None = None,
                  height: int | None = None, width: int | None = None,
                  dtype: str | torch.dtype | None = "fp32") -> Iterator[torch.Tensor]:
    """Decode latents (B, z, t, h, w) round by round into video pieces (B, C, n, H, W), trimmed to
    `num_frames` and cropped to `height` x `width` (defaults: those recorded in `Latents`)."""
    if isinstance(latents, Latents):
        num_frames = num_frames or latents.num_frames
        height, width = height or latents.height, width or latents.width
        latents = latents.mean
    if latents.ndim != 5 or latents.shape[1] != model.config.z_channels:
        raise InputError(f"expected latents (B, {model.config.z_channels}, t, h, w), got shape {tuple(latents.shape)}"
                         + (" (a latent file of another model?)" if latents.ndim == 5 else ""))
    z = latents
    if hasattr(model, "post_quant_conv"):
        z = model.post_quant_conv(z.to(_device(model), next(model.parameters()).dtype))
    fn = _precise(model, decoder_fn(model), resolve_dtype(dtype, _device(model)))
    left = num_frames or model.sample_frames(z.shape[2])
    with torch.no_grad():
        for piece in run_windows(fn, windows([z], decode_step(model))):
            piece = piece[:, :, :left, : height or None, : width or None]
            left -= piece.shape[2]
            yield piece
            if left <= 0:
                return


def decode(model: CVVAE, latents: torch.Tensor | Latents, **kwargs) -> torch.Tensor:
    """Decode to a video (B, C, T, H, W) in [-1, 1]; see `decode_stream` for the arguments."""
    return torch.cat(list(decode_stream(model, latents, **kwargs)), dim=2)
