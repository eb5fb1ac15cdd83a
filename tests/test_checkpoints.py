"""Loading every released layout and file format, strictly and safely."""

import json
import re

import pytest
import torch
from safetensors.torch import save_file

from cvvae import CVVAE, CheckpointError

from .conftest import TINY, TINY_SD3, rel_err, tiny_model, video


def _outputs(model):
    with torch.no_grad():
        x = video(1, 3, 5, 16, 16)
        return model.encode(x).latent_dist.mean, model.decode(video(1, model.config.z_channels, 2, 2, 2)).sample


def _assert_same(a, b):
    for u, v in zip(_outputs(a), _outputs(b)):
        torch.testing.assert_close(u, v, rtol=0, atol=0)


def to_sd3_layout(sd: dict, levels: int) -> dict:
    """The official SD3 (diffusers) key layout, written here independently of cvvae's converter."""
    out = {}
    for k, v in sd.items():
        k2 = k.replace("norm_out", "conv_norm_out").replace("nin_shortcut", "conv_shortcut")
        k2 = re.sub(r"encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets.", k2)
        k2 = re.sub(r"encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0.", k2)
        k2 = re.sub(r"decoder\.up\.(\d+)\.", lambda m: f"decoder.up_blocks.{levels - 1 - int(m.group(1))}.", k2)
        k2 = k2.replace(".block.", ".resnets.").replace(".upsample.", ".upsamplers.0.")
        k2 = k2.replace("mid.block_1.", "mid_block.resnets.0.").replace("mid.block_2.", "mid_block.resnets.1.")
        for a, b in (("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
            k2 = k2.replace(f"mid.attn_1.{a}.", f"mid_block.attentions.0.{b}.")
        if "attentions.0.to_" in k2 and v.ndim == 4:
            v = v.flatten(1)  # Linear weight
        if "conv_shortcut" in k2:
            v = v[:, :, 0] if v.ndim == 5 else v  # 2-D 1x1 conv: [out, in, 1, 1]
        out[k2] = v
    return out


def test_save_load_round_trip(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "vae")
    assert {p.name for p in (tmp_path / "vae").iterdir()} == {"config.json", "diffusion_pytorch_model.safetensors"}
    _assert_same(model, CVVAE.from_pretrained(tmp_path, subfolder="vae"))
    # diffusers' from_config path builds the same architecture
    rebuilt = CVVAE.from_config(CVVAE.load_config(tmp_path / "vae"))
    assert _plain(rebuilt.config) == _plain(model.config)


def _plain(cfg) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items() if not k.startswith("_")}


def test_keyword_arguments_override_the_config(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    loaded = CVVAE.from_pretrained(tmp_path, tile_spatial_size=64, scaling_factor=0.5)
    assert (loaded.config.tile_spatial_size, loaded.config.scaling_factor) == (64, 0.5)
    assert CVVAE.from_pretrained(tmp_path).config.tile_spatial_size == tiny_model().config.tile_spatial_size
    with pytest.raises(TypeError, match="tile_size"):  # a typo is an error, not silently ignored
        CVVAE.from_pretrained(tmp_path, tile_size=64)
    CVVAE.from_pretrained(tmp_path, low_cpu_mem_usage=True, revision="main")  # diffusers/hub options are accepted


def test_torch_dtype_and_fp16_stored_weights(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    loaded = CVVAE.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    save_file({k: v.half() for k, v in model.state_dict().items()}, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    loaded = CVVAE.from_pretrained(tmp_path)
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    w = model.state_dict()["encoder.conv_in.weight"]
    torch.testing.assert_close(loaded.state_dict()["encoder.conv_in.weight"], w.half().float(), rtol=0, atol=0)


def test_official_sd3_layout_and_config(tmp_path):
    model = tiny_model(**TINY_SD3)
    sd = to_sd3_layout(model.state_dict(), levels=4)
    assert "encoder.down_blocks.1.resnets.0.conv_shortcut.weight" in sd
    (tmp_path / "vae3d_sd3").mkdir()
    save_file(sd, str(tmp_path / "vae3d_sd3" / "diffusion_pytorch_model.safetensors"))
    official_cfg = {
        "_class_name": "CVVAESD3Model", "_diffusers_version": "0.29.2", "act_fn": "silu",
        "block_out_channels": [8, 16, 16, 16], "causal_decoder": False, "causal_encoder": True,
        "double_z": True, "down_block_types": ["DownEncoderBlock3D"] * 4, "en_de_n_frames_a_time": 16,
        "half_3d": True, "in_channels": 3, "layers_per_block": 1, "mid_block_add_attention": True,
        "norm_num_groups": 4, "num_video_frames": None, "out_channels": 16, "reshape_x_dim_to_4": False,
        "reshape_z_dim_to_4": False, "spatial_n_compress": 8, "tile_overlap_ratio": 0.2222,
        "tile_spatial_size": 576, "time_n_compress": 4, "up_block_types": ["UpDecoderBlock3D"] * 4,
    }
    (tmp_path / "vae3d_sd3" / "config.json").write_text(json.dumps(official_cfg))
    loaded = CVVAE.from_pretrained(tmp_path, subfolder="vae3d_sd3")
    _assert_same(model, loaded)
    assert loaded.config.shift_factor == 0.0609


def test_official_sd21_layout_folder(tmp_path):
    """Our key names are the official SD2.1 ones: the released config.json loads as it is."""
    model = tiny_model()
    official_cfg = {k: v for k, v in model.config.items()
                    if k not in ("norm_num_groups", "norm_eps", "padding_mode", "use_post_quant_conv",
                                 "shift_factor", "block_out_channels")}
    official_cfg.update(_class_name="CVVAEModel", norm_num_groups=4)
    (tmp_path / "config.json").write_text(json.dumps(official_cfg))
    save_file(model.state_dict(), str(tmp_path / "diffusion_pytorch_model.safetensors"))
    _assert_same(model, CVVAE.from_pretrained(tmp_path))


def test_bare_safetensors_of_both_official_fixtures(fixtures_dir):
    """Without config.json the variant follows from the key layout and the shapes."""
    for name in ("sd21", "sd3"):
        folder = CVVAE.from_pretrained(fixtures_dir / name)
        bare = CVVAE.from_pretrained(fixtures_dir / name / "diffusion_pytorch_model.safetensors")
        assert _plain(bare.config) == _plain(folder.config)
        _assert_same(folder, bare)


def test_lightning_ckpt(tmp_path):
    model = tiny_model()
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    state.update({"loss.logvar": torch.zeros(()), "constraint_decoder.conv_in.weight": torch.zeros(4, 4, 3, 3),
                  "loss.discriminator.main.0.weight": torch.zeros(2, 3, 3, 3, 3)})
    torch.save({"state_dict": state, "global_step": 10, "epoch": 1}, tmp_path / "last.ckpt")
    loaded = CVVAE.from_pretrained(tmp_path / "last.ckpt", config=dict(TINY))
    _assert_same(model, loaded)


class Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickled_code_is_refused(tmp_path):
    torch.save({"state_dict": {"encoder.x": torch.zeros(1)}, "payload": Evil()}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="weights_only"):
        CVVAE.from_pretrained(tmp_path / "evil.ckpt")


def test_mismatched_checkpoint_lists_keys(tmp_path):
    model = tiny_model()
    sd = model.state_dict()
    del sd["decoder.conv_out.bias"]
    sd["decoder.extra.weight"] = torch.zeros(1)
    sd["encoder.conv_in.weight"] = torch.zeros(8, 3, 3, 3, 1)
    model.save_pretrained(tmp_path)
    save_file(sd, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        CVVAE.from_pretrained(tmp_path)
    msg = str(err.value)
    assert "missing: decoder.conv_out.bias" in msg
    assert "unexpected: decoder.extra.weight" in msg
    assert "wrong shape: encoder.conv_in.weight" in msg


def test_wrong_variant_is_refused(tmp_path):
    """SD3 weights under an SD2.1 config: channel counts differ, nothing loads partially."""
    tiny_model(**TINY_SD3).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["z_channels"] = 4
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="wrong shape"):
        CVVAE.from_pretrained(tmp_path)


@pytest.mark.parametrize("content, match", [(None, "not found"), (b"garbage", "not a readable safetensors")])
def test_missing_or_corrupt_file(tmp_path, content, match):
    path = tmp_path / "w.safetensors"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        CVVAE.from_pretrained(path)


def test_unknown_config_field(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["frobnicate"] = 1
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(Exception, match="frobnicate"):
        CVVAE.from_pretrained(tmp_path)


def test_fixture_layout_matches_official_key_list(fixtures_dir):
    """Every key of the released SD2.1 layout exists in our model with the released shape."""
    ref = fixtures_dir.parent / "reference" / "official-state-dict-keys.txt"
    if not ref.is_file():
        pytest.skip("official key list not present")
    model = CVVAE()  # the released default config, random weights
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    lines = ref.read_text().split("\n# Official CV-VAE SD3")[0].splitlines()
    released = {}
    for line in lines:
        if line and not line.startswith("#"):
            key, shape, _ = line.split("\t")
            released[key] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    assert len(released) == 254
    assert own == released
    assert rel_err(torch.tensor(float(sum(p.numel() for p in model.parameters()))), torch.tensor(182446475.0)) == 0
