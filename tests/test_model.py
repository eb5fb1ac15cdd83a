"""Shapes, frame arithmetic, causality, the diffusers-style API and its contracts."""

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from cvvae import CVVAE, ConfigError, InputError
from cvvae.model import frames
from cvvae.model.autoencoder import DiagonalGaussian
from cvvae.model.layers import GroupNorm

from .conftest import TINY, TINY_SD3, rel_err, tiny_model, video


@pytest.mark.parametrize("T, t", [(1, 1), (5, 2), (9, 3), (17, 5), (16, 5)])
def test_frame_arithmetic(T, t):
    assert frames.latent_frames(T, 4) == t
    if (T - 1) % 4 == 0:
        assert frames.sample_frames(t, 4) == T
    assert frames.padded_frames(T, 4) == {1: 1, 5: 5, 9: 9, 17: 17, 16: 17}[T]


@pytest.mark.parametrize("cfg", [TINY, TINY_SD3], ids=["sd21", "sd3"])
@pytest.mark.parametrize("T", [1, 5, 9, 17])
@torch.no_grad()
def test_shapes_1_plus_4k(cfg, T):
    model = tiny_model(**cfg)
    z = model.encode(video(2, 3, T, 32, 24)).latent_dist.mode()
    k = (T - 1) // 4
    assert z.shape == (2, cfg.get("z_channels", 4), 1 + k, 4, 3)
    assert model.decode(z).sample.shape == (2, 3, T, 32, 24)


def test_compression_attributes():
    model = CVVAE(**TINY)
    assert (model.spatial_compression_ratio, model.temporal_compression_ratio) == (8, 4)
    assert list(model.config.block_out_channels) == [8, 16, 16, 16]
    assert 2 ** (len(model.config.block_out_channels) - 1) == 8  # what StableDiffusionPipeline computes
    assert model.latent_frames(97) == 25 and model.sample_frames(25) == 97


def _per_frame_norms(model):
    """Diagnostic patch: GroupNorm per frame instead of over the clip, to expose the conv path."""

    def forward(self, x):
        if x.ndim != 5:
            return torch.nn.functional.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        y = torch.nn.functional.group_norm(rearrange(x, "b c t h w -> (b t) c h w"), self.num_groups,
                                           self.weight, self.bias, self.eps)
        return rearrange(y, "(b t) c h w -> b c t h w", b=x.shape[0])

    for m in model.modules():
        if isinstance(m, GroupNorm):
            m.forward = forward.__get__(m)


@torch.no_grad()
def test_encoder_conv_path_is_causal():
    """Frame f reaches exactly the latents >= ceil(f/4); with clip-wide GroupNorm (as released)
    every frame reaches every latent, which is why this needs the per-frame diagnostic patch."""
    model = tiny_model()
    x = video(1, 3, 17, 16, 16)
    base = model.encoder(x)
    y = x.clone()
    y[:, :, 6] += 0.5
    assert (model.encoder(y)[:, :, :2] - base[:, :, :2]).abs().max() > 0  # GN pools over the clip
    _per_frame_norms(model)
    base = model.encoder(x)
    for f in (1, 4, 5, 6, 16):
        y = x.clone()
        y[:, :, f] += 0.5
        delta = (model.encoder(y) - base).abs().amax(dim=(0, 1, 3, 4))
        first = -(-f // 4)
        assert torch.all(delta[:first] == 0), (f, delta)
        assert torch.all(delta[first:] > 0), (f, delta)


@torch.no_grad()
def test_image_mode_4d():
    model = tiny_model()
    frames_4d = video(6, 3, 16, 16)
    z = model.encode(frames_4d).latent_dist.mean
    assert z.shape == (6, 4, 2, 2)
    per_frame = torch.cat([model.encode(f[None, :, None]).latent_dist.mean[:, :, 0] for f in frames_4d])
    torch.testing.assert_close(z, per_frame)
    assert model.decode(z).sample.shape == (6, 3, 16, 16)
    # grouped into clips of 5 frames -> 2 latents each
    model.register_to_config(num_video_frames=5)
    z = model.encode(video(10, 3, 16, 16)).latent_dist.mean
    assert z.shape == (4, 4, 2, 2)
    assert model.decode(z).sample.shape == (10, 3, 16, 16)
    with pytest.raises(InputError, match="clips of 5"):
        model.encode(video(7, 3, 16, 16))


def test_wrong_input_shape_is_a_clear_error():
    model = tiny_model()
    with pytest.raises(InputError, match=r"\(B, 3, T, H, W\)"):
        model.encode(video(1, 4, 5, 16, 16))
    with pytest.raises(InputError, match=r"\(B, 4, T, H, W\)"):
        model.decode(video(1, 16, 2, 2, 2))


def test_kl_and_nll_sum_over_all_latent_axes():
    moments = video(2, 8, 3, 4, 5)
    post = DiagonalGaussian(moments)
    mean, logvar = moments[:, :4], moments[:, 4:]
    hand = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).flatten(1).sum(1)
    torch.testing.assert_close(post.kl(), hand)
    other = DiagonalGaussian(video(2, 8, 3, 4, 5, seed=1))
    assert post.kl(other).shape == (2,)
    assert post.nll(mean).shape == (2,)


