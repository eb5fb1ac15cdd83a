"""The latent file: one safetensors file with the latents, optionally their logvar, and JSON metadata.

Written by ``cvvae encode`` (:func:`cvvae.codec.save_latents`), read by ``cvvae decode`` (:func:`cvvae.codec.load_latents`). Tensors: ``latents``
(B, z, t, h, w), unscaled posterior means, and ``logvar`` when kept. Metadata (each value JSON-encoded): the
original ``num_frames``, ``height``, ``width`` and ``fps``; the ``model`` that made them (its id, see
`cvvae.identity`) with its ``model_sha256``, ``z_channels``, ``scaling_factor``, ``shift_factor``; how they were
made (``chunk_mode``, ``tile_spatial_size``); ``source`` and ``cvvae_version``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError
from .files import atomic_file

REQUIRED = ("num_frames", "height", "width")


def write_latent_file(path: str | os.PathLike[str], tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write ``tensors`` (``latents`` and optionally ``logvar``) with ``meta`` to ``path``, atomically."""
    from safetensors.torch import save_file

    missing = [k for k in ("latents", *REQUIRED) if k not in tensors and k not in meta]
    if missing:
        raise InputError(f"a latent file needs {', '.join(missing)}")
    with atomic_file(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={k: json.dumps(v) for k, v in meta.items()})


def read_latent_file(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, metadata) of a latent file; :class:`InputError` when it is not one."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise InputError(f"latent file not found: {path}")
    try:
        with safe_open(str(path), "pt") as f:
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, json.JSONDecodeError) as e:
        raise InputError(f"{path} is not a cvvae latent file ({e})") from None
    if "latents" not in tensors or any(k not in meta for k in REQUIRED):
        raise InputError(f"{path} is not a cvvae latent file (written by `cvvae encode`)")
    return tensors, meta
