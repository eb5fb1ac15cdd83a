"""Peak RSS of `cvvae reconstruct` on a 1280x720 video against its length, full SD2.1-size CV-VAE.

    python benchmarks/memory_720p.py                               # 17, 65 and 129 frames of unseen/cockatoo.mp4
    python benchmarks/memory_720p.py --frames 17 33 --video my_720p.mp4 --dtype fp32
    python benchmarks/memory_720p.py --frames 17 --tile-size 256           # smaller spatial tiles
    python benchmarks/memory_720p.py --weights cvvae/assets/bundled/cvvae  # the engine's own memory: a small model

The model is the released architecture (`CVVAE()`, 182 M parameters) with random weights, saved once in fp32 to
`--model-dir` and loaded by the command as a user's weights would be (`--dtype auto`: bf16 weights, channels-last,
where the CPU computes bf16 natively). Every length runs the unchanged command line in a fresh process (blended
rounds and the model's 576-px spatial tiles, the defaults, or `--tile-size`), and its peak RSS is that process's
own (`os.wait4`, the figure `/usr/bin/time -v` prints as "Maximum resident set size"). The input is a real
1280x720 video: imageio's cockatoo.mp4 (280 frames), fetched by `scripts/get_sample_media.sh --with-unseen`.
`--weights` runs a trained model instead: the bundled one's activations are a few hundred MiB a tile, so what grows
with the length, if anything does, is the engine's (the frames read, blended and written), at the same resolution
in minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MEDIA = Path(os.environ.get("CVVAE_MEDIA", Path.home() / ".cache" / "cvvae" / "media"))


def save_model(folder: Path) -> None:
    """The full-size CV-VAE with random weights (seed 0), fp32 safetensors, unless already saved."""
    from cvvae import CVVAE

    if (folder / "config.json").is_file():
        return
    torch.manual_seed(0)
    CVVAE().save_pretrained(folder)


def run(video: Path, model: Path, frames: int, dtype: str, tile_size: int | None, out: Path) -> dict:
    """One `cvvae reconstruct` in a fresh process: its summary, wall time and peak RSS."""
    cmd = [sys.executable, "-m", "cvvae", "reconstruct", str(video), "--weights", str(model), "--max-frames",
           str(frames), "--dtype", dtype, "--json", "-q", "-o", str(out)]
    if tile_size is not None:
        cmd += ["--tile-size", str(tile_size)]
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=stdout, stderr=stderr)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (ru_maxrss in KiB on Linux)
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - t0
        stdout.seek(0), stderr.seek(0)
        if proc.returncode != 0:
            raise SystemExit(f"error: {' '.join(cmd)} failed:\n{stderr.read()[-2000:]}")
        summary = json.loads(stdout.read())
    return {"frames": summary["frames"], "seconds": seconds, "peak_rss_mib": usage.ru_maxrss / 1024,
            "psnr": summary["psnr"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--video", type=Path, default=MEDIA / "unseen" / "cockatoo.mp4")
    parser.add_argument("--frames", type=int, nargs="+", default=[17, 65, 129])
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--tile-size", type=int, default=None,
                        help="spatial tiles in pixels (default: the model's, 576)")
    parser.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "cvvae_memory_720p" / "model")
    parser.add_argument("--weights", type=Path, help="a trained CV-VAE folder instead of the full-size random one")
    args = parser.parse_args()
    if not args.video.is_file():
        raise SystemExit(f"error: {args.video} is missing (run scripts/get_sample_media.sh --with-unseen, or --video)")
    from cvvae.io.video import probe

    info = probe(args.video)
    if (info.num_frames or 0) < max(args.frames):
        raise SystemExit(f"error: {args.video} has {info.num_frames} frames, fewer than {max(args.frames)}")
    model = args.weights or args.model_dir
    if args.weights is None:
        save_model(args.model_dir)
    elif not (args.weights / "config.json").is_file():
        raise SystemExit(f"error: {args.weights} holds no config.json (a CV-VAE folder, e.g. "
                         "cvvae/assets/bundled/cvvae)")
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"capability {torch.backends.cpu.get_cpu_capability()}, "
          f"native bf16 {torch.ops.mkldnn._is_mkldnn_bf16_supported()}, {torch.get_num_threads()} threads; "
          f"{args.video.name} {info.width}x{info.height}, --dtype {args.dtype}, "
          f"tiles {args.tile_size or 'default (576)'}, model {args.weights or 'full-size, random weights'}")
    psnr = "PSNR dB" if args.weights else "PSNR dB (random weights)"
    print(f"| frames | seconds | s/frame | peak RSS MiB | vs first | {psnr} |")
    print("|---|---|---|---|---|---|")
    first = None
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.frames:
            r = run(args.video, model, n, args.dtype, args.tile_size, Path(tmp) / f"rec{n}.mp4")
            first = first or r["peak_rss_mib"]
            print(f"| {r['frames']} | {r['seconds']:.0f} | {r['seconds'] / r['frames']:.1f} | {r['peak_rss_mib']:.0f} "
                  f"| {r['peak_rss_mib'] / first:.2f}x | {r['psnr']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