@torch.no_grad()
def test_determinism_slicing_and_forward():
    model = tiny_model()
    x = video(3, 3, 5, 16, 16)
    a = model(x).sample
    torch.testing.assert_close(model(x).sample, a, rtol=0, atol=0)
    model.enable_slicing()
    torch.testing.assert_close(model(x).sample, a, rtol=1e-5, atol=1e-5)
    model.disable_slicing()
    g = torch.Generator().manual_seed(1)
    s1 = model(x, sample_posterior=True, generator=g).sample
    s2 = model(x, sample_posterior=True, generator=torch.Generator().manual_seed(1)).sample
    torch.testing.assert_close(s1, s2)
    assert (s1 - a).abs().max() > 0


@torch.no_grad()
def test_tiling_toggles_and_tiles_only_where_needed():
    model = tiny_model(tile_spatial_size=32, tile_overlap_ratio=0.25)
    x = video(1, 3, 5, 48, 64)
    tiled = model(x).sample
    model.disable_tiling()
    untiled = model(x).sample
    model.enable_tiling()
    # random weights amplify per-tile GroupNorm statistics, so only "tiles really ran" is checked here;
    # the tiled values themselves are checked against the official implementation in test_golden.py
    assert (tiled - untiled).abs().max() > 1e-3
    torch.testing.assert_close(model(x).sample, tiled, rtol=0, atol=0)
    small = x[..., :32, :32]  # one tile: tiling must not change anything
    torch.testing.assert_close(model(small).sample, model.disable_tiling() or model(small).sample, rtol=0, atol=0)


def test_training_step_and_gradient_checkpointing():
    x = video(1, 3, 5, 16, 16)
    grads = []
    for checkpointing in (False, True):
        model = tiny_model().train()
        if checkpointing:
            model.enable_gradient_checkpointing()
        posterior = model.encode(x).latent_dist
        out = model.decode(posterior.mode()).sample
        loss = (out - x).abs().mean() + 1e-6 * posterior.kl().mean()
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        assert all(p.grad is not None for p in model.encoder.parameters())
    assert rel_err(grads[1], grads[0]) < 1e-5


