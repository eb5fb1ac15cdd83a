"""Reading checkpoints of every released layout safely, converting them, loading them strictly.

Layouts (keys of the encoder shown; the decoder is analogous):
- "ldm": ours and the official SD2.1 release (`encoder.down.0.block.0.conv1.weight`, `mid.attn_1.q`).
  Original LDM-format 2D SD VAEs use the same names (for inflation).
- "diffusers": the official SD3 release and diffusers' AutoencoderKL (`encoder.down_blocks.0.resnets.0
  .conv1.weight`, `mid_block.attentions.0.to_q`). Converted by renaming; its Linear attention
  projections become 1x1 convs and its 2D 1x1 shortcuts 1x1x1 convs (the same maps).
Files: safetensors, diffusers `.bin`, and Lightning/PyTorch `.ckpt`/`.pt`/`.pth`, the latter read with
`torch.load(weights_only=True)`, so no pickled code ever runs.
"""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..errors import CheckpointError, ConfigError
from .autoencoder import time_levels

WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# Prefixes of wrappers around the autoencoder (Lightning modules, DDP, torch.compile, SD checkpoints).
WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.", "vae.", "first_stage_model.", "autoencoder.")
MODEL_ROOTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")

SD3_SCALING, SD3_SHIFT = 1.5305, 0.0609  # SD3's own VAE values; the released SD3 config lacks them


# ------------------------------------------------------------------------------------------ files
def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file, with wrapper prefixes stripped and non-autoencoder entries dropped
    (a Lightning training checkpoint also holds the loss, the discriminator, the frozen 2D decoder)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            sd = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from None
    elif path.suffix in TORCH_SUFFIXES:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure means "not safely loadable"
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{path} cannot be read safely with weights_only=True ({first})") from None
        sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
        if not isinstance(sd, dict):
            raise CheckpointError(f"{path} holds no state dict")
    else:
        raise CheckpointError(f"{path}: unknown weights format (use .safetensors, .ckpt, .pt, .pth or .bin)")
    return strip_wrappers(sd)


