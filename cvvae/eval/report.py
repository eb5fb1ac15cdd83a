"""The evaluation report: `evaluate`'s numbers rendered as metrics.json, report.md, report.html and plots.

Nothing is computed here (see `evaluate.py` for where each number comes from): this module formats, draws the
per-frame PSNR plot and the frame strips, and writes the folder atomically. It requires matplotlib (the `eval`
extra).
"""

from __future__ import annotations

import html
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from ..io.files import atomic_dir
from ..model.mapping import MAPPINGS
from .evaluate import DEFINITIONS, unique_name
from .metrics import MOTION_LEVELS

def fmt_value(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.2e}" if digits < 0 else f"{v:.{digits}f}"
    return str(v)


def jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items() if not isinstance(v, np.ndarray)}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9-]+", "_", name).strip("_") or "item"


Block = tuple  # ("h", level, text) | ("p", text) | ("ul", [text]) | ("table", headers, rows) | ("img", src, alt)


def _motion(item: dict[str, Any]) -> str:
    m = item["motion"]
    return f"{m['mean_frame_difference']:.1f} ({m['level']})"


def _compat_blocks(c: dict[str, Any] | str) -> list[Block]:
    """The compatibility section: (a)-(d) per model, with the cross-decoding gaps by motion level."""
    b: list[Block] = []
    b += [("h", 2, "Compatibility with the image VAE")]
    if isinstance(c, str):
        b += [("p", f"{c}: no image VAE given (--image-vae).")]
    else:
        ok = {n: r for n, r in c.items() if isinstance(r, dict)}
        b += [("p", f"{n}: {r}") for n, r in c.items() if isinstance(r, str)]
        if ok:
            b += [("h", 3, "(a) Image mode"), ("table",
                  ["model", "frames", "PSNR CV-VAE vs image VAE", "PSNR CV-VAE", "PSNR image VAE",
                   "latent rel. error (mean)", "latent rel. error (max)"],
                  [[n, fmt_value(a["frames"]), fmt_value(a["psnr_cvvae_vs_image_vae"]), fmt_value(a["psnr_cvvae"]),
                    fmt_value(a["psnr_image_vae"]), fmt_value(a["latent_rel_error_mean"], -1),
                    fmt_value(a["latent_rel_error_max"], -1)] for n, a in ((n, r["image_mode"]) for n, r in ok.items())]),
                  ("h", 3, "(b) Cross-decoding: CV-VAE latents -> image decoder, vs psi(X)"), ("table",
                  ["model", "mapping", "videos", "PSNR", "image VAE PSNR", "gap (dB)", "worst video gap (dB)"],
                  [[n, mp, fmt_value(r["cross_decoding"]["videos"]), fmt_value(v["psnr"]), fmt_value(v["image_vae_psnr"]),
                    fmt_value(v["gap_db"]), fmt_value(v["worst_gap_db"])]
                   for n, r in ok.items() for mp, v in r["cross_decoding"]["mappings"].items()]),
                  ("p", "Gap by motion level (" + DEFINITIONS["motion"] + "), mean / worst video:"), ("table",
                  ["model", "motion", "videos", *MAPPINGS],
                  [[n, level, fmt_value(g["videos"]), *(f"{fmt_value(v['gap_db'])} / {fmt_value(v['worst_gap_db'])}"
                                                         for v in g["mappings"].values())]
                   for n, r in ok.items() for level, g in r["cross_decoding"]["by_motion"].items()]),
                  ("h", 3, "(c) Image-VAE latents of psi_slice(X) -> CV-VAE decoder, vs X"), ("table",
                  ["model", "videos", "PSNR", "CV-VAE's own PSNR"],
                  [[n, fmt_value(v["videos"]), fmt_value(v["psnr"]), fmt_value(v["cvvae_psnr"])]
                   for n, v in ((n, r["video_decoder_from_image_latents"]) for n, r in ok.items())])]
            b += [("h", 3, "(d) Per-channel latent statistics (unscaled)")]
            for n, r in ok.items():
                s = r["latent_stats"]
                cv, iv = s["cvvae"], s["image_vae"]
                b += [("p", f"{n}: {cv['values_per_channel']:,} values per channel; scaling factors CV-VAE "
                            f"{s['cvvae_scaling_factor']}, image VAE {s['image_vae_scaling_factor']}."),
                      ("table", ["channel", "CV-VAE mean", "CV-VAE std", "image VAE mean", "image VAE std"],
                       [[str(k), fmt_value(cv["mean"][k], 4), fmt_value(cv["std"][k], 4), fmt_value(iv["mean"][k], 4),
                         fmt_value(iv["std"][k], 4)] for k in range(len(cv["mean"]))])]
    return b