@torch.no_grad()
def test_bfloat16_runs_on_cpu_and_tracks_fp32():
    model = tiny_model()
    x = video(1, 3, 5, 16, 16)
    ref = model(x).sample
    out = model.to(torch.bfloat16)(x.bfloat16()).sample
    assert out.dtype == torch.bfloat16
    assert rel_err(out.float(), ref) < 0.05


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(ch_mult=[1, 2], spatial_n_compress=8), "spatial_n_compress"),
        (dict(norm_num_groups=3), "divisible"),
        (dict(decoder_attn_type="flash"), "decoder_attn_type"),
        (dict(use_3d_conv=False), "use_3d_conv"),
        (dict(block_out_channels=[8, 12]), "block_out_channels"),
        (dict(padding_mode="reflect"), "padding_mode"),
        (dict(tile_spatial_size=3), "tile_spatial_size=3"),  # a 0-latent tile: tiling would never advance
        (dict(tile_spatial_size=68), "multiple of 8"),
        (dict(tile_overlap_ratio=1.0), "overlap ratio"),
    ],
)
def test_bad_configs_are_rejected(bad, match):
    with pytest.raises(ConfigError, match=match):
        CVVAE(**{**TINY, **bad})


def test_bad_tiles_set_after_loading_are_rejected_before_running():
    from cvvae import codec

    model = tiny_model()
    model.register_to_config(tile_spatial_size=4)  # bypasses __init__'s check
    with pytest.raises(ConfigError, match="tile_spatial_size=4"):
        codec.encode(model, video(1, 3, 1, 64, 64))


@pytest.mark.parametrize("time_padding", ["causal", "replicate", "zeros"])
@pytest.mark.parametrize("space_padding", ["zeros", "replicate"])
def test_single_frame_conv_equals_the_padded_3d_conv(time_padding, space_padding):
    from cvvae.model.layers import Conv3d, pad_frames  # noqa: PLC0415

    torch.manual_seed(0)
    conv = Conv3d(3, 5, 3, time_padding=time_padding, space_padding=space_padding)
    x = torch.randn(2, 3, 1, 7, 6, requires_grad=True)
    y = conv(x)
    # Reference: pad time by hand as the multi-frame path does, then a plain 3D conv.
    ref_in = F.pad(x, (1, 1, 1, 1, 0, 0), mode="replicate") if space_padding == "replicate" else x
    if time_padding == "causal":
        ref_in = pad_frames(ref_in, 2)
    elif time_padding == "replicate":
        ref_in = pad_frames(ref_in, 1, 1)
    ref = F.conv3d(ref_in, conv.weight, conv.bias,
                   padding=(1 if time_padding == "zeros" else 0, *([1, 1] if space_padding == "zeros" else [0, 0])))
    assert y.shape == ref.shape == (2, 5, 1, 7, 6)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    (g,) = torch.autograd.grad(y.square().sum(), conv.weight)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), conv.weight)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)


def _conv_of_nearest_2x(x, weight, bias, time_padding, space_padding):
    """The official upsampler's arithmetic with torch's own ops: nearest 2x in space, pad, a valid 3D conv."""
    up = F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest")
    if space_padding == "replicate":
        up = F.pad(up, (1, 1, 1, 1, 0, 0), mode="replicate")
    time_pad = {"zeros": 1, "replicate": 0, "causal": 0}[time_padding]
    if time_padding != "zeros":  # 5-D replicate pads the last three dims: pad T only
        up = F.pad(up, (0, 0, 0, 0, 1, 1) if time_padding == "replicate" else (0, 0, 0, 0, 2, 0), mode="replicate")
    return F.conv3d(up, weight, bias, padding=(time_pad, *([1, 1] if space_padding == "zeros" else [0, 0])))


