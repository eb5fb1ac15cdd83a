"""CV-VAE inside diffusers pipelines, offline, with tiny components built in code.

Image pipelines (SD, SD img2img, SD3) take the CV-VAE unchanged; video pipelines (SVD, AnimateDiff,
text-to-video SD) decode in video mode (n latents -> 1 + 4(n-1) frames) or image mode (n -> n).
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    AnimateDiffPipeline,
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    MotionAdapter,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    StableVideoDiffusionPipeline,
    UNet2DConditionModel,
    UNet3DConditionModel,
    UNetSpatioTemporalConditionModel,
)
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from cvvae import CVVAE, InputError, codec
from cvvae.io.video import VideoWriter, probe
from cvvae.model.inflate import inflate_from_image_vae
from cvvae.pipelines import (
    AnimateDiffCVVAEPipeline,
    StableVideoDiffusionCVVAEPipeline,
    TextToVideoSDCVVAEPipeline,
    decode_video_latents,
)

from .conftest import TINY_SD3, randomise_, tiny_model

SIZE = 64  # pixels: 8x8 latents
STEPS = 2


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: these ops are tiny, and on a busy 2-core machine two OpenMP threads wait
    on each other (a 32x32 linear took 60x longer with two)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def seed(n: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(n)


def tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer over single bytes (no merges), built in code: no hub download."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        vocab.update({c + suffix: len(vocab) + i for i, c in enumerate(sorted(ByteLevel.alphabet()))})
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def text_encoder() -> CLIPTextModel:
    torch.manual_seed(0)
    return CLIPTextModel(CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=8,
                                        intermediate_size=16, num_attention_heads=2, num_hidden_layers=2,
                                        vocab_size=1000)).eval()


def ddim() -> DDIMScheduler:
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def sd_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(block_out_channels=(4, 8), layers_per_block=1, sample_size=32, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=8,
                                norm_num_groups=2).eval()


def image_vae() -> AutoencoderKL:
    """A tiny SD-style 2D VAE (4 levels: 8x in space, 4 latent channels)."""
    torch.manual_seed(0)
    return randomise_(AutoencoderKL(block_out_channels=[8, 16, 16, 16], down_block_types=["DownEncoderBlock2D"] * 4,
                                    up_block_types=["UpDecoderBlock2D"] * 4, norm_num_groups=4,
                                    layers_per_block=1)).eval()


def sd_pipeline(vae: torch.nn.Module) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder(), tokenizer=tokenizer(), unet=sd_unet(),
                                   scheduler=ddim(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pixels(video: torch.Tensor) -> torch.Tensor:
    """(B, 3, T, H, W) in [-1, 1] -> (B, T, 3, H, W) in [0, 1], as output_type="pt" gives them."""
    return (video / 2 + 0.5).clamp(0, 1).transpose(1, 2)


class LastLatents:
    """A step callback that keeps the latents of the last step: `callback_on_step_end=` (pipe, step,
    timestep, tensors) or, for pipelines that only have the old API, `callback=` (step, timestep, latents)."""

    def __call__(self, *args):
        if len(args) == 3:
            self.latents = args[2].clone()
            return None
        self.latents = args[3]["latents"].clone()
        return {}


# ------------------------------------------------------------------------------------- image pipelines
@torch.no_grad()
def test_sd_pipeline_inflated_cvvae_gives_the_autoencoderkl_image():
    vae2d = image_vae()
    images = {}
    for name, vae in (("2d", vae2d), ("cvvae", inflate_from_image_vae(vae2d).eval())):
        pipe = sd_pipeline(vae)
        assert pipe.vae_scale_factor == 8
        images[name] = pipe("a lion, low-poly", num_inference_steps=STEPS, height=SIZE, width=SIZE,
                            generator=seed(), output_type="np").images
    assert images["cvvae"].shape == (1, SIZE, SIZE, 3)
    assert np.abs(images["cvvae"] - images["2d"]).max() < 1e-4


@torch.no_grad()
def test_sd_img2img_and_stock_code_paths(tmp_path):
    vae = tiny_model()
    pipe = sd_pipeline(vae)
    image = PIL.Image.fromarray((np.random.default_rng(0).random((SIZE, SIZE, 3)) * 255).astype(np.uint8))

    i2i = StableDiffusionImg2ImgPipeline.from_pipe(pipe, vae=pipe.vae)  # from_pipe drops a non-AutoencoderKL vae
    i2i.set_progress_bar_config(disable=True)
    out = i2i("a lion", image=image, strength=0.75, num_inference_steps=STEPS, generator=seed(),
              output_type="np").images
    assert out.shape == (1, SIZE, SIZE, 3) and np.isfinite(out).all()

    # Saved and reloaded: the CVVAE is recorded in model_index.json and loads back.
    pipe.save_pretrained(tmp_path)
    again = StableDiffusionPipeline.from_pretrained(tmp_path)
    assert isinstance(again.vae, CVVAE)
    torch.testing.assert_close(again.vae.state_dict(), vae.state_dict(), rtol=0, atol=0)

    pipe.vae.enable_slicing()
    pipe.vae.enable_tiling()
    with pytest.raises(ValueError, match="AutoencoderKL"):
        pipe.fuse_qkv_projections()  # diffusers' isinstance check: the VAE must be left out
    pipe.fuse_qkv_projections(vae=False)
    pipe.unfuse_qkv_projections(vae=False)


@torch.no_grad()
def test_sd_pipeline_from_pretrained_with_cvvae_as_vae(tmp_path):
    """As users load SD2.1: the stock folder (AutoencoderKL in model_index.json), vae= replaced."""
    sd_pipeline(image_vae()).save_pretrained(tmp_path)
    vae = tiny_model()
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path, vae=vae)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae is vae
    grab = LastLatents()
    out = pipe("a lion", num_inference_steps=STEPS, height=SIZE, width=SIZE, generator=seed(), output_type="pt",
               callback_on_step_end=grab).images
    expected = pixels(vae.decode(grab.latents[:, :, None] / 0.18215).sample)[:, 0]
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


@torch.no_grad()
def test_sd3_pipeline_with_sd3_cvvae():
    vae = tiny_model(**TINY_SD3, scaling_factor=1.5305, shift_factor=0.0609)
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=32, patch_size=1, in_channels=16, out_channels=16, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                        joint_attention_dim=32, pooled_projection_dim=64).eval()
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                                    text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                    text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    g = seed(1)
    embeds, pooled = torch.randn(1, 7, 32, generator=g), torch.randn(1, 64, generator=g)
    grab = LastLatents()
    out = pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, negative_prompt_embeds=torch.zeros_like(embeds),
               negative_pooled_prompt_embeds=torch.zeros_like(pooled), num_inference_steps=STEPS, height=SIZE,
               width=SIZE, generator=seed(), output_type="pt", callback_on_step_end=grab).images
    assert out.shape == (1, 3, SIZE, SIZE) and grab.latents.shape == (1, 16, 8, 8)
    expected = pixels(vae.decode(grab.latents[:, :, None] / 1.5305 + 0.0609).sample)[:, 0]
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------- decoding helper
@torch.no_grad()
def test_decode_video_latents_modes():
    vae = tiny_model()
    latents = torch.randn(2, 4, 3, 2, 3, generator=seed())
    video = decode_video_latents(vae, latents)
    assert video.shape == (2, 3, 9, 16, 24) and video.dtype == torch.float32
    torch.testing.assert_close(video, codec.decode(vae, latents / 0.18215), rtol=0, atol=0)
    vae.enable_slicing()
    torch.testing.assert_close(decode_video_latents(vae, latents), video, rtol=0, atol=1e-5)  # batch 1 vs 2
    vae.disable_slicing()

    images = decode_video_latents(vae, latents, mode="image", chunk_size=4)
    assert images.shape == (2, 3, 3, 16, 24)
    frames = vae.decode(latents.transpose(1, 2).flatten(0, 1) / 0.18215).sample  # 4-D: each a 1-frame clip
    torch.testing.assert_close(images, frames.unflatten(0, (2, 3)).transpose(1, 2), rtol=0, atol=1e-6)

    with pytest.raises(InputError, match="mode"):
        decode_video_latents(vae, latents, mode="frames")
    with pytest.raises(InputError, match=r"\(B, 4, F, h, w\)"):
        decode_video_latents(vae, latents[:, :, 0])


@torch.no_grad()
def test_decode_video_latents_scaling_and_shift():
    vae = tiny_model(**TINY_SD3, scaling_factor=1.5305, shift_factor=0.0609)
    latents = torch.randn(1, 16, 2, 2, 2, generator=seed())
    torch.testing.assert_close(decode_video_latents(vae, latents), codec.decode(vae, latents / 1.5305 + 0.0609),
                               rtol=0, atol=0)
    raw = decode_video_latents(vae, latents, scaling_factor=1.0, shift_factor=0.0)  # latents not scaled
    torch.testing.assert_close(raw, codec.decode(vae, latents), rtol=0, atol=0)


def test_decode_video_latents_runs_the_offload_hook():
    """`enable_model_cpu_offload` moves the VAE to the GPU in a hook that diffusers runs from
    `vae.encode`/`vae.decode` (`apply_forward_hook`); video-mode decoding must run it too."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    class Count(ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            Count.calls += 1
            return args, kwargs

    vae = add_hook_to_module(tiny_model(), Count())
    with torch.no_grad():
        decode_video_latents(vae, torch.randn(1, 4, 2, 2, 2, generator=seed()))
    assert Count.calls >= 1


