"""diffusers' model conventions, covering the ground of its own test mixins (tests/models/testing_utils:
ModelTesterMixin, TrainingTesterMixin; tests/models/autoencoders/testing_utils: AutoencoderTesterMixin) in our
own tests: save/load with shards, variants and dtypes, config names, outputs, determinism, tiling, slicing.
Where diffusers' behaviour is the reference, its AutoencoderKL is run next to CVVAE."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKL

from cvvae import CVVAE, CheckpointError, ConfigError

from .conftest import tiny_model, video

INPUT = video(2, 3, 9, 32, 32, seed=1)


def forward(model, x=INPUT):
    with torch.no_grad():
        return model(x).sample


def image_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(8, 16), norm_num_groups=4, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)


@pytest.mark.parametrize("variant", [None, "fp16"])
def test_sharded_checkpoints_save_and_load(tmp_path, variant):
    model = tiny_model()
    model.save_pretrained(tmp_path, max_shard_size="40KB", variant=variant)
    v = f".{variant}" if variant else ""
    index = json.loads((tmp_path / f"diffusion_pytorch_model.safetensors.index{v}.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all(s.startswith(f"diffusion_pytorch_model{v}-") for s in shards)
    torch.testing.assert_close(forward(CVVAE.from_pretrained(tmp_path, variant=variant)), forward(model),
                               rtol=0, atol=0)
    (tmp_path / shards[-1]).unlink()
    with pytest.raises(CheckpointError, match="names shards that are missing"):
        CVVAE.from_pretrained(tmp_path, variant=variant)


def test_variants_are_picked_only_when_asked_as_diffusers_does(tmp_path):
    for cls, model in ((AutoencoderKL, image_vae()), (CVVAE, tiny_model())):
        folder = tmp_path / cls.__name__
        model.save_pretrained(folder, variant="fp16")
        assert (folder / "diffusion_pytorch_model.fp16.safetensors").is_file()
        with pytest.raises(OSError, match="Error no file named diffusion_pytorch_model.bin found in directory"):
            cls.from_pretrained(folder)
        with pytest.raises(OSError, match="diffusion_pytorch_model.bf16.bin"):
            cls.from_pretrained(folder, variant="bf16")
        cls.from_pretrained(folder, variant="fp16")
    with pytest.raises(OSError, match="it holds the variant\\(s\\) fp16: pass variant="):
        CVVAE.from_pretrained(tmp_path / "CVVAE")
    tiny_model(seed=3).save_pretrained(tmp_path / "CVVAE")  # both: the plain file without variant=
    torch.testing.assert_close(forward(CVVAE.from_pretrained(tmp_path / "CVVAE")), forward(tiny_model(seed=3)))


def test_use_safetensors(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    CVVAE.from_pretrained(tmp_path, use_safetensors=True)
    with pytest.raises(OSError, match="no file named diffusion_pytorch_model.bin"):
        CVVAE.from_pretrained(tmp_path, use_safetensors=False)
    tiny_model().save_pretrained(tmp_path / "bin", safe_serialization=False)
    CVVAE.from_pretrained(tmp_path / "bin", use_safetensors=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_weights_saved_in_a_dtype_load_back_and_run(tmp_path, dtype):
    model = tiny_model().to(dtype)
    model.save_pretrained(tmp_path)
    loaded = CVVAE.from_pretrained(tmp_path, torch_dtype=dtype)
    assert loaded.dtype == dtype
    if dtype == torch.bfloat16:  # fp16 does not run on a CPU
        torch.testing.assert_close(forward(loaded, INPUT.to(dtype)), forward(model, INPUT.to(dtype)), rtol=0, atol=0)


def test_loading_info_placement_and_refused_options(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    model, info = CVVAE.from_pretrained(tmp_path, output_loading_info=True)
    assert info == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
    placed = CVVAE.from_pretrained(tmp_path, device_map="cpu")  # diffusers' loader places the weights
    assert placed.hf_device_map == {"": torch.device("cpu")} or placed.hf_device_map == {"": "cpu"}
    torch.testing.assert_close(forward(placed), forward(model), rtol=0, atol=0)
    with pytest.raises(TypeError, match="quantization_config"):
        CVVAE.from_pretrained(tmp_path, quantization_config={"load_in_8bit": True})


def test_config_names_of_diffusers_take_precedence():
    """diffusers' norm-groups test builds the model with block_out_channels=(16, 32) on top of the official names."""
    model = CVVAE(ch=8, ch_mult=[1, 2, 2, 2], num_res_blocks=1, norm_num_groups=16, block_out_channels=(16, 32))
    cfg = model.config
    assert (cfg.ch, list(cfg.ch_mult), list(cfg.block_out_channels)) == (16, [1, 2], [16, 32])
    assert (cfg.spatial_n_compress, cfg.time_n_compress) == (2, 2)  # derived from the two levels
    assert forward(model, INPUT).shape == INPUT.shape
    assert list(CVVAE(ch=8, ch_mult=[1, 2], norm_num_groups=4).config.block_out_channels) == [8, 16]
    with pytest.raises(ConfigError, match="spatial_n_compress"):
        CVVAE(block_out_channels=(16, 32), norm_num_groups=16, spatial_n_compress=8)


def test_outputs_dict_and_tuple_and_determinism():
    model = tiny_model()
    with torch.no_grad():
        a, (b,) = model(INPUT).sample, model(INPUT, return_dict=False)
        (posterior,) = model.encode(INPUT, return_dict=False)
        (decoded,) = model.decode(posterior.mode(), return_dict=False)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(decoded, a, rtol=0, atol=0)
    assert a.shape == INPUT.shape and posterior.mean.shape == (2, 4, 3, 4, 4)


def test_tiling_really_tiles_and_slicing_really_slices():
    """diffusers' own checks pass even when no tile runs (a 16-px input under a 256-px tile); count the calls."""
    model = tiny_model(tile_spatial_size=32, tile_overlap_ratio=0.25)
    calls = []
    model.encoder.register_forward_hook(lambda m, args, out: calls.append(tuple(args[0].shape)))
    x = video(2, 3, 5, 48, 64, seed=2)
    tiled = forward(model, x)
    assert len(calls) == 6 and {c[-2:] for c in calls} == {(32, 32), (32, 16), (24, 32), (24, 16)}
    model.disable_tiling()
    calls.clear()
    untiled = forward(model, x)
    assert calls == [(2, 3, 5, 48, 64)] and (tiled - untiled).abs().mean() < 0.5
    model.enable_slicing()
    calls.clear()
    torch.testing.assert_close(forward(model, x), untiled, rtol=1e-5, atol=1e-5)
    assert calls == [(1, 3, 5, 48, 64)] * 2


def test_training_with_ema_and_gradient_checkpointing_equivalence():
    from diffusers.training_utils import EMAModel

    results = []
    for checkpointing in (False, True):
        model = tiny_model().train()
        if checkpointing:
            model.enable_gradient_checkpointing()
        assert model.is_gradient_checkpointing == checkpointing
        assert all(m.gradient_checkpointing == checkpointing for m in (model.encoder, model.decoder))
        ema = EMAModel(model.parameters())
        out = model(INPUT).sample
        loss = torch.nn.functional.mse_loss(out, INPUT)
        loss.backward()
        ema.step(model.parameters())
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-4, atol=1e-6, msg=name)
