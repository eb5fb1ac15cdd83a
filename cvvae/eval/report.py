"""Evaluation harness: the paper's reconstruction protocol, compatibility with a 2D image VAE, a report.

    metrics = evaluate([("cvvae", model)], "webvid_val/", "coco_val/", image_vae=sd_vae, lpips=LPIPS(vgg16))
    write_report(metrics, "report/")   # metrics.json, report.md, report.html, per_frame_psnr.png, strips/

Protocol (Table 1 of the paper, deterministic): every video is resized so that its short side is
`size` (swscale, area filter when shrinking) and centre-cropped to `size` x `size`; the clip is
frames 0, stride, 2*stride, ... (`frames` of them). Images: same resize and crop, one frame. Files
that are unreadable or too short are skipped and listed. Latents are the posterior mean; every
metric against the input uses the reconstruction clamped to [-1, 1] and rounded to uint8.

FVD (optional) uses a user-supplied I3D TorchScript file (StyleGAN-V's `i3d_torchscript.pt`, a port of
the tf.hub Kinetics-400 I3D used by the original FVD); it is never downloaded. Calling convention,
as in universome/fvd-comparison `compare_metrics.py`: `detector(x, rescale=False, resize=False,
return_features=True)` with x float32 (N, 3, T, 224, 224) in [-1, 1] -> (N, 400) logits before the
softmax. We resize each uint8-rounded frame to 224 x 224 ourselves (bilinear, no antialiasing) and
map [0, 255] -> [-1, 1] as the original TF `preprocess` does.

This module requires matplotlib for `write_report` (the `eval` extra).
"""

from __future__ import annotations

import argparse
import html
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .. import __version__, codec
from ..data import ClipSpec, list_items, read_clip
from ..errors import CheckpointError, InputError
from ..io.files import ordinary_mode
from ..model import CVVAE
from ..model.chunking import encode_step
from ..model.frames import padded_frames
from ..train.losses import MAPPINGS
from .compat import MAPPING_SEED, Compatibility, ImageVAE, frames_of, reference_for_video, to01, to01_u8
from .metrics import PSNR_CAP, psnr, ssim

Source = str | os.PathLike | Sequence[Any]
NA = "n/a"
STRIP_ITEMS = 3  # strips for the first items of each kind
STRIP_FRAMES = 4  # frames per strip
I3D_SIZE = 224

DEFINITIONS = {
    "psnr": f"10 log10(1 / MSE) per frame over all pixels and channels in [0, 1] (reconstruction rounded to uint8), "
            f"capped at {PSNR_CAP:g} dB, averaged over the frames of an item, then over items.",
    "ssim": "Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, data range 1, valid filtering, "
            "per channel then averaged (= scikit-image structural_similarity(gaussian_weights=True, sigma=1.5, "
            "use_sample_covariance=False, data_range=1)); per frame, averaged as PSNR.",
    "lpips": "LPIPS-VGG v0.1 (Zhang et al. 2018; = lpips.LPIPS(net='vgg', version='0.1')) per frame on [-1, 1], "
             "averaged as PSNR; n/a without ImageNet VGG16 weights.",
    "fvd": "Frechet distance ||mu_r - mu_g||^2 + tr(S_r + S_g - 2 (S_r S_g)^(1/2)) between I3D (Kinetics-400) "
           "features of the input clips and of their reconstructions (covariances with N - 1; one clip per video). "
           "Biased for few clips (the paper's protocols use 1024-2048); n/a without --fvd-i3d.",
    "per_frame_psnr": "PSNR of frame t averaged over videos. Chunk boundaries: frame f where a new temporal round "
                      "of the official chunked encode/decode starts (f is shared, frames f+1.. come from the next "
                      "round); multiples of config.en_de_n_frames_a_time.",
    "image_mode": "(a) single frames (images, and frame 0 of each video) through the CV-VAE in image mode and "
                  "through the image VAE: PSNR between the two reconstructions (float, not rounded), each one's "
                  "PSNR vs the frame, relative error ||mu_cv - mu_2d|| / ||mu_2d|| of the latent means.",
    "cross_decoding": "(b) CV-VAE video latents (mean) decoded frame by frame by the image decoder, PSNR vs psi(X) "
                      "for each mapping psi (first: frame 0; average: frame 0 + the mean of each group of 4; slice: "
                      "frames 0, 4, 8, ...; random: frame 0 + one frame per group of 4, torch generator seeded "
                      f"{MAPPING_SEED} + item index). Reference: the image VAE's own reconstruction of psi(X); "
                      "gap = reference - cross-decoding PSNR.",
    "video_decoder_from_image_latents": "(c) image-VAE latents (mean) of psi_slice(X) decoded as one video by the "
                                        "CV-VAE decoder, PSNR vs X (next to the CV-VAE's own reconstruction PSNR).",
    "latent_stats": "(d) per latent channel mean and std (unscaled) of the CV-VAE's latents (all latent frames of "
                    "the videos; images) and of the image VAE's latents of the same frames (slice frames 0, 4, 8, ... "
                    "of the videos; images).",
}


