"""Training CV-VAE: `cvvae train CONFIG.yaml [key=value ...]`, on one process or many (torchrun).

A plain loop (read it top to bottom in `train`). Per batch: one autoencoder update, then one
discriminator update on the same reconstruction (the official code alternates them batch by batch
and recomputes the forward for each). Everything that has gradients (the CV-VAE, the learned
log-variances, the discriminator) lives in one `TrainStep` module wrapped by accelerate/DDP, so every
rank keeps identical parameters. Checkpoints hold model, discriminator, both optimizers and
schedulers, EMA, RNG states and the step, are written under a temporary name and renamed when
complete; `--resume` continues from the newest one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import yaml
from torch import nn

from ..errors import ConfigError
from ..io.files import publish
from .losses import CVVAELoss, LossConfig


# ------------------------------------------------------------------------------------------ config
@dataclass
class DataConfig:
    videos: str | None = None  # folder, CSV/JSONL manifest, or webdataset shards ("data/shard-*.tar")
    images: str | None = None  # folder or manifest of images (trained as 1-frame videos)
    frames: int = 17
    stride: tuple[int, int] = (1, 8)
    short_side: int = 256
    crop: int = 256
    video_batch: int = 1
    image_batch: int = 8
    image_ratio: float = 0.5  # fraction of batches that are image batches
    num_workers: int = 2


@dataclass
class OptimConfig:
    lr: float = 4e-5  # official: base 2e-5 x lr_g_factor 2
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-4
    weight_decay: float = 0.01
    warmup: int = 1000
    min_lr_ratio: float = 0.005
    grad_clip: float = 1.0
    disc_lr: float = 2e-5


@dataclass
class TrainConfig:
    output_dir: str = "runs/cvvae"
    image_vae: str | None = None  # frozen 2D VAE (diffusers AutoencoderKL folder) for regularisation/inflation
    init: str | None = None  # CV-VAE weights to start from; default: inflate `image_vae`
    model: dict = field(default_factory=dict)  # CVVAE config when neither init nor image_vae is given
    lpips_vgg16: str | None = None  # ImageNet VGG16 weights (torchvision file) for the perceptual loss
    steps: int = 200_000  # total optimisation steps (the LR schedule spans them)
    stop_at: int | None = None  # end this invocation after this step (checkpointed); --resume continues
    seed: int = 0
    # "no" (the paper trains in fp32) or "bf16"; an unquoted YAML `no` arrives as False and means "no"
    mixed_precision: str = field(default="no", metadata={"yaml_false": "no"})
    gradient_checkpointing: bool = True
    # Train the decoder only: the latent space, and so its compatibility with the image VAE, stays as it is
    # (how SD's ft-EMA/ft-MSE decoders were made). The decoder regulariser then has nothing to train: skipped
    # in training steps (evaluations without gradients still report it).
    freeze_encoder: bool = False
    ema_decay: float | None = None
    disc_ndf: int = 64
    disc_layers: int = 4
    log_every: int = 50
    image_every: int = 250
    save_every: int = 2000
    keep_checkpoints: int = 2
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)

    def __post_init__(self) -> None:
        if self.mixed_precision not in ("no", "bf16"):
            raise ConfigError(f"mixed_precision must be 'no' or 'bf16', got {self.mixed_precision!r}")


def _field_types(cls) -> dict[str, set[type]]:
    """Field name -> the plain types its annotation admits (`str | None` -> {str, NoneType})."""
    out = {}
    for name, hint in typing.get_type_hints(cls).items():
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)  # X | None, Optional[X]
        args = typing.get_args(hint) if union else (hint,)
        out[name] = {typing.get_origin(a) or a for a in args}
    return out


def _build(cls, values: dict, where: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown {where} keys: {unknown}; known: {sorted(fields)}")
    kwargs, hints = {}, _field_types(cls)
    for name, value in values.items():
        sub = fields[name].default_factory if fields[name].default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(sub) and isinstance(value, dict):
            value = _build(sub, value, f"{where}.{name}" if where != "config" else name)
        kinds = hints[name]
        if isinstance(value, list) and tuple in kinds:
            value = tuple(value)
        elif str in kinds and isinstance(value, bool):
            # YAML 1.1 reads unquoted no/off/yes/on as booleans; a field may say what its False means
            if value is False and "yaml_false" in fields[name].metadata:
                value = fields[name].metadata["yaml_false"]
            else:
                raise ConfigError(f"{where}.{name} must be a string, got {value!r} (quote it)")
        elif isinstance(value, bool) and bool not in kinds and kinds & {int, float}:
            raise ConfigError(f"{where}.{name} must be a number, got {value!r}")
        elif float in kinds and isinstance(value, (str, int)) and not isinstance(value, bool):
            try:  # YAML 1.1 reads 1e-4 (no dot) as a string
                value = float(value)
            except ValueError:
                raise ConfigError(f"{where}.{name} must be a number, got {value!r}") from None
        kwargs[name] = value
    return cls(**kwargs)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """A YAML file plus `dotted.key=value` overrides (values parsed as YAML: 1e-4, true, [1, 8])."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            values = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot read config {path}: {e}") from None
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not key=value")
        node = values
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(raw)
    return _build(TrainConfig, values, "config")


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup from 0, then cosine from 1 to min_ratio at `total`, constant after (the
    official schedule is not clamped and rises again after `total`)."""
    if step < warmup:
        return step / max(1, warmup)
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p))


# ------------------------------------------------------------------------------------------ model
class TrainStep(nn.Module):
    """Everything with gradients, behind one forward so that DDP synchronises all of it.

    forward(x, step) -> (loss, breakdown, reconstruction): the autoencoder step;
    forward(x, step, xrec) -> (loss, breakdown): the discriminator step on a detached reconstruction.
    """

    def __init__(self, model: nn.Module, loss: CVVAELoss) -> None:
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, x: torch.Tensor, step: int, xrec: torch.Tensor | None = None):
        if xrec is not None:
            return self.loss.discriminator_loss(x, xrec, step)
        return self.loss.generator_loss(self.model, x, step, last_layer=self.model.decoder.conv_out.weight)


def _image_vae(path: str | None):
    if path is None:
        return None
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(path).eval().requires_grad_(False)
    return vae


def build_models(cfg: TrainConfig):
    """(CV-VAE, frozen 2D VAE or None): from `init`, else inflated from `image_vae`, else from `model`."""
    from ..model import CVVAE
    from ..model.inflate import inflate_from_image_vae

    vae2d = _image_vae(cfg.image_vae)
    if cfg.model and (cfg.init or vae2d is not None):
        source = f"init ({cfg.init})" if cfg.init else f"the image VAE it inflates ({cfg.image_vae})"
        warnings.warn(f"the model settings {sorted(cfg.model)} are ignored: the architecture comes from {source}",
                      stacklevel=2)
    if cfg.init:
        model = CVVAE.from_pretrained(cfg.init)
    elif vae2d is not None:
        model = inflate_from_image_vae(vae2d)
    else:
        model = CVVAE(**cfg.model)
    return model.train(), vae2d


def _has_discriminator(cfg: TrainConfig) -> bool:
    return cfg.loss.disc_factor > 0 and cfg.loss.disc_weight > 0


def build_loss(cfg: TrainConfig, model, vae2d) -> CVVAELoss:
    from .discriminator import NLayerDiscriminator3D

    lpips = None
    if cfg.loss.perceptual_weight > 0 or cfg.loss.reg_perceptual_weight > 0:
        from .lpips import LPIPS

        lpips = LPIPS(cfg.lpips_vgg16)
    disc = None
    if _has_discriminator(cfg):
        disc = NLayerDiscriminator3D(ndf=cfg.disc_ndf, n_layers=cfg.disc_layers,
                                     norm_groups=min(32, cfg.disc_ndf))
    decode_2d = encode_2d = None
    if vae2d is not None:
        def decode_2d(z):
            return vae2d.decode(z).sample

        def encode_2d(frames):
            d = vae2d.encode(frames).latent_dist
            return torch.cat([d.mean, d.logvar], dim=1)
    return CVVAELoss(cfg.loss, lpips=lpips, discriminator=disc, image_decoder=decode_2d, image_encoder=encode_2d,
                     t=model.temporal_compression_ratio, encoder_frozen=cfg.freeze_encoder)


# ------------------------------------------------------------------------------------------ data
class StepBatches(torch.utils.data.Dataset):
    """Batch `step` of rank `rank` as a pure function of (seed, rank, step), so resuming at any step
    is exact and costs nothing, and DataLoader workers can decode batches ahead in any order.

    Each batch is all images or all video clips (image_ratio of them images), items drawn with
    replacement. Unreadable, truncated or too-short files are skipped, redrawn and counted in
    batch["skipped"] (with batch["skipped_paths"]).
    """

    def __init__(self, cfg: DataConfig, seed: int, rank: int) -> None:
        from ..data import ClipSpec, list_items

        def items(source: str | None, kind: str) -> list:
            return list_items(os.path.expanduser(source), kind=kind) if source else []

        self.videos, self.images = items(cfg.videos, "video"), items(cfg.images, "image")
        if not self.videos and not self.images:
            raise ConfigError("no training data: set data.videos and/or data.images to folders or manifests")
        self.cfg, self.seed, self.rank = cfg, seed, rank
        self.video_spec = ClipSpec(frames=cfg.frames, stride=tuple(cfg.stride), short_side=cfg.short_side, crop=cfg.crop)
        self.image_spec = ClipSpec(frames=1, stride=1, short_side=cfg.short_side, crop=cfg.crop)

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, step: int) -> dict:
        import numpy as np

        from ..data import ClipError, collate, read_clip

        rng = np.random.default_rng([self.seed, self.rank, step])
        images = bool(self.images) and (not self.videos or rng.random() < self.cfg.image_ratio)
        pool, spec = (self.images, self.image_spec) if images else (self.videos, self.video_spec)
        n = self.cfg.image_batch if images else self.cfg.video_batch
        samples, skipped = [], []
        while len(samples) < n:
            item = pool[int(rng.integers(len(pool)))]
            try:
                samples.append(read_clip(item, spec, rng))
            except ClipError as e:
                skipped.append(f"{item['path']}: {e}")
                if len(skipped) > 20 * n:
                    raise ConfigError(f"no readable clips in the training data (last: {skipped[-1]})") from None
        batch = collate(samples)
        batch.update(skipped=len(skipped), skipped_paths=skipped)
        return batch


def _is_shards(source: str | None) -> bool:
    return bool(source) and str(source).endswith(".tar")


def _shard_batches(cfg: TrainConfig, start: int) -> Iterator[dict]:
    """Batches streamed from webdataset shards (plus folders/manifests for the other kind).

    Shards cannot be read at random, so here a resumed run draws a fresh, seeded order
    (seed + step) instead of replaying the interrupted one; folders and manifests resume exactly.
    """
    from ..data import ClipDataset, ClipSpec, MixedLoader, ShardClipDataset, list_items

    d = cfg.data
    seed = cfg.seed + 1_000_003 * start
    specs = {"videos": ClipSpec(frames=d.frames, stride=tuple(d.stride), short_side=d.short_side, crop=d.crop),
             "images": ClipSpec(frames=1, stride=1, short_side=d.short_side, crop=d.crop)}
    sources = {}
    for name, source in (("videos", d.videos), ("images", d.images)):
        if _is_shards(source):
            sources[name] = ShardClipDataset(source, specs[name], seed=seed, shuffle_buffer=256)
        elif source:
            items = list_items(os.path.expanduser(source), kind=name[:-1])
            sources[name] = ClipDataset(items, specs[name], seed=seed)
    weights = {"images": d.image_ratio, "videos": 1 - d.image_ratio}
    loader = MixedLoader(sources, {k: weights[k] for k in sources},
                         {"images": d.image_batch, "videos": d.video_batch}, seed=seed, num_workers=d.num_workers)
    for batch in loader:
        yield {**batch, "skipped": 0}  # shard skips are counted by the datasets (loader.stats())


def batches(cfg: TrainConfig, rank: int, start: int) -> Iterator[dict]:
    """Training batches from `start` to `cfg.steps`, decoded by DataLoader workers."""
    if _is_shards(cfg.data.videos) or _is_shards(cfg.data.images):
        return _shard_batches(cfg, start)
    data = StepBatches(cfg.data, cfg.seed, rank)
    workers = cfg.data.num_workers
    loader = torch.utils.data.DataLoader(data, batch_size=None, sampler=range(start, cfg.steps), num_workers=workers,
                                         prefetch_factor=2 if workers else None)
    return iter(loader)


# ------------------------------------------------------------------------------------------ checkpoints
def _checkpoints(out: Path) -> list[Path]:
    found = [p for p in (out / "checkpoints").glob("step-*") if (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(accelerator, out: Path, step: int, keep: int) -> Path:
    """accelerate state into checkpoints/.step-N.partial, renamed to step-N once every rank is done."""
    final = out / "checkpoints" / f"step-{step}"
    tmp = out / "checkpoints" / f".step-{step}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "state.json").write_text(json.dumps({"step": step}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in _checkpoints(out)[:-keep] if keep > 0 else []:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def save_weights(model, out: Path) -> None:
    """save_pretrained into out/.name.partial, renamed when complete."""
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    publish(tmp, out)


def _check_ranks_agree(accelerator, model, out: Path) -> None:
    """Every rank must hold the same weights after training; record the per-rank checksums."""
    checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
    sums = accelerator.gather(checksum.to(accelerator.device)).tolist()
    if accelerator.is_main_process:
        (out / "rank_checksums.json").write_text(json.dumps(sums))
        if max(sums) - min(sums) > 1e-6 * max(1.0, abs(sums[0])):
            raise RuntimeError(f"ranks disagree after training: parameter checksums {sums}")


def _check_resumable(saved: dict, cfg: TrainConfig) -> None:
    """The settings that decide what a checkpoint holds (which parameters the optimizers track, whether
    there is an EMA copy or a discriminator) must match the run's: else loading its state fails deep in torch."""
    def held(c: TrainConfig) -> dict:
        return {"freeze_encoder": c.freeze_encoder, "EMA": bool(c.ema_decay),
                "discriminator": _has_discriminator(c) and (c.disc_ndf, c.disc_layers)}

    before, after = held(_build(TrainConfig, saved, "config")), held(cfg)
    changed = [f"{k} was {before[k]} and is {after[k]}" for k in before if before[k] != after[k]]
    if changed:
        raise ConfigError(f"cannot --resume {cfg.output_dir}: {'; '.join(changed)} (its checkpoints hold a different "
                          "optimizer state); set it back, or train into a new output_dir with init=<its weights>")


