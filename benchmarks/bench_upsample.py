"""The decoder's upsamplers: nearest 2x + 3D conv (the official form) against `Nearest2xConv3d` (a transposed conv).

    python benchmarks/bench_upsample.py [--reps 3] [--clip 17x128x128]

The three upsampler convs of the SD2.1-size decoder at the shapes a clip gives them (17x128x128: 512->1024 channels
on 5x16x16, 512->512 on 9x32x32, 256->512 on 9x64x64), random weights, fp32 (plain layout) and, where the CPU runs
bf16 natively, bf16 (channels-last, as `cvvae reconstruct --dtype auto` runs it). Baseline, in the same process:
`F.interpolate(nearest)` then the k=3 conv with the same weights, the arithmetic of the official code and of cvvae
before. Prints seconds (best of --reps), the path `Nearest2xConv3d` took (the transposed conv, or the upsampled
input where the kernel would be the larger: `runs_transposed`), the speed-up, GFLOP/s of the baseline's conv and the
relative difference of the outputs; the CPU capability heads the table.
"""

from __future__ import annotations

import argparse
import os
import platform

import torch
import torch.nn.functional as F

from bench_image_mode import best  # this folder is on the path when a script here runs

from cvvae.model.layers import Conv3d, Nearest2xConv3d


def baseline(conv: Nearest2xConv3d, x: torch.Tensor) -> torch.Tensor:
    """Nearest 2x in space, then the plain `Conv3d` (its padding included): the upsampler before."""
    return Conv3d.forward(conv, F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--clip", default="17x128x128", help="TxHxW of the decoded clip")
    args = parser.parse_args()
    T, H, W = (int(v) for v in args.clip.split("x"))
    torch.set_num_threads(os.cpu_count() or 1)
    native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    dtypes = [torch.float32] + ([torch.bfloat16] if native else [])
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16: {native}"
          + ("" if native else " (bf16 not run: it would be emulated)"))
    t1, t2 = (T - 1) // 4 + 1, (T - 1) // 2 + 1  # latent frames, and frames after the first temporal upsampler
    layers = [(512, 1024, t1, H // 8, W // 8), (512, 512, t2, H // 4, W // 4), (256, 512, t2, H // 2, W // 2)]
    print("| conv | input | dtype | upsample + conv s | Nearest2xConv3d s | its path | speed-up | baseline GFLOP/s | "
          "rel. diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    totals = {d: [0.0, 0.0] for d in dtypes}
    for cin, cout, t, h, w in layers:
        torch.manual_seed(0)
        conv = Nearest2xConv3d(cin, cout, time_padding="replicate", space_padding="zeros").eval()
        x = torch.randn(1, cin, t, h, w)
        for dtype in dtypes:
            fmt = torch.channels_last_3d if dtype == torch.bfloat16 else torch.contiguous_format
            conv_d = conv.to(dtype, memory_format=fmt)
            x_d = x.to(dtype).contiguous(memory_format=fmt)
            with torch.no_grad():
                old, a = best(lambda: baseline(conv_d, x_d), args.reps)
                new, b = best(lambda: conv_d(x_d), args.reps)
            a, b = a.double(), b.double()
            flops = 2 * cin * cout * 27 * t * 4 * h * w
            totals[dtype][0] += old
            totals[dtype][1] += new
            path = "transposed" if conv_d.runs_transposed(x_d) else "upsampled"
            print(f"| {cin}->{cout} | {t}x{h}x{w} | {str(dtype)[6:]} | {old:.3f} | {new:.3f} | {path} | "
                  f"{old / new:.2f}x | "
                  f"{flops / old / 1e9:.0f} | {((a - b).norm() / a.norm()).item():.1e} |")
    for dtype, (old, new) in totals.items():
        print(f"| all three | | {str(dtype)[6:]} | {old:.3f} | {new:.3f} | | {old / new:.2f}x | | |")


if __name__ == "__main__":
    main()
