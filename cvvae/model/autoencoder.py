"""Encoder3D, Decoder3D and the public `CVVAE` model (diffusers ModelMixin/ConfigMixin API).

Shapes for the released SD2.1 model (ch 128, ch_mult [1, 2, 4, 4]) and a 1x3x17x256x256 clip:
  encoder: 17x256^2 -> down.0 (time+space) 9x128^2 -> down.1 (space) 9x64^2 -> down.2 (time+space)
           5x32^2 -> mid -> moments 1x8x5x32x32 (mean and logvar of 4 latent channels)
  decoder: 5x32^2 -> up.3 (time+space) 9x64^2 -> up.2 (space) 9x128^2 -> up.1 (time+space) 17x256^2
Time is resampled at every other level (encoder levels 0, 2, ...; the decoder mirrors it).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import AutoencoderMixin, DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils.accelerate_utils import apply_forward_hook
from einops import rearrange
from torch import nn

from ..errors import ConfigError, InputError
from . import frames
from .frames import time_levels
from .chunking import check_tiles, decode_latents, encode_moments, max_blend_overlap
from .layers import (Conv3d, Downsample, FrameConv2d, GroupNorm, MidAttention, ResnetBlock, Upsample, is_channels_last,
                     pad_frames, silu)

CHUNK_MODES = ("official", "blend", "full")

# Official attention-type names (config.json) -> the kind of MidAttention they build (None: no attention).
ENCODER_ATTENTION = {"vanilla": "spatial", "vanilla-xformers": "spatial", "spatial": "spatial", "none": None}
DECODER_ATTENTION = {
    **ENCODER_ATTENTION,
    "spatial-temporal-xformer": "spatial-temporal",
    "spatial-temporal": "spatial-temporal",
    "spatial-temporal-residual": "spatial-temporal-residual",
}


class _Checkpointed(nn.Module):
    """Runs children through activation checkpointing when diffusers turned it on (training only)."""

    gradient_checkpointing = False
    _gradient_checkpointing_func: Callable

    def run(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(module, x)
        return module(x)


@dataclass(frozen=True)
class Blocks:
    """How an encoder or decoder builds its blocks: padding, 2D+3D split, norms, dropout."""

    time_padding: str  # "causal" (encoder), "zeros" (SD2.1 decoder) or "replicate" (SD3 decoder)
    space_padding: str
    half_3d: bool
    norm_groups: int
    norm_eps: float
    dropout: float

    def resnet(self, cin: int, cout: int) -> ResnetBlock:
        return ResnetBlock(cin, cout, **asdict(self))

    def conv(self, cin: int, cout: int) -> Conv3d:
        return Conv3d(cin, cout, 3, time_padding=self.time_padding, space_padding=self.space_padding)

    def norm(self, channels: int) -> GroupNorm:
        return GroupNorm(self.norm_groups, channels, eps=self.norm_eps)


class Encoder3D(_Checkpointed):
    """Causal video encoder: (B, 3, T, H, W) -> moments (B, 2*z, 1+(T-1)//4, H/8, W/8)."""

    def __init__(self, *, in_channels: int, out_channels: int, widths: list[int], num_res_blocks: int,
                 attention: str | None, blocks: Blocks) -> None:
        super().__init__()
        self.conv_in = blocks.conv(in_channels, widths[0])
        self.down = nn.ModuleList()
        c = widths[0]
        for i, (w, time) in enumerate(zip(widths, time_levels(len(widths)))):
            level = nn.Module()
            level.block = nn.ModuleList(blocks.resnet(c if j == 0 else w, w) for j in range(num_res_blocks))
            if i < len(widths) - 1:
                level.downsample = Downsample(w, time=time, space_padding=blocks.space_padding)
            self.down.append(level)
            c = w
        self.mid = _mid_block(c, attention, blocks)
        self.norm_out = blocks.norm(c)
        self.conv_out = blocks.conv(c, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = self.run(block, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)  # T -> (T-1)//2 + 1 on time levels; H, W -> H/2, W/2
        h = _run_mid(self, h)
        return self.conv_out(silu(self.norm_out(h)))


class Decoder3D(_Checkpointed):
    """Non-causal video decoder: (B, z, t, h, w) -> (B, 3, 1+4(t-1), 8h, 8w)."""

    def __init__(self, *, in_channels: int, out_channels: int, widths: list[int], num_res_blocks: int,
                 attention: str | None, blocks: Blocks) -> None:
        super().__init__()
        c = widths[-1]
        self.conv_in = blocks.conv(in_channels, c)
        self.mid = _mid_block(c, attention, blocks)
        # `up` is stored in index order 0..L-1 (checkpoint names) and applied from L-1 down to 0.
        levels: list[nn.Module] = []
        enc_time = time_levels(len(widths))
        for i in reversed(range(len(widths))):
            w = widths[i]
            level = nn.Module()
            level.block = nn.ModuleList(blocks.resnet(c if j == 0 else w, w) for j in range(num_res_blocks + 1))
            if i > 0:
                level.upsample = Upsample(w, time=enc_time[i - 1], space_padding=blocks.space_padding)
            levels.insert(0, level)
            c = w
        self.up = nn.ModuleList(levels)
        self.norm_out = blocks.norm(c)
        self.conv_out = blocks.conv(c, out_channels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = _run_mid(self, self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = self.run(block, h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)  # T -> 2T-1 on time levels; H, W -> 2H, 2W
        return self.conv_out(silu(self.norm_out(h)))


def _mid_block(channels: int, attention: str | None, blocks: Blocks) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = blocks.resnet(channels, channels)
    if attention is not None:
        mid.attn_1 = MidAttention(channels, kind=attention, norm_groups=blocks.norm_groups, norm_eps=blocks.norm_eps)
    mid.block_2 = blocks.resnet(channels, channels)
    return mid


def _run_mid(coder: _Checkpointed, h: torch.Tensor) -> torch.Tensor:
    mid = coder.mid
    h = coder.run(mid.block_1, h)
    if hasattr(mid, "attn_1"):
        h = coder.run(mid.attn_1, h)
    return coder.run(mid.block_2, h)


class DiagonalGaussian(DiagonalGaussianDistribution):
    """diffusers' posterior, with KL and NLL summed over every non-batch axis (diffusers sums over
    axes 1-3 only, which is wrong for 5-D video latents)."""

    def kl(self, other: DiagonalGaussianDistribution | None = None) -> torch.Tensor:
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device)
        if other is None:
            terms = self.mean.pow(2) + self.var - 1.0 - self.logvar
        else:
            terms = (self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar
        return 0.5 * terms.sum(dim=tuple(range(1, terms.ndim)))

    def nll(self, sample: torch.Tensor, dims: tuple[int, ...] | None = None) -> torch.Tensor:
        if self.deterministic:
            return torch.zeros(sample.shape[0], device=sample.device)
        dims = tuple(range(1, sample.ndim)) if dims is None else dims
        return 0.5 * torch.sum(math.log(2.0 * math.pi) + self.logvar + (sample - self.mean).pow(2) / self.var, dim=dims)


class CVVAE(ModelMixin, AutoencoderMixin, ConfigMixin):
    r"""CV-VAE: a video VAE whose latents are compatible with Stable Diffusion's image VAE.

    Config fields keep the names of the official `config.json` (SD2.1 variant `CVVAEModel`);
    official SD3-variant configs (`CVVAESD3Model`) are translated on load (see `checkpoints.py`).
    Fields the official configs do not have: `norm_num_groups`, `norm_eps`, `padding_mode`
    ("zeros" for SD2.1, "replicate" for SD3), `use_post_quant_conv` (inflated 2D VAEs),
    `shift_factor` (SD3: 0.0609) and `block_out_channels` (= ch * ch_mult, read by diffusers pipelines).

    Precedence of names: diffusers' `block_out_channels`, when given, sets the widths and wins over the
    official `ch` and `ch_mult` (which are then recorded as its first entry and its multiples); left out,
    it is derived from them. `spatial_n_compress` and `time_n_compress` follow from the number of levels
    (left out or None) and must agree with it when given.

    Videos are (B, 3, T, H, W) in [-1, 1]; latents are (B, z, 1+(T-1)//4, H/8, W/8), not scaled.
    4-D inputs are frames, (B*T, C, H, W), and give 4-D outputs (image mode).
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["ResnetBlock"]

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_ch: int = 3,
        z_channels: int = 4,
        double_z: bool = True,
        ch: int = 128,
        ch_mult: tuple[int, ...] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        attn_resolutions: tuple[int, ...] = (),
        dropout: float = 0.0,
        use_3d_conv: bool = True,
        half_3d: bool = True,
        causal_encoder: bool = True,
        causal_decoder: bool = False,
        encoder_attn_type: str = "vanilla-xformers",
        decoder_attn_type: str = "spatial-temporal-xformer",
        scaling_factor: float = 0.18215,
        shift_factor: float | None = None,
        force_upcast: bool = True,
        en_de_n_frames_a_time: int | None = 16,
        time_n_compress: int | None = None,
        spatial_n_compress: int | None = None,
        tile_spatial_size: int | None = 576,
        tile_overlap_ratio: float = 0.2222,
        num_video_frames: int | None = None,
        reshape_z_dim_to_4: bool = False,
        reshape_x_dim_to_4: bool = False,
        norm_num_groups: int = 32,
        norm_eps: float = 1e-5,
        padding_mode: str = "zeros",
        use_post_quant_conv: bool = False,
        block_out_channels: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        if block_out_channels is not None:  # diffusers' name wins over the official ch * ch_mult (class docstring)
            if list(block_out_channels) != [ch * m for m in ch_mult] and (ch, tuple(ch_mult)) != (128, (1, 2, 4, 4)):
                warnings.warn(f"block_out_channels {list(block_out_channels)} and ch * ch_mult "
                              f"{[ch * m for m in ch_mult]} disagree: block_out_channels is used", stacklevel=3)
            ch, ch_mult = _split_widths(block_out_channels)
        widths = [ch * m for m in ch_mult]
        levels = len(widths)
        spatial_n_compress = spatial_n_compress or 2 ** (levels - 1)
        time_n_compress = time_n_compress or 2 ** sum(time_levels(levels))
        _validate(locals(), widths)
        self.register_to_config(ch=ch, ch_mult=list(ch_mult), block_out_channels=widths,
                                spatial_n_compress=spatial_n_compress, time_n_compress=time_n_compress)
        blocks = Blocks(time_padding=padding_mode, space_padding=padding_mode, half_3d=half_3d,
                        norm_groups=norm_num_groups, norm_eps=norm_eps, dropout=dropout)
        self.encoder = Encoder3D(in_channels=in_channels, out_channels=z_channels * (2 if double_z else 1),
                                 widths=widths, num_res_blocks=num_res_blocks,
                                 attention=ENCODER_ATTENTION[encoder_attn_type], blocks=replace(blocks, time_padding="causal"))
        self.decoder = Decoder3D(in_channels=z_channels, out_channels=out_ch, widths=widths,
                                 num_res_blocks=num_res_blocks, attention=DECODER_ATTENTION[decoder_attn_type],
                                 blocks=blocks)
        if use_post_quant_conv:
            self.post_quant_conv = FrameConv2d(z_channels, z_channels, 1)
        self.use_slicing = False
        self.use_tiling = True  # as released: 576 px tiles whenever a frame is larger (see chunking.py)
        self._chunk_mode = "official"
        self._blend_overlap = 1

    @property
    def chunk_mode(self) -> str:
        """How `encode`/`decode` split a long clip: "official" (the released temporal rounds, the default),
        "blend" (rounds that overlap by `blend_overlap` latents, blended: no seams) or "full" (the whole clip in
        one forward; memory grows with its length). See `chunking.py`."""
        return self._chunk_mode

    @chunk_mode.setter
    def chunk_mode(self, mode: str) -> None:
        if mode not in CHUNK_MODES:
            raise ConfigError(f"chunk_mode must be one of {CHUNK_MODES}, got {mode!r}")
        if mode == "blend" and self._max_blend_overlap() < 1:
            warnings.warn(f"rounds of {self.config.en_de_n_frames_a_time} frames are too short to blend (it takes 12 "
                          "or more): the released rounds are used", stacklevel=2)
        self._chunk_mode = mode

    def _max_blend_overlap(self) -> int:
        step = self.config.en_de_n_frames_a_time
        return max_blend_overlap(step // self.temporal_compression_ratio) if step else 0

    @contextlib.contextmanager
    def chunking(self, mode: str, blend_overlap: int | None = None) -> Iterator["CVVAE"]:
        """Use another chunk mode (and blend overlap) inside a `with` block, e.g. for one pipeline call."""
        before = self._chunk_mode, self._blend_overlap
        try:
            self.chunk_mode = mode
            if blend_overlap is not None:
                self.blend_overlap = blend_overlap
            yield self
        finally:
            self._chunk_mode, self._blend_overlap = before

    @property
    def blend_overlap(self) -> int:
        """Latents (4 frames each) by which "blend" rounds overlap beyond their shared boundary (1 with the released
        16-frame rounds; larger rounds, `en_de_n_frames_a_time`, allow more)."""
        return self._blend_overlap

    @blend_overlap.setter
    def blend_overlap(self, latents: int) -> None:
        most = self._max_blend_overlap()
        if isinstance(latents, bool) or not isinstance(latents, int) or not 1 <= latents <= max(most, 1):
            raise ConfigError(f"blend_overlap must be an integer from 1 to {most} with rounds of "
                              f"{self.config.en_de_n_frames_a_time} frames, got {latents!r}")
        self._blend_overlap = latents

    @property
    def memory_format(self) -> torch.memory_format:
        """The layout of the conv weights, which `encode_clip`/`decode_clip` give their inputs too:
        torch.contiguous_format (as loaded) or torch.channels_last_3d (`model.to(memory_format=...)`)."""
        return torch.channels_last_3d if is_channels_last(self.encoder.conv_in.weight) else torch.contiguous_format

    def to(self, *args, memory_format: torch.memory_format | None = None, **kwargs) -> "CVVAE":
        """nn.Module.to, where `memory_format=torch.channels_last_3d` lays out every conv weight channels-last
        (5-D ones as 3-D, the per-frame 2-D ones as 2-D), so that activations stay channels-last through the
        whole forward: faster bf16 (and fp32) convolutions on CPUs (docs/benchmarks.md), the same arithmetic;
        `torch.contiguous_format` lays them out plainly again, `torch.preserve_format` leaves them."""
        model = super().to(*args, **kwargs) if args or kwargs else self
        if memory_format not in (None, torch.preserve_format):
            if memory_format not in (torch.channels_last_3d, torch.contiguous_format):
                raise ValueError(f"memory_format must be torch.channels_last_3d or torch.contiguous_format for a "
                                 f"video model, got {memory_format}")
            last = memory_format == torch.channels_last_3d
            for p in model.parameters():
                if p.ndim in (4, 5):
                    fmt = (torch.channels_last if p.ndim == 4 else torch.channels_last_3d) if last \
                        else torch.contiguous_format
                    p.data = p.data.contiguous(memory_format=fmt)
        return model

    def save_pretrained(self, *args, **kwargs) -> None:
        """diffusers' save_pretrained; a channels-last model is saved in the plain layout (safetensors stores densely
        packed tensors only) and keeps its layout."""
        layout = self.memory_format
        if layout != torch.contiguous_format:
            self.to(memory_format=torch.contiguous_format)
        try:
            super().save_pretrained(*args, **kwargs)
        finally:
            self.to(memory_format=layout)

    def enable_tiling(self, tile_size: int | None = None) -> None:
        """Cut frames larger than the tile size into blended spatial tiles (on by default, as released).

        `tile_size` (pixels) replaces `config.tile_spatial_size` (576 for the released weights): a multiple of
        the spatial factor of at least 4 latents. Smaller tiles use less memory; seams are blended.
        """
        if tile_size is not None:
            check_tiles(tile_size, self.config.tile_overlap_ratio, self.spatial_compression_ratio)
            self.register_to_config(tile_spatial_size=tile_size)
        self.use_tiling = True

    # ----------------------------------------------------------------------------------- attributes
    @property
    def spatial_compression_ratio(self) -> int:
        return 2 ** (len(self.config.ch_mult) - 1)

    @property
    def temporal_compression_ratio(self) -> int:
        return 2 ** sum(time_levels(len(self.config.ch_mult)))

    @property
    def latent_channels(self) -> int:
        return self.config.z_channels

    def latent_frames(self, num_frames: int) -> int:
        """Latent frames for a clip of `num_frames` frames (17 -> 5)."""
        return frames.latent_frames(num_frames, self.temporal_compression_ratio)

    def sample_frames(self, num_latents: int) -> int:
        """Frames decoded from `num_latents` latent frames (5 -> 17)."""
        return frames.sample_frames(num_latents, self.temporal_compression_ratio)

    # ----------------------------------------------------------------------------------- encode/decode
    def encode_clip(self, x: torch.Tensor) -> torch.Tensor:
        """Moments (B, 2z, 1+k, h, w) of a clip (B, C, 1+4k, 8h, 8w) in one forward: no temporal rounds, no
        spatial tiles, no padding. This is what training differentiates through; `encode` is for inference."""
        _check_video(x, self.config.in_channels, "video")
        t, s = self.temporal_compression_ratio, self.spatial_compression_ratio
        if (x.shape[2] - 1) % t or x.shape[-2] % s or x.shape[-1] % s:
            raise InputError(f"encode_clip takes 1 + {t}k frames of a size divisible by {s}, got shape "
                             f"{tuple(x.shape)} (encode pads any clip)")
        return self.encoder(x.contiguous(memory_format=self.memory_format))

    def decode_clip(self, z: torch.Tensor) -> torch.Tensor:
        """Video (B, C, 1+4(t-1), 8h, 8w) of latents (B, z, t, h, w) in one forward (see `encode_clip`)."""
        _check_video(z, self.config.z_channels, "latent")
        z = z.contiguous(memory_format=self.memory_format)
        if hasattr(self, "post_quant_conv"):
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_slicing and x.shape[0] > 1:
            return torch.cat([self._encode(xi) for xi in x.split(1)])
        return encode_moments(self, x)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.use_slicing and z.shape[0] > 1:
            return torch.cat([self._decode(zi) for zi in z.split(1)])
        return decode_latents(self, z)

    def _fit(self, x: torch.Tensor) -> torch.Tensor:
        """x in the weights' dtype, padded at the end to 1 + 4k frames and to sizes divisible by the spatial
        factor (replicating the last frame, row and column), with a warning that says so."""
        t, s = self.temporal_compression_ratio, self.spatial_compression_ratio
        T, H, W = x.shape[2:]
        notes = [note] if (note := frames.padding_notice(T, t)) else []
        if H % s or W % s:
            notes.append(f"a {H}x{W} frame is not divisible by {s}: padded to {H + -H % s}x{W + -W % s} by "
                         "repeating the last row and column")
            x = F.pad(x, (0, -W % s, 0, -H % s, 0, 0), mode="replicate")
        if notes:
            warnings.warn("; ".join(notes) + ": decode returns the padded clip (cvvae.codec trims it back)",
                          stacklevel=3)
            x = pad_frames(x, 0, frames.padded_frames(T, t) - T)
        weights = self.dtype
        return x.to(weights) if x.is_floating_point() and x.dtype != weights else x

    @apply_forward_hook
    def encode(self, x: torch.Tensor, return_dict: bool = True) -> AutoencoderKLOutput | tuple[DiagonalGaussian]:
        """Encode a video (B, C, T, H, W) or frames (B*T, C, H, W) in [-1, 1] to a posterior.

        Frames are grouped into clips of `config.num_video_frames` (1 if unset), as the official
        wrapper does; their latents come back as (B*t, z, h, w). A clip that is not 1 + 4k frames, or
        whose size is not divisible by 8, is padded at the end with a warning (never cut). Computes in the
        weights' dtype (inputs are cast to it) or under the caller's autocast, in the chunk mode's
        temporal rounds and spatial tiles (`chunking.py`).
        """
        image_mode = x.ndim == 4
        if image_mode:
            x = rearrange(x, "(b t) c h w -> b c t h w", t=self._frames_per_clip(x, self.config.num_video_frames))
        _check_video(x, self.config.in_channels, "video")
        moments = self._encode(self._fit(x))
        if image_mode or self.config.reshape_z_dim_to_4:
            moments = rearrange(moments, "b c t h w -> (b t) c h w")
        posterior = DiagonalGaussian(moments)
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    @apply_forward_hook
    def decode(
        self, z: torch.Tensor, num_frames: int | None = None, return_dict: bool = True, generator=None
    ) -> DecoderOutput | tuple[torch.Tensor]:
        """Decode latents (B, z, t, h, w) to a video (B, C, 1+4(t-1), 8h, 8w).

        4-D latents (B*t, z, h, w) are grouped into clips of `num_frames` latent frames (default:
        the latents of `config.num_video_frames` frames, else 1) and come back as 4-D frames.
        `generator` is accepted for diffusers pipelines and ignored (decoding is deterministic).
        """
        image_mode = z.ndim == 4
        if image_mode:
            n = num_frames
            if n is None and self.config.num_video_frames:
                n = self.latent_frames(self.config.num_video_frames)
            z = rearrange(z, "(b t) c h w -> b c t h w", t=self._frames_per_clip(z, n))
        _check_video(z, self.config.z_channels, "latent")
        x = self._decode(z.to(self.dtype) if z.is_floating_point() and z.dtype != self.dtype else z)
        if image_mode or self.config.reshape_x_dim_to_4:
            x = rearrange(x, "b c t h w -> (b t) c h w")
        return DecoderOutput(sample=x) if return_dict else (x,)

    def forward(
        self,
        sample: torch.Tensor,
        sample_posterior: bool = False,
        return_dict: bool = True,
        generator: torch.Generator | None = None,
    ) -> DecoderOutput | tuple[torch.Tensor]:
        """Encode, take the posterior mode (or a sample), decode."""
        posterior = self.encode(sample).latent_dist
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        return self.decode(z, return_dict=return_dict)

    @staticmethod
    def _frames_per_clip(x: torch.Tensor, n: int | None) -> int:
        n = n or 1
        if x.shape[0] % n:
            raise InputError(f"got {x.shape[0]} frames, which do not split into clips of {n} frames")
        return n

    # ----------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder: str | None = None,
                        torch_dtype: torch.dtype | None = None, **kwargs) -> "CVVAE":
        """Load from a folder (config.json + weights), a weights file or a hub id.

        Accepts our own layout and both official layouts (SD2.1 `CVVAEModel`, SD3 `CVVAESD3Model`),
        safetensors, diffusers .bin and Lightning .ckpt files (read with weights_only=True).
        Loading is strict: a checkpoint that does not fit raises `CheckpointError`.
        """
        from .checkpoints import load_pretrained

        torch_dtype = kwargs.pop("dtype", None) if torch_dtype is None else torch_dtype  # diffusers' newer alias
        return load_pretrained(cls, pretrained_model_name_or_path, subfolder=subfolder, torch_dtype=torch_dtype, **kwargs)


def _split_widths(block_out_channels: Sequence[int]) -> tuple[int, list[int]]:
    """diffusers' block_out_channels -> the official (ch, ch_mult)."""
    widths = [int(w) for w in block_out_channels]
    if not widths or widths[0] < 1 or any(w % widths[0] for w in widths):
        raise ConfigError(f"block_out_channels {widths} must be multiples of their first entry (ch * ch_mult)")
    return widths[0], [w // widths[0] for w in widths]


def _check_video(x: torch.Tensor, channels: int, what: str) -> None:
    if x.ndim != 5 or x.shape[1] != channels:
        raise InputError(f"expected a {what} tensor (B, {channels}, T, H, W), got shape {tuple(x.shape)}")


def _validate(cfg: dict, widths: list[int]) -> None:
    """Reject configs this implementation cannot build exactly, naming the field and the fix."""

    def fail(msg: str) -> None:
        raise ConfigError(msg)

    if not cfg["use_3d_conv"]:
        fail("use_3d_conv=False is not supported (no released CV-VAE uses it)")
    if not cfg["causal_encoder"] or cfg["causal_decoder"]:
        fail("only causal_encoder=True with causal_decoder=False is supported (the released design)")
    if cfg["attn_resolutions"]:
        fail("attn_resolutions must be empty: released CV-VAEs have attention in the mid blocks only")
    if cfg["encoder_attn_type"] not in ENCODER_ATTENTION:
        fail(f"encoder_attn_type {cfg['encoder_attn_type']!r} unknown; use one of {sorted(ENCODER_ATTENTION)}")
    if cfg["decoder_attn_type"] not in DECODER_ATTENTION:
        fail(f"decoder_attn_type {cfg['decoder_attn_type']!r} unknown; use one of {sorted(DECODER_ATTENTION)}")
    if cfg["padding_mode"] not in ("zeros", "replicate"):
        fail(f"padding_mode must be 'zeros' or 'replicate', got {cfg['padding_mode']!r}")
    if any(w % cfg["norm_num_groups"] for w in widths):
        fail(f"every width {widths} must be divisible by norm_num_groups={cfg['norm_num_groups']}")
    levels = len(widths)
    step = cfg["en_de_n_frames_a_time"]
    if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 1
                             or step % cfg["time_n_compress"]):
        fail(f"en_de_n_frames_a_time must be None or a positive multiple of time_n_compress="
             f"{cfg['time_n_compress']} (frames per temporal round), got {step!r}")
    if 2 ** (levels - 1) != cfg["spatial_n_compress"]:
        fail(f"{levels} levels compress space by {2 ** (levels - 1)}, but spatial_n_compress={cfg['spatial_n_compress']}")
    t = 2 ** sum(time_levels(levels))
    if t != cfg["time_n_compress"]:
        fail(f"{levels} levels compress time by {t}, but time_n_compress={cfg['time_n_compress']}")
    check_tiles(cfg["tile_spatial_size"], cfg["tile_overlap_ratio"], 2 ** (levels - 1))