def strip_wrappers(sd: dict[str, Any]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in sd.items():
        if not isinstance(value, torch.Tensor):
            continue
        stripped = True
        while stripped:
            stripped = False
            for p in WRAPPER_PREFIXES:
                if key.startswith(p):
                    key, stripped = key[len(p) :], True
        if key.startswith(MODEL_ROOTS):
            out[key] = value
    if not out:
        raise CheckpointError("no encoder/decoder weights found in the checkpoint")
    return out


# ------------------------------------------------------------------------------------------ layouts
def detect_layout(sd: dict[str, torch.Tensor]) -> str:
    return "diffusers" if any(".down_blocks." in k or ".mid_block." in k or ".up_blocks." in k for k in sd) else "ldm"


_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
         "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}


def diffusers_to_ldm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename diffusers-layout keys to LDM names; Linear attention weights become [C, C, 1, 1]."""
    ups = {int(m.group(1)) for k in sd if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))}
    n_up = max(ups) + 1 if ups else 0
    out = {}
    for key, v in sd.items():
        k = key.replace("conv_norm_out", "norm_out")
        k = re.sub(r"mid_block\.resnets\.(\d)\.", lambda m: f"mid.block_{int(m.group(1)) + 1}.", k)
        k = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", k)
        k = re.sub(r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block.", k)
        k = re.sub(r"up_blocks\.(\d+)\.", lambda m: f"up.{n_up - 1 - int(m.group(1))}.", k)
        k = k.replace("upsamplers.0.", "upsample.").replace(".resnets.", ".block.")
        k = k.replace("conv_shortcut", "nin_shortcut")
        if m := re.match(r"(\w+)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)$", k):
            k = f"{m.group(1)}.mid.attn_1.{_ATTN.get(m.group(2), m.group(2))}.{m.group(3)}"
            if v.ndim == 2:
                v = v[:, :, None, None]
        out[k] = v
    return out


def to_ldm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return diffusers_to_ldm(sd) if detect_layout(sd) == "diffusers" else sd


def load_weights(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Load strictly; 1x1 kernels are reshaped between their 2D/3D forms. Lists every mismatch."""
    sd = to_ldm(sd)
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    bad_shapes, fitted = [], {}
    for k in set(own) & set(sd):
        v, want = sd[k], own[k].shape
        if v.shape != want and v.numel() == own[k].numel() and all(s == 1 for s in v.shape[2:]) \
                and all(s == 1 for s in want[2:]):
            v = v.reshape(want)  # [o, i, 1, 1] <-> [o, i, 1, 1, 1]: the same per-pixel linear map
        if v.shape != want:
            bad_shapes.append(f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(want)}")
        fitted[k] = v
    if missing or unexpected or bad_shapes:
        parts = []
        for name, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", bad_shapes)):
            if items:
                shown = ", ".join(items[:6]) + (f", ... ({len(items)} in all)" if len(items) > 6 else "")
                parts.append(f"{name}: {shown}")
        raise CheckpointError("checkpoint does not fit this CV-VAE config; " + "; ".join(parts))
    model.load_state_dict(fitted, strict=True)


# ------------------------------------------------------------------------------------------ configs
def config_from_json(cfg: dict[str, Any], init_fields: set[str]) -> dict[str, Any]:
    """Our constructor arguments from a config.json of ours or of either official class."""
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    if "block_out_channels" in cfg and "ch" not in cfg:  # official CVVAESD3Model
        cfg = _from_sd3_config(cfg)
    unknown = sorted(set(cfg) - init_fields)
    if unknown:
        raise ConfigError(f"config.json has fields that are not CV-VAE fields: {unknown}")
    return cfg


def _from_sd3_config(cfg: dict[str, Any]) -> dict[str, Any]:
    widths = list(cfg.pop("block_out_channels"))
    ch = widths[0]
    if any(w % ch for w in widths):
        raise ConfigError(f"block_out_channels {widths} are not multiples of their first entry")
    attention = "vanilla" if cfg.pop("mid_block_add_attention", True) else "none"
    if cfg.pop("act_fn", "silu") != "silu":
        raise ConfigError("only act_fn='silu' is supported")
    for key in ("down_block_types", "up_block_types"):
        cfg.pop(key, None)
    translated = {
        "z_channels": cfg.pop("out_channels", 16),
        "out_ch": 3,
        "ch": ch,
        "ch_mult": [w // ch for w in widths],
        "num_res_blocks": cfg.pop("layers_per_block", 2),
        "norm_num_groups": cfg.pop("norm_num_groups", 32),
        "norm_eps": 1e-6,
        "padding_mode": "replicate",
        "encoder_attn_type": attention,
        "decoder_attn_type": attention,
        "scaling_factor": SD3_SCALING,
        "shift_factor": SD3_SHIFT,
    }
    return {**cfg, **translated}


def shape_config(sd: dict[str, torch.Tensor], what: str = "a CV-VAE checkpoint") -> dict[str, Any]:
    """The config fields that the tensor shapes of an LDM-named state dict (2D or 3D) determine."""
    try:
        widths, i = [], 0
        while f"encoder.down.{i}.block.0.conv1.weight" in sd:
            widths.append(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0])
            i += 1
        ch = sd["encoder.conv_in.weight"].shape[0]
        z = sd["decoder.conv_in.weight"].shape[1]
        return dict(
            in_channels=sd["encoder.conv_in.weight"].shape[1],
            out_ch=sd["decoder.conv_out.weight"].shape[0],
            z_channels=z,
            double_z=sd["encoder.conv_out.weight"].shape[0] == 2 * z,
            ch=ch,
            ch_mult=[w // ch for w in widths],
            num_res_blocks=sum(1 for k in sd if re.fullmatch(r"encoder\.down\.0\.block\.\d+\.conv1\.weight", k)),
            use_post_quant_conv="post_quant_conv.weight" in sd,
            time_n_compress=2 ** sum(time_levels(len(widths))),
            spatial_n_compress=2 ** (len(widths) - 1),
        )
    except KeyError as e:
        raise CheckpointError(f"weights lack {e.args[0]}: not {what}") from None


def infer_config(sd: dict[str, torch.Tensor], layout: str) -> dict[str, Any]:
    """A config for bare weights (no config.json): shapes from the tensors, the rest from the
    released variant the layout belongs to (diffusers layout -> SD3, LDM layout -> SD2.1)."""
    cfg = shape_config(sd)
    conv2 = sd.get("encoder.down.0.block.0.conv2.weight")
    if conv2 is None:
        raise CheckpointError("weights lack encoder.down.0.block.0.conv2.weight: not a CV-VAE checkpoint")
    cfg["half_3d"] = conv2.ndim == 4
    cfg["encoder_attn_type"] = "vanilla" if "encoder.mid.attn_1.q.weight" in sd else "none"
    cfg["decoder_attn_type"] = ("spatial-temporal-xformer" if "decoder.mid.attn_1.q_t.weight" in sd
                                else "vanilla" if "decoder.mid.attn_1.q.weight" in sd else "none")
    if layout == "diffusers":
        cfg.update(norm_eps=1e-6, padding_mode="replicate", scaling_factor=SD3_SCALING, shift_factor=SD3_SHIFT)
    return cfg


# ------------------------------------------------------------------------------------------ entry
def resolve(name_or_path: str | Path, subfolder: str | None, **hub_kwargs) -> Path:
    """A local folder or file; otherwise a hub repo id, fetched with huggingface_hub (config and
    safetensors only: the official repo also holds 905 MB pickles we never need)."""
    path = Path(name_or_path)
    if path.exists():
        return path / subfolder if subfolder and path.is_dir() else path
    if str(name_or_path).count("/") != 1 or str(name_or_path).startswith((".", "/")):
        raise CheckpointError(f"weights not found: {name_or_path} (no such file or folder)")
    from huggingface_hub import snapshot_download

    prefix = f"{subfolder}/" if subfolder else ""
    try:
        root = snapshot_download(str(name_or_path), allow_patterns=[f"{prefix}*.json", f"{prefix}*.safetensors"],
                                 **hub_kwargs)
    except Exception as e:  # noqa: BLE001 - network, auth and missing-repo errors all end here
        raise CheckpointError(f"cannot fetch {name_or_path} from the Hugging Face hub "
                              f"({type(e).__name__}); pass a local folder or file instead") from None
    return Path(root) / subfolder if subfolder else Path(root)


def find_weights(folder: Path, variant: str | None = None) -> Path:
    names = list(WEIGHT_NAMES)
    if variant:
        names = [n.replace(".safetensors", f".{variant}.safetensors").replace(".bin", f".{variant}.bin") for n in names]
    for name in names:
        if (folder / name).is_file():
            return folder / name
    found = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", *TORCH_SUFFIXES))
    if len(found) == 1:
        return found[0]
    raise CheckpointError(f"no weights in {folder}: expected {names[0]}"
                          + (f" (found {', '.join(p.name for p in found)})" if found else ""))


# diffusers' ModelMixin.from_pretrained options that have no meaning here (pipelines pass some of them)
_IGNORED_LOADER_KWARGS = {"low_cpu_mem_usage", "device_map", "max_memory", "offload_folder", "offload_state_dict",
                          "use_safetensors", "output_loading_info", "quantization_config", "disable_mmap", "from_flax",
                          "mirror", "use_flashpack"}


def load_pretrained(cls, name_or_path, *, subfolder=None, torch_dtype=None, config: dict | None = None,
                    variant: str | None = None, **hub_kwargs):
    """See `CVVAE.from_pretrained`. Keyword arguments that name config fields override the config (as in
    diffusers, e.g. tile_spatial_size=256); the others go to huggingface_hub."""
    fields = set(cls._get_init_keys(cls))
    overrides = {k: hub_kwargs.pop(k) for k in list(hub_kwargs) if k in fields}
    from huggingface_hub import snapshot_download

    hub = set(inspect.signature(snapshot_download).parameters)
    unknown = sorted(set(hub_kwargs) - hub - _IGNORED_LOADER_KWARGS)
    if unknown:
        raise TypeError(f"from_pretrained() got unexpected keyword arguments {unknown}: neither config fields of "
                        f"{cls.__name__} nor huggingface_hub download options")
    hub_kwargs = {k: v for k, v in hub_kwargs.items() if k in hub}
    path = resolve(name_or_path, subfolder, **hub_kwargs)
    folder = path if path.is_dir() else path.parent
    weights = find_weights(path, variant) if path.is_dir() else path
    sd = read_state_dict(weights)
    layout = detect_layout(sd)
    sd = to_ldm(sd)
    if config is None and (folder / "config.json").is_file():
        try:
            config = json.loads((folder / "config.json").read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{folder / 'config.json'} is not valid JSON ({e})") from None
    kwargs = config_from_json(config, fields) if config is not None else infer_config(sd, layout)
    model = cls(**{**kwargs, **overrides})
    load_weights(model, sd)
    model.eval()
    if torch_dtype is not None:
        # nn.Module.to: diffusers' ModelMixin.to warns about fp32-kept modules even when there are none
        torch.nn.Module.to(model, torch_dtype)
    return model