def _blocks(m: dict[str, Any], strip_files: dict[str, str], plot: str | None) -> list[Block]:
    p, names = m["protocol"], list(m["models"])
    b: list[Block] = [("h", 1, "CV-VAE evaluation report")]
    pv, pi = p["videos"], p["images"]
    b += [("h", 2, "Protocol"), ("ul", [
        f"Videos: {pv['source']} - {pv['evaluated']} evaluated, {pv['skipped']} skipped of {pv['listed']} listed; "
        f"{pv['frames']} frames from frame {pv['start_frame']} with stride {pv['stride']}; {pv['resize']}; "
        f"{pv['crop']} crop; seam ratios over frames "
        f"{', '.join(f'{a}' if a == b else f'{a}-{b}' for a, b in pv['seam_spans']) or '(none)'}.",
        f"Images: {pi['source']} - {pi['evaluated']} evaluated, {pi['skipped']} skipped of {pi['listed']} listed; "
        f"{pi['resize']}; {pi['crop']} crop.",
        f"At most {p['max_items']} items of each kind." if p["max_items"] else "All items.",
        f"Latents: {p['latents']}; compute dtype {p['dtype']}.",
        f"Pixels: {p['pixels']}.",
        "FVD: " + (p["fvd"] if isinstance(p["fvd"], str) else
                   f"I3D {p['fvd']['i3d']} called as {p['fvd']['call']}; input {p['fvd']['input']}; "
                   f"{p['fvd']['clips']} clips, {p['fvd']['feature_dim']}-d features."),
        f"cvvae {m['cvvae_version']}, torch {m['timing']['torch']}, device {m['timing']['device']}, "
        f"{m['timing']['seconds']:.1f} s.",
    ])]
    b += [("h", 2, "Reconstruction"), ("table",
          ["model", "videos", "PSNR", "SSIM", "LPIPS", "FVD", "PSNR frame 0", "PSNR frames 1+", "temporal error",
           "seam ratio", "images", "PSNR", "SSIM", "LPIPS"],
          [[n, *(fmt_value(v[k], d) for k, d in (("count", 2), ("psnr", 2), ("ssim", 4), ("lpips", 4), ("fvd", 2),
                                                  ("psnr_first_frame", 2), ("psnr_later_frames", 2),
                                                  ("temporal_error", 4), ("seam_ratio", 3)) for v in [r["videos"]]),
            fmt_value(r["images"]["count"]), fmt_value(r["images"]["psnr"]), fmt_value(r["images"]["ssim"], 4),
            fmt_value(r["images"]["lpips"], 4)] for n, r in m["reconstruction"].items()]),
          ("p", "By motion level (" + DEFINITIONS["motion"] + "), video PSNR / SSIM:"),
          ("table", ["model", *(level for level, _ in MOTION_LEVELS)],
           [[n, *(f"{fmt_value(g['psnr'])} / {fmt_value(g['ssim'], 4)} ({g['videos']})" if g else "-"
                  for g in (r.get(level) for level, _ in MOTION_LEVELS))]
            for n, r in m["reconstruction_by_motion"].items()]),
          ("table", ["model", "latent channels", "parameters", "dtype", "scaling factor", "frames per round",
                     "chunk mode", "chunk boundaries (frame)"],
           [[n, fmt_value(i["latent_channels"]), f"{i['parameters']:,}", i["dtype"], fmt_value(i["scaling_factor"], 5),
             fmt_value(i["en_de_n_frames_a_time"]), i["chunk_mode"] + (f" (overlap {i['blend_overlap']})"
                                                                       if i.get("blend_overlap") else ""),
             ", ".join(map(str, i["chunk_boundaries"])) or "none"]
            for n, i in m["models"].items()])]
    if plot:
        b += [("h", 2, "Per-frame PSNR and temporal error"), ("img", plot, "per-frame PSNR and temporal error"),
              ("p", "Dashed lines: chunk boundaries. " + DEFINITIONS["per_frame_psnr"] + " Lower panel: "
               + DEFINITIONS["temporal_error"] + " Seam ratio: " + DEFINITIONS["seam_ratio"])]
    b += _compat_blocks(m["compatibility"])
    for kind in ("videos", "images"):
        rows = m["items"][kind]
        if rows:
            motion = kind == "videos"
            header = ["item", *(["motion"] if motion else []),
                      *[f"{n} {k}" for n in names for k in ("PSNR", "SSIM", "LPIPS")]]
            b += [("h", 2, f"Per item: {kind}"), ("table", header,
                  [[it["name"], *([_motion(it)] if motion else []),
                    *[fmt_value(it["models"][n][k], 2 if k == "psnr" else 4) for n in names
                      for k in ("psnr", "ssim", "lpips")]] for it in rows])]
    b += [("h", 2, "Skipped items")]
    b += [("table", ["path", "kind", "reason", "detail"], [[s["path"], s["kind"], s["reason"], s["detail"]]
                                                          for s in m["skipped"]])] if m["skipped"] else [("p", "None.")]
    if strip_files:
        b += [("h", 2, "Frame strips")]
        for name, file in strip_files.items():
            s = m["strips"][name]
            b += [("p", f"{name}: rows {', '.join(s['rows'])}; frames {', '.join(map(str, s['frames']))}."),
                  ("img", file, name)]
    b += [("h", 2, "Definitions"), ("ul", [f"{k}: {v}" for k, v in m["definitions"].items()])]
    return b


