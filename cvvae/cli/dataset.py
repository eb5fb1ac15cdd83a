"""`cvvae encode-dataset`: a video dataset to latent shards (`cvvae.data.encode`), under torchrun for many
processes."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from ..errors import InputError
from .common import HelpFormatter, load_model, note, report


def add_parsers(sub: argparse._SubParsersAction, parents: dict[str, argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "encode-dataset", parents=[parents["common"], parents["model"]], formatter_class=HelpFormatter,
        help="encode a video dataset to latent shards for diffusion training (torchrun for many processes)",
        description="Encode every clip of a folder, CSV/JSONL manifest or webdataset shards into webdataset tar "
        "shards of unscaled latents (KEY.latents.safetensors + KEY.json). Re-running the same command resumes "
        "(finished shards are kept); under torchrun every process encodes its share: "
        "`torchrun --nproc_per_node N --no-python cvvae encode-dataset ...`. Read with cvvae.data.LatentDataset.")
    p.add_argument("source", help="folder, CSV/JSONL manifest (path, caption, extra columns), or webdataset shards "
                   "('data/shard-*.tar', quoted)")
    p.add_argument("-o", "--output", type=Path, required=True, help="output folder (created; reused to resume)")
    p.add_argument("--frames", type=int, help="frames per clip, 1 + 4k (default 17; with --buckets each bucket "
                   "sets its own)")
    p.add_argument("--stride", type=int, default=1, help="frame step within a clip; videos too short for the clip at "
                   "this stride are skipped (listed in skipped.jsonl)")
    p.add_argument("--size", type=int, help="short-side resize then centre crop SIZE x SIZE, a multiple of 8 "
                   "(default 256; 0 keeps each video's size)")
    p.add_argument("--buckets", help="comma-separated FRAMESxHEIGHTxWIDTH buckets, e.g. 17x256x256,17x192x320: each "
                   "video goes to the bucket of the closest aspect ratio, resized to cover it, centre-cropped")
    p.add_argument("--clips-per-video", type=int, default=1, help="clips drawn per video (random starts)")
    p.add_argument("--logvar", action="store_true", help="also store the posterior's logvar (so training can sample "
                   "latents: LatentDataset(sample=True))")
    p.add_argument("--sample", action="store_true", help=argparse.SUPPRESS)  # the former name of --logvar
    p.add_argument("--batch-size", type=int, default=1, help="clips of one shape encoded together")
    p.add_argument("--num-workers", type=int, default=4, help="DataLoader processes decoding clips (0: decode in "
                   "the main process)")
    p.add_argument("--shard-size", type=int, default=1000, help="clips per output shard")
    p.add_argument("--seed", type=int, default=0, help="seed of the clip starts (clip i of video v is a function of "
                   "seed, v, i)")
    p.add_argument("--rank-timeout", type=float, default=600.0, metavar="SEC",
                   help="rank 0 gives up (exit 2) when another rank has not reported for this long")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Sets up torch.distributed under torchrun, encodes, prints the summary (rank 0)."""
    import torch

    from ..data import encode_dataset

    if args.sample:
        note(args, "--sample is now called --logvar (it stores the posterior's logvar next to its mean)")
        args.logvar = True
    if args.buckets and (args.frames is not None or args.size is not None):
        raise InputError("--buckets sets frames and size per bucket: drop --frames/--size")
    dist = torch.distributed
    world = int(os.environ.get("WORLD_SIZE", "1"))
    own_group = world > 1 and dist.is_available() and not dist.is_initialized()
    if own_group:
        if torch.cuda.is_available() and (args.device or "cuda").startswith("cuda"):
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # "cuda" now means this rank's GPU
        dist.init_process_group("gloo")  # only a broadcast at the start: gloo works on CPU and GPU machines
    try:
        model, model_id = load_model(args, required=True)
        frames = 17 if args.frames is None else args.frames
        size = 256 if args.size is None else (args.size or None)  # --size 0: keep each video's size
        summary = encode_dataset(
            model, args.source, args.output, frames=frames, stride=args.stride, size=size,
            buckets=args.buckets or None, clips_per_video=args.clips_per_video, sample=args.logvar,
            batch_size=args.batch_size, num_workers=args.num_workers, shard_size=args.shard_size, dtype=args.dtype,
            seed=args.seed, model_id=model_id, progress=not (args.quiet or args.json),
            rank_timeout=args.rank_timeout)
    finally:
        if own_group:
            dist.destroy_process_group()
    if "out_dir" in summary:  # rank 0
        s = summary
        report(args, s, [
            f"{s['out_dir']}: {s['clips']} clips in {s['shards']} shards, {s['skipped']} skipped (see skipped.jsonl)",
            (f"{s['clips_written']} clips encoded in {s['seconds']} s ({s['clips_per_s']} clips/s) by "
             f"{s['world_size']} process(es); {s['shards_reused']} shards kept from earlier runs")])
    return summary
