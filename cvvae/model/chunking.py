"""Temporal chunking and spatial tiling: the one place that splits work for encode and decode.

Modes (`model.chunk_mode`):
- "official": the released semantics, so released weights give the released numbers. Encode in
  rounds of `en_de_n_frames_a_time` + 1 frames (16 + 1) that share one boundary frame, decode in
  rounds of 16/4 + 1 latents sharing one boundary latent; rounds after the first drop their first
  output. Inside each round, frames larger than `tile_spatial_size` (576 px) are cut into tiles
  with `tile_overlap_ratio` (0.2222) overlap, each tile runs through the whole encoder/decoder,
  and the overlaps are blended linearly (blending is in place: a tile blended with its upper
  neighbour is later used, blended, by the tile to its right... exactly as released).
- "full": the whole clip in one forward.
Tiling follows `model.use_tiling` (enable_tiling / disable_tiling).
"""

from __future__ import annotations

import functools
from typing import Callable, Iterator

import torch

Fn = Callable[[torch.Tensor], torch.Tensor]


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
        [fn(x[..., i : i + tile_in, j : j + tile_in]) for j in origins(W, tile_in, stride_in)]
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


def chunked(fn: Fn, x: torch.Tensor, step: int | None) -> torch.Tensor:
    """Run `fn` over windows [n*step, n*step + step + 1) along T; later windows drop their first output."""
    T = x.shape[2]
    if not step or T <= step + 1:
        return fn(x)
    rounds = -(-(T - 1) // step)
    outs = [fn(x[:, :, n * step : n * step + step + 1]) for n in range(rounds)]
    return torch.cat([outs[0]] + [o[:, :, 1:] for o in outs[1:]], dim=2)


def tile_grid(model) -> tuple[int, int, int] | None:
    """(latent tile, latent overlap, spatial factor), or None when tiling is off.

    Everything derives from latent units so that pixel strides stay multiples of the spatial
    factor: with the released 576 px and 0.2222 this is tile 72, overlap 16, stride 56 latents,
    i.e. 576 px tiles at a 448 px stride with a 128 px blend, exactly the released numbers.
    """
    cfg = model.config
    if not (model.use_tiling and cfg.tile_spatial_size):
        return None
    s = model.spatial_compression_ratio
    lt = cfg.tile_spatial_size // s
    return lt, round(lt * cfg.tile_overlap_ratio), s


def encode_moments(model, x: torch.Tensor) -> torch.Tensor:
    """Moments (B, 2z, t, h, w) of a video (B, C, T, H, W) under the model's chunk mode."""
    if model.chunk_mode == "full":
        return model.encoder(x)
    fn: Fn = model.encoder
    if grid := tile_grid(model):
        lt, lo, s = grid
        fn = functools.partial(tiled, model.encoder, tile_in=lt * s, stride_in=(lt - lo) * s,
                               overlap_out=lo, limit_out=lt - lo)
    return chunked(fn, x, model.config.en_de_n_frames_a_time)


def decode_latents(model, z: torch.Tensor) -> torch.Tensor:
    """Video (B, C, T, H, W) decoded from latents (B, z, t, h, w) under the model's chunk mode."""
    if model.chunk_mode == "full":
        return model.decoder(z)
    fn: Fn = model.decoder
    if grid := tile_grid(model):
        lt, lo, s = grid
        fn = functools.partial(tiled, model.decoder, tile_in=lt, stride_in=lt - lo,
                               overlap_out=lo * s, limit_out=(lt - lo) * s)
    step = model.config.en_de_n_frames_a_time
    return chunked(fn, z, step // model.temporal_compression_ratio if step else None)
