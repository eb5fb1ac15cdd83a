"""Building blocks of CV-VAE. Every tensor is (B, C, T, H, W).

The blocks reproduce the official implementation (AILab-CVC/CV-VAE) operation for operation (but for the
upsamplers' conv, `Nearest2xConv3d`, which computes the same values with fewer operations), so released checkpoints
give the released numbers; module names are the LDM names the official SD2.1 checkpoint uses (`block`,
`nin_shortcut`, `downsample.conv`, `attn_1.q`, ...). Blocks are pure functions of their input: temporal chunking,
spatial tiling and precision policy live elsewhere.

Padding is explicit because it is what distinguishes the two released variants:
- time: "causal" (encoder: 2p copies of the first frame in front, nothing behind),
  "zeros" (SD2.1 decoder) or "replicate" (SD3 decoder and every temporal upsampler);
- space: "zeros" (SD2.1) or "replicate" (SD3); 2D per-frame convs always pad with zeros.
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

TimePadding = Literal["causal", "zeros", "replicate"]
SpacePadding = Literal["zeros", "replicate"]


def silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU, in place when autograd is off (inference): one activation-sized buffer less per call.
    Callers pass only tensors they own (fresh outputs of a norm)."""
    return F.silu(x, inplace=not torch.is_grad_enabled())


def dense(x: torch.Tensor) -> torch.Tensor:
    """x packed densely in its own layout: channels-last-3d stays channels-last-3d (a slice of it, or of a
    contiguous tensor, is strided; conv kernels slow down on strided inputs)."""
    fmt = torch.channels_last_3d if x.ndim == 5 and is_channels_last(x) else torch.contiguous_format
    return x.contiguous(memory_format=fmt)


def is_channels_last(x: torch.Tensor) -> bool:
    """Whether a 5-D tensor's channels are its innermost dimension (and it is not also plain contiguous)."""
    return x.ndim == 5 and x.stride(1) == 1 and x.shape[1] > 1


def pad_frames(x: torch.Tensor, front: int, back: int = 0) -> torch.Tensor:
    """Replicate the first frame `front` times and the last frame `back` times along T."""
    parts = [x[:, :, :1]] * front + [x] + [x[:, :, -1:]] * back
    return torch.cat(parts, dim=2) if len(parts) > 1 else x