# ------------------------------------------------------------------------------------------ loop
def train(cfg: TrainConfig, resume: bool = False, quiet: bool = False) -> Path:
    """Train; returns the folder of the final weights (loadable with CVVAE.from_pretrained), or of
    the last checkpoint when `stop_at` ended the run early."""
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.utils import set_seed
    from tqdm import tqdm

    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available(),
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    set_seed(cfg.seed, device_specific=True)
    out = Path(cfg.output_dir)
    if resume and _checkpoints(out) and (out / "config.yaml").is_file():
        _check_resumable(yaml.safe_load((out / "config.yaml").read_text()) or {}, cfg)
    accelerator.wait_for_everyone()  # every rank has read the old config.yaml before it is rewritten
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))

    model, vae2d = build_models(cfg)
    if cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    loss = build_loss(cfg, model, vae2d)
    if vae2d is not None:
        vae2d.to(accelerator.device)
    if loss.lpips is not None:
        loss.lpips.to(accelerator.device)
    step_module = TrainStep(model, loss)
    o = cfg.optim
    if cfg.freeze_encoder:
        model.encoder.requires_grad_(False)
    ae_params = ([p for p in model.parameters() if p.requires_grad] +
                 [p for n, p in loss.named_parameters() if n.startswith("logvar")])
    opt_ae = torch.optim.AdamW(ae_params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt_ae, lambda s: lr_factor(s, o.warmup, cfg.steps, o.min_lr_ratio))
    disc = loss.discriminator
    opt_d = (torch.optim.AdamW(disc.parameters(), lr=o.disc_lr, betas=o.betas, eps=o.eps,
                               weight_decay=o.weight_decay) if disc is not None else None)
    step_module, opt_ae, schedule = accelerator.prepare(step_module, opt_ae, schedule)
    if opt_d is not None:
        opt_d = accelerator.prepare(opt_d)
    ema = None
    if cfg.ema_decay:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(model.parameters(), decay=cfg.ema_decay)
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)

    found = _checkpoints(out) if resume else []
    start = json.loads((found[-1] / "state.json").read_text())["step"] if found else 0
    data = batches(cfg, accelerator.process_index, start)  # draws from the torch RNG: before restoring it
    if found:
        accelerator.load_state(str(found[-1]))
    writer = None
    if accelerator.is_main_process:
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(out / "tensorboard"))
        except ImportError:
            writer = None

    skipped = 0
    bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step",
               disable=quiet or not accelerator.is_main_process, dynamic_ncols=True)
    t0, seen = time.perf_counter(), 0
    end = min(cfg.steps, cfg.stop_at or cfg.steps)
    log = None
    if accelerator.is_main_process:
        log_path = out / "metrics.jsonl"
        if log_path.exists():  # drop what a killed run logged after its last checkpoint
            kept = [r for r in log_path.read_text().splitlines() if r and json.loads(r)["step"] <= start]
            log_path.write_text("".join(r + "\n" for r in kept))
        log = open(log_path, "a")
    for step in range(start, end):
        batch = next(data)
        x = batch["video"].to(accelerator.device)
        skipped += batch["skipped"]
        with accelerator.autocast():
            total, parts, xrec = step_module(x, step)
        accelerator.backward(total)
        accelerator.clip_grad_norm_(ae_params, o.grad_clip)
        opt_ae.step()
        schedule.step()
        opt_ae.zero_grad(set_to_none=True)
        if opt_d is not None:
            opt_d.zero_grad(set_to_none=True)  # drop what the generator loss left on D
            if step >= cfg.loss.disc_start:
                with accelerator.autocast():
                    d_loss, d_parts = step_module(x, step, xrec.detach())
                accelerator.backward(d_loss)
                accelerator.clip_grad_norm_(disc.parameters(), o.grad_clip)
                opt_d.step()
                opt_d.zero_grad(set_to_none=True)
                parts.update(d_parts)
        if ema is not None:
            ema.step(model.parameters())
        seen += x.shape[0]
        bar.update(1)
        if accelerator.is_main_process and (step + 1) % cfg.log_every == 0:
            mse = (xrec.detach().float().clamp(-1, 1) - x.float()).square().mean()
            parts["psnr"] = 10 * torch.log10(4 / mse.clamp_min(1e-10))  # this batch, pixel range [-1, 1]
            record = {"step": step + 1, **{k: float(v) for k, v in parts.items()}, "skipped_files": skipped,
                      "lr": schedule.get_last_lr()[0], "clips_per_s": seen / (time.perf_counter() - t0)}
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{record['total']:.4g}")
        if writer is not None and (step + 1) % cfg.log_every == 0:
            for k, v in parts.items():
                writer.add_scalar(f"train/{k}", float(v), step + 1)
            writer.add_scalar("train/lr", schedule.get_last_lr()[0], step + 1)
            writer.add_scalar("train/clips_per_s", seen / (time.perf_counter() - t0), step + 1)
            writer.add_scalar("data/skipped_files", skipped, step + 1)
        if writer is not None and (step + 1) % cfg.image_every == 0:
            pair = torch.cat([x[0, :, 0], xrec[0, :, 0].detach().float().clamp(-1, 1)], dim=-1)
            writer.add_image("train/input|reconstruction", (pair + 1) / 2, step + 1)
        if (step + 1) % cfg.save_every == 0 or step + 1 == end:
            save_checkpoint(accelerator, out, step + 1, cfg.keep_checkpoints)
    bar.close()
    if log is not None:
        log.close()
    _check_ranks_agree(accelerator, model, out)
    final = out / "final"
    if accelerator.is_main_process and end == cfg.steps:
        if ema is not None:
            ema.copy_to(model.parameters())
        save_weights(accelerator.unwrap_model(step_module).model, final)
    if writer is not None:
        writer.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return final if end == cfg.steps else _checkpoints(out)[-1]