# ------------------------------------------------------------------------------------------ Frechet distance
def _trace_sqrt_product(s1: np.ndarray, s2: np.ndarray, method: str) -> float:
    """tr((s1 s2)^(1/2)) of two covariance matrices."""
    if method == "auto":
        try:
            import scipy.linalg  # noqa: F401

            method = "scipy"
        except ImportError:
            method = "eigh"
    if method == "scipy":
        import scipy.linalg

        def sqrtm(a: np.ndarray) -> np.ndarray:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # `disp` is deprecated from SciPy 1.16; singular-matrix notes
                try:
                    out = scipy.linalg.sqrtm(a, disp=False)
                except TypeError:  # SciPy >= 1.18 has no `disp`
                    out = scipy.linalg.sqrtm(a)
            return out[0] if isinstance(out, tuple) else out

        covmean = sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():  # singular product: offset the diagonals (as pytorch-fid does)
            offset = np.eye(s1.shape[0]) * 1e-6
            covmean = sqrtm((s1 + offset) @ (s2 + offset))
        return float(np.real(np.trace(covmean)))
    if method == "eigh":
        a, b = torch.as_tensor(s1, dtype=torch.float64), torch.as_tensor(s2, dtype=torch.float64)
        w, v = torch.linalg.eigh((a + a.T) / 2)
        root = v @ torch.diag(w.clamp_min(0).sqrt()) @ v.T
        m = root @ b @ root  # similar to s1 s2 for PSD s1, s2, and symmetric: its eigenvalues are real
        return float(torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum())
    raise ValueError(f"method must be 'auto', 'scipy' or 'eigh', got {method!r}")


def frechet_distance_from_stats(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                                method: str = "auto") -> float:
    """||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), the Frechet (W2^2) distance of two
    Gaussians. `method`: "scipy" (scipy.linalg.sqrtm), "eigh" (torch, symmetric eigendecompositions) or
    "auto" (scipy when installed)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1 - mu2
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * _trace_sqrt_product(s1, s2, method))


def frechet_distance(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, method: str = "auto") -> float:
    """Frechet distance between feature sets a (N, D) and b (M, D) (N, M >= 2; covariances with N - 1)."""
    a, b = (np.asarray(torch.as_tensor(t).double().cpu()) for t in (a, b))
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise InputError(f"need two feature sets (N >= 2, D) of equal D, got {a.shape} and {b.shape}")
    return frechet_distance_from_stats(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False), method)


def load_i3d(path: str | os.PathLike, device: torch.device | str = "cpu") -> torch.jit.ScriptModule:
    """The user's I3D TorchScript file (e.g. StyleGAN-V's i3d_torchscript.pt); never downloaded."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"I3D TorchScript file not found: {path} (FVD needs a local i3d_torchscript.pt)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch >= 2.10 deprecates TorchScript
            return torch.jit.load(str(path), map_location="cpu").eval().to(device)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's checkpoint problem
        raise CheckpointError(f"cannot load the I3D TorchScript file {path}: {type(e).__name__}: {e}"
                              .splitlines()[0]) from None


@torch.no_grad()
def i3d_features(detector: torch.nn.Module, frames01: torch.Tensor) -> torch.Tensor:
    """I3D features (1, D) of one clip given as frames (T, 3, H, W) in [0, 1] (see the module docstring)."""
    x = F.interpolate(frames01.float() * 255, size=(I3D_SIZE, I3D_SIZE), mode="bilinear", align_corners=False)
    x = (2 * x / 255 - 1).clamp(-1, 1).permute(1, 0, 2, 3).unsqueeze(0)  # (1, 3, T, 224, 224)
    device = next(iter(detector.parameters()), torch.empty(0)).device
    try:
        out = detector(x.to(device), rescale=False, resize=False, return_features=True)
    except Exception as e:  # noqa: BLE001 - a foreign TorchScript file fails in its own ways
        raise CheckpointError(f"the I3D detector failed on a clip {tuple(x.shape)}: {type(e).__name__}: {e}"
                              .splitlines()[0]) from None
    return out.detach().float().cpu().reshape(1, -1)


# ------------------------------------------------------------------------------------------ evaluation
class _Totals:
    """Running per-model reconstruction results for one kind of item."""

    def __init__(self) -> None:
        self.psnr: list[float] = []
        self.ssim: list[float] = []
        self.lpips: list[float] = []
        self.curve: torch.Tensor | None = None
        self.first: list[float] = []
        self.later: list[float] = []
        self.features: list[torch.Tensor] = []
        self.seconds = 0.0

    def add(self, p: torch.Tensor, s: torch.Tensor, lp: torch.Tensor | None, video: bool) -> None:
        self.psnr.append(float(p.mean()))
        self.ssim.append(float(s.mean()))
        if lp is not None:
            self.lpips.append(float(lp.mean()))
        if video:
            self.curve = p.double() if self.curve is None else self.curve + p.double()
            self.first.append(float(p[0]))
            self.later.extend([float(p[1:].mean())] if p.numel() > 1 else [])

    def result(self, video: bool) -> dict[str, Any]:
        out: dict[str, Any] = {"count": len(self.psnr), "psnr": _mean(self.psnr), "ssim": _mean(self.ssim),
                               "lpips": _mean(self.lpips) if self.lpips else NA}
        if video:
            out.update(psnr_first_frame=_mean(self.first), psnr_later_frames=_mean(self.later))
        return out


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _unique(name: str, taken: set[str], sep: str = "#") -> str:
    out, n = name, 2
    while out in taken:
        out, n = f"{name}{sep}{n}", n + 1
    taken.add(out)
    return out


def _name_of(path: str, taken: set[str]) -> str:
    return _unique(Path(path).name, taken)