def _norm_in_float32(norm: Callable, x: torch.Tensor, arg: Any, weight: torch.Tensor, bias: torch.Tensor,
                     eps: float) -> torch.Tensor:
    """``norm(x, arg, weight, bias, eps)`` (F.group_norm or F.layer_norm) computed in float32, in x's dtype."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return norm(x, arg, weight, bias, eps)
    if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16):
        # The CPU kernels take a bf16 input with float32 weights and accumulate in float32: the casts' values up to
        # the last bit of the bf16 rounding (2 elements in 10^7 differ by one unit; tests/test_model.py), without
        # two full-size copies (6x faster on a 1x256x9x64x64 input).
        return norm(x, arg, weight.float(), bias.float(), eps)
    return norm(x.float(), arg, weight.float(), bias.float(), eps).to(x.dtype)


class GroupNorm(nn.GroupNorm):
    """GroupNorm whose statistics are always computed in float32.

    On a 5-D input the statistics pool over T, H and W of the whole clip (or chunk), exactly as
    in the official model; reduced-precision statistics over ~10^7 elements drift visibly.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _norm_in_float32(F.group_norm, x, self.num_groups, self.weight, self.bias, self.eps)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 (see `GroupNorm`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _norm_in_float32(F.layer_norm, x, self.normalized_shape, self.weight, self.bias, self.eps)


class Conv3d(nn.Conv3d):
    """A k x k x k 3D conv with 'same' padding of a chosen kind in time and in space.

    Zero padding is left to the conv kernel itself (no padded copy of the input); replicate
    and causal padding are materialised before the conv.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        *,
        time_padding: TimePadding,
        space_padding: SpacePadding,
    ) -> None:
        p = kernel_size // 2
        native = (p if time_padding == "zeros" else 0, *(2 * [p if space_padding == "zeros" else 0]))
        super().__init__(in_channels, out_channels, kernel_size, padding=native)
        self.p, self.time_padding, self.space_padding = p, time_padding, space_padding

    single_frame_shortcut = True  # class-wide switch of the 1-frame path (benchmarks/bench_image_mode.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.one_frame(x):
            return F.conv3d(self.pad(x), self.one_frame_taps(self.weight), self.bias, padding=(0, *self.padding[1:]))
        return super().forward(self.pad(x))

    def one_frame(self, x: torch.Tensor) -> bool:
        """Whether x runs as a 2D conv: one frame, a k > 1 kernel, and the shortcut on. With one frame, causal and
        replicate padding show every time tap the same frame and zero padding shows only the centre tap anything:
        the 3D conv is a 2D conv with the taps summed (or the centre tap), the same result for a third of the work
        (images, 1-latent clips)."""
        return bool(self.p) and x.shape[2] == 1 and self.single_frame_shortcut

    def one_frame_taps(self, weight: torch.Tensor) -> torch.Tensor:
        """The time taps of `weight` (or a slice of it along its outputs) as one frame sees them (`one_frame`)."""
        return weight[:, :, self.p : self.p + 1] if self.time_padding == "zeros" else weight.sum(2, keepdim=True)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """x with the padding the kernel does not do itself: replicate in space, causal or replicate in time (none
        in time for `one_frame`)."""
        p = self.p
        if p and self.space_padding == "replicate":
            x = F.pad(x, (p, p, p, p, 0, 0), mode="replicate")
        if p and not self.one_frame(x) and self.time_padding == "causal":
            x = pad_frames(x, 2 * p)
        elif p and not self.one_frame(x) and self.time_padding == "replicate":
            x = pad_frames(x, p, p)
        return x


class FrameConv2d(nn.Conv2d):
    """A 2D conv applied to every frame independently; its weight stays 4-D, [out, in, k, k].

    Runs as a 3D conv with a (1, k, k) view of the weight, which is the same arithmetic as
    folding time into the batch but needs no transposed copy of the activations.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.padding[0]
        return F.conv3d(x, self.weight.unsqueeze(2), self.bias, padding=(0, p, p))


class ResnetBlock(nn.Module):
    """norm1 -> SiLU -> conv1 (3D) -> norm2 -> SiLU -> dropout -> conv2 (2D per frame if half_3d), + shortcut."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        time_padding: TimePadding,
        space_padding: SpacePadding,
        half_3d: bool,
        norm_groups: int,
        norm_eps: float,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        pad = dict(time_padding=time_padding, space_padding=space_padding)
        self.norm1 = GroupNorm(norm_groups, in_channels, eps=norm_eps)
        self.conv1 = Conv3d(in_channels, out_channels, 3, **pad)
        self.norm2 = GroupNorm(norm_groups, out_channels, eps=norm_eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = FrameConv2d(out_channels, out_channels) if half_3d else Conv3d(out_channels, out_channels, 3, **pad)
        if in_channels != out_channels:
            self.nin_shortcut = Conv3d(in_channels, out_channels, 1, **pad)  # 1x1x1: no padding at all

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(silu(self.norm1(x)))
        h = self.conv2(self.dropout(silu(self.norm2(h))))
        shortcut = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return shortcut + h if torch.is_grad_enabled() else h.add_(shortcut)


class Downsample(nn.Module):
    """Stride-2 conv in space, and in time when `time` is set (T -> (T-1)//2 + 1: 17 -> 9 -> 5).

    Time is always padded causally (2 copies of the first frame), so output frame i sees input
    frames 2i-2 .. 2i. Space is padded as LDM does, (0, 1) zeros on the right and bottom, or
    symmetric replicate for the SD3 variant.
    """

    def __init__(self, channels: int, *, time: bool, space_padding: SpacePadding) -> None:
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, 3, stride=(2 if time else 1, 2, 2))
        self.space_padding = space_padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.space_padding == "zeros":
            x = F.pad(x, (0, 1, 0, 1, 0, 0))
        else:
            x = F.pad(x, (1, 1, 1, 1, 0, 0), mode="replicate")
        return self.conv(pad_frames(x, 2))


_KERNEL_STEP_ELEMENTS = 2**19  # weight elements summed per step when making a transposed kernel (2 MiB in float32)


def _nearest_2x_taps(w: torch.Tensor, dim: int) -> torch.Tensor:
    """The 4 taps of a stride-2 transposed conv equal to nearest 2x then the 3 taps (w0, w1, w2) along `dim`.

    Output 2i of the conv sees inputs i-1, i, i through w0, w1, w2, and output 2i+1 sees i, i, i+1; as a transposed
    conv (output n gets input m through tap n - 2m + 1) that is (w2, w1+w2, w0+w1, w0). Plain additions, so the
    sums are exact whatever the matmul precision settings (an einsum would be a matmul, TF32 on some GPUs)."""
    w0, w1, w2 = w.unbind(dim)
    return torch.stack([w2, w1 + w2, w0 + w1, w0], dim)


class Nearest2xConv3d(Conv3d):
    """A k=3 `Conv3d` applied to its input upsampled 2x in space (nearest), without making the upsampled input.

    The conv on the upsampled input is, in exact arithmetic, a transposed conv of the input itself, stride 2 in
    space, whose 3x4x4 kernel sums the conv's taps (`_nearest_2x_taps`): 48 multiply-adds per input pixel and
    channel pair instead of 4 x 27 = 108, and no input 4x the size of x. The values are those of the conv up to
    floating-point rounding (tests/test_model.py); the weight and its state-dict key stay the conv's. The decoder's
    upsamplers are 30% of the SD2.1-size model's FLOPs: this makes them 1.6-2.0x faster (docs/benchmarks.md).

    The kernel is made from the weight at every call, 48/27 of its size (oneDNN then reorders it once more), so
    on small inputs it would hold more memory than the upsampled copy it saves, and take longer to make than the
    conv saves: there the conv runs on the upsampled input as before (`runs_transposed`).
    """

    def __init__(self, in_channels: int, out_channels: int, *, time_padding: TimePadding,
                 space_padding: SpacePadding) -> None:
        super().__init__(in_channels, out_channels, 3, time_padding=time_padding, space_padding=space_padding)

    def runs_transposed(self, x: torch.Tensor) -> bool:
        """Whether x goes through the transposed conv: when its kernel (in x out x 48 taps, 16 for one frame, in the
        weight's dtype) holds fewer bytes than the upsampled x it replaces (in x 4 x positions of x, in x's)."""
        taps = 16 if self.one_frame(x) else 48
        return self.out_channels * taps * self.weight.element_size() < 4 * x[:, 0].numel() * x.element_size()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.runs_transposed(x):
            return super().forward(F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest"))
        one_frame = self.one_frame(x)
        kernel = self._transposed_kernel(one_frame)
        # x padded as the conv pads (the nearest 2x of a padded x is the padded 2x); a transposed conv's padding p
        # crops p outputs at each end: k - 1 = 2 leaves the valid outputs of a padded frame axis, 1 those of a
        # zero-padded one (the kernel's own zeros), 3 those of a space axis replicate-padded by one input pixel
        time_crop = 0 if one_frame else 1 if self.time_padding == "zeros" else 2
        space_crop = 3 if self.space_padding == "replicate" else 1
        return F.conv_transpose3d(self.pad(x), kernel, self.bias, stride=(1, 2, 2),
                                  padding=(time_crop, space_crop, space_crop))

    def _transposed_kernel(self, one_frame: bool) -> torch.Tensor:
        """[in, out, 3 (1 for one frame), 4, 4] in the weight's dtype and layout, time flipped (a transposed conv's
        taps run backwards).

        Summed in float32 (float64 for float64 weights) and rounded once, so a bf16 kernel holds the bf16 weights'
        sums correctly rounded; a few output channels at a time, so that the float32 temporaries stay a few MiB
        (the widest upsampler's whole float32 kernel would be 100 MiB). For one frame the time taps are those of
        `Conv3d.one_frame_taps`."""
        w = self.weight
        dtype = torch.promote_types(w.dtype, torch.float32)
        fmt = torch.channels_last_3d if is_channels_last(w) else torch.contiguous_format
        frames = 1 if one_frame else 3
        kernel = torch.empty(w.shape[1], w.shape[0], frames, 4, 4, dtype=w.dtype, device=w.device, memory_format=fmt)
        step = max(1, _KERNEL_STEP_ELEMENTS // w[0].numel())
        for o in range(0, w.shape[0], step):
            part = w[o : o + step].to(dtype)
            if one_frame:
                part = self.one_frame_taps(part)
            part = _nearest_2x_taps(_nearest_2x_taps(part, 3), 4)
            kernel[:, o : o + step] = part.flip(2).transpose(0, 1)
        return kernel


class Upsample(nn.Module):
    """Nearest 2x in space, then a 3D conv; with `time`, the conv emits two frames per input frame.

    Time: the conv has 2C outputs; channel half n of frame t becomes frame 2t + n, and the first
    frame is dropped, so T -> 2T - 1 (5 -> 9 -> 17, 1 -> 1). Time padding is replicate.
    """

    def __init__(self, channels: int, *, time: bool, space_padding: SpacePadding) -> None:
        super().__init__()
        self.time = time
        out = channels * (2 if time else 1)
        self.conv = Nearest2xConv3d(channels, out, time_padding="replicate", space_padding=space_padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)  # = the conv of x upsampled 2x in space (nearest), without the upsampled x
        if not self.time:
            return y
        # Interleave into a new contiguous tensor: a rearranged copy sliced [:, :, 1:] would keep a
        # frame more alive and be non-contiguous, and the next GroupNorm would copy all of it again
        # (a 272 MiB copy in a 17x128x128 SD2.1-size decode; docs/benchmarks.md).
        B, C2, T, H, W = y.shape
        fmt = torch.channels_last_3d if is_channels_last(y) else torch.contiguous_format
        out = torch.empty(B, C2 // 2, 2 * T - 1, H, W, dtype=y.dtype, device=y.device, memory_format=fmt)
        out[:, :, 0::2] = y[:, C2 // 2 :]  # n = 1: frames 2t
        out[:, :, 1::2] = y[:, : C2 // 2, 1:]  # n = 0: frames 2t - 1 (t = 0 dropped)
        return out


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Single-head attention over (N, L, C) tokens, scale 1/sqrt(C), softmax in float32."""
    dtype = q.dtype
    out = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    return out.to(dtype)


class MidAttention(nn.Module):
    """Self-attention of the mid blocks.

    kind:
    - "spatial": per-frame attention over H*W tokens, x + s (encoder of both variants, SD3 decoder).
    - "spatial-temporal": the official SD2.1 decoder block: the temporal attention (over T, per
      pixel) reads the spatial branch s and there is one residual around both: x + t(s).
    - "spatial-temporal-residual": x + s, then + t(x + s). With proj_out_t zero this is exactly
      the spatial block, which is how an inflated 2D VAE keeps its image behaviour.
    Keys: norm, q, k, v, proj_out (1x1 convs), plus norm_t, q_t, k_t, v_t, proj_out_t (Linear).
    """

    def __init__(self, channels: int, *, kind: str, norm_groups: int, norm_eps: float) -> None:
        super().__init__()
        self.kind = kind
        self.norm = GroupNorm(norm_groups, channels, eps=norm_eps)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))
        if kind != "spatial":
            self.norm_t = LayerNorm(channels, eps=1e-5)
            self.q_t, self.k_t, self.v_t, self.proj_out_t = (nn.Linear(channels, channels) for _ in range(4))

    def spatial(self, x: torch.Tensor) -> torch.Tensor:
        """The spatial branch s, without residual."""
        B, C, T, H, W = x.shape
        h = self.norm(rearrange(x, "b c t h w -> (b t) c h w"))  # GroupNorm per frame here
        # the 1x1 convs run as modules (not as F.linear on their weights) so that hooks, e.g.
        # accelerate's sequential offload, see them
        q, k, v = (rearrange(proj(h), "n c h w -> n (h w) c") for proj in (self.q, self.k, self.v))
        h = rearrange(_attention(q, k, v), "n (h w) c -> n c h w", h=H)
        return rearrange(self.proj_out(h), "(b t) c h w -> b c t h w", b=B)

    def temporal(self, s: torch.Tensor) -> torch.Tensor:
        """The temporal branch t(s): full (non-causal) attention over T for every pixel."""
        B, C, T, H, W = s.shape
        h = self.norm_t(rearrange(s, "b c t h w -> (b h w) t c"))
        h = self.proj_out_t(_attention(self.q_t(h), self.k_t(h), self.v_t(h)))
        return rearrange(h, "(b h w) t c -> b c t h w", b=B, h=H)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.spatial(x)
        if self.kind == "spatial":
            return x + s
        if self.kind == "spatial-temporal":
            return x + self.temporal(s)
        h = x + s
        return h + self.temporal(h)
