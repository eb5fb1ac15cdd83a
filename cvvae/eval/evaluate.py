"""Evaluation: the paper's reconstruction protocol and the compatibility measurements, as numbers.

    metrics = evaluate([("cvvae", model)], "webvid_val/", "coco_val/", image_vae=sd_vae, lpips=LPIPS(vgg16))
    write_report(metrics, "report/")   # cvvae.eval.report: metrics.json, report.md, report.html, plot, strips

Where each reported number is computed: PSNR and SSIM in `metrics.py`, LPIPS in `lpips.py`, FVD in `fvd.py`,
image mode / cross-decoding / image latents through the video decoder / latent statistics in `compat.py`
(with the mapping functions of `cvvae.model.mapping`); the loop over items, per-frame PSNR and the chunk
boundaries here. The report (`report.py`) only renders this dict.

Protocol (Table 1 of the paper, deterministic): every video is resized so that its short side is
`size` (swscale, area filter when shrinking) and centre-cropped to `size` x `size`; the clip is
frames 0, stride, 2*stride, ... (`frames` of them; a video too short for that is skipped, never read at a
smaller stride). Images: same resize and crop, one frame. Files that are unreadable or too short are skipped
and listed. Latents are the posterior mean (`cvvae.codec`); every metric against the input uses the
reconstruction clamped to [-1, 1] and rounded to uint8.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .. import __version__, codec
from ..data import ClipSpec, list_items, read_clip
from ..errors import InputError
from ..model import CVVAE
from ..model.chunking import handovers, round_boundaries
from ..model.mapping import MAPPINGS, frames_of
from ..runtime import compute_dtype
from .compat import MAPPING_SEED, Compatibility, ImageVAE, reference_for_video, to01, to01_u8
from .fvd import I3D_SIZE, frechet_distance, i3d_features, load_i3d
from .metrics import (MOTION_LEVELS, PSNR_CAP, mean_frame_difference, motion_level, psnr, seam_ratio, ssim,
                      temporal_error)

Source = str | os.PathLike | Sequence[Any]
NA = "n/a"
STRIP_ITEMS = 3  # strips for the first items of each kind
STRIP_FRAMES = 4  # frames per strip

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
                      "of the chunked encode/decode starts (f is shared, frames f+1.. come from the next round; "
                      "multiples of config.en_de_n_frames_a_time in the official mode, every 12 frames in the blend "
                      "mode, whose rounds then fade in over the next 4 frames).",
    "temporal_error": "per transition t -> t+1, mean |(y[t+1] - y[t]) - (x[t+1] - x[t])| of the uint8-rounded "
                      "reconstruction y against the input x in [0, 1]: what flicker and jumps add; averaged over "
                      "transitions, then over videos.",
    "seam_ratio": "temporal error of the transitions across each handover between temporal rounds (into and out of "
                  "the shared boundary frame of released rounds; across the frames the blend mode mixes) over that "
                  "of the transitions 3-5 frames before and after it, pooled over the handovers of a video, averaged "
                  "over videos; about 1 without seams. Measured for every model over the same frame spans: the "
                  "handovers of all models evaluated together and of the released rounds (protocol.videos."
                  "seam_spans); n/a when no handover lies 6+ frames inside the clip.",
    "image_mode": "(a) single frames (images, and frame 0 of each video) through the CV-VAE in image mode and "
                  "through the image VAE: PSNR between the two reconstructions (float, not rounded), each one's "
                  "PSNR vs the frame, relative error ||mu_cv - mu_2d|| / ||mu_2d|| of the latent means.",
    "cross_decoding": "(b) CV-VAE video latents (mean) decoded frame by frame by the image decoder, PSNR vs psi(X) "
                      "for each mapping psi (first: frame 0; average: frame 0 + the mean of each group of 4; slice: "
                      "frames 0, 4, 8, ...; random: frame 0 + one frame per group of 4, torch generator seeded "
                      f"{MAPPING_SEED} + item index). Reference: the image VAE's own reconstruction of psi(X); "
                      "gap = reference - cross-decoding PSNR; worst = the largest gap of one video; by motion: the "
                      "videos of each motion level.",
    "motion": "mean |x[t+1] - x[t]| of a video's evaluated frames in 0-255 levels; levels: "
              + ", ".join(f"{n} (< {u:g})" if u != float("inf") else f"{n} (the rest)" for n, u in MOTION_LEVELS)
              + ".",
    "video_decoder_from_image_latents": "(c) image-VAE latents (mean) of psi_slice(X) decoded as one video by the "
                                        "CV-VAE decoder, PSNR vs X (next to the CV-VAE's own reconstruction PSNR).",
    "latent_stats": "(d) per latent channel mean and std (unscaled) of the CV-VAE's latents (all latent frames of "
                    "the videos; images) and of the image VAE's latents of the same frames (slice frames 0, 4, 8, ... "
                    "of the videos; images).",
}


class _Totals:
    """Running per-model reconstruction results for one kind of item."""

    def __init__(self) -> None:
        self.psnr: list[float] = []
        self.ssim: list[float] = []
        self.lpips: list[float] = []
        self.curve: torch.Tensor | None = None
        self.temporal_curve: torch.Tensor | None = None
        self.temporal: list[float] = []
        self.seams: list[float] = []
        self.first: list[float] = []
        self.later: list[float] = []
        self.features: list[torch.Tensor] = []
        self.seconds = 0.0

    def add(self, p: torch.Tensor, s: torch.Tensor, lp: torch.Tensor | None, video: bool,
            temporal: torch.Tensor | None = None, seam: float | None = None) -> None:
        self.psnr.append(float(p.mean()))
        self.ssim.append(float(s.mean()))
        if lp is not None:
            self.lpips.append(float(lp.mean()))
        if video:
            self.curve = p.double() if self.curve is None else self.curve + p.double()
            self.first.append(float(p[0]))
            self.later.extend([float(p[1:].mean())] if p.numel() > 1 else [])
        if temporal is not None and temporal.numel():
            t = temporal.double()
            self.temporal_curve = t if self.temporal_curve is None else self.temporal_curve + t
            self.temporal.append(float(t.mean()))
        if seam is not None:
            self.seams.append(seam)

    def result(self, video: bool) -> dict[str, Any]:
        out: dict[str, Any] = {"count": len(self.psnr), "psnr": _mean(self.psnr), "ssim": _mean(self.ssim),
                               "lpips": _mean(self.lpips) if self.lpips else NA}
        if video:
            out.update(psnr_first_frame=_mean(self.first), psnr_later_frames=_mean(self.later),
                       temporal_error=_mean(self.temporal), seam_ratio=_mean(self.seams) if self.seams else NA)
        return out


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def unique_name(name: str, taken: set[str], sep: str = "#") -> str:
    """`name`, or `name#2`, `name#3`, ... (with `sep`) if taken; records the result in `taken`."""
    out, n = name, 2
    while out in taken:
        out, n = f"{name}{sep}{n}", n + 1
    taken.add(out)
    return out


def seam_positions(models: Sequence[CVVAE], frames: int) -> list[tuple[int, int]]:
    """Where seam ratios are measured, the same frames for every model compared: the round handovers of all of
    them and the released rounds' ones (so that a whole-clip forward, which has none, is measured there too)."""
    spans = {span for m in models for released in (False, True) for span in handovers(m, frames, released)}
    return sorted(spans)


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
             fvd_i3d: str | os.PathLike | None = None, dtype: str = "fp32", progress: bool = True,
             baselines: Sequence[str] = ()) -> dict[str, Any]:
    """Reconstruction metrics (PSNR/SSIM/LPIPS/FVD, per-frame PSNR) of each named CV-VAE on the videos and
    images of the given sources (folders, CSV/JSONL manifests, files; see `cvvae.data.list_items`) and,
    with `image_vae` (a diffusers AutoencoderKL), its compatibility with that image VAE (`compat.py`).
    `baselines`: names of `BASELINES` (trivial codecs) measured on the same frames, next to the models.

    `max_items`: at most this many evaluated (readable) items of each kind, in listing order. Returns a
    JSON-ready dict (see `cvvae.eval.report.write_report`), except `strips[*]["image"]`, uint8 arrays for the
    report.
    """
    t_start = time.perf_counter()
    _check_arguments(weights, videos, images, size, max_items)
    try:
        specs = {"videos": ClipSpec(frames, stride=stride, short_side=size, crop=size, random_crop=False,
                                    random_start=False, fit_stride=False),
                 "images": ClipSpec(1, stride=1, short_side=size, crop=size, random_crop=False, random_start=False)}
    except ValueError as e:
        raise InputError(str(e)) from None
    sources = {"videos": videos, "images": images}
    listed = {kind: list_items(src, kind=kind[:-1]) if src is not None else [] for kind, src in sources.items()}
    first = next(weights[0][1].parameters())
    unknown = sorted(set(baselines) - set(BASELINES))
    if unknown:
        raise InputError(f"unknown baselines {unknown}; known: {sorted(BASELINES)}")
    run = _Run(weights, compute_dtype(dtype, first.dtype, first.device), image_vae, lpips,
               load_i3d(fvd_i3d, first.device) if fvd_i3d is not None else None, list(baselines))
    for kind, spec in specs.items():
        run.evaluate_kind(kind, spec, listed[kind], max_items, progress)
    if not run.items["videos"] and not run.items["images"]:
        s = run.skipped
        raise InputError(f"no item could be evaluated ({len(s)} skipped"
                         + (f"; first: {s[0]['path']}: {s[0]['reason']})" if s else ")"))
    protocol = {kind: {"source": _source_name(sources[kind]), "listed": len(listed[kind]),
                       "evaluated": len(run.items[kind]), "skipped": sum(s["kind"] == kind for s in run.skipped)}
                for kind in sources}
    return {
        "format": "cvvae-eval/1",
        "cvvae_version": __version__,
        "protocol": _protocol(protocol, run, frames, stride, size, max_items, fvd_i3d),
        "definitions": DEFINITIONS,
        "models": {name: _model_info(model, frames) for name, model in weights},
        "baselines": {name: BASELINES[name][1] for name in baselines},
        "reconstruction": run.reconstruction(),
        "reconstruction_by_motion": run.by_motion(),
        "per_frame_psnr": run.curves(),
        "per_frame_temporal_error": run.curves(temporal=True),
        "compatibility": run.compatibility(),
        "items": run.items,
        "skipped": run.skipped,
        "strips": run.strips,
        "timing": {"seconds": time.perf_counter() - t_start, "torch": torch.__version__, "device": str(first.device),
                   "encode_decode_seconds": {n: run.totals["videos"][n].seconds + run.totals["images"][n].seconds
                                             for n in run.names}},
    }