def chunk_boundaries(model: CVVAE, frames: int) -> list[int]:
    """Frames where the official chunked encode/decode of a `frames`-frame clip starts a new round."""
    step = encode_step(model)
    if not step or frames <= 1:
        return []
    return list(range(step, padded_frames(frames, model.temporal_compression_ratio) - 1, step))


def _lpips(metric: torch.nn.Module, a01: torch.Tensor, b01: torch.Tensor, batch: int = 16) -> torch.Tensor:
    device = next(metric.buffers()).device
    with torch.no_grad():
        return torch.cat([metric(x.to(device) * 2 - 1, y.to(device) * 2 - 1).float().cpu()
                          for x, y in zip(a01.split(batch), b01.split(batch))])


def _strip(rows: list[torch.Tensor], frames: list[int], gap: int = 2) -> np.ndarray:
    """uint8 (H, W, 3) grid: one row per video (T, 3, H, W) in [0, 1], columns = `frames`, white gaps."""
    h, w = rows[0].shape[-2:]
    grid = np.full((len(rows) * (h + gap) - gap, len(frames) * (w + gap) - gap, 3), 255, np.uint8)
    for i, video in enumerate(rows):
        for j, f in enumerate(frames):
            pixels = (video[f].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            grid[i * (h + gap): i * (h + gap) + h, j * (w + gap): j * (w + gap) + w] = pixels
    return grid


def _read(item: dict[str, Any], spec: ClipSpec, kind: str) -> tuple[dict[str, Any] | None, dict[str, str] | None]:
    try:
        return read_clip(item, spec, rng=0), None
    except InputError as e:  # ClipError carries a reason; other input errors mean "unreadable"
        reason, detail = getattr(e, "reason", "unreadable"), getattr(e, "detail", str(e))
    except Exception as e:  # noqa: BLE001 - one bad file must not end a long evaluation
        reason, detail = "error", f"{type(e).__name__}: {e}".splitlines()[0]
    return None, {"path": str(item["path"]), "kind": kind, "reason": reason, "detail": detail}


def evaluate(weights: list[tuple[str, CVVAE]], videos: Source | None, images: Source | None = None, *,
             frames: int = 33, stride: int = 3, size: int = 256, image_vae: Any | None = None,
             max_items: int | None = None, lpips: torch.nn.Module | None = None,
             fvd_i3d: str | os.PathLike | None = None, dtype: str = "fp32", progress: bool = True) -> dict[str, Any]:
    """Reconstruction metrics (PSNR/SSIM/LPIPS/FVD, per-frame PSNR) of each named CV-VAE on the videos and
    images of the given sources (folders, CSV/JSONL manifests, files; see `cvvae.data.list_items`) and,
    with `image_vae` (a diffusers AutoencoderKL), its compatibility with that image VAE (`compat.py`).

    `max_items`: at most this many evaluated (readable) items of each kind, in listing order. Returns a
    JSON-ready dict (see `write_report`), except `strips[*]["image"]`, uint8 arrays for the report.
    """
    t_start = time.perf_counter()
    if not weights or not all(isinstance(n, str) and isinstance(m, CVVAE) for n, m in weights):
        raise InputError("weights must be a non-empty list of (name, CVVAE) pairs")
    names = [n for n, _ in weights]
    if len(set(names)) != len(names):
        raise InputError(f"weight-set names must be unique, got {names}")
    if videos is None and images is None:
        raise InputError("nothing to evaluate: give videos and/or images")
    if size < 16:
        raise InputError(f"size must be at least 16 px (SSIM uses an 11x11 window), got {size}")
    if max_items is not None and max_items < 1:
        raise InputError(f"max_items must be >= 1, got {max_items}")
    try:
        specs = {"videos": ClipSpec(frames, stride=stride, short_side=size, crop=size, random_crop=False,
                                    random_start=False),
                 "images": ClipSpec(1, stride=1, short_side=size, crop=size, random_crop=False, random_start=False)}
    except ValueError as e:
        raise InputError(str(e)) from None
    sources = {"videos": videos, "images": images}
    listed = {kind: list_items(src, kind=kind[:-1]) if src is not None else [] for kind, src in sources.items()}
    device = next(weights[0][1].parameters()).device
    compute_dtype = codec.resolve_dtype(dtype, device)
    detector = load_i3d(fvd_i3d, device) if fvd_i3d is not None else None
    vae = ImageVAE(image_vae.eval(), compute_dtype) if image_vae is not None else None
    compat: dict[str, Compatibility | str] = {}
    if vae is not None:
        for name, model in weights:
            why = Compatibility.unsupported(model, vae)
            compat[name] = why or Compatibility(model, vae, compute_dtype)

    totals = {kind: {name: _Totals() for name in names} for kind in sources}
    real_features: list[torch.Tensor] = []
    items: dict[str, list[dict[str, Any]]] = {"videos": [], "images": []}
    skipped: list[dict[str, str]] = []
    strips: dict[str, dict[str, Any]] = {}
    taken: set[str] = set()

    from tqdm import tqdm

    for kind, spec in specs.items():
        todo = listed[kind]
        bar = tqdm(total=min(len(todo), max_items or len(todo)), desc=f"eval {kind}", unit=kind[:-1],
                   disable=not progress or not todo, file=sys.stderr, dynamic_ncols=True)
        for index, item in enumerate(todo):
            if max_items is not None and len(items[kind]) >= max_items:
                break
            sample, skip = _read(item, spec, kind)
            if sample is not None and kind == "videos" and sample["stride"] != stride:  # read_clip shrank it to fit
                skip = {"path": str(item["path"]), "kind": kind, "reason": "too short",
                        "detail": f"{frames} frames at stride {stride} need {stride * (frames - 1) + 1} frames; "
                                  f"only stride {sample['stride']} fits"}
            if skip is not None:
                skipped.append(skip)
                bar.total += 1 if bar.total < len(todo) else 0
                bar.update(1)
                continue
            x = sample["video"].unsqueeze(0)  # (1, 3, T, H, W) in [-1, 1], exactly the uint8 frames
            ref = to01(frames_of(x))
            record: dict[str, Any] = {"name": _name_of(sample["path"], taken), "path": sample["path"],
                                      "frames": x.shape[2], "start": sample["start"], "stride": sample["stride"],
                                      "fps": sample["fps"], "orig_size": list(sample["orig_size"]),
                                      "crop": list(sample["crop"]), "models": {}}
            video = kind == "videos"
            if video and detector is not None:
                real_features.append(i3d_features(detector, ref))
            reference = reference_for_video(vae, x, index) if video and vae is not None else None
            recons = []
            for name, model in weights:
                t0 = time.perf_counter()
                latents = codec.encode(model, x, dtype=compute_dtype)
                recon = codec.decode(model, latents, dtype=compute_dtype).float().cpu()
                totals[kind][name].seconds += time.perf_counter() - t0
                out = to01_u8(frames_of(recon))
                recons.append(out)
                p, s = psnr(out, ref), ssim(out, ref)
                lp = _lpips(lpips, out, ref) if lpips is not None else None
                totals[kind][name].add(p, s, lp, video)
                row = {"psnr": float(p.mean()), "ssim": float(s.mean()),
                       "lpips": float(lp.mean()) if lp is not None else NA}
                if video:
                    row["psnr_per_frame"] = p.tolist()
                    if detector is not None:
                        totals[kind][name].features.append(i3d_features(detector, out))
                record["models"][name] = row
                c = compat.get(name)
                if isinstance(c, Compatibility):
                    mean = latents.mean.float().cpu()
                    if video:
                        c.add_video(x, reference, mean, recon)
                    else:
                        c.add_image(x, mean, recon)
            items[kind].append(record)
            if len(items[kind]) <= STRIP_ITEMS:
                T = x.shape[2]
                cols = sorted({int(round(f)) for f in np.linspace(0, T - 1, min(T, STRIP_FRAMES))})
                strips[record["name"]] = {"kind": kind, "frames": cols, "rows": ["input", *names],
                                          "image": _strip([ref, *recons], cols)}
            bar.update(1)
        bar.close()

    evaluated = sum(len(v) for v in items.values())
    if evaluated == 0:
        first = f"; first: {skipped[0]['path']}: {skipped[0]['reason']}" if skipped else ""
        raise InputError(f"no item could be evaluated ({len(skipped)} skipped{first})")

    reconstruction: dict[str, dict[str, Any]] = {}
    for name in names:
        v, i = totals["videos"][name], totals["images"][name]
        rv = v.result(video=True)
        if detector is None:
            rv["fvd"] = NA
        elif len(real_features) < 2:
            rv["fvd"] = f"{NA} (needs at least 2 videos, got {len(real_features)})"
        else:
            rv["fvd"] = frechet_distance(torch.cat(real_features), torch.cat(v.features))
        reconstruction[name] = {"videos": rv, "images": i.result(video=False)}

    models = {}
    for name, model in weights:
        cfg = model.config
        models[name] = {"latent_channels": cfg.z_channels, "parameters": sum(p.numel() for p in model.parameters()),
                        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
                        "scaling_factor": cfg.scaling_factor, "en_de_n_frames_a_time": cfg.en_de_n_frames_a_time,
                        "chunk_mode": model.chunk_mode, "tiling": bool(model.use_tiling),
                        "tile_spatial_size": cfg.tile_spatial_size,
                        "chunk_boundaries": chunk_boundaries(model, frames)}

    curves = {}
    for name in names:
        v = totals["videos"][name]
        curves[name] = (v.curve / len(v.first)).tolist() if v.curve is not None else []

    compatibility: dict[str, Any] | str = NA
    if vae is not None:
        compatibility = {name: (c.result() if isinstance(c, Compatibility) else f"{NA} ({c})")
                         for name, c in compat.items()}

    def source_info(kind: str) -> dict[str, Any]:
        src = sources[kind]
        return {"source": None if src is None else (str(src) if isinstance(src, (str, os.PathLike)) else
                                                      [str(s) for s in src]),
                "listed": len(listed[kind]), "evaluated": len(items[kind]),
                "skipped": sum(s["kind"] == kind for s in skipped)}

    protocol = {
        "videos": {**source_info("videos"), "frames": frames, "stride": stride, "start_frame": 0,
                   "resize": f"short side to {size} px (swscale, area filter when shrinking)",
                   "crop": f"centre {size}x{size}"},
        "images": {**source_info("images"), "frames": 1, "resize": f"short side to {size} px", "crop":
                   f"centre {size}x{size}"},
        "max_items": max_items,
        "latents": "posterior mean (codec.encode / codec.decode, official chunking and tiling)",
        "pixels": "inputs are the decoded uint8 frames; reconstructions are clamped to [-1, 1] and rounded to uint8 "
                  "before every metric against the input",
        "dtype": str(compute_dtype).replace("torch.", ""),
        "lpips": "LPIPS-VGG v0.1" if lpips is not None else NA,
        "fvd": ({"i3d": str(fvd_i3d), "call": "detector(x, rescale=False, resize=False, return_features=True)",
                 "input": f"float32 (N, 3, T, {I3D_SIZE}, {I3D_SIZE}) in [-1, 1]: uint8 frames resized bilinearly "
                          f"(no antialiasing), then 2 x / 255 - 1", "clips": len(real_features),
                 "feature_dim": int(real_features[0].shape[1]) if real_features else None}
                if detector is not None else NA),
        "image_vae": ({"latent_channels": vae.latent_channels, "scaling_factor": vae.vae.config.scaling_factor,
                       "mapping_seed": MAPPING_SEED, "mappings": list(MAPPINGS)} if vae is not None else NA),
    }
    return {
        "format": "cvvae-eval/1",
        "cvvae_version": __version__,
        "protocol": protocol,
        "definitions": DEFINITIONS,
        "models": models,
        "reconstruction": reconstruction,
        "per_frame_psnr": curves,
        "compatibility": compatibility,
        "items": items,
        "skipped": skipped,
        "strips": strips,
        "timing": {"seconds": time.perf_counter() - t_start, "torch": torch.__version__, "device": str(device),
                   "encode_decode_seconds": {n: totals["videos"][n].seconds + totals["images"][n].seconds
                                             for n in names}},
    }


# ------------------------------------------------------------------------------------------ report
def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.2e}" if digits < 0 else f"{v:.{digits}f}"
    return str(v)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items() if not isinstance(v, np.ndarray)}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9-]+", "_", name).strip("_") or "item"


