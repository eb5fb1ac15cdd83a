"""`cvvae reconstruct`, `cvvae encode`, `cvvae decode`: a video file through the model (`cvvae.codec`), streamed."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Iterable

import numpy as np

from ..errors import CVVAEError, InputError
from .common import (HelpFormatter, check_output, load_model, note, progress, read_kwargs, report, set_up,
                     weights_dtype)


def add_parsers(sub: argparse._SubParsersAction, parents: dict[str, argparse.ArgumentParser]) -> None:
    common, model, frames, video = (parents[k] for k in ("common", "model", "frames", "video"))
    p = sub.add_parser("reconstruct", parents=[common, model, frames, video], formatter_class=HelpFormatter,
                       help="encode and decode a video (or image); report PSNR/SSIM",
                       description="Encode and decode a video or image, write the reconstruction, print PSNR/SSIM. "
                       "Keeps fps and aspect ratio; any frame count and size work (padded, then trimmed).")
    p.add_argument("input", type=Path, help="video (mp4, avi, mkv, webm, ...) or image (png, jpg)")
    p.add_argument("-o", "--output", type=Path, required=True, help="output video (or image for image input)")
    p.add_argument("--side-by-side", action="store_true", help="write input | reconstruction next to each other")
    p.add_argument("--sample", action="store_true", help="decode a sample of the posterior instead of its mean")
    p.add_argument("--seed", type=int, default=0, help="seed for --sample")
    p.set_defaults(func=reconstruct)

    p = sub.add_parser("encode", parents=[common, model, frames], formatter_class=HelpFormatter,
                       help="encode a video to a latent file (.safetensors with metadata)",
                       description="Encode a video to latents (unscaled posterior mean; with --logvar also the "
                       "posterior's logvar) plus metadata (fps, size, frame count, the model that made them, "
                       "scaling factor).")
    p.add_argument("input", type=Path, help="video or image")
    p.add_argument("-o", "--output", type=Path, required=True, help="latent file, e.g. clip.latents.safetensors")
    p.add_argument("--logvar", action="store_true", help="also store the posterior's logvar (decode --sample)")
    p.set_defaults(func=encode)

    p = sub.add_parser("decode", parents=[common, model, video], formatter_class=HelpFormatter,
                       help="decode a latent file back to a video of the original length and size",
                       description="Decode a latent file written by `cvvae encode` with the model that made it "
                       "(recorded in the file); --weights decodes with another model of the same latent space, "
                       "e.g. a fine-tuned decoder (with a note).")
    p.add_argument("input", type=Path, help="latent file written by `cvvae encode`")
    p.add_argument("-o", "--output", type=Path, required=True, help="output video or image")
    p.add_argument("--sample", action="store_true", help="decode a sample of the posterior (needs encode --logvar)")
    p.add_argument("--seed", type=int, default=0, help="seed for --sample")
    p.set_defaults(func=decode)


def _pieces(frames: Iterable[np.ndarray], bar, n: int = 16):
    """uint8 frames (H, W, 3) -> video pieces (1, 3, n, H, W) in [-1, 1]."""
    batch: list[np.ndarray] = []
    for frame in frames:
        batch.append(frame)
        if len(batch) == n:
            yield _piece(batch, bar)
    if batch:
        yield _piece(batch, bar)


def _piece(batch: list[np.ndarray], bar):
    """The batch's frames as one piece, emptying the batch: nothing of it stays bound across the caller's yield
    while the model runs."""
    from ..io.video import to_tensor

    bar.update(len(batch))
    piece = to_tensor(np.stack(batch))
    batch.clear()
    return piece


def _encode_file(args: argparse.Namespace, model, keep_logvar: bool):
    """Encode a video file as a stream. Returns (Latents, VideoInfo)."""
    from .. import codec
    from ..io.video import probe, read_frames

    info = probe(args.input)
    total = info.num_frames if args.max_frames is None else min(args.max_frames, info.num_frames or args.max_frames)
    with progress(args, total, "encode") as bar:
        frames = read_frames(args.input, **read_kwargs(args))
        latents = codec.encode(model, _pieces(frames, bar), dtype=args.dtype, keep_logvar=keep_logvar)
    return latents, info


def reconstruct(args: argparse.Namespace) -> None:
    import torch

    from .. import codec
    from ..io.video import VideoWriter, read_frames, to_frames

    check_output(args.output, args.input)
    model, _ = load_model(args)
    t0 = time.perf_counter()
    latents, info = _encode_file(args, model, keep_logvar=args.sample)
    generator = torch.Generator().manual_seed(args.seed) if args.sample else None
    psnrs, ssims = [], []
    originals = read_frames(args.input, **read_kwargs(args))
    with VideoWriter(args.output, fps=info.fps, crf=args.crf) as writer, \
            progress(args, latents.num_frames, "decode") as bar:
        stream = codec.decode_stream(model, latents, dtype=args.dtype, sample=args.sample, generator=generator)
        for out in map(to_frames, stream):  # each round's float frames are freed once converted (decode_stream)
            frame_psnrs, frame_ssims = _write_scored(writer, out, originals, args.side_by_side)
            psnrs += frame_psnrs
            ssims += frame_ssims
            bar.update(len(out))
    summary = dict(input=str(args.input), output=str(args.output), frames=latents.num_frames,
                   height=latents.height, width=latents.width, fps=info.fps,
                   latent_shape=list(latents.mean.shape), psnr=float(np.mean(psnrs)), ssim=float(np.mean(ssims)),
                   seconds=round(time.perf_counter() - t0, 2))
    report(args, summary, [
        f"{args.output}: {summary['frames']} frames {summary['width']}x{summary['height']} @ {info.fps:g} fps",
        f"PSNR {summary['psnr']:.2f} dB  SSIM {summary['ssim']:.4f}  ({summary['seconds']} s)"])


def _write_scored(writer, out: np.ndarray, originals, side_by_side: bool) -> tuple[list[float], list[float]]:
    """Write decoded uint8 frames (T, H, W, 3) (next to the next T `originals` with `side_by_side`) and score them
    against those: per-frame PSNR and SSIM. What it makes of a round lives only in here."""
    import torch

    from ..eval.metrics import psnr, ssim

    ref = np.stack([next(originals) for _ in range(len(out))])
    for r, o in zip(ref, out):
        writer.write(np.concatenate([r, o], axis=1) if side_by_side else o)
    a, b = (torch.from_numpy(f).permute(0, 3, 1, 2).float() / 255 for f in (ref, out))
    return psnr(a, b).tolist(), ssim(a, b).tolist()


def encode(args: argparse.Namespace) -> None:
    from .. import codec

    check_output(args.output, args.input)
    model, model_id = load_model(args)
    latents, info = _encode_file(args, model, keep_logvar=args.logvar)
    meta = codec.save_latents(args.output, latents, model, model_id=model_id, fps=info.fps, source=str(args.input),
                              source_height=info.height, source_width=info.width)
    summary = dict(output=str(args.output), latent_shape=list(latents.mean.shape), **meta)
    report(args, summary, [f"{args.output}: latents {tuple(latents.mean.shape)} from {latents.num_frames} frames "
                           f"{latents.width}x{latents.height} @ {info.fps:g} fps"])


def _decoder_of(args: argparse.Namespace, meta: dict, channels: int):
    """The model to decode `channels`-channel latents with: --weights (a note when it is not the recorded one),
    else the recorded model."""
    from ..identity import fingerprint, load_recorded

    recorded = meta.get("model")
    if args.weights is None:
        if args.subfolder:
            raise InputError("--subfolder needs --weights")
        if not recorded:
            raise InputError(f"{args.input} does not say which model made it: pass --weights")
        try:
            model = load_recorded(recorded, torch_dtype=weights_dtype(args))
        except CVVAEError as e:  # the recorded model is not on this machine
            raise InputError(f"{args.input} was encoded by {recorded}, which cannot be loaded here ({e}); pass that "
                             "model with --weights (and --subfolder)") from None
        if meta.get("model_sha256") not in (None, fingerprint(model)):
            note(args, f"the weights of {recorded} changed since {args.input} was encoded")
        return set_up(model, args)
    model, chosen = load_model(args)
    if channels != model.config.z_channels:
        raise InputError(f"{args.input} holds {channels}-channel latents of {recorded}, but this model has "
                         f"{model.config.z_channels} latent channels")
    if recorded and chosen != recorded and meta.get("model_sha256") != fingerprint(model):
        note(args, f"{args.input} was encoded by {recorded}; decoding it with {chosen}")
    return model


def decode(args: argparse.Namespace) -> None:
    import torch

    from .. import codec
    from ..io.video import VideoWriter, to_frames

    check_output(args.output, args.input)
    latents, meta = codec.load_latents(args.input)
    if args.sample and latents.logvar is None:
        raise InputError(f"{args.input} holds no logvar: encode with --logvar to decode a sample")
    model = _decoder_of(args, meta, latents.mean.shape[1])
    generator = torch.Generator().manual_seed(args.seed) if args.sample else None
    with VideoWriter(args.output, fps=meta.get("fps") or 25.0, crf=args.crf) as writer, \
            progress(args, latents.num_frames, "decode") as bar:
        stream = codec.decode_stream(model, latents, dtype=args.dtype, sample=args.sample, generator=generator)
        for frames in map(to_frames, stream):  # each round's float frames are freed once converted (decode_stream)
            for frame in frames:
                writer.write(frame)
            bar.update(len(frames))
    summary = dict(output=str(args.output), frames=latents.num_frames, height=latents.height,
                   width=latents.width, fps=meta.get("fps"))
    report(args, summary, [f"{args.output}: {latents.num_frames} frames {latents.width}x{latents.height}"])
