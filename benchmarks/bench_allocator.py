"""CPU step time with glibc's default allocator vs `cvvae.allocator.keep_freed_memory()` (what `cvvae` applies).

    python benchmarks/bench_allocator.py [--size 256] [--frames 9] [--steps 6]

Model: the bundled CV-VAE (ch 32, 16 latent channels). Two jobs, each in a fresh process per allocator
setting (malloc settings are process-wide): a training step (encode, decode, squared error, backward,
Adam step) on one clip, and an inference pass (encode + decode under no_grad) on the same clip. Prints the
median seconds per step after one warm-up step, the CPU seconds spent in the kernel (page faults of
re-mapped memory), the peak resident memory, and the speed-up over the default measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

from cvvae.allocator import untuned_environ


def worker(job: str, keep: bool, size: int, frames: int, steps: int) -> dict:
    from cvvae.allocator import keep_freed_memory
    from cvvae.bundled import load_bundled

    applied = keep_freed_memory() if keep else False
    torch.manual_seed(0)
    model = load_bundled("cvvae").requires_grad_(job == "train")
    x = torch.rand(1, 3, frames, size, size) * 2 - 1
    if job == "train":
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-5)

        def step():
            y = model(x).sample
            loss = (y - x).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    else:
        model.eval()

        def step():
            with torch.no_grad():
                model.decode(model.encode(x).latent_dist.mean)
    step()  # warm-up: first-touch of weights, oneDNN kernels
    start = resource.getrusage(resource.RUSAGE_SELF)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    end = resource.getrusage(resource.RUSAGE_SELF)
    return {"applied": applied, "step_s": statistics.median(times),
            "sys_s": (end.ru_stime - start.ru_stime) / steps, "user_s": (end.ru_utime - start.ru_utime) / steps,
            "peak_gib": end.ru_maxrss / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--worker", nargs=2, metavar=("JOB", "ALLOCATOR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        job, alloc = args.worker
        print(json.dumps(worker(job, alloc == "keep", args.size, args.frames, args.steps)))
        return
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"bundled CV-VAE, 1x3x{args.frames}x{args.size}x{args.size} clip, median of {args.steps} steps")
    print("| job | allocator | s/step | kernel CPU s/step | user CPU s/step | peak RSS GiB | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for job in ("train", "infer"):
        base = None
        for alloc in ("default", "keep"):
            env = untuned_environ()  # so "default" is glibc's default and "keep" is not vetoed
            out = subprocess.run([sys.executable, __file__, "--size", str(args.size), "--frames", str(args.frames),
                                  "--steps", str(args.steps), "--worker", job, alloc],
                                 env=env, check=True, capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            if alloc == "keep" and not r["applied"]:
                print(f"| {job} | keep | (not applied: not glibc, or opted out) | | | | |")
                continue
            base = base or r["step_s"]
            print(f"| {job} | {alloc} | {r['step_s']:.2f} | {r['sys_s']:.2f} | {r['user_s']:.2f} | "
                  f"{r['peak_gib']:.2f} | {base / r['step_s']:.2f}x |")


if __name__ == "__main__":
    main()
