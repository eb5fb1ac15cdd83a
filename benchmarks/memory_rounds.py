"""Live tensor bytes and peak RSS of `cvvae reconstruct`, round by round, with where the largest tensors were made.

    python benchmarks/memory_rounds.py 17 720 cvvae/assets/bundled/cvvae     # frames, short side, weights
    python benchmarks/memory_rounds.py 65 720 cvvae/assets/bundled/cvvae

Runs the command itself, in this process (`--dtype auto`, its default rounds and tiles), on the first FRAMES frames
of unseen/cockatoo.mp4 (`scripts/get_sample_media.sh --with-unseen`), counting every live torch storage over 1 MiB
(`memory_trace.py`'s dispatch mode, on real tensors). After each encode and decode round it prints the round's
peak of live tensors, the largest tensors alive then with the code that made them, and the process's peak RSS so
far: a later round that peaks above the first holds something the first did not. The RSS includes this trace's
own bookkeeping; `memory_720p.py` measures the command alone.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import traceback
from pathlib import Path

import torch
from memory_trace import LiveBytes  # benchmarks/ is on the path of a script run from it

MEDIA = Path(os.environ.get("CVVAE_MEDIA", Path.home() / ".cache" / "cvvae" / "media"))


class LiveTensors(LiveBytes):
    """Live bytes of storages over 1 MiB made under this mode, each with the cvvae lines that made it."""

    def __init__(self) -> None:
        super().__init__(min_bytes=2**20)

    def origin_of(self, func) -> str:
        sites = [f"{f.filename.rsplit('cvvae/', 1)[-1]}:{f.lineno}" for f in traceback.extract_stack()
                 if "/cvvae/" in f.filename]
        return f"{func.__name__} at " + " < ".join(sites[::-1][:3])

    def report(self, phase: str, top: int = 6) -> None:
        print(f"{phase}: peak {self.peak / 2**20:.0f} MiB of live tensors")
        for size, origin in self.at_peak[:top]:
            print(f"  {size / 2**20:8.0f} MiB  {origin}")
        self.peak, self.at_peak = self.live, []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("frames", type=int)
    parser.add_argument("short_side", type=int)
    parser.add_argument("weights", type=Path)
    parser.add_argument("--video", type=Path, default=MEDIA / "unseen" / "cockatoo.mp4")
    parser.add_argument("--top", type=int, default=4, help="largest tensors listed per round")
    args = parser.parse_args()
    if not args.video.is_file():
        raise SystemExit(f"error: {args.video} is missing (run scripts/get_sample_media.sh --with-unseen, or --video)")
    from cvvae import codec
    from cvvae.cli import main as cvvae
    from cvvae.model import chunking

    mode, rounds = LiveTensors(), {}

    def traced(fn):  # a round of the encoder (frames in) or the decoder (latents in)
        def run(x: torch.Tensor) -> torch.Tensor:
            y = fn(x)
            phase = "encode" if x.shape[1] == 3 else "decode"
            rounds[phase] = rounds.get(phase, 0) + 1
            maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            mode.report(f"{phase} round {rounds[phase]} (peak RSS so far {maxrss:.0f} MiB)", args.top)
            return y
        return run

    # the codec runs every round through run_windows: hand it the traced model call
    codec.run_windows = lambda fn, wins, overlap=0: chunking.run_windows(traced(fn), wins, overlap)
    with tempfile.TemporaryDirectory() as tmp, mode:
        cvvae(["reconstruct", str(args.video), "--weights", str(args.weights), "--max-frames", str(args.frames),
               "--short-side", str(args.short_side), "--dtype", "auto", "-q", "-o", str(Path(tmp) / "out.mp4")])


if __name__ == "__main__":
    main()
