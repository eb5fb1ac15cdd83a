"""The CV-VAE objective (paper section 3, Eq. 3; official `LPIPSWithDiscriminatorAndDomainConstraint`).

    L = NLL(x, D_v(z)) + kl_weight KL + w_dec NLL_2d(psi(x), D_i(z)) + w_enc NLL(x, D_v(E_i(psi(x))))
        + d_weight * disc_factor * (-mean D(D_v(z)))

- NLL: per pixel |x - x_hat| (`pixel_loss: l2`: (x - x_hat)^2, what PSNR measures) + perceptual_weight *
  LPIPS (per frame, broadcast over its pixels), divided by exp(logvar) plus logvar with a learned scalar
  logvar, summed and divided by the number of frames (official normalisation).
- Decoder regularisation (the paper's choice): the video latents z, decoded frame by frame by the
  frozen 2D image decoder D_i, must reproduce psi(x). Gradients reach the 3D encoder only, so with the
  encoder frozen (decoder-only fine-tuning, `encoder_frozen=True`) training steps skip the term.
- Encoder regularisation: the frozen 2D encoder E_i encodes psi(x) frame by frame; the 3D decoder
  must rebuild the whole video from those latents. (The official code crashes on this path.)
- psi, the mapping from 1 + 4k frames to 1 + k latent-frame targets: `first`, `average`, `slice`,
  `random` (a random frame per group of 4, drawn per sample; the official code draws once per batch; optional
  per-frame odds, `random_frame_weights`).
- Adaptive GAN weight ||grad NLL|| / (||grad G|| + 1e-4) on the decoder's last layer, from `disc_start` on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from einops import rearrange
from torch import nn

from ..errors import ConfigError
from ..model.autoencoder import DiagonalGaussian
from ..model.mapping import MAPPINGS, frames_of, psi, videos_of
from .discriminator import adaptive_weight, hinge_d_loss

PIXEL_LOSSES = ("l1", "l2")


@dataclass
class LossConfig:
    perceptual_weight: float = 0.5
    kl_weight: float = 1.0  # on the summed KL / batch size, relative to the summed NLL / frames (official)
    disc_weight: float = 0.5
    disc_start: int = 1
    disc_factor: float = 1.0
    logvar_init: float = 0.0
    learn_logvar: bool = True
    dec_reg_weight: float = 1.0  # lambda_1: decoder regularisation (0 turns it off)
    enc_reg_weight: float = 0.0  # lambda_2: encoder regularisation
    reg_perceptual_weight: float = 0.0  # LPIPS on the regularisation target too (the official uses L1 only)
    mapping: str = "random"
    # mapping random: relative odds of each frame of a group (t of them) being the target; None = uniform (paper).
    # Odds that favour the last frame move the latent from the group mean toward what `slice` measures.
    random_frame_weights: tuple[float, ...] | None = None
    pixel_loss: str = "l1"  # "l1" (official) or "l2" (squared error: fine-tunes for PSNR, as SD's ft-MSE decoder)


Decode2D = Callable[[torch.Tensor], torch.Tensor]  # latents (N, z, h, w) -> frames (N, 3, H, W)
Encode2D = Callable[[torch.Tensor], torch.Tensor]  # frames (N, 3, H, W) -> moments (N, 2z, h, w)


class CVVAELoss(nn.Module):
    """Generator and discriminator losses; learned log-variances are its only parameters."""

    def __init__(self, config: LossConfig, *, lpips: nn.Module | None = None, discriminator: nn.Module | None = None,
                 image_decoder: Decode2D | None = None, image_encoder: Encode2D | None = None, t: int = 4,
                 encoder_frozen: bool = False) -> None:
        """`encoder_frozen`: only the decoder trains, so training steps skip the decoder regulariser (its
        gradient reaches only the encoder and its own log-variance); evaluations without gradients still
        report it."""
        super().__init__()
        c = self.config = config
        if c.mapping not in MAPPINGS:
            raise ConfigError(f"unknown mapping {c.mapping!r}; use one of {MAPPINGS}")
        if (c.perceptual_weight > 0 or c.reg_perceptual_weight > 0) and lpips is None:
            raise ConfigError("perceptual_weight > 0 needs LPIPS weights (see cvvae.eval.lpips); or set it to 0")
        w = c.random_frame_weights
        if w is not None and (len(w) != t or min(w) < 0 or sum(w) <= 0):
            raise ConfigError(f"random_frame_weights needs {t} non-negative weights, not all zero; got {list(w)}")
        if c.pixel_loss not in PIXEL_LOSSES:
            raise ConfigError(f"unknown pixel_loss {c.pixel_loss!r}; use one of {PIXEL_LOSSES}")
        if c.dec_reg_weight > 0 and image_decoder is None:
            raise ConfigError("dec_reg_weight > 0 needs the frozen 2D image decoder")
        if c.enc_reg_weight > 0 and image_encoder is None:
            raise ConfigError("enc_reg_weight > 0 needs the frozen 2D image encoder")
        self.discriminator, self.t, self.encoder_frozen = discriminator, t, encoder_frozen
        # Frozen helpers stay out of the module tree: no DDP sync, no optimizer, not in checkpoints.
        self.__dict__.update(lpips=lpips, image_decoder=image_decoder, image_encoder=image_encoder)
        for name in ("logvar", "logvar_2d", "logvar_enc"):
            self.register_parameter(name, nn.Parameter(torch.tensor(c.logvar_init), requires_grad=c.learn_logvar))

    def nll(self, x: torch.Tensor, xrec: torch.Tensor, logvar: torch.Tensor, perceptual_weight: float) -> torch.Tensor:
        """sum(|x - xrec| + w LPIPS) / exp(logvar) + logvar, summed, divided by the number of frames
        (squared error instead of |x - xrec| with pixel_loss l2)."""
        rec = (x - xrec).square() if self.config.pixel_loss == "l2" else (x - xrec).abs()
        if perceptual_weight > 0:
            p = self.lpips(frames_of(x), frames_of(xrec))  # (B*T,)
            rec = rec + perceptual_weight * rearrange(p, "(b t) -> b 1 t 1 1", b=x.shape[0])
        n_frames = x.shape[0] * x.shape[2]
        return (rec / logvar.exp() + logvar).sum() / n_frames

    def generator_loss(self, model, x: torch.Tensor, step: int, *, generator: torch.Generator | None = None,
                       last_layer: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """One autoencoder step for videos (B, 3, 1+4k, H, W) (images: T = 1).

        Returns (loss, detached breakdown, reconstruction); `last_layer` (the decoder's conv_out
        weight) enables the adaptive GAN weight.
        """
        c = self.config
        posterior = DiagonalGaussian(model.encode_clip(x))  # whole clips: no inference rounds or tiles in the graph
        z = posterior.sample(generator=generator)
        xrec = model.decode_clip(z)
        nll = self.nll(x, xrec, self.logvar, c.perceptual_weight)
        kl = posterior.kl().sum() / x.shape[0]
        parts = {"nll": nll, "kl": kl, "logvar": self.logvar.detach()}
        total = nll + c.kl_weight * kl
        if c.dec_reg_weight > 0 or c.enc_reg_weight > 0:  # one draw of psi serves both regularisers
            target = psi(x, c.mapping, self.t, generator, c.random_frame_weights)
        if c.dec_reg_weight > 0 and not (self.encoder_frozen and torch.is_grad_enabled()):
            zt = z[:, :, : target.shape[2]]
            x2d = videos_of(self.image_decoder(frames_of(zt)), x.shape[0])
            parts["reg_dec"] = self.nll(target, x2d, self.logvar_2d, c.reg_perceptual_weight)
            total = total + c.dec_reg_weight * parts["reg_dec"]
        if c.enc_reg_weight > 0:
            with torch.no_grad():
                moments = self.image_encoder(frames_of(target))
            zi = DiagonalGaussian(moments).sample(generator=generator)
            zi = videos_of(zi, x.shape[0])
            xrec_enc = model.decode_clip(zi)  # covers all of x, or frame 0 only for mapping "first"
            parts["reg_enc"] = self.nll(x[:, :, : xrec_enc.shape[2]], xrec_enc, self.logvar_enc, c.perceptual_weight)
            total = total + c.enc_reg_weight * parts["reg_enc"]
        if self.discriminator is not None and step >= c.disc_start and c.disc_factor > 0:
            g = -self.discriminator(xrec).mean()
            d_weight = (adaptive_weight(nll, g, last_layer, c.disc_weight) if last_layer is not None and
                        torch.is_grad_enabled() else torch.tensor(1.0, device=x.device))
            total = total + d_weight * c.disc_factor * g
            parts.update(g=g.detach(), d_weight=d_weight)
        parts["total"] = total
        return total, {k: v.detach() for k, v in parts.items()}, xrec

    def discriminator_loss(self, x: torch.Tensor, xrec: torch.Tensor, step: int) -> tuple[torch.Tensor, dict]:
        """Hinge loss on real clips and detached reconstructions; zero before disc_start."""
        factor = self.config.disc_factor if step >= self.config.disc_start else 0.0
        real, fake = self.discriminator(x), self.discriminator(xrec.detach())
        loss = factor * hinge_d_loss(real, fake)
        return loss, {"disc": loss.detach(), "logits_real": real.mean().detach(), "logits_fake": fake.mean().detach()}
