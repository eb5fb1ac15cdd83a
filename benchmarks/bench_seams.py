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
input's) across handovers between rounds over the same error 3-5 frames before and after. Every mode is measured
over the same two sets of frames: the released rounds' handovers (frames 16, 32, ...) and the blended rounds' fades
(frames 13-16, 25-28, ...); "seam excess" is the mode's ratio minus the whole-clip forward's over those frames,
i.e. what the rounds add to what the content itself gives there (0 without seams).
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
    from cvvae.model.chunking import handovers
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
    with model.chunking("blend", overlap):  # where the blend rounds would fade, whatever this run's mode
        blend = handovers(model, latents.num_frames)
    return {"psnr": psnrs, "temporal_error": errors, "released": handovers(model, latents.num_frames, released=True),
            "blend": blend,
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
    videos = [Path(v) for v in args.videos] if args.videos else clips(args.frames)
    if not videos:
        raise SystemExit(f"no clip of {args.frames}+ frames: run scripts/get_sample_media.sh --with-opencv")
    modes = args.modes.split(",")
    print(f"# {args.frames} frames, {args.size}x{args.size}, fp32, {os.cpu_count()} threads, torch {torch.__version__}, "
          f"model {args.weights or 'bundled'}; blend overlap {args.overlap} latent(s)")
    print("| clip | mode | PSNR dB | seam excess at the released handovers | seam excess at the blend fades | "
          "seconds | time vs official | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|")
    pooled: dict[str, list[tuple[float | None, float | None]]] = {m: [] for m in modes}
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
        spans = {kind: sorted({tuple(s) for r in results.values() for s in r[kind]}) for kind in ("released", "blend")}
        for mode, r in results.items():
            excess = [_excess(r, results.get("full"), spans[kind]) for kind in ("released", "blend")]
            pooled[mode].append(tuple(excess))
            seconds = results.get("official", r)["seconds"]
            print(f"| {video.stem} | {mode} | {sum(r['psnr']) / len(r['psnr']):.2f} | {_f(excess[0], '+.3f')} | "
                  f"{_f(excess[1], '+.3f')} | {r['seconds']:.1f} | {r['seconds'] / seconds:.2f}x | "
                  f"{r['peak_rss_mib']:.0f} |")
    print(f"# released handovers: frames {_spans(spans['released'])}; blend fades: frames {_spans(spans['blend'])}")
    for mode, pairs in pooled.items():
        means = [[p[k] for p in pairs if p[k] is not None] for k in (0, 1)]
        print(f"# {mode}: mean seam excess {_f(sum(means[0]) / len(means[0]) if means[0] else None, '+.3f')} at the "
              f"released handovers, {_f(sum(means[1]) / len(means[1]) if means[1] else None, '+.3f')} at the blend "
              f"fades ({len(pairs)} clips)")


def _excess(result: dict, full: dict | None, spans: list) -> float | None:
    """The mode's seam ratio over `spans` minus the whole-clip forward's over the same frames."""
    from cvvae.eval.metrics import seam_ratio

    if full is None or not spans:
        return None
    ratio, base = (seam_ratio(torch.tensor(r["temporal_error"]), spans) for r in (result, full))
    return None if ratio is None or base is None else ratio - base


def _spans(spans: list) -> str:
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in spans) or "none"


def _f(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


if __name__ == "__main__":
    main()
