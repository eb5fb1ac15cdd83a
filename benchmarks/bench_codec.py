"""Encode/decode speed and memory of the full SD2.1-size CV-VAE (random weights) on this machine.

    python benchmarks/bench_codec.py                 # the standard table (several minutes on 2 cores)
    python benchmarks/bench_codec.py --quick         # 9x64x64 only
    python benchmarks/bench_codec.py --reps 1        # one run per case (includes oneDNN set-up)

Every case runs in a fresh process, so peak RSS (ru_maxrss) belongs to that case alone. Baseline
("naive"): the whole clip through one straightforward fp32 forward, `encoder(x)` then `decoder(mean)`.
"engine": `cvvae.codec.encode/decode` (official 16-frame rounds, any length, bounded memory) in fp32,
and in bf16 where the CPU has native bf16 (on other CPUs bf16 is 30-90x slower and is skipped);
"engine-tiled": the same with 64-px spatial tiles (`--tile-size 64`), for frames larger than that.
"floor": the model loaded and a 1x8x8 forward run, the memory any exact fp32 method pays.
FLOPs are counted once per clip shape with torch.utils.flop_counter on the meta device; the ceilings
(a large matmul and a conv3d) are measured in the same run. Compare figures within one run only.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time

import torch

CLIPS = [(9, 64, 64), (17, 128, 128), (17, 64, 64), (129, 64, 64)]  # 17 vs 129 at 64^2: flat in length?
SMALL_TILE = 64  # px: the "engine-tiled" case, a user's knob for memory (its output is not the untiled one)


def count_flops(T: int, H: int, W: int) -> float:
    """FLOPs of one encode + decode of a T x H x W clip (meta device: nothing is computed)."""
    from torch.utils.flop_counter import FlopCounterMode

    from cvvae import CVVAE

    with torch.device("meta"):
        model = CVVAE().eval()
        x = torch.empty(1, 3, T, H, W)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model.decoder(model.encoder(x)[:, :4])
    return float(counter.get_total_flops())


def ceilings(dtype: torch.dtype) -> dict[str, float]:
    """GFLOP/s of a 2048^2 matmul and a conv3d 256->256 k3 on 1x256x9x32x32."""
    def best(fn, flops: float, reps: int = 3) -> float:
        fn()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return flops / min(times) / 1e9

    a = torch.randn(2048, 2048, dtype=dtype)
    x = torch.randn(1, 256, 9, 32, 32, dtype=dtype)
    w = torch.randn(256, 256, 3, 3, 3, dtype=dtype)
    with torch.no_grad():
        return {"matmul": best(lambda: a @ a, 2 * 2048**3),
                "conv3d": best(lambda: torch.nn.functional.conv3d(x, w, padding=1), 2 * 256 * 27 * 256 * 9 * 32 * 32)}


def run_case(mode: str, T: int, H: int, W: int, dtype: str, reps: int) -> dict:
    """One case in this process: seconds, peak RSS (MiB), output checksum."""
    from cvvae import CVVAE, codec
    torch.manual_seed(0)
    model = CVVAE().eval().requires_grad_(False)
    if mode == "floor":  # what every exact fp32 method pays: weights + runtime, and a 1x8x8 forward's set-up
        with torch.no_grad():
            model.decoder(model.encoder(torch.zeros(1, 3, 1, 8, 8))[:, :4])
        return {"mode": mode, "dtype": dtype, "clip": [T, H, W], "peak_rss_mib": _peak_rss_mib()}
    if mode == "engine-tiled":
        model.register_to_config(tile_spatial_size=SMALL_TILE)
    x = torch.rand(1, 3, T, H, W, generator=torch.Generator().manual_seed(1)) * 2 - 1
    enc, dec = [], []
    with torch.no_grad():
        for _ in range(reps):  # the first run also pays oneDNN's per-shape set-up: report the best
            t0 = time.perf_counter()
            if mode == "naive":
                z = model.encoder(x)[:, :4]
                t1 = time.perf_counter()
                y = model.decoder(z)
            else:
                latents = codec.encode(model, x, dtype=dtype)
                t1 = time.perf_counter()
                y = codec.decode(model, latents, dtype=dtype)
            enc.append(t1 - t0)
            dec.append(time.perf_counter() - t1)
    torch.save(y, f"/tmp/cvvae_bench_{mode}_{dtype}_{T}x{H}x{W}.pt")
    return {"mode": mode, "dtype": dtype, "clip": [T, H, W], "encode_s": min(enc), "decode_s": min(dec),
            "total_s": min(enc) + min(dec), "peak_rss_mib": _peak_rss_mib()}


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def psnr_between(a_path: str, b_path: str) -> float:
    a, b = torch.load(a_path, weights_only=True), torch.load(b_path, weights_only=True)
    mse = ((a.double() - b.double()) / 2).pow(2).mean().item()  # [-1, 1] -> [0, 1]
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(1 / mse)).item()


def rel_err(a_path: str, b_path: str) -> float:
    a, b = torch.load(a_path, weights_only=True), torch.load(b_path, weights_only=True)
    return ((a - b).norm() / b.norm()).item()


def _clip(text: str) -> tuple[int, int, int]:
    try:
        T, H, W = (int(n) for n in text.split("x"))
    except ValueError:
        raise SystemExit(f"--clips: expected TxHxW such as 17x128x128, got {text!r}") from None
    return T, H, W


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only the 9x64x64 clip")
    parser.add_argument("--reps", type=int, default=2, help="runs per case; the best time is reported")
    parser.add_argument("--clips", nargs="+", metavar="TxHxW", help="clips to run (default: the standard four; "
                        "overrides --quick)")
    parser.add_argument("--case", nargs=5, metavar=("MODE", "T", "H", "W", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.case:
        mode, T, H, W, dtype = args.case
        print(json.dumps(run_case(mode, int(T), int(H), int(W), dtype, args.reps)))
        return

    from cvvae.codec import native_bf16

    bf16 = native_bf16()
    cap = torch.backends.cpu.get_cpu_capability()
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, capability {cap}, "
          f"native bf16: {bf16}, threads 2")
    ceil = {"fp32": ceilings(torch.float32)}
    if bf16:
        ceil["bf16"] = ceilings(torch.bfloat16)
    print(f"# ceilings GFLOP/s: {json.dumps({k: {n: round(v) for n, v in c.items()} for k, c in ceil.items()})}")
    floor = json.loads(subprocess.run([sys.executable, __file__, "--case", "floor", "1", "8", "8", "fp32"],
                                      capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
    floor = floor["peak_rss_mib"]
    print(f"# floor: peak RSS {floor:.0f} MiB with the fp32 model loaded and a 1x8x8 forward run (weights + runtime);"
          f" 'activations' below = peak RSS - floor")
    clips = [_clip(c) for c in args.clips] if args.clips else CLIPS[:1] if args.quick else CLIPS
    rows = []
    for T, H, W in clips:
        flops = count_flops(T, H, W)
        cases = [("naive", "fp32"), ("engine", "fp32")] + ([("engine", "bf16")] if bf16 else [])
        cases += [("engine-tiled", "fp32")] if max(H, W) > SMALL_TILE else []
        results = {}
        for mode, dtype in cases:
            out = subprocess.run([sys.executable, __file__, "--case", mode, str(T), str(H), str(W), dtype,
                                  "--reps", str(args.reps)],
                                 capture_output=True, text=True, check=True)
            results[(mode, dtype)] = json.loads(out.stdout.strip().splitlines()[-1])
        base = results[("naive", "fp32")]
        for (mode, dtype), r in results.items():
            path = f"/tmp/cvvae_bench_{mode}_{dtype}_{T}x{H}x{W}.pt"
            ref = f"/tmp/cvvae_bench_naive_fp32_{T}x{H}x{W}.pt"
            rows.append({
                **r, "tflop": flops / 1e12, "gflops": flops / r["total_s"] / 1e9,
                "of_ceiling": flops / r["total_s"] / 1e9 / ceil[dtype]["conv3d"],
                "speed_vs_naive": base["total_s"] / r["total_s"], "rss_vs_naive": r["peak_rss_mib"] / base["peak_rss_mib"],
                "act_vs_naive": ((r["peak_rss_mib"] - floor) / (base["peak_rss_mib"] - floor)
                                 if base["peak_rss_mib"] - floor > 16 else float("nan")),  # too small to tell
                "frames_per_s": T / r["total_s"], "rel_err_vs_naive": rel_err(path, ref),
                "psnr_vs_naive": psnr_between(path, ref)})
    header = ("| clip | mode | dtype | TFLOP | encode s | decode s | total s | frames/s | GFLOP/s | of conv3d ceiling"
              " | speed vs naive | peak RSS MiB | RSS vs naive | activations vs naive | rel. err vs naive |")
    print(header)
    print("|" + "|".join(["---"] * (header.count("|") - 1)) + "|")
    for r in rows:
        T, H, W = r["clip"]
        print(f"| {T}x{H}x{W} | {r['mode']} | {r['dtype']} | {r['tflop']:.2f} | {r['encode_s']:.1f} | {r['decode_s']:.1f}"
              f" | {r['total_s']:.1f} | {r['frames_per_s']:.2f} | {r['gflops']:.0f} | {r['of_ceiling']:.0%}"
              f" | {r['speed_vs_naive']:.2f}x | {r['peak_rss_mib']:.0f} | {r['rss_vs_naive']:.2f}x | {r['act_vs_naive']:.2f}x"
              f" | {r['rel_err_vs_naive']:.1e} |")


if __name__ == "__main__":
    main()