Block = tuple  # ("h", level, text) | ("p", text) | ("ul", [text]) | ("table", headers, rows) | ("img", src, alt)


def _blocks(m: dict[str, Any], strip_files: dict[str, str], plot: str | None) -> list[Block]:
    p, names = m["protocol"], list(m["models"])
    b: list[Block] = [("h", 1, "CV-VAE evaluation report")]
    pv, pi = p["videos"], p["images"]
    b += [("h", 2, "Protocol"), ("ul", [
        f"Videos: {pv['source']} - {pv['evaluated']} evaluated, {pv['skipped']} skipped of {pv['listed']} listed; "
        f"{pv['frames']} frames from frame {pv['start_frame']} with stride {pv['stride']}; {pv['resize']}; "
        f"{pv['crop']} crop.",
        f"Images: {pi['source']} - {pi['evaluated']} evaluated, {pi['skipped']} skipped of {pi['listed']} listed; "
        f"{pi['resize']}; {pi['crop']} crop.",
        f"At most {p['max_items']} items of each kind." if p["max_items"] else "All items.",
        f"Latents: {p['latents']}; compute dtype {p['dtype']}.",
        f"Pixels: {p['pixels']}.",
        "FVD: " + (p["fvd"] if isinstance(p["fvd"], str) else
                   f"I3D {p['fvd']['i3d']} called as {p['fvd']['call']}; input {p['fvd']['input']}; "
                   f"{p['fvd']['clips']} clips, {p['fvd']['feature_dim']}-d features."),
        f"cvvae {m['cvvae_version']}, torch {m['timing']['torch']}, device {m['timing']['device']}, "
        f"{m['timing']['seconds']:.1f} s.",
    ])]
    b += [("h", 2, "Reconstruction"), ("table",
          ["model", "videos", "PSNR", "SSIM", "LPIPS", "FVD", "PSNR frame 0", "PSNR frames 1+", "images",
           "PSNR", "SSIM", "LPIPS"],
          [[n, _fmt(r["videos"]["count"]), _fmt(r["videos"]["psnr"]), _fmt(r["videos"]["ssim"], 4),
            _fmt(r["videos"]["lpips"], 4), _fmt(r["videos"]["fvd"]), _fmt(r["videos"]["psnr_first_frame"]),
            _fmt(r["videos"]["psnr_later_frames"]), _fmt(r["images"]["count"]), _fmt(r["images"]["psnr"]),
            _fmt(r["images"]["ssim"], 4), _fmt(r["images"]["lpips"], 4)] for n, r in m["reconstruction"].items()]),
          ("table", ["model", "latent channels", "parameters", "dtype", "scaling factor", "frames per round",
                     "chunk boundaries (frame)"],
           [[n, _fmt(i["latent_channels"]), f"{i['parameters']:,}", i["dtype"], _fmt(i["scaling_factor"], 5),
             _fmt(i["en_de_n_frames_a_time"]), ", ".join(map(str, i["chunk_boundaries"])) or "none"]
            for n, i in m["models"].items()])]
    if plot:
        b += [("h", 2, "Per-frame PSNR"), ("img", plot, "per-frame PSNR"),
              ("p", "Dashed lines: chunk boundaries. " + DEFINITIONS["per_frame_psnr"])]
    c = m["compatibility"]
    b += [("h", 2, "Compatibility with the image VAE")]
    if isinstance(c, str):
        b += [("p", f"{c}: no image VAE given (--image-vae).")]
    else:
        ok = {n: r for n, r in c.items() if isinstance(r, dict)}
        b += [("p", f"{n}: {r}") for n, r in c.items() if isinstance(r, str)]
        if ok:
            b += [("h", 3, "(a) Image mode"), ("table",
                  ["model", "frames", "PSNR CV-VAE vs image VAE", "PSNR CV-VAE", "PSNR image VAE",
                   "latent rel. error (mean)", "latent rel. error (max)"],
                  [[n, _fmt(a["frames"]), _fmt(a["psnr_cvvae_vs_image_vae"]), _fmt(a["psnr_cvvae"]),
                    _fmt(a["psnr_image_vae"]), _fmt(a["latent_rel_error_mean"], -1),
                    _fmt(a["latent_rel_error_max"], -1)] for n, a in ((n, r["image_mode"]) for n, r in ok.items())]),
                  ("h", 3, "(b) Cross-decoding: CV-VAE latents -> image decoder, vs psi(X)"), ("table",
                  ["model", "mapping", "videos", "PSNR", "image VAE PSNR", "gap (dB)"],
                  [[n, mp, _fmt(r["cross_decoding"]["videos"]), _fmt(v["psnr"]), _fmt(v["image_vae_psnr"]),
                    _fmt(v["gap_db"])] for n, r in ok.items() for mp, v in r["cross_decoding"]["mappings"].items()]),
                  ("h", 3, "(c) Image-VAE latents of psi_slice(X) -> CV-VAE decoder, vs X"), ("table",
                  ["model", "videos", "PSNR", "CV-VAE's own PSNR"],
                  [[n, _fmt(v["videos"]), _fmt(v["psnr"]), _fmt(v["cvvae_psnr"])]
                   for n, v in ((n, r["video_decoder_from_image_latents"]) for n, r in ok.items())])]
            b += [("h", 3, "(d) Per-channel latent statistics (unscaled)")]
            for n, r in ok.items():
                s = r["latent_stats"]
                cv, iv = s["cvvae"], s["image_vae"]
                b += [("p", f"{n}: {cv['values_per_channel']:,} values per channel; scaling factors CV-VAE "
                            f"{s['cvvae_scaling_factor']}, image VAE {s['image_vae_scaling_factor']}."),
                      ("table", ["channel", "CV-VAE mean", "CV-VAE std", "image VAE mean", "image VAE std"],
                       [[str(k), _fmt(cv["mean"][k], 4), _fmt(cv["std"][k], 4), _fmt(iv["mean"][k], 4),
                         _fmt(iv["std"][k], 4)] for k in range(len(cv["mean"]))])]
    for kind in ("videos", "images"):
        rows = m["items"][kind]
        if rows:
            b += [("h", 2, f"Per item: {kind}"), ("table", ["item", *[f"{n} {k}" for n in names
                                                                     for k in ("PSNR", "SSIM", "LPIPS")]],
                  [[it["name"], *[_fmt(it["models"][n][k], 2 if k == "psnr" else 4) for n in names
                                  for k in ("psnr", "ssim", "lpips")]] for it in rows])]
    b += [("h", 2, "Skipped items")]
    b += [("table", ["path", "kind", "reason", "detail"], [[s["path"], s["kind"], s["reason"], s["detail"]]
                                                          for s in m["skipped"]])] if m["skipped"] else [("p", "None.")]
    if strip_files:
        b += [("h", 2, "Frame strips")]
        for name, file in strip_files.items():
            s = m["strips"][name]
            b += [("p", f"{name}: rows {', '.join(s['rows'])}; frames {', '.join(map(str, s['frames']))}."),
                  ("img", file, name)]
    b += [("h", 2, "Definitions"), ("ul", [f"{k}: {v}" for k, v in m["definitions"].items()])]
    return b


