"""Which UNet layers output-layer tuning trains, and how the tuned layers are saved and loaded back.

Only the tuned layers are saved (``OUT/tuned_layers.safetensors`` + ``OUT/tuned_layers.json``, which records
the UNet class, the objective and its settings); :func:`load_tuned_layers` copies them into a UNet or a
pipeline's ``.unet``, strictly.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..errors import CheckpointError
from ..io.files import write_atomic
from .objectives import FAMILIES, SUPPORTED, TuneError

__all__ = ["LAYERS", "TunedLayersError", "load_tuned_layers", "save_tuned_layers", "trainable_layers"]

Which = Literal["output", "first+last"]
LAYERS: dict[str, tuple[str, ...]] = {"output": ("conv_out",), "first+last": ("conv_in", "conv_out")}
_KNOWN = (*SUPPORTED, "UNet2DConditionModel")
WEIGHTS, META, FORMAT = "tuned_layers.safetensors", "tuned_layers.json", "cvvae-tuned-layers"


class TunedLayersError(CheckpointError, ValueError):
    """Saved tuned layers that do not fit the UNet they are loaded into."""


def trainable_layers(unet: nn.Module, which: Which = "output") -> dict[str, nn.Parameter]:
    """Freeze ``unet`` except its output layer (``which="output"``) or its input and output layers
    (``"first+last"``); return the trainable parameters by name (``conv_out.weight``, ...)."""
    if which not in LAYERS:
        raise TuneError(f"which must be one of {sorted(LAYERS)}, got {which!r}")
    layers = {}
    for name in LAYERS[which]:
        layer = getattr(unet, name, None)
        if not isinstance(layer, nn.Module) or not any(True for _ in layer.parameters()):
            raise TuneError(f"{type(unet).__name__} has no {name!r} layer with parameters, so {which!r} tuning "
                            f"does not apply to it (supported: diffusers UNets {', '.join(_KNOWN)})")
        layers[name] = layer
    unet.requires_grad_(False)
    params = {}
    for name, layer in layers.items():
        layer.requires_grad_(True)
        params.update({f"{name}.{p}": param for p, param in layer.named_parameters()})
    return params


def _config_hash(unet: nn.Module) -> str:
    """sha256 of the UNet's config without the private ``_name_or_path``-style keys."""
    config = {k: v for k, v in dict(getattr(unet, "config", {})).items() if not k.startswith("_")}
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()



def save_tuned_layers(params: dict[str, nn.Parameter], unet: nn.Module, out: Path, settings: dict[str, Any]) -> Path:
    """Write ``params`` to ``out/tuned_layers.safetensors`` and the record (``settings`` plus the layers, their
    shapes and the UNet's class and config hash) to ``out/tuned_layers.json`` (also in the file's metadata)."""
    from safetensors.torch import save

    meta = {"format": FORMAT, "version": 1, "layers": sorted(params),
            "shapes": {k: list(v.shape) for k, v in sorted(params.items())}, "unet_class": type(unet).__name__,
            "unet_config_sha256": _config_hash(unet), **settings}
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in params.items()}
    write_atomic(out / META, json.dumps(meta, indent=2) + "\n")
    write_atomic(out / WEIGHTS, save(tensors, metadata={"cvvae_tuned_layers": json.dumps(meta)}))
    return out / WEIGHTS


def load_tuned_layers(unet_or_pipeline: Any, path: str | os.PathLike[str]) -> list[str]:
    """Copy layers saved by :func:`tune_unet` (the file or its folder) into a UNet, or a pipeline's ``.unet``.

    Strict: every saved name must be a parameter of the UNet with the same shape, and a supported UNet must be
    of the class the layers were tuned on (SVD's and TextToVideoSD's ``conv_out`` have the same shape), else
    :class:`TunedLayersError` (nothing is changed then). Returns the loaded names.
    """
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    unet = getattr(unet_or_pipeline, "unet", unet_or_pipeline)
    path = Path(path).expanduser()
    file = path / WEIGHTS if path.is_dir() else path
    try:
        tensors = load_file(str(file))
        with safe_open(str(file), "pt") as f:
            tuned_on = json.loads((f.metadata() or {}).get("cvvae_tuned_layers", "{}")).get("unet_class")
    except (OSError, SafetensorError, ValueError, AttributeError) as e:
        raise TunedLayersError(f"cannot read tuned layers {file}: {e}") from None
    own = dict(unet.named_parameters())
    missing = sorted(k for k in tensors if k not in own)
    wrong = sorted(f"{k}: saved {tuple(v.shape)}, UNet {tuple(own[k].shape)}" for k, v in tensors.items()
                   if k in own and own[k].shape != v.shape)
    if missing or wrong:
        raise TunedLayersError(f"{file} does not fit this {type(unet).__name__}: "
                               + "; ".join(([f"not in the UNet: {', '.join(missing)}"] if missing else [])
                                           + ([f"shape mismatch: {'; '.join(wrong)}"] if wrong else [])))
    if tuned_on and type(unet).__name__ in FAMILIES and tuned_on != type(unet).__name__:
        raise TunedLayersError(f"{file} holds layers tuned on a {tuned_on}, not on this {type(unet).__name__}")
    with torch.no_grad():
        for k, v in tensors.items():
            own[k].copy_(v.to(own[k].device, own[k].dtype))
    return sorted(tensors)