def _check_arguments(weights: list[tuple[str, CVVAE]], videos: Source | None, images: Source | None, size: int,
                     max_items: int | None) -> None:
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


def _source_name(src: Source | None) -> str | list[str] | None:
    return None if src is None else str(src) if isinstance(src, (str, os.PathLike)) else [str(s) for s in src]


class _Run:
    """The state of one evaluation: per-model totals, per-item records, skips, strips, compatibility."""

    def __init__(self, weights: list[tuple[str, CVVAE]], dtype: torch.dtype, image_vae: Any | None,
                 lpips: torch.nn.Module | None, detector: torch.nn.Module | None, baselines: list[str]) -> None:
        self.weights, self.baselines, self.dtype = weights, baselines, dtype
        self.names = [n for n, _ in weights] + baselines
        self.lpips, self.detector = lpips, detector
        self.vae = ImageVAE(image_vae.eval(), dtype) if image_vae is not None else None
        self.compat: dict[str, Compatibility | str] = {}
        for name, model in weights if self.vae is not None else []:
            self.compat[name] = Compatibility.unsupported(model, self.vae) or Compatibility(model, self.vae, dtype)
        self.totals = {kind: {name: _Totals() for name in self.names} for kind in ("videos", "images")}
        self.real_features: list[torch.Tensor] = []
        self.items: dict[str, list[dict[str, Any]]] = {"videos": [], "images": []}
        self.skipped: list[dict[str, str]] = []
        self.strips: dict[str, dict[str, Any]] = {}
        self.taken: set[str] = set()

    def evaluate_kind(self, kind: str, spec: ClipSpec, todo: list[dict[str, Any]], max_items: int | None,
                      progress: bool) -> None:
        from tqdm import tqdm

        bar = tqdm(total=min(len(todo), max_items or len(todo)), desc=f"eval {kind}", unit=kind[:-1],
                   disable=not progress or not todo, file=sys.stderr, dynamic_ncols=True)
        for index, item in enumerate(todo):
            if max_items is not None and len(self.items[kind]) >= max_items:
                break
            sample, skip = _read(item, spec, kind)
            if skip is not None:
                self.skipped.append(skip)
                bar.total += 1 if bar.total < len(todo) else 0
            else:
                self.evaluate_item(kind, index, sample)
            bar.update(1)
        bar.close()

    def evaluate_item(self, kind: str, index: int, sample: dict[str, Any]) -> None:
        x = sample["video"].unsqueeze(0)  # (1, 3, T, H, W) in [-1, 1], exactly the uint8 frames
        ref = to01(frames_of(x))
        video = kind == "videos"
        record: dict[str, Any] = {"name": unique_name(Path(sample["path"]).name, self.taken), "path": sample["path"],
                                  "frames": x.shape[2], "start": sample["start"], "stride": sample["stride"],
                                  "fps": sample["fps"], "orig_size": list(sample["orig_size"]),
                                  "crop": list(sample["crop"]), "models": {}}
        if video:
            difference = mean_frame_difference(ref)
            record["motion"] = {"mean_frame_difference": difference, "level": motion_level(difference)}
        if video and self.detector is not None:
            self.real_features.append(i3d_features(self.detector, ref))
        reference = reference_for_video(self.vae, x, index) if video and self.vae is not None else None
        # seams are measured over the same frames for every model: all models' handovers, once per clip length
        spans = seam_positions([m for _, m in self.weights], x.shape[2]) if video else []
        recons = []
        for name, model in [*self.weights, *((b, None) for b in self.baselines)]:
            out, record["models"][name] = self._reconstruct(kind, name, model, x, ref, reference, spans)
            recons.append(out)
        self.items[kind].append(record)
        if len(self.items[kind]) <= STRIP_ITEMS:
            T = x.shape[2]
            cols = sorted({int(round(f)) for f in np.linspace(0, T - 1, min(T, STRIP_FRAMES))})
            self.strips[record["name"]] = {"kind": kind, "frames": cols, "rows": ["input", *self.names],
                                           "image": _strip([ref, *recons], cols)}

    def _reconstruct(self, kind: str, name: str, model: CVVAE | None, x: torch.Tensor, ref: torch.Tensor,
                     reference: Any, spans: list[tuple[int, int]]) -> tuple[torch.Tensor, dict[str, Any]]:
        """One model (or, with `model` None, the baseline `name`) on one item: its uint8-rounded frames in [0, 1]
        and the item's row of metrics (seam ratio over the frame `spans`)."""
        video, totals = kind == "videos", self.totals[kind][name]
        t0 = time.perf_counter()
        if model is None:
            latents, recon = None, BASELINES[name][0](x)
        else:
            latents = codec.encode(model, x, dtype=self.dtype)
            recon = codec.decode(model, latents, dtype=self.dtype).float().cpu()
        totals.seconds += time.perf_counter() - t0
        out = to01_u8(frames_of(recon))
        p, s = psnr(out, ref), ssim(out, ref)
        lp = _lpips(self.lpips, out, ref) if self.lpips is not None else None
        terr = temporal_error(ref, out) if video else None
        seam = seam_ratio(terr, spans) if video else None
        totals.add(p, s, lp, video, terr, seam)
        row = {"psnr": float(p.mean()), "ssim": float(s.mean()), "lpips": float(lp.mean()) if lp is not None else NA}
        if video:
            row["psnr_per_frame"] = p.tolist()
            row["temporal_error_per_transition"] = terr.tolist()
            row["seam_ratio"] = NA if seam is None else seam
            if self.detector is not None:
                totals.features.append(i3d_features(self.detector, out))
        c = self.compat.get(name)
        if isinstance(c, Compatibility):
            mean = latents.mean.float().cpu()
            if video:
                row["cross_decoding_gap_db"] = c.add_video(x, reference, mean, recon)
            else:
                c.add_image(x, mean, recon)
        return out, row

    def reconstruction(self) -> dict[str, dict[str, Any]]:
        out = {}
        for name in self.names:
            rv = self.totals["videos"][name].result(video=True)
            if self.detector is None:
                rv["fvd"] = NA
            elif len(self.real_features) < 2:
                rv["fvd"] = f"{NA} (needs at least 2 videos, got {len(self.real_features)})"
            else:
                rv["fvd"] = frechet_distance(torch.cat(self.real_features),
                                             torch.cat(self.totals["videos"][name].features))
            out[name] = {"videos": rv, "images": self.totals["images"][name].result(video=False)}
        return out

    def motion_groups(self) -> dict[str, list[int]]:
        """Motion level -> indices of its videos (in evaluation order)."""
        return {level: [i for i, it in enumerate(self.items["videos"]) if it["motion"]["level"] == level]
                for level, _ in MOTION_LEVELS}

    def by_motion(self) -> dict[str, dict[str, dict[str, float]]]:
        """Video PSNR and SSIM of each model averaged over the videos of each motion level."""
        out: dict[str, dict[str, dict[str, float]]] = {}
        for level, videos in self.motion_groups().items():
            for name in self.names:
                rows = [self.items["videos"][i]["models"][name] for i in videos]
                if rows:
                    out.setdefault(name, {})[level] = {"videos": len(rows),
                                                       "psnr": sum(r["psnr"] for r in rows) / len(rows),
                                                       "ssim": sum(r["ssim"] for r in rows) / len(rows)}
        return out

    def curves(self, temporal: bool = False) -> dict[str, list[float]]:
        """Per-frame PSNR (or per-transition temporal error) averaged over videos, per model."""
        out = {}
        for name in self.names:
            v = self.totals["videos"][name]
            total = v.temporal_curve if temporal else v.curve
            out[name] = (total / len(v.first)).tolist() if total is not None else []
        return out

    def compatibility(self) -> dict[str, Any] | str:
        if self.vae is None:
            return NA
        groups = self.motion_groups()
        return {name: (c.result(groups) if isinstance(c, Compatibility) else f"{NA} ({c})")
                for name, c in self.compat.items()}


