"""Training CV-VAE: `cvvae train CONFIG.yaml [key=value ...]`, on one process or many (torchrun).

A plain loop (read it top to bottom in `train`). Per batch: one autoencoder update, then one
discriminator update on the same reconstruction (the official code alternates them batch by batch
and recomputes the forward for each). Everything that has gradients (the CV-VAE, the learned
log-variances, the discriminator) lives in one `TrainStep` module wrapped by accelerate/DDP, so every
rank keeps identical parameters. The model runs whole clips in one forward (`CVVAE.encode_clip` /
`decode_clip`): no temporal rounds or spatial tiles inside the autograd graph.

Where things are: the config in `config.py`, batches in `batches.py`, checkpoints and resume in
`checkpoints.py`, the objective in `losses.py` (mapping functions: `cvvae.model.mapping`), the 3D
discriminator in `discriminator.py`, LPIPS in `cvvae.eval.lpips`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from ..eval.metrics import psnr
from ..model.mapping import frames_of
from .batches import batches
from .checkpoints import check_resumable, checkpoints, save_checkpoint, save_weights
from .config import TrainConfig
from .losses import CVVAELoss


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup from 0, then cosine from 1 to min_ratio at `total`, constant after (the
    official schedule is not clamped and rises again after `total`)."""
    if step < warmup:
        return step / max(1, warmup)
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p))


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


def build_loss(cfg: TrainConfig, model, vae2d) -> CVVAELoss:
    from .discriminator import NLayerDiscriminator3D

    lpips = None
    if cfg.loss.perceptual_weight > 0 or cfg.loss.reg_perceptual_weight > 0:
        from ..eval.lpips import LPIPS

        lpips = LPIPS(cfg.lpips_vgg16)
    disc = None
    if cfg.has_discriminator:
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


@dataclass
class _Run:
    """What one training run updates: the wrapped modules, their optimizers and schedule, the EMA."""

    accelerator: Any
    model: nn.Module  # the CV-VAE (unwrapped)
    step_module: nn.Module  # TrainStep, wrapped by accelerate
    ae_params: list[nn.Parameter]
    opt_ae: torch.optim.Optimizer
    schedule: Any
    disc: nn.Module | None
    opt_d: torch.optim.Optimizer | None
    ema: Any


def train(cfg: TrainConfig, resume: bool = False, quiet: bool = False) -> Path:
    """Train; returns the folder of the final weights (loadable with CVVAE.from_pretrained), or of
    the last checkpoint when `stop_at` ended the run early."""
    from tqdm import tqdm

    run = _prepare(cfg, resume)
    acc, out = run.accelerator, Path(cfg.output_dir)
    found = checkpoints(out) if resume else []
    start = json.loads((found[-1] / "state.json").read_text())["step"] if found else 0
    data = batches(cfg, acc.process_index, start)  # draws from the torch RNG: before restoring it
    if found:
        acc.load_state(str(found[-1]))
    log = _Log(cfg, out, start, acc.is_main_process)
    end = min(cfg.steps, cfg.stop_at or cfg.steps)
    with tqdm(total=cfg.steps, initial=start, desc="train", unit="step", disable=quiet or not acc.is_main_process,
              dynamic_ncols=True) as bar:
        for step in range(start, end):
            batch = next(data)
            x = batch["video"].to(acc.device)
            parts, xrec = _update(run, cfg, x, step)
            log.step(step + 1, x, xrec, parts, batch["skipped"], run.schedule.get_last_lr()[0])
            bar.update(1)
            if log.last is not None:
                bar.set_postfix(loss=f"{log.last['total']:.4g}")
            if (step + 1) % cfg.save_every == 0 or step + 1 == end:
                save_checkpoint(acc, out, step + 1, cfg.keep_checkpoints)
    log.close()
    _check_ranks_agree(acc, run.model, out)
    final = out / "final"
    if acc.is_main_process and end == cfg.steps:
        if run.ema is not None:
            run.ema.copy_to(run.model.parameters())
        save_weights(acc.unwrap_model(run.step_module).model, final)
    acc.wait_for_everyone()
    acc.end_training()
    return final if end == cfg.steps else checkpoints(out)[-1]