@pytest.mark.parametrize("frames", [1, 4])
@pytest.mark.parametrize("time_padding", ["causal", "replicate", "zeros"])
@pytest.mark.parametrize("space_padding", ["zeros", "replicate"])
@pytest.mark.parametrize("out_channels", [5, 64])
def test_nearest_2x_conv_is_the_conv_of_the_upsampled_input(out_channels, frames, time_padding, space_padding,
                                                            monkeypatch):
    """The transposed-conv form (5 output channels: its kernel is smaller than the upsampled input) and the
    upsample-then-conv one (64) against torch's ops: float64 values to rounding, gradients of input and weight,
    and bf16 within bf16's rounding; the kernel made two output channels at a time."""
    from cvvae.model import layers
    from cvvae.model.layers import Nearest2xConv3d

    monkeypatch.setattr(layers, "_KERNEL_STEP_ELEMENTS", 2 * 3 * 27)  # 5 output channels: steps of 2, 2, 1
    torch.manual_seed(0)
    conv = Nearest2xConv3d(3, out_channels, time_padding=time_padding, space_padding=space_padding).double()
    x = torch.randn(2, 3, frames, 5, 6, dtype=torch.float64, requires_grad=True)
    # kernel 5 x 48 (16 for one frame) against 4 x 2 x frames x 30 positions: transposed; 64 output channels: not
    assert conv.runs_transposed(x) == (out_channels == 5)
    y = conv(x)
    ref = _conv_of_nearest_2x(x, conv.weight, conv.bias, time_padding, space_padding)
    assert y.shape == ref.shape == (2, out_channels, frames, 10, 12)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(y.square().sum(), (x, conv.weight))
    ref_grads = torch.autograd.grad(ref.square().sum(), (x, conv.weight))
    for g, g_ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)
    conv16, x16 = conv.bfloat16().to(memory_format=torch.channels_last_3d), x.detach().bfloat16()
    with torch.no_grad():
        fast = conv16(x16.contiguous(memory_format=torch.channels_last_3d)).double()
        exact = _conv_of_nearest_2x(x16.double(), conv16.weight.double(), conv16.bias.double(), time_padding,
                                    space_padding)
    assert rel_err(fast, exact) < 2**-7  # bf16 (8 significant bits) output of exact sums of bf16 inputs


@pytest.mark.parametrize("time", [True, False])
def test_upsample_interleaves_frames_into_a_contiguous_tensor(time):
    from cvvae.model.layers import Upsample

    torch.manual_seed(0)
    up = Upsample(4, time=time, space_padding="zeros").eval()
    x = torch.randn(1, 4, 3, 5, 6)
    with torch.no_grad():
        y = up(x)
        ref = _conv_of_nearest_2x(x, up.conv.weight, up.conv.bias, "replicate", "zeros")
    if time:  # the documented rule: channel half n of frame t is frame 2t + n, frame 0 dropped
        ref = rearrange(ref, "b (n c) t h w -> b c (t n) h w", n=2)[:, :, 1:]
    assert y.shape == (1, 4, 5 if time else 3, 10, 12) and y.is_contiguous()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)


def test_bf16_norms_read_bf16_directly_and_match_the_float32_casts():
    """The CPU path that skips the full-size casts: the casts' values, up to the last bit of the bf16 rounding."""
    from cvvae.model.layers import GroupNorm, LayerNorm

    torch.manual_seed(0)
    for norm, x in ((GroupNorm(8, 64), torch.randn(2, 64, 5, 16, 16) * 3 + 1), (LayerNorm(64), torch.randn(40, 7, 64))):
        with torch.no_grad():
            norm.weight.normal_(1, 0.1)
            norm.bias.normal_(0, 0.1)
            xb = x.bfloat16()
            fast = norm(xb)
            cast = torch.nn.functional.group_norm(xb.float(), 8, norm.weight, norm.bias, norm.eps).bfloat16() \
                if isinstance(norm, GroupNorm) else \
                torch.nn.functional.layer_norm(xb.float(), (64,), norm.weight, norm.bias, norm.eps).bfloat16()
        assert fast.dtype == torch.bfloat16
        ulp = cast.float().abs().clamp_min(1e-3) * 2**-7
        assert ((fast.float() - cast.float()).abs() <= ulp).all()
    double = GroupNorm(8, 64).double()  # float64 keeps computing as before
    assert double(torch.randn(1, 64, 2, 4, 4, dtype=torch.float64)).dtype == torch.float64
