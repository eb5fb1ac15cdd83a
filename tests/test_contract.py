"""One contract for encode/decode whichever entry point is called (`CVVAE.encode/decode`, `cvvae.codec`): frame
counts are padded with a notice (never cut), the asked precision runs or is refused, and the options that used to
be accepted and ignored are refused."""

from __future__ import annotations

import warnings

import pytest
import torch

from cvvae import ConfigError, InputError, codec
from cvvae.model.mapping import psi
from cvvae.train.losses import CVVAELoss, LossConfig

from .conftest import rel_err, tiny_model, video


def padded_by_hand(x: torch.Tensor, frames: int, size: tuple[int, int] | None = None) -> torch.Tensor:
    """The rule written out: repeat the last frame (then the last row and column) up to the given sizes."""
    x = torch.cat([x, x[:, :, -1:].expand(-1, -1, frames - x.shape[2], -1, -1)], dim=2)
    if size is not None:
        h, w = size
        x = torch.cat([x, x[..., -1:, :].expand(-1, -1, -1, h - x.shape[3], -1)], dim=3)
        x = torch.cat([x, x[..., -1:].expand(-1, -1, -1, -1, w - x.shape[4])], dim=4)
    return x


@torch.no_grad()
@pytest.mark.parametrize("T", [2, 6, 8])
def test_model_encode_pads_frames_with_a_notice_never_cuts(T):
    model = tiny_model()
    x = video(1, 3, T, 16, 16)
    with pytest.warns(UserWarning, match=f"{T} frames is not 1 \\+ 4k: padded to {1 + 4 * -(-(T - 1) // 4)}"):
        mean = model.encode(x).latent_dist.mean
    padded = padded_by_hand(x, 1 + 4 * -(-(T - 1) // 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 1 + 4k frames: nothing to say
        expected = model.encode(padded).latent_dist.mean
    torch.testing.assert_close(mean, expected, rtol=0, atol=0)
    assert model.decode(mean).sample.shape[2] == padded.shape[2]  # the padded clip comes back, not a shorter one
    with pytest.warns(UserWarning, match="decoding trims back"):
        assert torch.equal(codec.encode(model, x).mean, mean)  # the codec: the same latents, and it trims on decode


@torch.no_grad()
def test_model_encode_pads_sizes_not_divisible_by_8():
    model = tiny_model()
    x = video(1, 3, 5, 20, 12)
    with pytest.warns(UserWarning, match="20x12 frame is not divisible by 8: padded to 24x16"):
        mean = model.encode(x).latent_dist.mean
    torch.testing.assert_close(mean, model.encode(padded_by_hand(x, 5, (24, 16))).latent_dist.mean, rtol=0, atol=0)
    out = codec.decode(model, codec.encode(model, x))
    assert out.shape == x.shape  # the codec crops back


def test_model_encode_casts_inputs_to_the_weights_dtype():
    model = tiny_model().to(torch.bfloat16)
    with torch.no_grad():
        z = model.encode(video(1, 3, 5, 16, 16)).latent_dist.mean
    assert z.dtype == torch.bfloat16


@torch.no_grad()
def test_codec_refuses_a_dtype_the_weights_cannot_run():
    model = tiny_model().to(torch.bfloat16)
    x = video(1, 3, 5, 16, 16)
    with pytest.raises(InputError, match="weights are bf16, so it computes in bf16, not fp32"):
        codec.encode(model, x, dtype="fp32")
    latents = codec.encode(model, x, dtype="auto")  # auto: the weights' dtype
    reference = tiny_model().to(torch.bfloat16)(x.to(torch.bfloat16)).sample
    torch.testing.assert_close(codec.decode(model, latents, dtype="bf16"), reference.float(), rtol=0, atol=0)
    with pytest.raises(InputError, match="not fp32"):
        codec.decode(model, latents, dtype="fp32")


@torch.no_grad()
def test_non_finite_output_of_reduced_weights_is_reported():
    model = tiny_model().to(torch.bfloat16)
    model.decoder.conv_out.bias.fill_(float("inf"))
    latents = codec.Latents(torch.zeros(1, 4, 2, 2, 2), None, 5, 16, 16)
    with pytest.warns(UserWarning, match="non-finite values in a torch.bfloat16 round; load the model in float32"):
        codec.decode(model, latents, dtype="auto")


@torch.no_grad()
def test_post_quant_conv_runs_in_the_asked_precision():
    model = tiny_model(use_post_quant_conv=True)
    seen = []
    model.post_quant_conv.register_forward_hook(lambda m, args, out: seen.append(out.dtype))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bf16 on a CPU without native support warns that it is slow
        codec.decode(model, torch.randn(1, 4, 2, 2, 2), dtype="bf16")
    assert seen == [torch.bfloat16]


def test_chunk_mode_and_round_length_are_checked():
    model = tiny_model()
    with pytest.raises(ConfigError, match="chunk_mode must be one of"):
        model.chunk_mode = "ful"
    model.chunk_mode = "full"
    assert model.chunk_mode == "full"
    with pytest.raises(ConfigError, match="en_de_n_frames_a_time must be None or a positive multiple of"):
        tiny_model(en_de_n_frames_a_time=6)


@torch.no_grad()
def test_decode_can_sample_without_touching_the_mean():
    model = tiny_model()
    latents = codec.encode(model, video(1, 3, 5, 16, 16), keep_logvar=True)
    mean = latents.mean.clone()
    a = codec.decode(model, latents, sample=True, generator=torch.Generator().manual_seed(3))
    b = codec.decode(model, latents.sample(torch.Generator().manual_seed(3)), num_frames=5, height=16, width=16)
    assert torch.equal(a, b) and torch.equal(latents.mean, mean)
    assert not torch.equal(a, codec.decode(model, latents))
    with pytest.raises(InputError, match="hold no logvar"):
        codec.decode(model, codec.encode(model, video(1, 3, 5, 16, 16)), sample=True)


def test_training_never_runs_through_the_inference_rounds_or_tiles():
    """A 9-frame, 64-px clip with 4-frame rounds and 32-px tiles: the loss reconstructs it in one forward."""
    model = tiny_model(en_de_n_frames_a_time=4, tile_spatial_size=32)
    loss = CVVAELoss(LossConfig(perceptual_weight=0, dec_reg_weight=0, disc_factor=0), t=4)
    x = video(1, 3, 9, 64, 64)
    _, _, xrec = loss.generator_loss(model, x, 0, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        z = model.encoder(x).chunk(2, dim=1)  # the whole clip, by hand
        z = z[0] + torch.exp(0.5 * z[1].clamp(-30, 20)) * torch.randn(z[0].shape, generator=torch.Generator()
                                                                      .manual_seed(0))
        whole = model.decoder(z)
        chunked = model.decode(z).sample  # what the inference engine gives: rounds and tiles
    assert rel_err(xrec.detach(), whole) < 1e-5
    assert rel_err(chunked, whole) > 1e-3  # the rounds and tiles do change the result here
    assert psi(x, "slice").shape[2] == 3
