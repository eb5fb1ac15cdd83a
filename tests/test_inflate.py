"""Inflation: on single images the CV-VAE must reproduce the 2D VAE it was inflated from."""

import re

import pytest
import torch
from diffusers import AutoencoderKL

from cvvae import CVVAE, CheckpointError
from cvvae.model.inflate import deflate_to_image_vae, inflate_from_image_vae

from .conftest import randomise_, rel_err, video


def image_vae(**overrides) -> AutoencoderKL:
    torch.manual_seed(0)
    cfg = dict(block_out_channels=[8, 16, 16, 16], down_block_types=["DownEncoderBlock2D"] * 4,
               up_block_types=["UpDecoderBlock2D"] * 4, norm_num_groups=4, layers_per_block=2)
    return randomise_(AutoencoderKL(**{**cfg, **overrides})).eval()


def to_ldm_layout(sd: dict, levels: int) -> dict:
    """An original-LDM (CompVis) format state dict, renamed here independently of cvvae."""
    out = {}
    for k, v in sd.items():
        k = k.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        k = re.sub(r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block.", k)
        k = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", k)
        k = re.sub(r"up_blocks\.(\d+)\.resnets\.", lambda m: f"up.{levels - 1 - int(m.group(1))}.block.", k)
        k = re.sub(r"up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"up.{levels - 1 - int(m.group(1))}.upsample.", k)
        k = k.replace("mid_block.resnets.0.", "mid.block_1.").replace("mid_block.resnets.1.", "mid.block_2.")
        for a, b in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
            k = k.replace(f"mid_block.attentions.0.{a}.", f"mid.attn_1.{b}.")
        if ".attn_1." in k and v.ndim == 2:
            v = v[:, :, None, None]
        out[f"first_stage_model.{k}"] = v
    return out


def assert_reproduces(vae: AutoencoderKL, model: CVVAE, tol: float = 1e-5) -> None:
    x = video(2, 3, 64, 48)
    with torch.no_grad():
        ref, ours = vae.encode(x).latent_dist, model.encode(x).latent_dist
        assert rel_err(ours.mean, ref.mean) < tol
        assert rel_err(ours.logvar, ref.logvar) < tol
        z = ref.sample(generator=torch.Generator().manual_seed(0))
        assert rel_err(model.decode(z).sample, vae.decode(z).sample) < tol


@pytest.mark.parametrize("overrides", [{}, {"use_post_quant_conv": False, "use_quant_conv": False},
                                       {"mid_block_add_attention": False}], ids=["sd", "no-quant", "no-attn"])
def test_inflated_model_reproduces_autoencoderkl_on_images(overrides):
    vae = image_vae(**overrides)
    model = inflate_from_image_vae(vae)
    assert model.config.norm_eps == 1e-6 and model.config.norm_num_groups == 4
    assert hasattr(model, "post_quant_conv") == vae.config.use_post_quant_conv
    assert_reproduces(vae, model)


def test_inflation_from_an_ldm_state_dict_and_a_file(tmp_path):
    vae = image_vae()
    ldm = to_ldm_layout(vae.state_dict(), levels=4)
    assert "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight" in ldm
    model = inflate_from_image_vae(ldm, norm_num_groups=4)
    assert_reproduces(vae, model)
    torch.save({"state_dict": ldm}, tmp_path / "sd-vae.ckpt")
    assert_reproduces(vae, inflate_from_image_vae(tmp_path / "sd-vae.ckpt", norm_num_groups=4))
    vae.save_pretrained(tmp_path / "vae2d")
    assert_reproduces(vae, inflate_from_image_vae(tmp_path / "vae2d"))


def test_inflated_model_saves_and_reloads(tmp_path):
    vae = image_vae()
    inflate_from_image_vae(vae).save_pretrained(tmp_path)
    assert_reproduces(vae, CVVAE.from_pretrained(tmp_path))


def test_inflated_video_shapes_and_temporal_attention_is_live():
    model = inflate_from_image_vae(image_vae())
    assert model.config.decoder_attn_type == "spatial-temporal-residual"
    with torch.no_grad():
        z = model.encode(video(1, 3, 9, 32, 32)).latent_dist.mean
        assert z.shape == (1, 4, 3, 4, 4)
        assert model.decode(z).sample.shape == (1, 3, 9, 32, 32)
    # the zero output projection must still receive gradients, or training could never use it
    out = model.decode(z).sample
    out.square().mean().backward()
    assert model.decoder.mid.attn_1.proj_out_t.weight.grad.abs().sum() > 0


def test_inflation_rejects_a_non_vae():
    with pytest.raises(CheckpointError, match="no encoder/decoder weights"):
        inflate_from_image_vae({"foo.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="not an SD-style image VAE"):
        inflate_from_image_vae({"encoder.foo.weight": torch.zeros(1)})


@pytest.mark.parametrize("attention", ["vanilla", "none"])
def test_deflation_is_exact_on_images_and_inverts_inflation(attention):
    """A CV-VAE with random taps everywhere, exported as the 2D VAE it is on single frames."""
    torch.manual_seed(0)
    model = randomise_(CVVAE(ch=8, ch_mult=[1, 2, 2, 2], num_res_blocks=1, norm_num_groups=4, norm_eps=1e-6,
                             encoder_attn_type=attention, decoder_attn_type=attention,
                             use_post_quant_conv=True)).eval()
    vae2d = deflate_to_image_vae(model)
    x = video(2, 3, 48, 40)
    with torch.no_grad():
        ours, ref = model.encode(x).latent_dist, vae2d.encode(x).latent_dist
        assert rel_err(ref.mean, ours.mean) < 1e-5 and rel_err(ref.logvar, ours.logvar) < 1e-5
        assert rel_err(vae2d.decode(ours.mean).sample, model.decode(ours.mean).sample) < 1e-5
    assert_reproduces(vae2d, inflate_from_image_vae(vae2d))  # and back again


def test_deflation_refuses_what_is_not_2d_on_images():
    with pytest.raises(CheckpointError, match="padding_mode.*norm_eps|norm_eps"):
        deflate_to_image_vae(CVVAE(ch=8, ch_mult=[1, 2, 2, 2], num_res_blocks=1, norm_num_groups=4))
    model = inflate_from_image_vae(image_vae())
    deflate_to_image_vae(model)  # zero temporal projection: fine
    with torch.no_grad():
        model.decoder.mid.attn_1.proj_out_t.bias.add_(0.1)  # a bias alone adds to every pixel
    with pytest.raises(CheckpointError, match="not spatial on single frames: its temporal output projection"):
        deflate_to_image_vae(model)
    with torch.no_grad():
        model.decoder.mid.attn_1.proj_out_t.bias.zero_()
        model.decoder.mid.attn_1.proj_out_t.weight.add_(0.1)
    with pytest.raises(CheckpointError, match="not spatial on single frames: its temporal output projection"):
        deflate_to_image_vae(model)
    # Asked to, it exports the decoder without the temporal branch: what the model is with proj_out_t zero
    dropped = deflate_to_image_vae(model, drop_temporal_attention=True)
    z = torch.randn(1, model.config.z_channels, 1, 6, 5)
    with torch.no_grad():
        trained = model.decode(z).sample
        model.decoder.mid.attn_1.proj_out_t.weight.zero_()
        assert rel_err(dropped.decode(z[:, :, 0]).sample, model.decode(z).sample[:, :, 0]) < 1e-5
        assert rel_err(trained, model.decode(z).sample) > 1e-3  # the trained branch did change the output
