"""Temporal chunking and spatial tiling: the one place that splits work for encode and decode.

Modes (`model.chunk_mode`):
- "official": the released semantics, so released weights give the released numbers. Encode in
  rounds of `en_de_n_frames_a_time` + 1 frames (16 + 1) that share one boundary frame, decode in
  rounds of 16/4 + 1 latents sharing one boundary latent; rounds after the first drop their first
  output. Inside each round, frames larger than `tile_spatial_size` (576 px) are cut into tiles
  with `tile_overlap_ratio` (0.2222) overlap, each tile runs through the whole encoder/decoder,
  and the overlaps are blended linearly (blending is in place: a tile blended with its upper
  neighbour is later used, blended, by the tile to its right... exactly as released).
- "blend": rounds of the same size that overlap by `model.blend_overlap` more latents (4 frames each), whose
  overlaps are blended linearly, in latent space when encoding and in pixel space when decoding: the seams
  of the released rounds (a jump every 16 frames: each round has its own GroupNorm statistics, causal
  padding and attention context) fade over the overlap. Memory is bounded by the round size, as released;
  each round advances 4 * (4 - overlap) frames instead of 16, so one latent of overlap (the most that rounds of
  16 frames allow) costs 4/3 the compute (docs/benchmarks.md has the measured trade).
- "full": the whole clip in one forward (no temporal rounds, no tiles).
Tiling follows `model.use_tiling` (enable_tiling / disable_tiling).
"""

from __future__ import annotations

import functools
from typing import Callable, Iterable, Iterator

import torch

from ..errors import ConfigError
from .frames import padded_frames
from .layers import dense, pad_frames

Fn = Callable[[torch.Tensor], torch.Tensor]


def check_tiles(size: int | None, overlap_ratio: float, spatial: int) -> None:
    """Tiles of `size` px (None or 0: no tiling) must hold whole latents and leave a stride after the overlap."""
    if not size:
        return
    lt = size // spatial
    if size % spatial or lt < 4 or not 0 <= overlap_ratio < 1 or lt - round(lt * overlap_ratio) < 1:
        raise ConfigError(f"tile_spatial_size={size} / tile_overlap_ratio={overlap_ratio}: tiles must be a multiple "
                          f"of {spatial} px, at least {4 * spatial} px, with an overlap ratio in [0, 1) that leaves "
                          "a stride (or tile_spatial_size=None: no tiling)")


def origins(size: int, tile: int, stride: int) -> Iterator[int]:
    """Tile origins 0, stride, 2*stride, ..., stopping after the first tile that reaches `size`."""
    o = 0
    while True:
        yield o
        if o + tile >= size:
            return
        o += stride


def _blend(a: torch.Tensor, b: torch.Tensor, overlap: int, dim: int) -> None:
    """In place: ramp b's first n slices along `dim` from a's last n (weight k/n on b, k = 0..n-1)."""
    n = min(a.shape[dim], b.shape[dim], overlap)
    if n <= 0:
        return
    w = torch.arange(n, device=b.device, dtype=torch.float32) / n
    w = w.view([-1 if d == dim % b.ndim else 1 for d in range(b.ndim)]).to(b.dtype)
    head = b.narrow(dim, 0, n)
    head.copy_(a.narrow(dim, a.shape[dim] - n, n) * (1 - w) + head * w)


def tiled(fn: Fn, x: torch.Tensor, tile_in: int, stride_in: int, overlap_out: int, limit_out: int) -> torch.Tensor:
    """Run `fn` over overlapping spatial tiles of x (B, C, T, H, W) and blend the outputs."""
    H, W = x.shape[-2:]
    if H <= tile_in and W <= tile_in:
        return fn(x)
    grid = [
        [fn(dense(x[..., i : i + tile_in, j : j + tile_in])) for j in origins(W, tile_in, stride_in)]
        for i in origins(H, tile_in, stride_in)
    ]
    rows = []
    for i, row in enumerate(grid):
        for j, tile in enumerate(row):
            if i > 0:
                _blend(grid[i - 1][j], tile, overlap_out, dim=-2)
            if j > 0:
                _blend(row[j - 1], tile, overlap_out, dim=-1)
        last_i = i == len(grid) - 1
        cropped = [t[..., : None if last_i else limit_out, : None if j == len(row) - 1 else limit_out]
                   for j, t in enumerate(row)]
        rows.append(torch.cat(cropped, dim=-1))
    return torch.cat(rows, dim=-2)


