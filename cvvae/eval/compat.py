"""Compatibility of a CV-VAE with a 2D image VAE (the paper's core claim, measured).

Four measurements, each accumulated over a dataset by :class:`Compatibility` (one per CV-VAE):

(a) image mode: CV-VAE and image VAE on the same single frames. PSNR between their two
    reconstructions (float, clamped to [0, 1], not rounded: it measures agreement, not quality),
    each one's PSNR against the frame (uint8-rounded), and the relative error of the CV-VAE latent
    mean against the image VAE's, ||mu_v - mu_i|| / ||mu_i|| per frame.
(b) cross-decoding: the CV-VAE's video latents (posterior mean) of X (1 + 4k frames), decoded frame by
    frame by the image decoder D_i, against psi(X) for each mapping (first / average / slice / random,
    see `cvvae.model.mapping`); reference: the image VAE's own reconstruction D_i(E_i(psi(X))).
(c) the image VAE's latents of psi_slice(X) (frames 0, 4, 8, ...), decoded as one video by the CV-VAE
    decoder, against X.
(d) per-channel mean and std of the CV-VAE's latents and of the image VAE's latents of the same
    frames (all latent frames of the videos vs the image VAE on the slice frames; images as they are).

Latents are unscaled on both sides (the scaling factor is reported, not applied).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from .. import codec
from ..model import CVVAE
from ..model.mapping import MAPPINGS, frames_of, psi, videos_of
from .metrics import psnr

MAPPING_SEED = 0  # the `random` mapping draws from torch.Generator().manual_seed(MAPPING_SEED + item index)


def to01(x: torch.Tensor) -> torch.Tensor:
    """Values in [-1, 1] -> [0, 1] (clamped, float32, on the CPU)."""
    return ((x.detach().float().cpu().clamp(-1, 1) + 1) / 2)


def to01_u8(x: torch.Tensor) -> torch.Tensor:
    """Values in [-1, 1] -> [0, 1] rounded to uint8 levels (what a saved frame holds)."""
    return (to01(x) * 255).round() / 255


def mean_psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean per-frame PSNR of frames (N, C, H, W) in [0, 1]."""
    return float(psnr(x, y).mean())


class ImageVAE:
    """A diffusers AutoencoderKL used frame by frame: (N, 3, H, W) in [-1, 1] <-> unscaled latent means."""

    def __init__(self, vae: Any, dtype: torch.dtype = torch.float32, batch: int = 8) -> None:
        self.vae, self.dtype, self.batch = vae, dtype, batch
        p = next(vae.parameters())
        self.device, self.weights = p.device, p.dtype

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def spatial_compression(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def _autocast(self):
        on = self.dtype != torch.float32 and self.weights == torch.float32
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=on)

    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return torch.cat([self.vae.encode(f.to(self.device, self.weights)).latent_dist.mean.float().cpu()
                              for f in frames.split(self.batch)])

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return torch.cat([self.vae.decode(c.to(self.device, self.weights)).sample.float().cpu()
                              for c in z.split(self.batch)])


@dataclass
class LatentStats:
    """Per-channel running mean/std of latents (N, C, ...) in float64."""

    total: torch.Tensor | None = None
    squares: torch.Tensor | None = None
    count: int = 0

    def update(self, z: torch.Tensor) -> None:
        z = z.detach().double().cpu().transpose(0, 1).flatten(1)  # (C, everything else)
        s, q = z.sum(1), z.pow(2).sum(1)
        self.total = s if self.total is None else self.total + s
        self.squares = q if self.squares is None else self.squares + q
        self.count += z.shape[1]

    def result(self) -> dict[str, Any]:
        if self.total is None:
            return {"values_per_channel": 0, "mean": [], "std": []}
        mean = self.total / self.count
        var = (self.squares / self.count - mean.pow(2)).clamp_min(0)
        return {"values_per_channel": self.count, "mean": mean.tolist(), "std": var.sqrt().tolist()}