def _markdown(blocks: list[Block]) -> str:
    def cell(s: str) -> str:
        return str(s).replace("|", "\\|").replace("\n", " ")

    out = []
    for blk in blocks:
        if blk[0] == "h":
            out.append(f"{'#' * blk[1]} {blk[2]}")
        elif blk[0] == "p":
            out.append(blk[1])
        elif blk[0] == "ul":
            out.append("\n".join(f"- {x}" for x in blk[1]))
        elif blk[0] == "table":
            lines = ["| " + " | ".join(map(cell, blk[1])) + " |", "|" + "---|" * len(blk[1])]
            lines += ["| " + " | ".join(map(cell, r)) + " |" for r in blk[2]]
            out.append("\n".join(lines))
        elif blk[0] == "img":
            out.append(f"![{blk[2]}]({blk[1]})")
    return "\n\n".join(out) + "\n"


def _html(blocks: list[Block]) -> str:
    e = html.escape
    body = []
    for blk in blocks:
        if blk[0] == "h":
            body.append(f"<h{blk[1]}>{e(blk[2])}</h{blk[1]}>")
        elif blk[0] == "p":
            body.append(f"<p>{e(blk[1])}</p>")
        elif blk[0] == "ul":
            body.append("<ul>" + "".join(f"<li>{e(x)}</li>" for x in blk[1]) + "</ul>")
        elif blk[0] == "table":
            head = "".join(f"<th>{e(str(h))}</th>" for h in blk[1])
            rows = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in blk[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif blk[0] == "img":
            body.append(f'<p><img src="{e(blk[1])}" alt="{e(blk[2])}"></p>')
    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
             "text-align:right}td:first-child,th:first-child{text-align:left}img{max-width:100%;"
             "image-rendering:pixelated}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>CV-VAE evaluation report</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def _plot(m: dict[str, Any], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 7), dpi=100)
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True)
    bounds = {n: tuple(i["chunk_boundaries"]) for n, i in m["models"].items()}
    same = len(set(bounds.values())) == 1
    temporal = m["per_frame_temporal_error"]
    for name, curve in m["per_frame_psnr"].items():
        if not curve:
            continue
        (line,) = top.plot(range(len(curve)), curve, marker="o", markersize=3, label=name)
        if temporal.get(name):  # transition t -> t+1 drawn at t + 0.5
            bottom.plot([t + 0.5 for t in range(len(temporal[name]))], temporal[name], marker="o", markersize=3,
                        color=line.get_color(), label=name)
        for ax in (top, bottom) if not same else ():
            for k, f in enumerate(bounds.get(name, ())):
                ax.axvline(f, linestyle="--", linewidth=1, color=line.get_color(),
                           label=f"{name}: chunk boundary" if k == 0 and ax is top else None)
    if same:
        for ax in (top, bottom):
            for k, f in enumerate(next(iter(bounds.values()))):
                ax.axvline(f, linestyle="--", linewidth=1, color="gray",
                           label="chunk boundary" if k == 0 and ax is top else None)
    top.set_ylabel("PSNR (dB)")
    top.set_title("Per-frame PSNR and temporal error, averaged over videos")
    bottom.set_xlabel("frame")
    bottom.set_ylabel("temporal error")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    top.legend()
    fig.tight_layout()
    fig.savefig(path)


def write_report(metrics: dict[str, Any], out_dir: str | os.PathLike) -> Path:
    """Write metrics.json, report.md, report.html (same content), per_frame_psnr.png (when there are videos)
    and strips/<item>.png into `out_dir`, built in a temporary folder next to it and renamed when complete
    (an existing folder is replaced). Returns the folder."""
    import matplotlib.image

    out = Path(out_dir).expanduser()
    with atomic_dir(out, replace=True) as tmp:
        strip_files: dict[str, str] = {}
        used: set[str] = set()
        for name, s in metrics.get("strips", {}).items():
            if isinstance(s.get("image"), np.ndarray):
                file = f"strips/{unique_name(_file_name(name), used, '-')}.png"
                (tmp / "strips").mkdir(exist_ok=True)
                matplotlib.image.imsave(tmp / file, s["image"])
                strip_files[name] = file
            elif s.get("file"):
                strip_files[name] = s["file"]
        plot = None
        if any(metrics["per_frame_psnr"].values()):
            plot = "per_frame_psnr.png"
            _plot(metrics, tmp / plot)
        data = jsonable(metrics)
        for name, file in strip_files.items():
            data["strips"][name]["file"] = file
        (tmp / "metrics.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        blocks = _blocks(data, strip_files, plot)
        (tmp / "report.md").write_text(_markdown(blocks), encoding="utf-8")
        (tmp / "report.html").write_text(_html(blocks), encoding="utf-8")
    return out