def windows(pieces: Iterable[torch.Tensor], step: int | None, pad_to: int | None = None,
            overlap: int = 0) -> Iterator[torch.Tensor]:
    """Group a stream of clip pieces (B, C, n, H, W) into windows of `step` + 1 frames along T that
    share `overlap` + 1 frames with the window before ([0, step+1), [step - overlap, 2*step - overlap + 1), ...);
    the last window may be shorter (it always reaches past the one before).

    `step=None` gives one window holding everything. With `pad_to=t` the last window is padded by
    repeating its last frame up to 1 + t*k frames. Each window is a new dense tensor (one piece that is a
    window already is passed on as it is). While a window is out, this generator holds only the frames the next
    window needs (the few frames a piece leaves are copied out of it), never the pieces the window was gathered
    from: the frames in flight are the window, the frames it shares with the next one and at most one piece.
    """
    held: list[torch.Tensor] = []  # frames read and still needed (`count`), as views of their pieces
    count, emitted = 0, False
    for piece in pieces:
        held.append(piece)
        count += piece.shape[2]
        del piece
        while step and count >= step + 1:
            window = _join(_span(held, 0, step + 1))
            held = _span(held, step - overlap, count)
            if _partial(held[0]) and held[0].shape[2] <= step:  # a few frames of a piece: keep those, not the piece
                held[0] = held[0].clone()
            count -= step - overlap
            emitted = True
            yield window
            del window  # before the next piece is read: the caller is done with it
    if count > overlap + 1 or (held and not emitted):
        window, held = _join(held), []
        if pad_to and (count - 1) % pad_to:
            window = pad_frames(window, 0, padded_frames(count, pad_to) - count)
        yield window


def _span(pieces: list[torch.Tensor], start: int, stop: int) -> list[torch.Tensor]:
    """Frames [start, stop) of consecutive pieces, as views of the pieces they fall in."""
    out, offset = [], 0
    for p in pieces:
        n = p.shape[2]
        a, b = max(start - offset, 0), min(stop - offset, n)
        if a < b:
            out.append(p if (a, b) == (0, n) else p[:, :, a:b])
        offset += n
    return out


def _partial(t: torch.Tensor) -> bool:
    """Whether t is a view of part of a larger storage (which it keeps alive whole)."""
    return t.untyped_storage().nbytes() > t.numel() * t.element_size()


def _join(pieces: list[torch.Tensor]) -> torch.Tensor:
    """Consecutive pieces as one dense tensor: a copy, unless one dense piece is all there is."""
    return dense(pieces[0]) if len(pieces) == 1 else torch.cat(pieces, dim=2)


def run_windows(fn: Fn, wins: Iterable[torch.Tensor], overlap: int = 0) -> Iterator[torch.Tensor]:
    """fn over each window, streamed. Consecutive outputs share `overlap` + 1 frames (or latents): the first of
    them is the boundary the later window starts from, whose own output is dropped (as released); over the other
    `overlap` the earlier window's values fade into the later window's, linearly (weight k / (overlap + 1) on the
    later one, k = 1 .. overlap). With `overlap=0` these are the released rounds: one piece per window. Blended,
    each window's last frames wait for the next window, and the last ones come as a final piece.

    Neither a window nor an output piece stays referenced here once it is used: a caller that drops each piece
    before asking for the next one holds one round's output at a time."""
    if overlap == 0:
        first = True  # not enumerate: its reused (n, w) tuple would hold the last window while the next is built
        for w in wins:
            out = fn(w)
            del w
            yield out if first else out[:, :, 1:]
            del out
            first = False
        return
    shared, tail = overlap + 1, None
    for w in wins:
        out = fn(w)
        del w
        if tail is not None:
            out = torch.cat([_fade(tail, out[:, :, :shared]), out[:, :, shared:]], dim=2)
        out, tail = out[:, :, :-shared], out[:, :, -shared:].clone()  # frees the rest of the window
        if out.shape[2]:
            yield out
        del out
    if tail is not None:
        yield tail


