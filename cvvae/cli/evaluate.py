"""`cvvae eval`: the paper's reconstruction protocol and the compatibility report (`cvvae.eval`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import InputError
from ..runtime import DTYPE_CHOICES, resolve_device
from .common import HelpFormatter, report


def add_parsers(sub: argparse._SubParsersAction, parents: dict[str, argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "eval", parents=[parents["common"]], formatter_class=HelpFormatter,
        help="evaluate reconstruction (PSNR/SSIM/LPIPS/FVD) and 2D-VAE compatibility; write a report",
        description="Evaluate one or more CV-VAEs with the paper's protocol (Table 1: 256x256 centre crops, 33 "
                    "frames with stride 3) on videos and images, optionally against a 2D image VAE (image mode, "
                    "cross-decoding per mapping function, latent statistics), and write metrics.json, report.md, "
                    "report.html, per_frame_psnr.png and frame strips to a folder.")
    arg = p.add_argument
    arg("--weights", action="append", required=True, metavar="W",
        help="CV-VAE folder, weights file or hub id; repeat to compare several models in one report")
    arg("--subfolder", action="append", metavar="S",
        help="subfolder of --weights (e.g. vae3d); once for all, or once per --weights in order")
    arg("--name", action="append", metavar="NAME", help="report name of each --weights (default: its folder name)")
    arg("--chunk-mode", action="append", metavar="MODE", choices=["official", "blend", "full"],
        help="temporal rounds of each --weights (once for all, or once per --weights): official (the released "
             "rounds, the paper's protocol; the default), blend (overlapping, cross-faded) or full (one forward); "
             "the report's seam ratio compares them")
    arg("--videos", metavar="DIR_OR_CSV", help="folder, CSV/JSONL manifest (column 'path') or video file")
    arg("--images", metavar="DIR_OR_CSV", help="folder, CSV/JSONL manifest or image file (e.g. COCO val)")
    arg("--frames", type=int, metavar="N", default=33, help="frames per clip, 1 + 4k")
    arg("--stride", type=int, metavar="N", default=3, help="frame stride of the clip (shorter videos are skipped)")
    arg("--size", type=int, metavar="PX", default=256, help="short-side resize, then centre crop to PX x PX")
    arg("--image-vae", metavar="DIR", help="2D image VAE to compare with: a diffusers AutoencoderKL folder (or a "
                                           "pipeline folder with vae/), e.g. stable-diffusion-2-1/vae")
    arg("--lpips-vgg16", metavar="PATH", help="torchvision vgg16-397923af.pth (or safetensors) for LPIPS; default: "
                                              "CVVAE_VGG16 or torch.hub's cache, else LPIPS is n/a (never downloaded)")
    arg("--fvd-i3d", metavar="PATH", help="I3D TorchScript file for FVD (StyleGAN-V's i3d_torchscript.pt); "
                                          "FVD is n/a without it (never downloaded)")
    arg("--max-items", type=int, metavar="N", help="evaluate at most N readable items of each kind")
    arg("--baseline", action="append", choices=["bicubic-8x"], default=[],
        help="a trivial codec measured on the same frames (bicubic-8x: each frame shrunk 8x and enlarged back)")
    arg("--dtype", default="fp32", choices=DTYPE_CHOICES, help="compute precision (the paper evaluates in fp32)")
    arg("--device", help="cpu or cuda (default: cuda when available)")
    arg("-o", "--output", required=True, metavar="DIR", help="report folder (replaced if it exists)")
    p.set_defaults(func=run)


def _per_weights(values: list, n: int, flag: str) -> list:
    """A flag given once (for every --weights) or once per --weights, as one value per --weights."""
    if len(values) not in (1, n):
        raise InputError(f"{flag} given {len(values)} times for {n} --weights: give it once or once per --weights")
    return values * n if len(values) == 1 else values


def _models(args: argparse.Namespace, device) -> list:
    """(name, model) of every --weights, names unique."""
    from ..eval.evaluate import unique_name
    from ..model import CVVAE

    subs = _per_weights(args.subfolder or [None], len(args.weights), "--subfolder")
    if args.name and len(args.name) != len(args.weights):
        raise InputError(f"--name given {len(args.name)} times for {len(args.weights)} --weights")
    modes = _per_weights(args.chunk_mode or ["official"], len(args.weights), "--chunk-mode")
    weights, taken = [], set()
    for k, (w, s) in enumerate(zip(args.weights, subs)):
        model = CVVAE.from_pretrained(w, subfolder=s).to(device).requires_grad_(False).eval()
        model.chunk_mode = modes[k]
        label = args.name[k] if args.name else f"{Path(w).name}/{s}" if s else Path(w).name or str(w)
        if args.chunk_mode and len(set(modes)) > 1 and not args.name:
            label += f" ({modes[k]})"
        weights.append((unique_name(label, taken), model))
    return weights


def run(args: argparse.Namespace) -> None:
    """Load the models, evaluate, write the report, print a summary."""
    from ..eval.compat import load_image_vae
    from ..eval.evaluate import evaluate
    from ..eval.lpips import local_lpips
    from ..eval.report import write_report

    if not args.videos and not args.images:
        raise InputError("give --videos and/or --images")
    out = Path(args.output)
    if not out.parent.is_dir():
        raise InputError(f"output folder does not exist: {out.parent}")
    if out.exists() and not out.is_dir():
        raise InputError(f"output {out} exists and is not a folder")
    device = resolve_device(args.device)
    weights = _models(args, device)
    image_vae = load_image_vae(args.image_vae, device) if args.image_vae else None
    lpips = local_lpips(args.lpips_vgg16)
    metrics = evaluate(weights, args.videos, args.images, frames=args.frames, stride=args.stride, size=args.size,
                       image_vae=image_vae, max_items=args.max_items, lpips=lpips.to(device) if lpips else None,
                       fvd_i3d=args.fvd_i3d, dtype=args.dtype, progress=not (args.quiet or args.json),
                       baselines=args.baseline)
    write_report(metrics, out)
    summary, lines = _summary(metrics, out)
    report(args, summary, lines)


def _summary(metrics: dict, out: Path) -> tuple[dict, list[str]]:
    from ..eval.report import fmt_value as f
    from ..eval.report import jsonable

    summary = {"output": str(out), "skipped": len(metrics["skipped"]),
               "reconstruction": jsonable(metrics["reconstruction"]), "compatibility": {}}
    lines = []
    for name, r in metrics["reconstruction"].items():
        v, i = r["videos"], r["images"]
        parts = []
        if v["count"]:
            parts.append(f"videos {v['count']}: PSNR {f(v['psnr'])} SSIM {f(v['ssim'], 4)} "
                         f"LPIPS {f(v['lpips'], 4)} FVD {f(v['fvd'])}")
        if i["count"]:
            parts.append(f"images {i['count']}: PSNR {f(i['psnr'])} SSIM {f(i['ssim'], 4)} LPIPS {f(i['lpips'], 4)}")
        lines.append(f"{name}: " + " | ".join(parts))
        c = metrics["compatibility"]
        if isinstance(c, dict) and isinstance(c.get(name), dict):
            a, cross = c[name]["image_mode"], c[name]["cross_decoding"]["mappings"]
            summary["compatibility"][name] = {"image_mode_psnr": a["psnr_cvvae_vs_image_vae"],
                                              "cross_decoding_psnr": {m: x["psnr"] for m, x in cross.items()}}
            rnd = cross["random"]
            lines.append(f"  vs image VAE: image-mode agreement PSNR {f(a['psnr_cvvae_vs_image_vae'])} dB; "
                         f"cross-decoding (random) {f(rnd['psnr'])} dB vs the image VAE's "
                         f"{f(rnd['image_vae_psnr'])} dB")
    skipped = f" ({len(metrics['skipped'])} skipped)" if metrics["skipped"] else ""
    lines.append(f"report: {out / 'report.md'}{skipped}")
    return summary, lines