def _prepare(cfg: TrainConfig, resume: bool) -> _Run:
    """The accelerator, models, loss, optimizers and schedule of a run; config.yaml written (after the resume
    check has read the old one)."""
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.utils import set_seed

    acc = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available(),
                      kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    set_seed(cfg.seed, device_specific=True)
    out = Path(cfg.output_dir)
    if resume and checkpoints(out) and (out / "config.yaml").is_file():
        check_resumable(yaml.safe_load((out / "config.yaml").read_text()) or {}, cfg)
    acc.wait_for_everyone()  # every rank has read the old config.yaml before it is rewritten
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))

    model, vae2d = build_models(cfg)
    if cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    loss = build_loss(cfg, model, vae2d)
    for frozen in (vae2d, loss.lpips):
        if frozen is not None:
            frozen.to(acc.device)
    o = cfg.optim
    if cfg.freeze_encoder:
        model.encoder.requires_grad_(False)
    ae_params = ([p for p in model.parameters() if p.requires_grad] +
                 [p for n, p in loss.named_parameters() if n.startswith("logvar")])
    opt_ae = torch.optim.AdamW(ae_params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt_ae, lambda s: lr_factor(s, o.warmup, cfg.steps, o.min_lr_ratio))
    disc = loss.discriminator
    opt_d = (torch.optim.AdamW(disc.parameters(), lr=o.disc_lr, betas=o.betas, eps=o.eps,
                               weight_decay=o.weight_decay) if disc is not None else None)
    step_module, opt_ae, schedule = acc.prepare(TrainStep(model, loss), opt_ae, schedule)
    if opt_d is not None:
        opt_d = acc.prepare(opt_d)
    ema = None
    if cfg.ema_decay:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(model.parameters(), decay=cfg.ema_decay)
        ema.to(acc.device)
        acc.register_for_checkpointing(ema)
    return _Run(acc, model, step_module, ae_params, opt_ae, schedule, disc, opt_d, ema)


def _update(run: _Run, cfg: TrainConfig, x: torch.Tensor, step: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One autoencoder update, then (from disc_start on) one discriminator update on the same reconstruction.
    Returns the loss breakdown and the reconstruction."""
    acc = run.accelerator
    with acc.autocast():
        total, parts, xrec = run.step_module(x, step)
    acc.backward(total)
    acc.clip_grad_norm_(run.ae_params, cfg.optim.grad_clip)
    run.opt_ae.step()
    run.schedule.step()
    run.opt_ae.zero_grad(set_to_none=True)
    if run.opt_d is not None:
        run.opt_d.zero_grad(set_to_none=True)  # drop what the generator loss left on D
        if step >= cfg.loss.disc_start:
            with acc.autocast():
                d_loss, d_parts = run.step_module(x, step, xrec.detach())
            acc.backward(d_loss)
            acc.clip_grad_norm_(run.disc.parameters(), cfg.optim.grad_clip)
            run.opt_d.step()
            run.opt_d.zero_grad(set_to_none=True)
            parts.update(d_parts)
    if run.ema is not None:
        run.ema.step(run.model.parameters())
    return parts, xrec


class _Log:
    """metrics.jsonl (main process; what a killed run logged after its last checkpoint is dropped on resume)
    and TensorBoard when installed."""

    def __init__(self, cfg: TrainConfig, out: Path, start: int, main: bool) -> None:
        self.cfg, self.main, self.skipped, self.seen, self.t0 = cfg, main, 0, 0, time.perf_counter()
        self.file = self.writer = self.last = None
        if not main:
            return
        path = out / "metrics.jsonl"
        if path.exists():
            kept = [r for r in path.read_text().splitlines() if r and json.loads(r)["step"] <= start]
            path.write_text("".join(r + "\n" for r in kept))
        self.file = open(path, "a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out / "tensorboard"))
        except ImportError:
            self.writer = None

    def step(self, step: int, x: torch.Tensor, xrec: torch.Tensor, parts: dict[str, torch.Tensor], skipped: int,
             lr: float) -> None:
        self.skipped += skipped
        self.seen += x.shape[0]
        if not self.main:
            return
        if step % self.cfg.log_every == 0:
            rec = ((xrec.detach().float().clamp(-1, 1) + 1) / 2).cpu()
            parts = {**parts, "psnr": psnr(frames_of(rec), frames_of((x.float() + 1) / 2).cpu()).mean()}
            speed = self.seen / (time.perf_counter() - self.t0)
            self.last = {"step": step, **{k: float(v) for k, v in parts.items()}, "skipped_files": self.skipped,
                         "lr": lr, "clips_per_s": speed}
            self.file.write(json.dumps(self.last) + "\n")
            self.file.flush()
            if self.writer is not None:
                for k, v in parts.items():
                    self.writer.add_scalar(f"train/{k}", float(v), step)
                self.writer.add_scalar("train/lr", lr, step)
                self.writer.add_scalar("train/clips_per_s", speed, step)
                self.writer.add_scalar("data/skipped_files", self.skipped, step)
        if self.writer is not None and step % self.cfg.image_every == 0:
            pair = torch.cat([x[0, :, 0], xrec[0, :, 0].detach().float().clamp(-1, 1)], dim=-1)
            self.writer.add_image("train/input|reconstruction", (pair + 1) / 2, step)

    def close(self) -> None:
        for handle in (self.file, self.writer):
            if handle is not None:
                handle.close()


def _check_ranks_agree(accelerator, model: nn.Module, out: Path) -> None:
    """Every rank must hold the same weights after training; record the per-rank checksums. Every rank gets
    every checksum, so all of them fail together (none is left waiting in a barrier)."""
    checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
    sums = accelerator.gather(checksum.to(accelerator.device)).tolist()
    if accelerator.is_main_process:
        (out / "rank_checksums.json").write_text(json.dumps(sums))
    if max(sums) - min(sums) > 1e-6 * max(1.0, abs(sums[0])):
        raise RuntimeError(f"ranks disagree after training: parameter checksums {sums}")