def _avg(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


@dataclass
class ItemReference:
    """What the image VAE gives for one video clip, shared by every CV-VAE compared against it."""

    targets: dict[str, torch.Tensor]  # mapping -> psi(X) frames (n, 3, H, W) in [0, 1]
    reference_psnr: dict[str, float]  # mapping -> PSNR of D_i(E_i(psi(X))) vs psi(X)
    slice_latents: torch.Tensor  # E_i(psi_slice(X)) means (1 + k, z, h, w)
    frame0_recon: torch.Tensor  # D_i(E_i(X[0])) (1, 3, H, W) in [-1, 1]


def reference_for_video(image_vae: ImageVAE, x: torch.Tensor, index: int, t: int = 4) -> ItemReference:
    """The image VAE's side of (a)-(d) for a clip x (1, 3, 1 + t*k, H, W) in [-1, 1]."""
    g = torch.Generator().manual_seed(MAPPING_SEED + index)
    targets = {m: frames_of(psi(x, m, t=t, generator=g if m == "random" else None)) for m in MAPPINGS}
    sizes = [v.shape[0] for v in targets.values()]
    z = image_vae.encode(torch.cat(list(targets.values())))  # one batch: the image VAE is frame-wise
    latents = dict(zip(MAPPINGS, z.split(sizes)))
    recons = dict(zip(MAPPINGS, image_vae.decode(z).split(sizes)))
    targets = {m: to01(v) for m, v in targets.items()}
    ref = {m: mean_psnr(to01_u8(recons[m]), targets[m]) for m in MAPPINGS}
    slice_latents, frame0 = latents["slice"], recons["slice"][:1]
    return ItemReference(targets, ref, slice_latents, frame0)


@dataclass
class Compatibility:
    """Accumulates (a)-(d) for one CV-VAE against one image VAE."""

    model: CVVAE
    image_vae: ImageVAE
    dtype: str | torch.dtype = "fp32"
    image_mode: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in (
        "psnr_cvvae_vs_image_vae", "psnr_cvvae", "psnr_image_vae", "latent_rel_error")})
    cross: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m in MAPPINGS})
    cross_reference: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m in MAPPINGS})
    video_from_image_latents: list[float] = field(default_factory=list)
    own_video_psnr: list[float] = field(default_factory=list)
    stats_cvvae: LatentStats = field(default_factory=LatentStats)
    stats_image_vae: LatentStats = field(default_factory=LatentStats)

    @staticmethod
    def unsupported(model: CVVAE, image_vae: ImageVAE) -> str | None:
        """Why this pair cannot be compared, or None."""
        zc, zi = model.config.z_channels, image_vae.latent_channels
        if zc != zi:
            return f"latent channels differ (CV-VAE {zc}, image VAE {zi})"
        if model.spatial_compression_ratio != image_vae.spatial_compression:
            return (f"spatial compression differs (CV-VAE {model.spatial_compression_ratio}, "
                    f"image VAE {image_vae.spatial_compression})")
        return None

    def add_frame(self, frame: torch.Tensor, cv_mean: torch.Tensor, cv_recon: torch.Tensor,
                  vae_mean: torch.Tensor, vae_recon: torch.Tensor) -> None:
        """(a) for one frame: the frame (1, 3, H, W) in [-1, 1], latent means (1, z, h, w), reconstructions
        (1, 3, H, W) in [-1, 1] (CV-VAE in image mode, image VAE)."""
        ref = to01(frame)
        a = self.image_mode
        a["psnr_cvvae_vs_image_vae"].append(mean_psnr(to01(cv_recon), to01(vae_recon)))
        a["psnr_cvvae"].append(mean_psnr(to01_u8(cv_recon), ref))
        a["psnr_image_vae"].append(mean_psnr(to01_u8(vae_recon), ref))
        d, r = cv_mean.double().cpu(), vae_mean.double().cpu()
        a["latent_rel_error"].append(float((d - r).norm() / r.norm().clamp_min(1e-12)))

    def add_image(self, image: torch.Tensor, cv_mean: torch.Tensor, cv_recon: torch.Tensor) -> None:
        """(a) and (d) for an image item (1, 3, 1, H, W), given the CV-VAE's latents and reconstruction."""
        frame = frames_of(image)
        z = self.image_vae.encode(frame)
        self.add_frame(frame, frames_of(cv_mean), frames_of(cv_recon), z, self.image_vae.decode(z))
        self.stats_cvvae.update(cv_mean)
        self.stats_image_vae.update(z)

    def add_video(self, x: torch.Tensor, ref: ItemReference, cv_mean: torch.Tensor,
                  cv_recon: torch.Tensor) -> dict[str, float]:
        """(a)-(d) for a clip x (1, 3, 1 + 4k, H, W) in [-1, 1], given the CV-VAE's latent means (1, z, 1 + k, h, w)
        and reconstruction of it; returns the clip's cross-decoding gap per mapping."""
        model = self.model
        # (a) image mode on frame 0
        frame0 = x[:, :, :1]
        lat0 = codec.encode(model, frame0, dtype=self.dtype)
        rec0 = codec.decode(model, lat0, dtype=self.dtype)
        self.add_frame(frames_of(frame0), frames_of(lat0.mean), frames_of(rec0), ref.slice_latents[:1],
                       ref.frame0_recon)
        # (b) cross-decoding by the image decoder, against psi(X)
        cross = to01_u8(self.image_vae.decode(frames_of(cv_mean)))
        for m in MAPPINGS:
            target = ref.targets[m]
            self.cross[m].append(mean_psnr(cross[: target.shape[0]], target))
            self.cross_reference[m].append(ref.reference_psnr[m])
        # (c) image latents of the slice frames through the video decoder
        z = videos_of(ref.slice_latents, 1)
        video = codec.decode(model, z, num_frames=x.shape[2], dtype=self.dtype)
        self.video_from_image_latents.append(mean_psnr(to01_u8(frames_of(video)), to01(frames_of(x))))
        self.own_video_psnr.append(mean_psnr(to01_u8(frames_of(cv_recon)), to01(frames_of(x))))
        # (d) latent statistics on the same frames
        self.stats_cvvae.update(cv_mean)
        self.stats_image_vae.update(ref.slice_latents)
        return {m: self.cross_reference[m][-1] - self.cross[m][-1] for m in MAPPINGS}

    def _mappings(self, videos: list[int]) -> dict[str, dict[str, float | None]]:
        out = {}
        for m in MAPPINGS:
            p, r = _avg([self.cross[m][i] for i in videos]), _avg([self.cross_reference[m][i] for i in videos])
            gaps = [self.cross_reference[m][i] - self.cross[m][i] for i in videos]
            out[m] = {"psnr": p, "image_vae_psnr": r, "gap_db": None if p is None else r - p,
                      "worst_gap_db": max(gaps, default=None)}
        return out

    def result(self, groups: dict[str, list[int]]) -> dict[str, Any]:
        """Totals, with the cross-decoding gaps also over each group of videos (name -> indices in the order added,
        e.g. the videos of each motion level)."""
        a = self.image_mode
        errors = a["latent_rel_error"]
        every = list(range(len(self.cross["first"])))
        return {
            "image_mode": {"frames": len(errors), **{k: _avg(v) for k, v in a.items() if k != "latent_rel_error"},
                           "latent_rel_error_mean": _avg(errors), "latent_rel_error_max": max(errors, default=None)},
            "cross_decoding": {"videos": len(self.cross["first"]), "mappings": self._mappings(every),
                               "by_motion": {level: {"videos": len(videos), "mappings": self._mappings(videos)}
                                             for level, videos in groups.items() if videos}},
            "video_decoder_from_image_latents": {"videos": len(self.video_from_image_latents),
                                                 "psnr": _avg(self.video_from_image_latents),
                                                 "cvvae_psnr": _avg(self.own_video_psnr)},
            "latent_stats": {"cvvae": self.stats_cvvae.result(), "image_vae": self.stats_image_vae.result(),
                             "cvvae_scaling_factor": self.model.config.scaling_factor,
                             "image_vae_scaling_factor": self.image_vae.vae.config.scaling_factor},
        }


def load_image_vae(path: str, device: torch.device | str = "cpu") -> Any:
    """A diffusers AutoencoderKL from its folder, a pipeline folder holding vae/, or a hub id; frozen, in eval mode."""
    from diffusers import AutoencoderKL

    from ..errors import CheckpointError

    p = Path(path).expanduser()
    sub = "vae" if p.is_dir() and not (p / "config.json").is_file() and (p / "vae" / "config.json").is_file() \
        else None
    if not p.exists() and (p.is_absolute() or str(path).startswith(".")):
        raise CheckpointError(f"image VAE not found: {p}")
    try:
        vae = AutoencoderKL.from_pretrained(str(p) if p.exists() else path, subfolder=sub)
    except Exception as e:  # noqa: BLE001 - diffusers raises many types for a bad folder
        raise CheckpointError(f"cannot load the image VAE {path}: {type(e).__name__}: {e}".splitlines()[0]) from None
    return vae.to(device).requires_grad_(False).eval()