# ------------------------------------------------------------------------------------- image-to-video (SVD)
@pytest.fixture(scope="module")
def svd_components() -> dict:
    torch.manual_seed(0)
    unet = UNetSpatioTemporalConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=8, out_channels=4,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"), cross_attention_dim=32,
        num_attention_heads=8, projection_class_embeddings_input_dim=96, addition_time_embed_dim=32).eval()
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       prediction_type="v_prediction", sigma_max=700.0, sigma_min=0.002,
                                       steps_offset=1, timestep_spacing="leading", timestep_type="continuous",
                                       use_karras_sigmas=True)
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, projection_dim=32, num_hidden_layers=1, num_attention_heads=4, image_size=SIZE,
        intermediate_size=37, patch_size=8)).eval()
    return dict(vae=tiny_model(), image_encoder=image_encoder, unet=unet, scheduler=scheduler,
                feature_extractor=CLIPImageProcessor(crop_size=SIZE, size=SIZE))


def run_svd(pipe, output_type: str, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, SIZE, SIZE, generator=seed())  # a tensor: SVD resizes PIL images to 224 for CLIP
    return pipe(image, num_frames=3, height=SIZE, width=SIZE, num_inference_steps=STEPS, generator=seed(),
                output_type=output_type, **kwargs).frames