def _markdown(blocks: list[Block]) -> str:
    def cell(s: str) -> str:
        return str(s).replace("|", "\\|").replace("\n", " ")

    out = []
    for blk in blocks:
        if blk[0] == "h":
            out.append(f"{'#' * blk[1]} {blk[2]}")
        elif blk[0] == "p":
            out.append(blk[1])
        elif blk[0] == "ul":
            out.append("\n".join(f"- {x}" for x in blk[1]))
        elif blk[0] == "table":
            lines = ["| " + " | ".join(map(cell, blk[1])) + " |", "|" + "---|" * len(blk[1])]
            lines += ["| " + " | ".join(map(cell, r)) + " |" for r in blk[2]]
            out.append("\n".join(lines))
        elif blk[0] == "img":
            out.append(f"![{blk[2]}]({blk[1]})")
    return "\n\n".join(out) + "\n"


def _html(blocks: list[Block]) -> str:
    e = html.escape
    body = []
    for blk in blocks:
        if blk[0] == "h":
            body.append(f"<h{blk[1]}>{e(blk[2])}</h{blk[1]}>")
        elif blk[0] == "p":
            body.append(f"<p>{e(blk[1])}</p>")
        elif blk[0] == "ul":
            body.append("<ul>" + "".join(f"<li>{e(x)}</li>" for x in blk[1]) + "</ul>")
        elif blk[0] == "table":
            head = "".join(f"<th>{e(str(h))}</th>" for h in blk[1])
            rows = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in blk[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif blk[0] == "img":
            body.append(f'<p><img src="{e(blk[1])}" alt="{e(blk[2])}"></p>')
    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
             "text-align:right}td:first-child,th:first-child{text-align:left}img{max-width:100%;"
             "image-rendering:pixelated}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>CV-VAE evaluation report</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def _plot(m: dict[str, Any], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    bounds = {n: tuple(i["chunk_boundaries"]) for n, i in m["models"].items()}
    same = len(set(bounds.values())) == 1
    for name, curve in m["per_frame_psnr"].items():
        if not curve:
            continue
        (line,) = ax.plot(range(len(curve)), curve, marker="o", markersize=3, label=name)
        if not same:
            for k, f in enumerate(bounds[name]):
                ax.axvline(f, linestyle="--", linewidth=1, color=line.get_color(),
                           label=f"{name}: chunk boundary" if k == 0 else None)
    if same:
        for k, f in enumerate(next(iter(bounds.values()))):
            ax.axvline(f, linestyle="--", linewidth=1, color="gray", label="chunk boundary" if k == 0 else None)
    ax.set_xlabel("frame")
    ax.set_ylabel("PSNR (dB)")
    ax.set_title("Per-frame PSNR, averaged over videos")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def write_report(metrics: dict[str, Any], out_dir: str | os.PathLike) -> Path:
    """Write metrics.json, report.md, report.html (same content), per_frame_psnr.png (when there are videos)
    and strips/<item>.png into `out_dir`, built in a temporary folder next to it and renamed when complete
    (an existing folder is replaced). Returns the folder."""
    out = Path(out_dir).expanduser()
    if not out.parent.is_dir():
        raise InputError(f"output folder does not exist: {out.parent}")
    if out.exists() and not out.is_dir():
        raise InputError(f"output {out} exists and is not a folder")
    import matplotlib.image

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        os.chmod(tmp, ordinary_mode(folder=True))  # mkdtemp makes it private
        strip_files: dict[str, str] = {}
        used: set[str] = set()
        for name, s in metrics.get("strips", {}).items():
            if isinstance(s.get("image"), np.ndarray):
                file = f"strips/{_unique(_file_name(name), used, '-')}.png"
                (tmp / "strips").mkdir(exist_ok=True)
                matplotlib.image.imsave(tmp / file, s["image"])
                strip_files[name] = file
            elif s.get("file"):
                strip_files[name] = s["file"]
        plot = None
        if any(metrics["per_frame_psnr"].values()):
            plot = "per_frame_psnr.png"
            _plot(metrics, tmp / plot)
        data = _jsonable(metrics)
        for name, file in strip_files.items():
            data["strips"][name]["file"] = file
        (tmp / "metrics.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        blocks = _blocks(data, strip_files, plot)
        (tmp / "report.md").write_text(_markdown(blocks), encoding="utf-8")
        (tmp / "report.html").write_text(_html(blocks), encoding="utf-8")
        if out.exists():
            old = out.with_name(f".{out.name}.{os.getpid()}.old")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ------------------------------------------------------------------------------------------ CLI
class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the uninformative None/False ones (as `cvvae.cli`)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False) or "%(default)" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def add_parser(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """Add `cvvae eval` to a subparsers object. `parents` may give -q/--json (read with getattr); they
    must not define --weights, --subfolder or --dtype."""
    p = sub.add_parser(
        "eval", parents=parents, formatter_class=_Help,
        help="evaluate reconstruction (PSNR/SSIM/LPIPS/FVD) and 2D-VAE compatibility; write a report",
        description="Evaluate one or more CV-VAEs with the paper's protocol (Table 1: 256x256 centre crops, 33 "
                    "frames with stride 3) on videos and images, optionally against a 2D image VAE (image mode, "
                    "cross-decoding per mapping function, latent statistics), and write metrics.json, report.md, "
                    "report.html, per_frame_psnr.png and frame strips to a folder.")
    arg = p.add_argument
    arg("--weights", action="append", required=True, metavar="W",
        help="CV-VAE folder, weights file or hub id; repeat to compare several models in one report")
    arg("--subfolder", action="append", metavar="S",
        help="subfolder of --weights (e.g. vae3d); once for all, or once per --weights in order")
    arg("--name", action="append", metavar="NAME", help="report name of each --weights (default: its folder name)")
    arg("--videos", metavar="DIR_OR_CSV", help="folder, CSV/JSONL manifest (column 'path') or video file")
    arg("--images", metavar="DIR_OR_CSV", help="folder, CSV/JSONL manifest or image file (e.g. COCO val)")
    arg("--frames", type=int, metavar="N", default=33, help="frames per clip, 1 + 4k")
    arg("--stride", type=int, metavar="N", default=3, help="frame stride of the clip (shorter videos are skipped)")
    arg("--size", type=int, metavar="PX", default=256, help="short-side resize, then centre crop to PX x PX")
    arg("--image-vae", metavar="DIR", help="2D image VAE to compare with: a diffusers AutoencoderKL folder (or a "
                                           "pipeline folder with vae/), e.g. stable-diffusion-2-1/vae")
    arg("--lpips-vgg16", metavar="PATH", help="torchvision vgg16-397923af.pth (or safetensors) for LPIPS; default: "
                                              "CVVAE_VGG16 or torch.hub's cache, else LPIPS is n/a (never downloaded)")
    arg("--fvd-i3d", metavar="PATH", help="I3D TorchScript file for FVD (StyleGAN-V's i3d_torchscript.pt); "
                                          "FVD is n/a without it (never downloaded)")
    arg("--max-items", type=int, metavar="N", help="evaluate at most N readable items of each kind")
    arg("--dtype", default="fp32", choices=["auto", "fp32", "bf16", "fp16"],
        help="compute precision (the paper evaluates in fp32)")
    arg("--device", help="cpu or cuda (default: cuda when available)")
    arg("-o", "--output", required=True, metavar="DIR", help="report folder (replaced if it exists)")
    p.set_defaults(func=run)


def _load_image_vae(path: str, device: str) -> Any:
    from diffusers import AutoencoderKL

    p = Path(path).expanduser()
    sub = "vae" if p.is_dir() and not (p / "config.json").is_file() and (p / "vae" / "config.json").is_file() \
        else None
    if not p.exists() and (p.is_absolute() or path.startswith(".")):
        raise CheckpointError(f"image VAE not found: {p}")
    try:
        vae = AutoencoderKL.from_pretrained(str(p) if p.exists() else path, subfolder=sub)
    except Exception as e:  # noqa: BLE001 - diffusers raises many types for a bad folder
        raise CheckpointError(f"cannot load the image VAE {path}: {type(e).__name__}: {e}".splitlines()[0]) from None
    return vae.to(device).requires_grad_(False).eval()


def _load_lpips(path: str | None, device: str) -> torch.nn.Module | None:
    from ..train.lpips import LPIPS

    if path is None:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / "vgg16-397923af.pth"
        if os.environ.get("CVVAE_VGG16"):
            return LPIPS().to(device)
        if not cached.is_file():
            return None
        path = str(cached)
    return LPIPS(path).to(device)


def run(args: argparse.Namespace) -> None:
    """`cvvae eval`: load the models, evaluate, write the report, print a summary."""
    quiet, as_json = getattr(args, "quiet", False), getattr(args, "json", False)
    if not args.videos and not args.images:
        raise InputError("give --videos and/or --images")
    subs = args.subfolder or [None]
    if len(subs) not in (1, len(args.weights)):
        raise InputError(f"--subfolder given {len(subs)} times for {len(args.weights)} --weights: give it once or "
                         "once per --weights")
    subs = subs * len(args.weights) if len(subs) == 1 else subs
    if args.name and len(args.name) != len(args.weights):
        raise InputError(f"--name given {len(args.name)} times for {len(args.weights)} --weights")
    out = Path(args.output)
    if not out.parent.is_dir():
        raise InputError(f"output folder does not exist: {out.parent}")
    if out.exists() and not out.is_dir():
        raise InputError(f"output {out} exists and is not a folder")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda asked for, but no CUDA GPU is available")

    weights, taken = [], set()
    for k, (w, s) in enumerate(zip(args.weights, subs)):
        model = CVVAE.from_pretrained(w, subfolder=s).to(device).requires_grad_(False).eval()
        label = args.name[k] if args.name else f"{Path(w).name}/{s}" if s else Path(w).name or str(w)
        weights.append((_unique(label, taken), model))
    image_vae = _load_image_vae(args.image_vae, device) if args.image_vae else None
    lpips = _load_lpips(args.lpips_vgg16, device)
    metrics = evaluate(weights, args.videos, args.images, frames=args.frames, stride=args.stride, size=args.size,
                       image_vae=image_vae, max_items=args.max_items, lpips=lpips, fvd_i3d=args.fvd_i3d,
                       dtype=args.dtype, progress=not (quiet or as_json))
    write_report(metrics, out)

    summary = {"output": str(out), "skipped": len(metrics["skipped"]),
               "reconstruction": _jsonable(metrics["reconstruction"]), "compatibility": {}}
    lines = []
    for name, r in metrics["reconstruction"].items():
        v, i = r["videos"], r["images"]
        parts = []
        if v["count"]:
            parts.append(f"videos {v['count']}: PSNR {_fmt(v['psnr'])} SSIM {_fmt(v['ssim'], 4)} "
                         f"LPIPS {_fmt(v['lpips'], 4)} FVD {_fmt(v['fvd'])}")
        if i["count"]:
            parts.append(f"images {i['count']}: PSNR {_fmt(i['psnr'])} SSIM {_fmt(i['ssim'], 4)} "
                         f"LPIPS {_fmt(i['lpips'], 4)}")
        lines.append(f"{name}: " + " | ".join(parts))
        c = metrics["compatibility"]
        if isinstance(c, dict) and isinstance(c.get(name), dict):
            a, cross = c[name]["image_mode"], c[name]["cross_decoding"]["mappings"]
            summary["compatibility"][name] = {"image_mode_psnr": a["psnr_cvvae_vs_image_vae"],
                                              "cross_decoding_psnr": {m: x["psnr"] for m, x in cross.items()}}
            rnd = cross["random"]
            lines.append(f"  vs image VAE: image-mode agreement PSNR {_fmt(a['psnr_cvvae_vs_image_vae'])} dB; "
                         f"cross-decoding (random) {_fmt(rnd['psnr'])} dB vs the image VAE's "
                         f"{_fmt(rnd['image_vae_psnr'])} dB")
    skipped = f" ({len(metrics['skipped'])} skipped)" if metrics["skipped"] else ""
    lines.append(f"report: {out / 'report.md'}{skipped}")
    if as_json:
        print(json.dumps(summary, indent=2))
    elif not quiet:
        print("\n".join(lines))
