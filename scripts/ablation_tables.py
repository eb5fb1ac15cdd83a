#!/usr/bin/env python3
"""Markdown tables of the bundled model's ablation from a `cvvae eval` metrics.json (docs/reproduction.md).

    python scripts/ablation_tables.py runs/eval-heldout/metrics.json [--curves PLOT.png RUN_DIR...]

Rows are the evaluated models in the order given to `cvvae eval`. Columns: held-out reconstruction
(PSNR/SSIM over all frames, frame 0, frames 1+), and compatibility with the image VAE: (b) cross-decoding
PSNR of D_i(E_v(X)) against psi(X) for each mapping psi with the gap to the image VAE's own
reconstruction of psi(X), (c) the video decoder on the image VAE's latents of psi_slice(X), and (a) agreement
with the image VAE on single frames.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _f(value, digits: int = 2) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else str(value)


def tables(metrics: dict) -> str:
    rec, compat = metrics["reconstruction"], metrics["compatibility"]
    names = list(rec)
    mappings = metrics["protocol"]["image_vae"]["mappings"]
    lines = ["| model | PSNR | SSIM | PSNR frame 0 | PSNR frames 1+ | "
             + " | ".join(f"cross-dec. {m} (gap)" for m in mappings) + " | (c) image latents -> video dec. "
             "| (a) image mode vs image VAE |",
             "|---" * (7 + len(mappings)) + "|"]
    for n in names:
        v, c = rec[n]["videos"], compat[n]
        cross = c["cross_decoding"]["mappings"]
        lines.append(
            f"| {n} | {_f(v['psnr'])} | {_f(v['ssim'], 4)} | {_f(v['psnr_first_frame'])} | {_f(v['psnr_later_frames'])} | "
            + " | ".join(f"{_f(cross[m]['psnr'])} ({_f(cross[m]['gap_db'])})" for m in mappings)
            + f" | {_f(c['video_decoder_from_image_latents']['psnr'])} | {_f(c['image_mode']['psnr_cvvae_vs_image_vae'])} |")
    ref = {m: compat[names[0]]["cross_decoding"]["mappings"][m]["image_vae_psnr"] for m in mappings}
    lines.append("")
    lines.append("Image VAE's own reconstruction of psi(X) (the reference of each gap): "
                 + ", ".join(f"{m} {_f(v)} dB" for m, v in ref.items())
                 + f"; {rec[names[0]]['videos']['count']} held-out clips of "
                 f"{metrics['protocol']['videos']['frames']} frames.")
    return "\n".join(lines)


def plot_curves(path: str, runs: list[str]) -> None:
    """Training curves (per-batch PSNR and the regularisation loss) of runs' metrics.jsonl, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for run in runs:
        records = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines() if line]
        name = Path(run).name.removeprefix("abl-")
        steps = [r["step"] for r in records]
        axes[0].plot(steps, [r["psnr"] for r in records], label=name)
        if any("reg_dec" in r for r in records):
            axes[1].plot(steps, [r.get("reg_dec", float("nan")) for r in records], label=name)
    axes[0].set(xlabel="step", ylabel="training-batch PSNR (dB)", title="reconstruction")
    axes[1].set(xlabel="step", ylabel="decoder regularisation loss", title="D_i(E_v(X)) vs psi(X)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str]) -> int:
    curves = []
    if "--curves" in argv:
        i = argv.index("--curves")
        argv, curves = argv[:i], argv[i + 1:]
    if len(argv) != 1 or len(curves) == 1:
        print("usage: " + __doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    try:
        metrics = json.loads(Path(argv[0]).read_text())
    except (OSError, ValueError) as e:
        print(f"error: cannot read {argv[0]}: {e}", file=sys.stderr)
        return 2
    print(tables(metrics))
    if curves:
        plot_curves(curves[0], curves[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