@torch.no_grad()
def test_svd_video_mode_decodes_3_latents_to_9_frames(svd_components):
    pipe = StableVideoDiffusionCVVAEPipeline(**svd_components)
    assert pipe.decode_mode == "video"
    grab = LastLatents()
    frames = run_svd(pipe, "pt", callback_on_step_end=grab)
    assert frames.shape == (1, 9, 3, SIZE, SIZE)
    latents = grab.latents.transpose(1, 2)  # SVD keeps (B, F, C, h, w)
    expected = pixels(codec.decode(pipe.vae, latents / pipe.vae.config.scaling_factor))
    torch.testing.assert_close(frames, expected, rtol=0, atol=0)


@torch.no_grad()
def test_svd_video_mode_np_pil_and_writing(svd_components, tmp_path):
    pipe = StableVideoDiffusionCVVAEPipeline(**svd_components)
    frames = run_svd(pipe, "np")
    assert frames.shape == (1, 9, SIZE, SIZE, 3)
    pil = run_svd(pipe, "pil")[0]
    assert len(pil) == 9 and all(isinstance(f, PIL.Image.Image) and f.size == (SIZE, SIZE) for f in pil)
    np.testing.assert_array_equal(np.asarray(pil[4]), (frames[0, 4] * 255).round().astype(np.uint8))

    # diffusers.utils.export_to_video needs imageio + imageio-ffmpeg (absent here): cvvae's PyAV writer instead.
    with VideoWriter(tmp_path / "svd.mp4", fps=7 * 4) as writer:
        for frame in pil:
            writer.write(np.asarray(frame))
    assert probe(tmp_path / "svd.mp4").num_frames == 9


def test_svd_subclass_loads_a_saved_stock_pipeline(svd_components, tmp_path):
    StableVideoDiffusionPipeline(**svd_components).save_pretrained(tmp_path)
    vae = svd_components["vae"]
    pipe = StableVideoDiffusionCVVAEPipeline.from_pretrained(tmp_path, vae=vae)
    assert type(pipe) is StableVideoDiffusionCVVAEPipeline and pipe.vae is vae and pipe.decode_mode == "video"
    again = StableVideoDiffusionCVVAEPipeline.from_pipe(StableVideoDiffusionPipeline(**svd_components), vae=vae)
    assert again.vae is vae


