"""Inflate a 2D SD-style image VAE into a CV-VAE that reproduces it exactly on single images.

Rules (each exact for T = 1; the tests check them against diffusers' AutoencoderKL):
- Encoder 3D convs are causal (the first frame is replicated in front): the 2D kernel goes into the
  **last** temporal tap, the others are zero. A frame then sees only itself, and with time stride 2
  output frame i is the 2D conv of frame 2i ("slice" behaviour before any training).
- Decoder 3D convs pad time with zeros (or replicate): the 2D kernel goes into the **centre** tap.
- Time-doubling upsamplers (2C output channels, half n -> frame 2t + n): both halves get the
  centre-tap kernel, i.e. nearest-neighbour upsampling in time.
- 1x1 shortcuts become 1x1x1; 2D per-frame convs, norms and spatial attention are copied.
- quant_conv (1x1 on the moments) is folded into encoder.conv_out: W' = Q W, b' = Q b + q.
- post_quant_conv is kept as a 1x1 per-frame layer (folding it into decoder.conv_in would be wrong
  at the borders, where zero padding meets the folded bias).
- The decoder mid block gets a temporal attention *residual* after the spatial one
  ("spatial-temporal-residual") whose output projection is zero, so it adds exactly nothing.
- GroupNorm eps and groups are the 2D VAE's (1e-6 and 32 for SD).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import CheckpointError
from .autoencoder import CVVAE
from .checkpoints import read_state_dict, shape_config, strip_wrappers, to_ldm


def _config_2d(vae_2d) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The 2D state dict in LDM names, and what we know of its config."""
    if isinstance(vae_2d, (str, Path)):
        path = Path(vae_2d)
        if path.is_dir():
            from diffusers import AutoencoderKL

            try:
                vae_2d = AutoencoderKL.from_pretrained(path)
            except Exception as e:  # noqa: BLE001 - diffusers raises many types for a bad folder
                raise CheckpointError(f"{path} is not a diffusers AutoencoderKL folder ({type(e).__name__})") from None
        else:
            vae_2d = read_state_dict(path)
    if isinstance(vae_2d, torch.nn.Module):
        c = vae_2d.config
        cfg = dict(norm_num_groups=c.norm_num_groups, scaling_factor=c.scaling_factor,
                   shift_factor=c.get("shift_factor"), force_upcast=c.get("force_upcast", True),
                   mid_attention=c.get("mid_block_add_attention", True))
        return to_ldm(dict(vae_2d.state_dict())), cfg
    if isinstance(vae_2d, Mapping):
        sd = to_ldm(strip_wrappers(vae_2d))
        return sd, dict(mid_attention="encoder.mid.attn_1.q.weight" in sd)
    raise TypeError(f"cannot inflate a {type(vae_2d).__name__}; pass an AutoencoderKL, a state dict or a path")


def inflated_config(sd: Mapping[str, torch.Tensor], **overrides) -> dict[str, Any]:
    """CV-VAE config for a 2D VAE state dict in LDM names (SD defaults for what keys cannot tell)."""
    cfg = shape_config(sd, "an SD-style image VAE")
    attention = overrides.pop("mid_attention", True)
    spatial_only = overrides.pop("spatial_attention_only", False)  # no temporal attention in the decoder
    cfg.update(
        norm_num_groups=32, norm_eps=1e-6, padding_mode="zeros", half_3d=True,
        encoder_attn_type="vanilla" if attention else "none",
        decoder_attn_type=("vanilla" if spatial_only else "spatial-temporal-residual") if attention else "none",
    )
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    return cfg


