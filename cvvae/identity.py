"""Which model: the id that latent files and datasets record, loading a model by it, a fingerprint of its
weights, and what a model is (``cvvae info``).

An id is ``"cvvae-bundled"`` (the small model shipped with the package), a local path made absolute (so that
a command run from another folder still finds it), or a hub id as given; a subfolder is appended with ``/``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError
from .model import CVVAE

BUNDLED_ID = "cvvae-bundled"

# The released architectures (AILab-CVC/CV-VAE): these config fields identify them.
_COMMON = dict(ch=128, ch_mult=[1, 2, 4, 4], num_res_blocks=2, half_3d=True, norm_num_groups=32,
               use_post_quant_conv=False, in_channels=3, out_ch=3)
_RELEASED = {
    "released SD2.1 architecture (AILab-CVC/CV-VAE vae3d)": dict(
        _COMMON, z_channels=4, padding_mode="zeros", norm_eps=1e-5, encoder_attn_type="vanilla-xformers",
        decoder_attn_type="spatial-temporal-xformer"),
    "released SD3 architecture (AILab-CVC/CV-VAE vae3d_sd3)": dict(
        _COMMON, z_channels=16, padding_mode="replicate", norm_eps=1e-6, encoder_attn_type="vanilla",
        decoder_attn_type="vanilla"),
}


def model_id(weights: str | os.PathLike[str] | None, subfolder: str | None = None) -> str:
    """The id recorded for the model of ``weights`` (None: the bundled model) and ``subfolder``."""
    if weights is None:
        return BUNDLED_ID
    path = Path(weights).expanduser()
    name = str(path.resolve()) if path.exists() else str(weights)
    return f"{name}/{subfolder}" if subfolder else name


def load_model(weights: str | os.PathLike[str] | None, subfolder: str | None = None, *,
               torch_dtype: torch.dtype = torch.float32) -> CVVAE:
    """The CV-VAE of ``weights`` (a folder, weights file or hub id; with ``subfolder``), or the bundled one."""
    if weights is None:
        if subfolder:
            raise CheckpointError("a subfolder needs weights to look in")
        from .bundled import load_bundled

        return load_bundled(dtype=torch_dtype)
    return CVVAE.from_pretrained(weights, subfolder=subfolder, torch_dtype=torch_dtype)


def load_recorded(recorded: str, *, torch_dtype: torch.dtype = torch.float32) -> CVVAE:
    """The model a latent file or dataset recorded (see :func:`model_id`); :class:`CheckpointError` when it
    cannot be loaded here."""
    if recorded == BUNDLED_ID or Path(recorded).exists():
        return load_model(None if recorded == BUNDLED_ID else recorded, torch_dtype=torch_dtype)
    parts = recorded.split("/")
    if len(parts) < 2 or recorded.startswith(("/", ".", "~")):
        raise CheckpointError(f"weights not found: {recorded} (no such file or folder)")
    return load_model("/".join(parts[:2]), "/".join(parts[2:]) or None, torch_dtype=torch_dtype)  # a hub id


def fingerprint(model: torch.nn.Module) -> str:
    """"bf16:" + sha256 of the parameters and buffers (names, and values rounded to bfloat16): the same for the same
    weights wherever they are stored, whether stored in float32 or bfloat16 and loaded in either. (Weights stored in
    float16 round differently; changes smaller than bfloat16's precision go unseen.)"""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())
    return "bf16:" + h.hexdigest()


def variant(model: CVVAE) -> str:
    """The released architecture a model has, or "custom"; says nothing about its latent space (measure that
    with ``cvvae eval --image-vae``)."""
    cfg = model.config
    for name, fields in _RELEASED.items():
        if all(json.dumps(cfg.get(k)) == json.dumps(v) for k, v in fields.items()):
            return name
    return f"custom ({cfg.z_channels} latent channels)"


def describe(model: CVVAE) -> dict[str, Any]:
    """What ``cvvae info`` prints: architecture, sizes, dtype, compression, latent scaling."""
    cfg = model.config
    dtypes = sorted({str(p.dtype).replace("torch.", "") for p in model.parameters()})
    return dict(variant=variant(model), latent_channels=cfg.z_channels, block_out_channels=list(cfg.block_out_channels),
                res_blocks_per_level=cfg.num_res_blocks, parameters=sum(p.numel() for p in model.parameters()),
                encoder_parameters=sum(p.numel() for p in model.encoder.parameters()),
                decoder_parameters=sum(p.numel() for p in model.decoder.parameters()),
                dtype=",".join(dtypes), spatial_compression=model.spatial_compression_ratio,
                temporal_compression=model.temporal_compression_ratio, decoder_attention=cfg.decoder_attn_type,
                scaling_factor=cfg.scaling_factor, shift_factor=cfg.shift_factor)