@torch.no_grad()
def test_svd_export_to_video(svd_components, tmp_path):
    pytest.importorskip("imageio_ffmpeg", reason="diffusers' export_to_video needs imageio-ffmpeg")
    from diffusers.utils import export_to_video

    pipe = StableVideoDiffusionCVVAEPipeline(**svd_components)
    path = export_to_video(run_svd(pipe, "pil")[0], str(tmp_path / "svd.mp4"), fps=28)
    assert probe(path).num_frames == 9


@torch.no_grad()
def test_svd_image_mode_decodes_like_the_stock_pipeline(svd_components):
    pipe = StableVideoDiffusionCVVAEPipeline(**svd_components)
    with pytest.raises(InputError, match="decode_mode"):
        pipe.decode_mode = "frames"
    pipe.decode_mode = "image"
    grab = LastLatents()
    frames = run_svd(pipe, "np", callback_on_step_end=grab)
    assert frames.shape == (1, 3, SIZE, SIZE, 3)
    # The stock decode_latents (4-D chunks; a CVVAE decodes each latent frame as a 1-frame clip).
    ours = pipe.decode_latents(grab.latents, 3, decode_chunk_size=2)
    stock = StableVideoDiffusionPipeline.decode_latents(pipe, grab.latents, 3, decode_chunk_size=2)
    assert ours.shape == (1, 3, 3, SIZE, SIZE)
    torch.testing.assert_close(ours, stock, rtol=0, atol=1e-5)  # batching changes float rounding
    stock_frames = run_svd(StableVideoDiffusionPipeline(**svd_components), "np")
    np.testing.assert_allclose(frames, stock_frames, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------- text-to-video
def text_to_video_pipeline(kind: str):
    torch.manual_seed(0)
    common = dict(vae=tiny_model(), text_encoder=text_encoder(), tokenizer=tokenizer(), scheduler=ddim())
    if kind == "animatediff":
        unet = UNet2DConditionModel(block_out_channels=(8, 8), layers_per_block=1, sample_size=8, in_channels=4,
                                    out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
                                    norm_num_groups=2)
        adapter = MotionAdapter(block_out_channels=(8, 8), motion_layers_per_block=1, motion_norm_num_groups=2,
                                motion_num_attention_heads=2)
        return AnimateDiffCVVAEPipeline(unet=unet, motion_adapter=adapter, feature_extractor=None,
                                        image_encoder=None, **common)
    unet = UNet3DConditionModel(block_out_channels=(8, 8), layers_per_block=1, sample_size=32, in_channels=4,
                                out_channels=4, down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                                up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), cross_attention_dim=8,
                                attention_head_dim=4, norm_num_groups=2)
    return TextToVideoSDCVVAEPipeline(unet=unet, **common)


@torch.no_grad()
@pytest.mark.parametrize("kind", ["animatediff", "text-to-video-sd"])
def test_text_to_video_video_mode(kind):
    pipe = text_to_video_pipeline(kind)
    pipe.set_progress_bar_config(disable=True)
    grab = LastLatents()
    hook = dict(callback_on_step_end=grab) if kind == "animatediff" else dict(callback=grab)  # deprecated pipeline
    frames = pipe("a lion", num_frames=2, height=SIZE, width=SIZE, num_inference_steps=STEPS, generator=seed(),
                  output_type="pt", **hook).frames
    assert grab.latents.shape == (1, 4, 2, 8, 8)
    assert frames.shape == (1, 5, 3, SIZE, SIZE)  # 1 + 4(2 - 1)
    torch.testing.assert_close(frames, pixels(codec.decode(pipe.vae, grab.latents / 0.18215)), rtol=0, atol=0)
    if kind == "animatediff":
        pipe.decode_mode = "image"
        frames = pipe("a lion", num_frames=2, height=SIZE, width=SIZE, num_inference_steps=STEPS, generator=seed(),
                      output_type="np").frames
        assert frames.shape == (1, 2, SIZE, SIZE, 3)


def test_subclasses_fall_back_to_stock_decoding_with_another_vae():
    pipe = text_to_video_pipeline("text-to-video-sd")
    pipe.vae = image_vae()
    latents = torch.randn(1, 4, 2, 4, 4, generator=seed())
    with torch.no_grad():
        ours = pipe.decode_latents(latents)
        stock = super(TextToVideoSDCVVAEPipeline, pipe).decode_latents(latents)
    assert ours.shape == (1, 3, 2, 32, 32)
    torch.testing.assert_close(ours, stock, rtol=0, atol=0)
    assert issubclass(AnimateDiffCVVAEPipeline, AnimateDiffPipeline)