def _inflate_tensor(name: str, target: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    if src.shape == target.shape:
        return src
    if ".upsample." in name and target.ndim == 1 and target.shape[0] % src.shape[0] == 0:  # time-doubling bias
        return src.repeat(target.shape[0] // src.shape[0])
    if target.ndim == 5 and src.ndim == 4 and target.shape[2:] == (1, 1, 1):
        return src[:, :, None]
    if target.ndim == 5 and src.ndim == 4:
        out = torch.zeros_like(target, dtype=src.dtype)
        copies = target.shape[0] // src.shape[0]  # 2 for time-doubling upsamplers
        if src.shape[1:] != target.shape[1:2] + target.shape[3:] or copies * src.shape[0] != target.shape[0]:
            raise CheckpointError(f"cannot inflate {name}: 2D {tuple(src.shape)} -> 3D {tuple(target.shape)}")
        tap = target.shape[2] - 1 if name.startswith("encoder.") else target.shape[2] // 2
        out[:, :, tap] = src.repeat(copies, 1, 1, 1)
        return out
    raise CheckpointError(f"cannot inflate {name}: 2D {tuple(src.shape)} -> {tuple(target.shape)}")


def inflate_from_image_vae(vae_2d, **config_overrides) -> CVVAE:
    """Build a CV-VAE from a 2D image VAE.

    `vae_2d`: a diffusers `AutoencoderKL`, a state dict in diffusers or original LDM names (for
    example an SD checkpoint's `first_stage_model.*`), or a path to either. Keyword arguments
    override config fields (e.g. `norm_num_groups` for a non-SD VAE, `scaling_factor`).
    """
    sd, known = _config_2d(vae_2d)
    model = CVVAE(**inflated_config(sd, **{**known, **config_overrides}))
    sd = dict(sd)
    if "quant_conv.weight" in sd:
        q, qb = sd.pop("quant_conv.weight").flatten(1), sd.pop("quant_conv.bias")
        w, b = sd["encoder.conv_out.weight"], sd["encoder.conv_out.bias"]
        sd["encoder.conv_out.weight"] = torch.einsum("oa,a...->o...", q, w)
        sd["encoder.conv_out.bias"] = q @ b + qb
    new = {}
    for name, target in model.state_dict().items():
        if name in sd:
            new[name] = _inflate_tensor(name, target, sd.pop(name))
        elif ".attn_1." in name and name.split(".")[-2].endswith("_t"):
            # temporal attention: default init, but the output projection is zero (adds nothing)
            new[name] = torch.zeros_like(target) if ".proj_out_t." in name else target
        else:
            raise CheckpointError(f"2D VAE has no weight for {name}")
    if sd:
        raise CheckpointError(f"2D VAE weights not used by the CV-VAE: {sorted(sd)[:6]}")
    model.load_state_dict(new, strict=True)
    return model.eval()


def deflate_to_image_vae(model: CVVAE, *, drop_temporal_attention: bool = False):
    """The 2D image VAE (a diffusers `AutoencoderKL`) that a CV-VAE is on single images, exactly.

    For T = 1 every causal encoder conv (and downsampler) sees the one frame through all its
    temporal taps, so its 2D kernel is the sum of the taps; zero-padded decoder convs see it only
    through the centre tap; a time-doubling upsampler keeps the second half of its output channels
    (the frame it keeps), whose replicate-padded taps also sum. So a CV-VAE trained on images only
    exports as the image VAE it is, and `inflate_from_image_vae` brings that back (same images).
    Needs zero spatial padding and eps 1e-6 (what AutoencoderKL hard-codes) and a decoder attention
    that is spatial for one frame ("spatial", or "spatial-temporal-residual" with proj_out_t zero).
    `drop_temporal_attention` exports a "spatial-temporal-residual" decoder whose temporal branch was
    trained (e.g. inflated, then trained on images) without that branch: no longer exact, so measure it.
    """
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    cfg = model.config
    kind = model.decoder.mid.attn_1.kind if hasattr(model.decoder.mid, "attn_1") else None
    problems = []
    if cfg.padding_mode != "zeros":
        problems.append("padding_mode must be 'zeros'")
    if cfg.norm_eps != 1e-6:
        problems.append(f"norm_eps must be 1e-6 (AutoencoderKL's), not {cfg.norm_eps}")
    if kind == "spatial-temporal":
        problems.append(f"the decoder attention ({cfg.decoder_attn_type}) is not spatial on single frames")
    elif kind == "spatial-temporal-residual" and not drop_temporal_attention and any(
            p.abs().max() > 0 for p in model.decoder.mid.attn_1.proj_out_t.parameters()):
        # e.g. `cvvae inflate` output trained further on images: single frames train the temporal branch too
        problems.append(f"the decoder attention ({cfg.decoder_attn_type}) is not spatial on single frames: "
                        "its temporal output projection (proj_out_t) has been trained away from zero "
                        "(drop_temporal_attention / --drop-temporal-attention exports it without that branch)")
    if hasattr(model.encoder.mid, "attn_1") != (kind is not None):
        problems.append("encoder and decoder must both have or both lack mid attention")
    if problems:
        raise CheckpointError("cannot deflate this CV-VAE to a 2D VAE: " + "; ".join(problems))
    widths = list(cfg.block_out_channels)
    sd = {}
    for name, w in model.state_dict().items():
        if "_t." in name:  # the temporal attention, zero on single frames
            continue
        if ".upsample.conv." in name and model.get_submodule(name.rsplit(".", 2)[0]).time:
            w = w[w.shape[0] // 2:]  # the channel half that becomes the kept frame
        if w.ndim == 5:
            centre = name.startswith("decoder.") and ".upsample." not in name
            w = w[:, :, w.shape[2] // 2] if centre else w.sum(dim=2)
        sd[name] = w
    ae_config = dict(in_channels=cfg.in_channels, out_channels=cfg.out_ch, latent_channels=cfg.z_channels,
                     block_out_channels=widths, layers_per_block=cfg.num_res_blocks,
                     down_block_types=["DownEncoderBlock2D"] * len(widths),
                     up_block_types=["UpDecoderBlock2D"] * len(widths), norm_num_groups=cfg.norm_num_groups,
                     scaling_factor=cfg.scaling_factor, shift_factor=cfg.shift_factor,
                     force_upcast=cfg.force_upcast, use_quant_conv=False,
                     use_post_quant_conv=cfg.use_post_quant_conv, mid_block_add_attention=kind is not None)
    vae = AutoencoderKL(**ae_config)
    missing, unexpected = vae.load_state_dict(convert_ldm_vae_checkpoint(sd, ae_config), strict=False)
    if missing or unexpected:
        raise CheckpointError(f"deflation left keys unmatched: missing {missing[:4]}, unexpected {unexpected[:4]}")
    return vae.eval()
