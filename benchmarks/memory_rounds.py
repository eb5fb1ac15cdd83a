"""Live tensor bytes of `cvvae reconstruct`'s encode and decode over a real video, with where they were made.

    python benchmarks/memory_rounds.py 17 720 cvvae/assets/bundled/cvvae     # frames, short side, weights
    python benchmarks/memory_rounds.py 41 720 cvvae/assets/bundled/cvvae

Streams the first FRAMES frames of unseen/cockatoo.mp4 (`scripts/get_sample_media.sh --with-unseen`) through
`codec.encode` and `codec.decode_stream` as `cvvae reconstruct` does (`--dtype auto`), counting every live torch
storage over 1 MiB (the dispatch mode of `memory_trace.py`, on real tensors) and printing each phase's peak with
the largest tensors alive then and the code that made them. Comparing two lengths shows what a video's later rounds
hold that its first does not. Peak RSS adds the allocator's and the libraries' own (`memory_720p.py`).
"""

from __future__ import annotations

import argparse
import os
import traceback
import weakref
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

MEDIA = Path(os.environ.get("CVVAE_MEDIA", Path.home() / ".cache" / "cvvae" / "media"))


class LiveTensors(TorchDispatchMode):
    """Live bytes of CPU storages over 1 MiB made under this mode, each with the cvvae lines that made it."""

    def __init__(self) -> None:
        super().__init__()
        self.refs, self.sizes, self.origin = {}, {}, {}
        self.live = self.peak = 0
        self.at_peak: list[tuple[int, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.untyped_storage().nbytes() >= 2**20:
                self._track(t, func)
        return out

    def _track(self, t: torch.Tensor, func) -> None:
        key = t.untyped_storage()._cdata
        if key not in self.refs:
            sites = [f"{f.filename.rsplit('cvvae/', 1)[-1]}:{f.lineno}" for f in traceback.extract_stack()
                     if "/cvvae/" in f.filename]
            self.refs[key], self.sizes[key] = 0, t.untyped_storage().nbytes()
            self.origin[key] = f"{func.__name__} at " + " < ".join(sites[::-1][:3])
            self.live += self.sizes[key]
            if self.live > self.peak:
                self.peak = self.live
                self.at_peak = sorted(((self.sizes[k], self.origin[k]) for k in self.refs), reverse=True)
        self.refs[key] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        self.refs[key] -= 1
        if not self.refs[key]:
            self.live -= self.sizes.pop(key)
            del self.refs[key], self.origin[key]

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
    args = parser.parse_args()
    if not args.video.is_file():
        raise SystemExit(f"error: {args.video} is missing (run scripts/get_sample_media.sh --with-unseen, or --video)")
    from cvvae import CVVAE, codec
    from cvvae.eval.metrics import psnr, ssim
    from cvvae.io.video import read_frames, to_frames, to_tensor

    model = CVVAE.from_pretrained(args.weights).eval()

    def frames():
        return (f for _, f in zip(range(args.frames), read_frames(args.video, short_side=args.short_side)))

    def pieces():  # 16 frames a piece, as `cvvae reconstruct` reads them
        batch = []
        for f in frames():
            batch.append(f)
            if len(batch) == 16:
                yield to_tensor(np.stack(batch))
                batch = []
        if batch:
            yield to_tensor(np.stack(batch))

    mode = LiveTensors()
    with mode:
        latents = codec.encode(model, pieces(), dtype="auto")
        mode.report("encode")
        originals = frames()
        for piece in codec.decode_stream(model, latents, dtype="auto"):  # decoded and scored as reconstruct does
            out = to_frames(piece)
            ref = np.stack([next(originals) for _ in range(len(out))])
            a, b = (torch.from_numpy(f).permute(0, 3, 1, 2).float() / 255 for f in (ref, out))
            psnr(a, b), ssim(a, b)
        mode.report("decode")


if __name__ == "__main__":
    main()