def _fade(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a -> b along T: weight k / n on b for k = 0 .. n-1 (the first of b, a window's boundary output, unused)."""
    n = a.shape[2]
    w = (torch.arange(n, device=b.device, dtype=torch.float32) / n).view(1, 1, n, 1, 1).to(b.dtype)
    return a * (1 - w) + b * w


def chunked(fn: Fn, x: torch.Tensor, step: int | None, overlap: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """Run `fn` over windows [n*s, n*s + step + 1) of x along T, s = step - overlap[0], and join the outputs,
    blended over overlap[1] output frames (see `run_windows`)."""
    outs = list(run_windows(fn, windows([x], step, overlap=overlap[0]), overlap[1]))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def tile_size(model) -> int | None:
    """Pixels of the spatial tiles the model's encode/decode use, or None when they never tile."""
    grid = tile_grid(model)
    return None if grid is None else grid[0] * grid[2]


def tile_grid(model) -> tuple[int, int, int] | None:
    """(latent tile, latent overlap, spatial factor), or None when tiling is off.

    Everything derives from latent units so that pixel strides stay multiples of the spatial
    factor: with the released 576 px and 0.2222 this is tile 72, overlap 16, stride 56 latents,
    i.e. 576 px tiles at a 448 px stride with a 128 px blend, exactly the released numbers.
    """
    cfg = model.config
    if model.chunk_mode == "full" or not (model.use_tiling and cfg.tile_spatial_size):
        return None
    s = model.spatial_compression_ratio
    check_tiles(cfg.tile_spatial_size, cfg.tile_overlap_ratio, s)  # register_to_config bypasses __init__
    lt = cfg.tile_spatial_size // s
    return lt, round(lt * cfg.tile_overlap_ratio), s


def encoder_fn(model) -> Fn:
    """The encoder (`CVVAE.encode_clip`), wrapped in spatial tiling when it is on."""
    if grid := tile_grid(model):
        lt, lo, s = grid
        return functools.partial(tiled, model.encode_clip, tile_in=lt * s, stride_in=(lt - lo) * s,
                                 overlap_out=lo, limit_out=lt - lo)
    return model.encode_clip


def decoder_fn(model) -> Fn:
    """The decoder with its post_quant_conv (`CVVAE.decode_clip`), wrapped in spatial tiling when it is on."""
    if grid := tile_grid(model):
        lt, lo, s = grid
        return functools.partial(tiled, model.decode_clip, tile_in=lt, stride_in=lt - lo,
                                 overlap_out=lo * s, limit_out=(lt - lo) * s)
    return model.decode_clip


def encode_step(model) -> int | None:
    """Frames per encode round (16), or None for one round ("full" mode)."""
    return None if model.chunk_mode == "full" else model.config.en_de_n_frames_a_time


def decode_step(model) -> int | None:
    """Latents per decode round (16 / 4 = 4), or None for one round."""
    step = encode_step(model)
    return step // model.temporal_compression_ratio if step else None


def blended_latents(model) -> int:
    """Latents by which consecutive rounds overlap beyond the shared boundary: the model's `blend_overlap` in
    "blend" mode, else 0."""
    if model.chunk_mode != "blend" or not encode_step(model) or max_blend_overlap(decode_step(model)) < 1:
        return 0  # rounds too short to blend (CVVAE.chunk_mode warns): the released rounds
    o = model.blend_overlap
    if not 1 <= o <= max_blend_overlap(decode_step(model)):
        raise ConfigError(f"blend_overlap={o} must be from 1 to {max_blend_overlap(decode_step(model))} with rounds "
                          f"of {decode_step(model) + 1} latents")
    return o


def max_blend_overlap(step: int) -> int:
    """The most latents two rounds of `step` + 1 latents can blend: a latent is blended between two rounds,
    never three, so both overlaps of a round (with the one before and the one after) must fit in it."""
    return (step + 1) // 2 - 1


def encode_overlap(model) -> tuple[int, int]:
    """(frames two encode windows share beyond their boundary frame, latents blended between their outputs)."""
    o = blended_latents(model)
    return o * model.temporal_compression_ratio, o


def decode_overlap(model) -> tuple[int, int]:
    """(latents two decode windows share beyond their boundary latent, frames blended between their outputs)."""
    o = blended_latents(model)
    return o, o * model.temporal_compression_ratio


def round_boundaries(model, frames: int, released: bool = False) -> list[int]:
    """The first frame of every temporal round after the first (the frame it shares with the round before) in a
    `frames`-frame clip; none in "full" mode. `released=True`: where the released rounds start (any mode)."""
    return [s for s, _ in _round_starts(model, frames, released) if s < frames]


def handovers(model, frames: int, released: bool = False) -> list[tuple[int, int]]:
    """Frame spans (first, last) where one temporal round hands over to the next: the shared boundary frame f,
    (f, f), for the released rounds; the frames the blend mixes from both rounds, (f + 1, f + 4 * overlap), in
    "blend" mode; none in "full" mode. `released=True`: the released rounds' handovers, whatever the mode."""
    spans = [(s + 1, s + shared) if shared else (s, s) for s, shared in _round_starts(model, frames, released)]
    return [(a, b) for a, b in spans if b < frames]


def _round_starts(model, frames: int, released: bool) -> list[tuple[int, int]]:
    """(first frame, frames shared beyond it with the round before) of every round after the first."""
    step = model.config.en_de_n_frames_a_time if released else encode_step(model)
    if not step or frames <= 1:
        return []
    shared = 0 if released else encode_overlap(model)[0]
    T = padded_frames(frames, model.temporal_compression_ratio)
    starts, s = [], step - shared
    while s + shared + 1 < T:  # the round before did not reach the end
        starts.append((s, shared))
        s += step - shared
    return starts


def encode_moments(model, x: torch.Tensor) -> torch.Tensor:
    """Moments (B, 2z, t, h, w) of a video (B, C, T, H, W) under the model's chunk mode."""
    return chunked(encoder_fn(model), x, encode_step(model), encode_overlap(model))


def decode_latents(model, z: torch.Tensor) -> torch.Tensor:
    """Video (B, C, T, H, W) decoded from latents (B, z, t, h, w) under the model's chunk mode."""
    return chunked(decoder_fn(model), z, decode_step(model), decode_overlap(model))
