"""Image mode (1-frame clips, the SD2.1 text-to-image drop-in) of the full SD2.1-size CV-VAE, random weights.

    python benchmarks/bench_image_mode.py [--size 256] [--reps 3]

A 3D conv sees one frame replicated in time (causal or replicate padding), so `cvvae.model.layers.Conv3d`
runs it as a 2D conv with the temporal taps summed. Baseline ("3d"): the same model with that shortcut
turned off (`Conv3d.single_frame_shortcut = False`), measured in the same run. Prints encode and decode seconds (best of --reps), the speed-up and
the relative difference of the outputs.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from cvvae import CVVAE
from cvvae.model import layers


def best(fn, reps: int) -> tuple[float, torch.Tensor]:
    out = fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = CVVAE().eval()
    for p in model.parameters():  # random weights, scaled so activations stay O(1)
        p.data.normal_(0, 0.02)
    x = torch.rand(1, 3, 1, args.size, args.size) * 2 - 1
    results = {}
    with torch.no_grad():
        for name in ("3d", "2d-shortcut"):
            layers.Conv3d.single_frame_shortcut = name != "3d"
            try:
                enc_s, z = best(lambda: model.encode(x).latent_dist.mean, args.reps)
                dec_s, y = best(lambda: model.decode(z).sample, args.reps)
            finally:
                layers.Conv3d.single_frame_shortcut = True
            results[name] = (enc_s, dec_s, z, y)
    base, fast = results["3d"], results["2d-shortcut"]
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"1x{args.size}x{args.size} image, best of {args.reps}")
    print("| path | encode s | decode s | total s | speed-up |")
    print("|---|---|---|---|---|")
    for name, (e, d, _, _) in results.items():
        print(f"| {name} | {e:.2f} | {d:.2f} | {e + d:.2f} | {(base[0] + base[1]) / (e + d):.2f}x |")
    print(f"relative difference: latents {rel(fast[2], base[2]):.1e}, decoded {rel(fast[3], base[3]):.1e}")


if __name__ == "__main__":
    main()