def bicubic_codec(x: torch.Tensor, factor: int = 8) -> torch.Tensor:
    """The trivial codec a VAE with `factor`x spatial compression must beat: every frame of x (B, C, T, H, W) in
    [-1, 1] shrunk `factor` times (bicubic, antialiased) and enlarged back (bicubic), clamped."""
    frames = frames_of(x.float())
    small = F.interpolate(frames, scale_factor=1 / factor, mode="bicubic", antialias=True, align_corners=False)
    big = F.interpolate(small, size=frames.shape[-2:], mode="bicubic", align_corners=False)
    return big.clamp(-1, 1).unflatten(0, (x.shape[0], x.shape[2])).transpose(1, 2)


# name -> (reconstruction of a clip (B, C, T, H, W) in [-1, 1], description for the report)
BASELINES = {"bicubic-8x": (bicubic_codec, "every frame shrunk 8x (bicubic, antialiased) and enlarged back (bicubic): "
                                           "3 values per 8x8 pixels and frame, where a 16-channel 4x8x8 latent "
                                           "keeps 4 and a 4-channel one 1")}


def _model_info(model: CVVAE, frames: int) -> dict[str, Any]:
    cfg = model.config
    return {"latent_channels": cfg.z_channels, "parameters": sum(p.numel() for p in model.parameters()),
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "scaling_factor": cfg.scaling_factor, "en_de_n_frames_a_time": cfg.en_de_n_frames_a_time,
            "chunk_mode": model.chunk_mode, "blend_overlap": model.blend_overlap if model.chunk_mode == "blend" else None,
            "tiling": bool(model.use_tiling), "tile_spatial_size": cfg.tile_spatial_size,
            "chunk_boundaries": round_boundaries(model, frames)}


