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
from safetensors import SafetensorError, safe_open

from ..errors import CheckpointError, ConfigError
from .frames import time_levels

TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# Prefixes of wrappers around the autoencoder (Lightning modules, DDP, torch.compile, SD checkpoints).
WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.", "vae.", "first_stage_model.", "autoencoder.")
MODEL_ROOTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")

SD3_SCALING, SD3_SHIFT = 1.5305, 0.0609  # SD3's own VAE values; the released SD3 config lacks them


# ------------------------------------------------------------------------------------------ files
def read_state_dict(path: str | Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a weights file, with wrapper prefixes stripped and non-autoencoder entries dropped
    (a Lightning training checkpoint also holds the loss, the discriminator, the frozen 2D decoder).

    `dtype`: floating tensors in that dtype; a safetensors file is read and cast one tensor at a time, so that
    loading in bf16 never holds the float32 weights at once."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            sd = _read_safetensors(path, dtype)
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
        sd = {k: _cast(v, dtype) for k, v in strip_wrappers(sd).items()}  # the autoencoder's tensors only
    else:
        raise CheckpointError(f"{path}: unknown weights format (use .safetensors, .ckpt, .pt, .pth or .bin)")
    return strip_wrappers(sd)


def _read_safetensors(path: Path, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        keys = [k for k in f.keys() if _model_key(k) is not None] or list(f.keys())  # the autoencoder's tensors
        if dtype is None:
            return {k: f.get_tensor(k) for k in keys}
    # The file is memory-mapped while open, and every page read stays resident until it is closed: reopened per
    # tensor, a cast load holds one tensor of the stored dtype at a time (peak RSS 790 vs 1464 MiB loading the
    # SD2.1-size model in bf16: docs/benchmarks.md).
    out = {}
    for k in keys:
        with safe_open(str(path), "pt") as f:
            out[k] = _cast(f.get_tensor(k), dtype)
    return out


def _cast(value: Any, dtype: torch.dtype | None) -> Any:
    if dtype is None or not isinstance(value, torch.Tensor) or not value.is_floating_point():
        return value
    return value.to(dtype)


def _model_key(key: str) -> str | None:
    """The autoencoder's name of a checkpoint key without its wrapper prefixes, or None for other entries."""
    stripped = True
    while stripped:
        stripped = False
        for p in WRAPPER_PREFIXES:
            if key.startswith(p):
                key, stripped = key[len(p) :], True
    return key if key.startswith(MODEL_ROOTS) else None


def strip_wrappers(sd: dict[str, Any]) -> dict[str, torch.Tensor]:
    out = {name: value for key, value in sd.items()
           if isinstance(value, torch.Tensor) and (name := _model_key(key)) is not None}
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
    # a model built on the meta device (`load_pretrained`) takes the loaded tensors as they are, each with its own
    # memory (a torch file may hold tied tensors or views of one storage, which safetensors refuses to save)
    assign = any(p.is_meta for p in model.parameters())
    if assign:
        seen: set[int] = set()
        for k, v in fitted.items():
            ptr = v.untyped_storage().data_ptr()
            fitted[k] = v.clone() if ptr in seen else v
            seen.add(ptr)
    model.load_state_dict(fitted, strict=True, assign=assign)


# ------------------------------------------------------------------------------------------ configs
def config_from_json(cfg: dict[str, Any], init_fields: set[str]) -> dict[str, Any]:
    """Our constructor arguments from a config.json of ours or of either official class."""
    sd3 = cfg.get("_class_name") == "CVVAESD3Model" or "layers_per_block" in cfg or "down_block_types" in cfg
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    if sd3:  # the official CVVAESD3Model's config, in diffusers' AutoencoderKL names
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
class MissingWeightsError(CheckpointError, OSError):
    """A folder holds no weights file of the asked name (an OSError, as diffusers raises)."""


def resolve(name_or_path: str | Path, subfolder: str | None, **hub_kwargs) -> Path:
    """A local folder or file; otherwise a hub repo id, fetched with huggingface_hub (config and
    safetensors only: the official repo also holds 905 MB pickles we never need)."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path / subfolder if subfolder and path.is_dir() else path
    name = str(name_or_path)
    first = Path(name.split("/")[0]).expanduser()
    if name.count("/") != 1 or name.startswith((".", "/", "~")) or first.exists():
        raise CheckpointError(f"weights not found: {name_or_path} (no such file or folder)")
    from huggingface_hub import snapshot_download

    prefix = f"{subfolder}/" if subfolder else ""
    try:
        root = snapshot_download(name, allow_patterns=[f"{prefix}*.json", f"{prefix}*.safetensors"], **hub_kwargs)
    except Exception as e:  # noqa: BLE001 - network, auth and missing-repo errors all end here
        raise CheckpointError(f"weights not found: {name} is no local file or folder, and fetching it as a Hugging "
                              f"Face hub id failed ({type(e).__name__}); pass a local folder or file") from None
    return Path(root) / subfolder if subfolder else Path(root)


def weight_files(folder: Path, variant: str | None = None, use_safetensors: bool | None = None) -> list[Path]:
    """The weights of a folder as diffusers names them: ``diffusion_pytorch_model[.VARIANT].safetensors`` (or
    ``.bin``), or the shards an index names (``diffusion_pytorch_model.safetensors.index[.VARIANT].json``).
    Without them, and without a variant, the folder's only weights file (a Lightning ``.ckpt``, a bare file)
    that is not another variant's. ``use_safetensors``: True only safetensors, False only ``.bin``, None both."""
    v = f".{variant}" if variant else ""
    kinds = {True: ["safetensors"], False: ["bin"], None: ["safetensors", "bin"]}[use_safetensors]
    for ext in kinds:
        if (folder / f"diffusion_pytorch_model{v}.{ext}").is_file():
            return [folder / f"diffusion_pytorch_model{v}.{ext}"]
        index = folder / f"diffusion_pytorch_model.{ext}.index{v}.json"
        if index.is_file():
            return _shards(index)
    found = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", *TORCH_SUFFIXES))
    standard = [p for p in found if p.name.startswith("diffusion_pytorch_model")]
    others = [p for p in found if p not in standard]
    if not variant and use_safetensors is None and len(others) == 1 and not standard:
        return others
    hint = ""
    if variants := sorted({p.name.split(".")[1].split("-")[0] for p in standard if p.name.count(".") > 1}):
        hint = f" (it holds the variant(s) {', '.join(variants)}: pass variant=...)"
    elif found:
        hint = f" (found {', '.join(p.name for p in found)})"
    raise MissingWeightsError(f"Error no file named diffusion_pytorch_model{v}.bin found in directory {folder}, nor "
                              f"diffusion_pytorch_model{v}.safetensors or a sharded index{hint}")


def _shards(index: Path) -> list[Path]:
    try:
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, AttributeError) as e:
        raise CheckpointError(f"{index} is not a sharded-checkpoint index ({e})") from None
    missing = [n for n in names if not (index.parent / n).is_file()]
    if missing:
        raise CheckpointError(f"{index} names shards that are missing: {', '.join(missing)}")
    return [index.parent / n for n in names]


# diffusers' ModelMixin.from_pretrained options that change how, not what, is loaded (pipelines pass some of them)
_IGNORED_LOADER_KWARGS = {"low_cpu_mem_usage", "disable_mmap", "mirror"}
# ... and those only diffusers' own loader implements (big-model placement), used for folders of our layout
_PLACEMENT_KWARGS = {"device_map", "max_memory", "offload_folder", "offload_state_dict"}
_REFUSED_LOADER_KWARGS = {"quantization_config": None, "from_flax": False, "use_flashpack": False}


def load_pretrained(cls, name_or_path, *, subfolder=None, torch_dtype=None, config: dict | None = None,
                    variant: str | None = None, use_safetensors: bool | None = None, output_loading_info: bool = False,
                    **kwargs):
    """See `CVVAE.from_pretrained`. Keyword arguments that name config fields override the config (as in
    diffusers, e.g. tile_spatial_size=256); the others go to huggingface_hub."""
    fields = set(cls._get_init_keys(cls))
    overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in fields}
    placement = {k: v for k in list(kwargs) if k in _PLACEMENT_KWARGS and (v := kwargs.pop(k)) is not None}
    for key, inert in _REFUSED_LOADER_KWARGS.items():
        if kwargs.pop(key, inert) not in (inert, None):
            raise TypeError(f"from_pretrained({key}=...) is not supported by {cls.__name__}")
    from huggingface_hub import snapshot_download

    hub = set(inspect.signature(snapshot_download).parameters)
    unknown = sorted(set(kwargs) - hub - _IGNORED_LOADER_KWARGS)
    if unknown:
        raise TypeError(f"from_pretrained() got unexpected keyword arguments {unknown}: neither config fields of "
                        f"{cls.__name__} nor huggingface_hub download options")
    hub_kwargs = {k: v for k, v in kwargs.items() if k in hub}
    path = resolve(name_or_path, subfolder, **hub_kwargs)
    if placement:
        model = _load_placed(cls, path, placement, torch_dtype=torch_dtype, variant=variant,
                             use_safetensors=use_safetensors, config=config, overrides=overrides)
    else:
        model = _load(cls, path, fields, config, overrides, variant, use_safetensors,
                      torch_dtype or torch.get_default_dtype())
    if output_loading_info:  # loading is strict: a mismatch raises instead of being reported here
        return model, {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
    return model


def _load(cls, path: Path, fields: set[str], config: dict | None, overrides: dict, variant: str | None,
          use_safetensors: bool | None, dtype: torch.dtype):
    """The model of `path` in `dtype`: built on the meta device, then given the weights as they are read (in
    `dtype`), so that memory holds one copy of the weights, in the asked dtype."""
    folder = path if path.is_dir() else path.parent
    files = weight_files(path, variant, use_safetensors) if path.is_dir() else [path]
    sd: dict[str, torch.Tensor] = {}
    for file in files:
        sd.update(read_state_dict(file, dtype))
    layout = detect_layout(sd)
    sd = to_ldm(sd)
    if config is None and (folder / "config.json").is_file():
        config = _read_config(folder)
    kwargs = config_from_json(config, fields) if config is not None else infer_config(sd, layout)
    with torch.device("meta"):
        model = cls(**{**kwargs, **overrides})
    load_weights(model, sd)
    return model.eval()


def _read_config(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{folder / 'config.json'} is not valid JSON ({e})") from None


def _load_placed(cls, path: Path, placement: dict, *, torch_dtype, variant, use_safetensors, config, overrides):
    """device_map / max_memory / offload_folder: diffusers' own loader places the weights (accelerate's big-model
    loading), which reads folders saved by `save_pretrained` (our layout and config) only."""
    from diffusers.models.modeling_utils import ModelMixin

    if not path.is_dir() or config is not None or overrides or not (path / "config.json").is_file() \
            or _read_config(path).get("_class_name") not in (cls.__name__, "CVVAEModel"):
        raise CheckpointError(f"{', '.join(sorted(placement))} need a folder written by save_pretrained (or "
                              f"`cvvae convert`) and no config overrides; {path} is not one")
    model = ModelMixin.from_pretrained.__func__(cls, str(path), torch_dtype=torch_dtype, variant=variant,
                                                use_safetensors=use_safetensors, **placement)
    return model.eval()
