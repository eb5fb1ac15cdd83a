"""Where the time of one whole-clip forward goes: the full SD2.1-size CV-VAE (random weights), best of 2, then
torch.profiler's top operators of one more run.

    python benchmarks/profile_forward.py                        # bf16, channels-last, 17x128x128
    python benchmarks/profile_forward.py --dtype fp32 --layout ncdhw
    python benchmarks/profile_forward.py --no-profile           # times only

The forward is `encoder(x)` then `decoder(mean)` on the whole clip (no rounds, no tiles), with the weights in
`--dtype` and, with `--layout cl`, channels-last (`model.to(memory_format=torch.channels_last_3d)`), as the CLI
runs bf16 on a CPU. Prints the CPU capability and whether bf16 is native: judge bf16 only where it is.
"""

from __future__ import annotations

import argparse
import os
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--layout", choices=["cl", "ncdhw"], default="cl")
    p.add_argument("--clip", default="17x128x128", help="TxHxW")
    p.add_argument("--no-profile", action="store_true")
    args = p.parse_args()
    from cvvae import CVVAE

    torch.set_num_threads(os.cpu_count() or 1)
    T, H, W = (int(v) for v in args.clip.split("x"))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    model = CVVAE().eval().requires_grad_(False).to(dtype)
    x = (torch.rand(1, 3, T, H, W) * 2 - 1).to(dtype)
    if args.layout == "cl":
        model.to(memory_format=torch.channels_last_3d)
        x = x.contiguous(memory_format=torch.channels_last_3d)

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return model.decoder(model.encoder(x)[:, :model.config.z_channels])

    forward()
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        forward()
        times.append(time.perf_counter() - t0)
    print(f"# CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16 "
          f"{torch.ops.mkldnn._is_mkldnn_bf16_supported()}, {os.cpu_count()} threads, torch {torch.__version__}")
    print(f"{args.dtype} {args.layout} {args.clip}: best {min(times):.2f} s")
    if not args.no_profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            forward()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