def _protocol(sources: dict[str, dict[str, Any]], run: _Run, frames: int, stride: int, size: int,
              max_items: int | None, fvd_i3d: str | os.PathLike | None) -> dict[str, Any]:
    features = run.real_features
    return {
        "videos": {**sources["videos"], "frames": frames, "stride": stride, "start_frame": 0,
                   "seam_spans": seam_positions([m for _, m in run.weights], frames),
                   "resize": f"short side to {size} px (swscale, area filter when shrinking)",
                   "crop": f"centre {size}x{size}"},
        "images": {**sources["images"], "frames": 1, "resize": f"short side to {size} px", "crop":
                   f"centre {size}x{size}"},
        "max_items": max_items,
        "latents": "posterior mean (codec.encode / codec.decode, official chunking and tiling)",
        "pixels": "inputs are the decoded uint8 frames; reconstructions are clamped to [-1, 1] and rounded to uint8 "
                  "before every metric against the input",
        "dtype": str(run.dtype).replace("torch.", ""),
        "lpips": "LPIPS-VGG v0.1" if run.lpips is not None else NA,
        "fvd": ({"i3d": str(fvd_i3d), "call": "detector(x, rescale=False, resize=False, return_features=True)",
                 "input": f"float32 (N, 3, T, {I3D_SIZE}, {I3D_SIZE}) in [-1, 1]: uint8 frames resized bilinearly "
                          f"(no antialiasing), then 2 x / 255 - 1", "clips": len(features),
                 "feature_dim": int(features[0].shape[1]) if features else None}
                if run.detector is not None else NA),
        "image_vae": ({"latent_channels": run.vae.latent_channels, "scaling_factor": run.vae.vae.config.scaling_factor,
                       "mapping_seed": MAPPING_SEED, "mappings": list(MAPPINGS)} if run.vae is not None else NA),
    }
