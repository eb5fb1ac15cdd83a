"""Seams of long-video modes: seam ratio, PSNR, time and peak RSS of each chunk mode on real clips.

    python benchmarks/bench_seams.py                            # the held-out sample clips of 49+ frames
    python benchmarks/bench_seams.py --frames 129 --modes blend # memory against length
    python benchmarks/bench_seams.py --videos my_clip.mp4 --weights AILab-CVC/CV-VAE --subfolder vae3d

Modes: "official" (the released 16-frame rounds, sharing one boundary frame), "blend" (the same rounds overlapping
by one more latent, blended; `--overlap`), "full" (the whole clip in one forward). Every mode runs each clip in a
fresh process (so its peak RSS is its own), streamed from the file to the metrics as `cvvae reconstruct` runs
(memory bounded by a round, except "full"), fp32, with the bundled model unless `--weights` is given. Clips: the
held-out parts of the sample videos (`scripts/get_sample_media.sh --with-opencv`, which the bundled model never
trained on) with at least `--frames` frames, short side 256 px, centre crop 256x256, the first `--frames` frames.

Seam ratio (`cvvae.eval.metrics.seam_ratio`): temporal error (the output's frame-to-frame change against the
input's) across each handover between rounds over the same error 3-5 frames before and after; for "full", which
has no rounds, at the released handovers (frames 16, 32, ...). "full at the same frames": the whole-clip forward's
ratio at the mode's own handovers, i.e. what the content itself gives there; "excess": the mode's ratio minus it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

MEDIA = Path(os.environ.get("CVVAE_MEDIA", Path.home() / ".cache" / "cvvae" / "media"))


def clips(frames: int) -> list[Path]:
    """Held-out sample clips with at least `frames` frames."""
    from cvvae.io.video import probe

    found = sorted((MEDIA / "splits" / "heldout" / "videos").glob("*.mkv"))
    return [p for p in found if (probe(p).num_frames or 0) >= frames]


def pieces(path: Path, frames: int, size: int, n: int = 16):
    """The clip as pieces (1, 3, <=n, size, size) in [-1, 1], streamed from the file."""
    from cvvae.io.video import read_frames, to_tensor

    batch = []
    for frame in read_frames(path, max_frames=frames, short_side=size):
        top, left = (frame.shape[0] - size) // 2, (frame.shape[1] - size) // 2
        batch.append(frame[top:top + size, left:left + size])
        if len(batch) == n:
            yield to_tensor(batch)
            batch = []
    if batch:
        yield to_tensor(batch)


def run(path: str, mode: str, overlap: int, frames: int, size: int, weights: str | None, subfolder: str | None) -> dict:
    """One clip through one mode in this process, streamed as `cvvae reconstruct` does (memory bounded by a
    round): per-frame PSNR, per-transition temporal error, seconds, peak RSS."""
    from cvvae import codec
    from cvvae.eval.evaluate import seam_positions
    from cvvae.eval.metrics import psnr, temporal_error
    from cvvae.identity import load_model

    torch.set_num_threads(os.cpu_count() or 1)
    model = load_model(weights, subfolder).requires_grad_(False)
    model.chunk_mode = mode
    if mode == "blend":
        model.blend_overlap = overlap
    t0 = time.perf_counter()
    latents = codec.encode(model, pieces(Path(path), frames, size), dtype="fp32")
    inputs = (p[0].transpose(0, 1) for p in pieces(Path(path), frames, size, n=1))
    psnrs, errors, last = [], [], None
    for piece in codec.decode_stream(model, latents, dtype="fp32"):
        out = ((piece[0].transpose(0, 1).clamp(-1, 1) + 1) / 2 * 255).round() / 255  # what a written video holds
        ref = (torch.cat([next(inputs) for _ in range(len(out))]) + 1) / 2
        psnrs += psnr(out, ref).tolist()
        if last is not None:  # the transition into this piece
            errors += temporal_error(torch.cat([last[0], ref[:1]]), torch.cat([last[1], out[:1]])).tolist()
        errors += temporal_error(ref, out).tolist()
        last = ref[-1:], out[-1:]
    seconds = time.perf_counter() - t0
    return {"psnr": psnrs, "temporal_error": errors, "boundaries": seam_positions(model, latents.num_frames),
            "seconds": seconds, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--videos", nargs="*", help="clips to use instead of the held-out sample clips")
    p.add_argument("--frames", type=int, default=49, help="frames of each clip")
    p.add_argument("--size", type=int, default=256, help="short side and centre crop, px")
    p.add_argument("--modes", default="official,blend,full", help="comma-separated chunk modes")
    p.add_argument("--overlap", type=int, default=1, help="blend overlap in latents")
    p.add_argument("--weights", help="model (default: the bundled one)")
    p.add_argument("--subfolder")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        path, mode = json.loads(args.child)
        print(json.dumps(run(path, mode, args.overlap, args.frames, args.size, args.weights, args.subfolder)))
        return
    from cvvae.eval.metrics import seam_ratio

    videos = [Path(v) for v in args.videos] if args.videos else clips(args.frames)
    if not videos:
        raise SystemExit(f"no clip of {args.frames}+ frames: run scripts/get_sample_media.sh --with-opencv")
    modes = args.modes.split(",")
    print(f"# {args.frames} frames, {args.size}x{args.size}, fp32, {os.cpu_count()} threads, torch {torch.__version__}, "
          f"model {args.weights or 'bundled'}; blend overlap {args.overlap} latent(s)")
    print("| clip | mode | PSNR dB | seam ratio | full at the same frames | excess | seconds | time vs official "
          "| peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    pooled: dict[str, list[float]] = {m: [] for m in modes}
    for video in videos:
        results = {}
        for mode in modes:
            extra = [a for k in ("weights", "subfolder") if getattr(args, k) for a in (f"--{k}", getattr(args, k))]
            proc = subprocess.run([sys.executable, __file__, "--child", json.dumps([str(video), mode]),
                                   "--frames", str(args.frames), "--size", str(args.size), "--overlap",
                                   str(args.overlap), *extra], capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(proc.stderr.strip().splitlines()[-1])
            results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        for mode, r in results.items():
            spans = [tuple(s) for s in r["boundaries"]]
            ratio = seam_ratio(torch.tensor(r["temporal_error"]), spans)
            base = seam_ratio(torch.tensor(results["full"]["temporal_error"]), spans) if "full" in results else None
            pooled[mode].append((ratio, base))
            seconds = results.get("official", r)["seconds"]
            print(f"| {video.stem} | {mode} | {sum(r['psnr']) / len(r['psnr']):.2f} | {_f(ratio)} | {_f(base)} | "
                  f"{_f(None if ratio is None or base is None else ratio - base, '+.3f')} | {r['seconds']:.1f} | "
                  f"{r['seconds'] / seconds:.2f}x | {r['peak_rss_mib']:.0f} |")
    for mode, pairs in pooled.items():
        pairs = [(r, b) for r, b in pairs if r is not None and b is not None]
        if pairs:
            print(f"# {mode}: mean seam ratio {sum(r for r, _ in pairs) / len(pairs):.3f}, the full forward's at the "
                  f"same frames {sum(b for _, b in pairs) / len(pairs):.3f} ({len(pairs)} clips)")


def _f(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


if __name__ == "__main__":
    main()
