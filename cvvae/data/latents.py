"""Latent datasets: encode a video dataset to latent shards once, then train a diffusion model on them.

Writer, :func:`encode_dataset` (``cvvae encode-dataset``): every clip of a folder, CSV/JSONL manifest or
webdataset shards is encoded with the VAE and stored, unscaled, in webdataset tar shards. Reader,
:class:`LatentDataset`: streams those shards to a DataLoader, scaled for the diffusion model if asked.

Layout of ``OUT_DIR``::

    meta.json                    model, clip settings, stored fields, source listing (written once; a re-run
                                 with other settings is refused)
    shard-000000.tar             jobs [0, shard_size): per clip ``KEY.latents.safetensors`` + ``KEY.json``
    shard-000000.skipped.jsonl   the shard's skipped clips, one JSON object a line (path, reason, detail)
    ...
    skipped.jsonl, index.json    all skips, and the shard list with clip counts (rank 0, at the end)

Jobs. The item list (a folder sorted, a manifest in row order, shards sorted then in stored order) times
``clips_per_video``: job ``j`` is clip ``j % clips_per_video`` of item ``j // clips_per_video``; its clip is
a pure function of ``(seed, item, clip)`` (random start, centre crop), so any process computes any job
identically. A file that gives no clip (corrupt, truncated, too short; an image when ``frames > 1``) is
recorded in the sidecar with its reason and never stops the run. Shard ``n`` holds jobs ``[n * shard_size, (n + 1) *
shard_size)``, its members are keyed ``f"{n:06d}_{j:09d}"``. Shard numbers are global (not per rank),
so a run can be resumed with any number of processes.

Atomicity. A shard and its sidecar are written under hidden ``.NAME.partial`` names and renamed when
complete (sidecar first, then the tar: the tar's existence marks the shard done). Re-running the same
command redoes only the missing shards: no duplicates and no lost clips, also after ``kill -9``.

Processes. Under ``torchrun`` every rank runs the same call: rank 0 checks/writes ``meta.json`` and lists
the missing shards, which are dealt round-robin (one broadcast at the start, nothing in the hot loop).
At the end rank 0 waits until every shard file exists (a file-system barrier with no timeout, so an
uneven split cannot time out a collective), then writes ``skipped.jsonl`` and ``index.json``. Without
an initialised process group (``RANK``/``WORLD_SIZE`` only) shard ``n`` is done by rank ``n % world``.
All ranks must see ``OUT_DIR`` on a shared file system.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import math
import os
import sys
import tarfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from cvvae.errors import InputError

from .clips import ClipError, ClipSpec, _buffer_shuffle, _partition, collate, read_clip
from .sources import Item, _make_sample, _split_name, as_temp_file, expand_shards, list_items, tar_groups

if TYPE_CHECKING:
    from cvvae.model import CVVAE

__all__ = ["LatentDataset", "add_parser", "collate_latents", "encode_dataset", "parse_buckets", "run"]

logger = logging.getLogger("cvvae.data")

FORMAT, FORMAT_VERSION = "cvvae-latents", 1
Bucket = tuple[int, int, int]
_PARTIAL = ".partial"
# meta.json keys that may differ between runs into one folder; every other key must match.
_FREE_KEYS = frozenset({"cvvae_version", "source"})
_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def shard_name(n: int) -> str:
    """File name of global shard ``n``."""
    return f"shard-{n:06d}.tar"


def _sidecar_name(n: int) -> str:
    return f"shard-{n:06d}.skipped.jsonl"


def clip_key(n: int, job: int) -> str:
    """Webdataset key of job ``job`` in shard ``n``."""
    return f"{n:06d}_{job:09d}"


# ------------------------------------------------------------------------------------------ clips
def parse_buckets(text: str | Sequence[Sequence[int]]) -> list[Bucket]:
    """``"17x256x256,17x192x320"`` (or a list of ``(T, H, W)``) -> ``[(17, 256, 256), (17, 192, 320)]``."""
    parts = [p.strip() for p in text.split(",") if p.strip()] if isinstance(text, str) else list(text)
    buckets = []
    for part in parts:
        try:
            t, h, w = (int(v) for v in (part.lower().split("x") if isinstance(part, str) else part))
        except (ValueError, TypeError):
            raise InputError(f"bad bucket {part!r}: write FRAMESxHEIGHTxWIDTH, e.g. 17x256x256") from None
        if t < 1 or (t - 1) % 4 or h < 8 or w < 8 or h % 8 or w % 8:
            raise InputError(f"bad bucket {part!r}: frames must be 1 + 4k, height and width multiples of 8")
        buckets.append((t, h, w))
    if not buckets:
        raise InputError("no buckets given (e.g. 17x256x256,17x192x320)")
    return buckets


@dataclass(frozen=True)
class _Plan:
    """How every job's clip is cut; a pure function of (seed, item index, clip index)."""

    frames: int
    stride: int
    size: int | None
    buckets: tuple[Bucket, ...] | None
    seed: int
    clips_per_video: int

    def bucket_of(self, height: int, width: int) -> Bucket:
        """The bucket whose aspect ratio H/W is closest to the video's, in log space (first on ties)."""
        aspect = math.log(height / width)
        return min(self.buckets, key=lambda b: abs(math.log(b[1] / b[2]) - aspect))

    def spec(self, height: int | None = None, width: int | None = None) -> tuple[ClipSpec, Bucket | None]:
        """The ClipSpec of a ``height x width`` video (the size matters only with buckets)."""
        if not self.buckets:
            return ClipSpec(frames=self.frames, stride=self.stride, short_side=self.size, crop=self.size,
                            random_crop=False, random_start=True), None
        bucket = self.bucket_of(height, width)
        t, bh, bw = bucket
        # Scale so the bucket's crop is covered: max(bh / H, bw / W), as a short side (may shrink or enlarge).
        short = math.ceil(max(bh / height, bw / width) * min(height, width) - 1e-9)
        return ClipSpec(frames=t, stride=self.stride, short_side=max(1, short), crop=(bh, bw), random_crop=False,
                        random_start=True), bucket

    def read(self, item: Item, item_index: int, clip_index: int) -> dict[str, Any]:
        """The clip of job ``(item_index, clip_index)``; raises :class:`ClipError`."""
        rng = np.random.default_rng([self.seed, item_index, clip_index])
        if "_error" in item:
            raise ClipError("unreadable", item["_error"])
        if "_tar" not in item:
            return self._read_media(item, rng)
        sample = _make_sample(item["_tar"], item["_key"], _read_members(item))
        if sample.suffix is None:
            raise ClipError("unreadable", f"{sample.path}: no video or image member")
        with as_temp_file(sample.data, sample.suffix) as tmp:
            try:
                clip = self._read_media({**sample.metadata, "path": str(tmp), "caption": sample.caption}, rng)
            except ClipError as e:
                raise ClipError(e.reason, e.detail.replace(str(tmp), sample.path)) from None
        clip["path"] = sample.path
        return clip

    def _read_media(self, item: Item, rng: np.random.Generator) -> dict[str, Any]:
        height = width = None
        if self.buckets:
            from cvvae.io.video import probe

            try:
                info = probe(item["path"])
            except InputError as e:
                raise ClipError("unreadable", str(e)) from None
            height, width = info.height, info.width
        spec, bucket = self.spec(height, width)
        clip = read_clip(item, spec, rng)
        if clip["video"].shape[1] != spec.frames:  # an image, read as 1 frame
            raise ClipError("too short", f"{item['path']}: 1 frame (an image), the clip needs {spec.frames}")
        clip["bucket"] = bucket
        return clip


def _read_members(item: Item) -> dict[str, bytes]:
    """The member bytes of a tar sample listed by :func:`_tar_items` (random access, no scan)."""
    try:
        with tarfile.open(item["_tar"], "r:*") as tar:
            members = {}
            for ext, offset, size in item["_members"]:
                tar.fileobj.seek(offset)
                members[ext] = tar.fileobj.read(size)
            return members
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ClipError("unreadable", f"cannot read {item['path']}: {e}") from None


def _tar_items(shard: str) -> list[Item]:
    """One item per sample of a tar shard (members adjacent by key), from the headers only."""
    items: list[Item] = []
    key, members = None, []

    def flush() -> None:
        if members:
            items.append({"path": f"{shard}#{key}", "caption": None, "_tar": shard, "_key": key,
                          "_members": tuple(members)})

    try:
        with tarfile.open(shard, "r:*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name_key, ext = _split_name(member.name)
                if name_key != key:
                    flush()
                    key, members = name_key, []
                members.append((ext, member.offset_data, member.size))
        flush()
    except (tarfile.TarError, OSError, EOFError) as e:
        flush()
        items.append({"path": shard, "caption": None, "_error": f"cannot read shard {shard}: {e}"})
    return items


def _is_shards(source: Any) -> bool:
    if isinstance(source, (str, os.PathLike)):
        return str(source).endswith(".tar")
    return isinstance(source, Sequence) and bool(source) and all(_is_shards(s) for s in source)


def list_source(source: str | os.PathLike[str] | Sequence[str]) -> list[Item]:
    """Items of a folder, a CSV/JSONL manifest, or webdataset shards (a ``.tar`` path/glob or a list)."""
    if _is_shards(source):
        return [item for shard in expand_shards(source) for item in _tar_items(shard)]
    return list_items(source)


def _digest(items: list[Item]) -> str:
    h = hashlib.sha1()
    for item in items:
        path, _, key = item["path"].partition("#") if "_tar" in item else (item["path"], "", "")
        h.update(f"{os.path.abspath(path)}#{key}\n".encode())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ writer
class _Jobs(Dataset):
    """Map-style dataset over this rank's jobs: each gives its clip or a skip record (decoded in workers)."""

    def __init__(self, items: list[Item], jobs: list[int], plan: _Plan) -> None:
        self.items, self.jobs, self.plan = items, jobs, plan

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, i: int) -> dict[str, Any]:
        job = self.jobs[i]
        item_index, clip_index = divmod(job, self.plan.clips_per_video)
        item = self.items[item_index]
        try:
            return {"job": job, "clip": self.plan.read(item, item_index, clip_index)}
        except ClipError as e:
            error = e
        except Exception as e:  # one bad file must never stop the run
            logger.warning("unexpected error reading %s", item["path"], exc_info=True)
            error = ClipError("error", f"{item['path']}: {type(e).__name__}: {e}")
        return {"job": job, "path": item["path"], "reason": error.reason, "detail": error.detail}


def _identity(x: Any) -> Any:
    return x


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # mtime 0: a redone shard is byte-identical
    tar.addfile(info, io.BytesIO(data))


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}{_PARTIAL}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class _ShardWriter:
    """One shard being written under a hidden temporary name; :meth:`commit` renames it into place."""

    def __init__(self, out: Path, n: int) -> None:
        self.out, self.n = out, n
        self.tmp = out / f".{shard_name(n)}{_PARTIAL}"
        self.file = open(self.tmp, "wb")  # truncates a stale partial of an interrupted run
        self.tar = tarfile.open(fileobj=self.file, mode="w", format=tarfile.PAX_FORMAT)
        self.skipped: list[dict[str, Any]] = []
        self.clips = 0

    def add(self, key: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        from safetensors.torch import save

        _add_member(self.tar, f"{key}.latents.safetensors", save(tensors))
        _add_member(self.tar, f"{key}.json", json.dumps(meta, default=str).encode())
        self.clips += 1

    def skip(self, record: dict[str, Any]) -> None:
        self.skipped.append(record)

    def commit(self) -> None:
        self.tar.close()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        self.skipped.sort(key=lambda r: r["job"])
        lines = "".join(json.dumps(r, default=str) + "\n" for r in self.skipped)
        _write_atomic(self.out / _sidecar_name(self.n), lines.encode())
        os.replace(self.tmp, self.out / shard_name(self.n))


class _Progress:
    """Each rank writes its counts to ``.progress-rank{r}``; rank 0 sums them into one bar."""

    def __init__(self, out: Path, rank: int, world: int, total: int, show: bool) -> None:
        self.out, self.rank, self.world = out, rank, world
        self.counts = {"jobs": 0, "clips": 0, "skipped": 0}
        self.last_write = self.last_poll = 0.0
        self.bar = None
        if rank == 0 and show:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="encode-dataset", unit="clip", file=sys.stderr, dynamic_ncols=True,
                            smoothing=0.05)
        self.write()

    def path(self, rank: int) -> Path:
        return self.out / f".progress-rank{rank}"

    def add(self, clips: int = 0, skipped: int = 0) -> None:
        self.counts["jobs"] += clips + skipped
        self.counts["clips"] += clips
        self.counts["skipped"] += skipped
        now = time.monotonic()
        if now - self.last_write > 2.0:
            self.write()
        if now - self.last_poll > 0.5:
            self.poll()

    def write(self) -> None:
        self.last_write = time.monotonic()
        tmp = self.out / f".progress-rank{self.rank}{_PARTIAL}"
        tmp.write_text(json.dumps(self.counts))
        os.replace(tmp, self.path(self.rank))

    def poll(self) -> None:
        """Rank 0: show the sum of every rank's count."""
        self.last_poll = time.monotonic()
        if self.bar is None:
            return
        done = self.counts["jobs"]
        for r in range(1, self.world):
            try:
                done += json.loads(self.path(r).read_text())["jobs"]
            except (OSError, ValueError, KeyError):
                pass
        if done > self.bar.n:
            self.bar.update(min(done, self.bar.total) - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.update(self.bar.total - self.bar.n)
            self.bar.close()


def _rank_world() -> tuple[int, int, bool]:
    """``(rank, world, has_group)``: from torch.distributed when initialised, else RANK/WORLD_SIZE."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), True
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")), False


def _check_meta(out: Path, meta: dict[str, Any]) -> str | None:
    """Why ``OUT_DIR`` cannot take this run (None if it can)."""
    path = out / "meta.json"
    if not path.exists():
        if any(out.glob("shard-*.tar")):
            return f"{out} holds shards but no meta.json: use an empty or new output folder"
        return None
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return f"{path} is unreadable ({e}): use a new output folder"
    diffs = [f"{k}: {old.get(k)!r} there, {meta.get(k)!r} now" if k != "items_digest" else "the source lists "
             "other files" for k in sorted(set(old) | set(meta)) if k not in _FREE_KEYS and old.get(k) != meta.get(k)]
    if diffs:
        return (f"{out} was written by a different encode-dataset command ({'; '.join(diffs)}): resuming would mix "
                "two datasets; use a new output folder, or the same settings to resume")
    return None


def _shard_jobs(n: int, shard_size: int, n_jobs: int) -> range:
    return range(n * shard_size, min((n + 1) * shard_size, n_jobs))


def _read_sidecar(out: Path, n: int) -> list[dict[str, Any]]:
    path = out / _sidecar_name(n)
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as e:
        raise InputError(f"{path} is missing or unreadable ({e}): delete {shard_name(n)} too and re-run the same "
                         "command to redo that shard") from None


def encode_dataset(model: CVVAE, source: str | os.PathLike[str] | Sequence[str], out_dir: str | os.PathLike[str], *,
                   frames: int = 17, stride: int = 1, size: int | None = 256,
                   buckets: Sequence[Bucket] | str | None = None, clips_per_video: int = 1, sample: bool = False,
                   batch_size: int = 1, num_workers: int = 0, shard_size: int = 1000, dtype: str | torch.dtype = "fp32",
                   seed: int = 0, model_id: str = "", progress: bool = True) -> dict[str, Any]:
    """Encode every clip of ``source`` into latent shards in ``out_dir`` (see the module docstring).

    Args:
        source: a folder, a CSV/JSONL manifest (``path``, ``caption``, extra columns kept), or webdataset
            shards (a ``.tar`` path or glob, or a list of them).
        frames, stride: clip length (1 + 4k) and frame step; the start is random (seeded) per clip.
        size: short-side resize then centre crop ``size x size`` (a multiple of 8); None keeps each video's size.
        buckets: ``[(T, H, W), ...]`` or ``"17x256x256,17x192x320"``: each video goes to the bucket of the
            closest aspect ratio (log H/W), is resized to cover it and centre-cropped. Overrides ``frames``
            and ``size``.
        clips_per_video: clips drawn from each item.
        sample: store the posterior's logvar next to its mean (to sample latents when training).
        batch_size: clips of one shape encoded together; num_workers: DataLoader processes decoding clips.
        shard_size: jobs per shard; dtype: compute precision (``codec.encode``); seed: clip selection.
        model_id: recorded in meta.json (and checked on re-runs); progress: a bar on rank 0.

    Returns rank 0's summary (``clips``, ``skipped``: the whole dataset; ``clips_written``: this run, all
    ranks; ``shards``, ``shards_reused``, ``seconds``, ``clips_per_s``); other ranks return their own counts.
    Raises :class:`InputError` when ``out_dir`` holds a dataset made with other settings.
    """
    from cvvae import __version__, codec
    from cvvae.model.chunking import tile_size

    t0 = time.perf_counter()
    if buckets is not None:
        buckets = tuple(parse_buckets(buckets))
        frames, size = None, None
    else:
        if not isinstance(frames, int) or frames < 1 or (frames - 1) % 4:
            raise InputError(f"frames must be 1 + 4k (1, 5, 9, 17, ...), got {frames!r}")
        if size is not None and (size < 8 or size % 8):
            raise InputError(f"size must be a multiple of 8 (latents are 8x smaller), got {size!r}")
    for name, value, low in (("stride", stride, 1), ("clips_per_video", clips_per_video, 1),
                             ("batch_size", batch_size, 1), ("num_workers", num_workers, 0),
                             ("shard_size", shard_size, 1)):
        if not isinstance(value, int) or value < low:
            raise InputError(f"{name} must be an integer >= {low}, got {value!r}")
    out = Path(out_dir).expanduser()
    if not out.parent.is_dir():
        raise InputError(f"output folder's parent does not exist: {out.parent}")
    device = next(model.parameters()).device
    compute = codec.resolve_dtype(dtype, device)
    rank, world, has_group = _rank_world()

    items = list_source(source)
    if not items:
        raise InputError(f"{source}: no videos or images found")
    plan = _Plan(frames, stride, size, buckets, int(seed), clips_per_video)
    n_jobs = len(items) * clips_per_video
    n_shards = -(-n_jobs // shard_size)
    cfg = model.config
    meta = dict(format=FORMAT, version=FORMAT_VERSION, model=model_id, z_channels=cfg.z_channels,
                scaling_factor=cfg.scaling_factor, shift_factor=cfg.shift_factor, dtype=_DTYPE_NAMES[compute],
                tile_spatial_size=tile_size(model), frames=frames, stride=stride, size=size,
                buckets=[list(b) for b in buckets] if buckets else None,
                clips_per_video=clips_per_video, fields=["mean", "logvar"] if sample else ["mean"], seed=int(seed),
                shard_size=shard_size, items=len(items), items_digest=_digest(items), jobs=n_jobs, shards=n_shards,
                source=str(source) if isinstance(source, (str, os.PathLike)) else [str(s) for s in source],
                cvvae_version=__version__)

    # Start: rank 0 checks (or writes) meta.json and lists the missing shards; one broadcast tells every rank.
    out.mkdir(exist_ok=True)
    missing: list[int] = []
    error = None
    if rank == 0 or not has_group:
        error = _check_meta(out, meta)
        missing = [n for n in range(n_shards) if not (out / shard_name(n)).exists()]
        if error is None and rank == 0 and not (out / "meta.json").exists():
            _write_atomic(out / "meta.json", json.dumps(meta, indent=2).encode())
    if has_group:
        box = [error, missing, meta]
        torch.distributed.broadcast_object_list(box, src=0)
        error, missing = box[0], box[1]
        if error is None and box[2]["items_digest"] != meta["items_digest"]:
            error = f"rank {rank} lists other items in {source} than rank 0: every rank must see the same source"
        todo = missing[rank::world]
    else:
        todo = [n for n in missing if n % world == rank]
    if error is not None:
        raise InputError(error)

    counter = _Progress(out, rank, world, sum(len(_shard_jobs(n, shard_size, n_jobs)) for n in missing), progress)
    jobs = [j for n in todo for j in _shard_jobs(n, shard_size, n_jobs)]
    if jobs:
        _encode_jobs(model, _Jobs(items, jobs, plan), out, shard_size, batch_size, num_workers, compute, sample,
                     counter)
    if rank != 0:  # rank 0 stops reading progress files once every shard exists, which is now true of ours
        counter.path(rank).unlink(missing_ok=True)
        return dict(rank=rank, shards_done=len(todo), clips_written=counter.counts["clips"],
                    skipped=counter.counts["skipped"], seconds=round(time.perf_counter() - t0, 2))

    # End (rank 0): wait until every shard exists (any rank may still be working), then index and merge.
    waiting = missing
    while waiting := [n for n in waiting if not (out / shard_name(n)).exists()]:
        counter.poll()
        time.sleep(0.5)
    counter.close()
    shards, skipped_lines, written, redone = [], [], 0, set(missing)
    for n in range(n_shards):
        records = _read_sidecar(out, n)
        skipped_lines += records
        clips = len(_shard_jobs(n, shard_size, n_jobs)) - len(records)
        shards.append(dict(name=shard_name(n), jobs=len(_shard_jobs(n, shard_size, n_jobs)), clips=clips,
                           skipped=len(records)))
        written += clips if n in redone else 0
    total = sum(s["clips"] for s in shards)
    _write_atomic(out / "skipped.jsonl", "".join(json.dumps(r, default=str) + "\n" for r in skipped_lines).encode())
    index = dict(format=FORMAT, version=FORMAT_VERSION, shards=shards, clips=total, skipped=len(skipped_lines),
                 jobs=n_jobs)
    _write_atomic(out / "index.json", json.dumps(index, indent=2).encode())
    for stale in [*out.glob(f".*{_PARTIAL}"), *out.glob(".progress-rank*")]:
        stale.unlink(missing_ok=True)
    seconds = time.perf_counter() - t0
    return dict(out_dir=str(out), shards=n_shards, shards_reused=n_shards - len(missing), clips=total,
                skipped=len(skipped_lines), clips_written=written, seconds=round(seconds, 2),
                clips_per_s=round(written / seconds, 3) if seconds > 0 else None, world_size=world)


def _encode_jobs(model: CVVAE, jobs: _Jobs, out: Path, shard_size: int, batch_size: int, num_workers: int,
                 dtype: torch.dtype, sample: bool, counter: _Progress) -> None:
    """Decode clips in DataLoader workers, encode batches of equal shape, write shards as they complete."""
    from cvvae import codec

    loader = DataLoader(jobs, batch_size=None, shuffle=False, num_workers=num_workers, collate_fn=_identity,
                        prefetch_factor=4 if num_workers else None)
    writer: _ShardWriter | None = None
    pending: dict[tuple[int, ...], list[dict[str, Any]]] = {}

    def flush(shape: tuple[int, ...]) -> None:
        records = pending.pop(shape)
        batch = torch.stack([r["clip"]["video"] for r in records])
        latents = codec.encode(model, batch, dtype=dtype, keep_logvar=sample)
        for i, record in enumerate(records):
            tensors = {"mean": latents.mean[i].detach().cpu().clone()}
            if sample:
                tensors["logvar"] = latents.logvar[i].detach().cpu().clone()
            key = clip_key(writer.n, record["job"])
            writer.add(key, tensors, _clip_meta(record, key, tensors["mean"].shape, jobs.plan))
        counter.add(clips=len(records))

    for record in loader:
        n = record["job"] // shard_size
        if writer is None or writer.n != n:
            if writer is not None:
                for shape in list(pending):
                    flush(shape)
                writer.commit()
            writer = _ShardWriter(out, n)
        if "clip" not in record:
            logger.info("skipped %s: %s: %s", record["path"], record["reason"], record["detail"])
            writer.skip(dict(key=clip_key(n, record["job"]), **record, item=record["job"] // jobs.plan.clips_per_video,
                             clip=record["job"] % jobs.plan.clips_per_video))
            counter.add(skipped=1)
            continue
        shape = tuple(record["clip"]["video"].shape)
        pending.setdefault(shape, []).append(record)
        if len(pending[shape]) >= batch_size:
            flush(shape)
    if writer is not None:
        for shape in list(pending):
            flush(shape)
        writer.commit()


def _clip_meta(record: dict[str, Any], key: str, shape: torch.Size, plan: _Plan) -> dict[str, Any]:
    clip = {k: v for k, v in record["clip"].items() if k != "video"}
    job = record["job"]
    _, frames, height, width = record["clip"]["video"].shape
    return {**clip, "key": key, "job": job, "item": job // plan.clips_per_video, "clip": job % plan.clips_per_video,
            "crop": list(clip["crop"]), "orig_size": list(clip["orig_size"]),
            "bucket": list(clip["bucket"]) if clip.get("bucket") else None,
            "num_frames": frames, "height": height, "width": width, "latent_shape": list(shape)}


# ------------------------------------------------------------------------------------------ reader
def collate_latents(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack ``latents`` to ``(B, C, t, h, w)``; every other key becomes a list."""
    return collate(samples, key="latents")


class LatentDataset(IterableDataset):
    """Clips of a folder written by :func:`encode_dataset`, streamed shard by shard.

    Yields ``{"latents": (C, 1+k, h, w) float32, "caption": str | None, **metadata}`` (metadata: ``key``,
    ``path``, ``start``, ``stride``, ``fps``, ``crop``, ``orig_size``, ``bucket``, ``num_frames``, extra
    manifest columns...). ``scale=True`` gives ``(x - shift_factor) * scaling_factor`` (the SD3 convention;
    shift 0 when the model has none), what a latent diffusion model trains on; ``sample=True`` draws
    ``mean + exp(logvar / 2) * noise`` (needs ``--sample`` at encoding), seeded by (seed, epoch, clip).

    Shards are split between DDP ranks x DataLoader workers (each shard read by exactly one of them per
    epoch; give at least as many shards as readers), shuffled per epoch (:meth:`set_epoch`) and, with
    ``shuffle_buffer`` > 0, clips are shuffled within a buffer of that many.

    A diffusion training loop (rectified flow)::

        data = LatentDataset("latents/", scale=True, sample=True)
        loader = data.loader(batch_size=8, num_workers=4)
        for epoch in range(epochs):
            data.set_epoch(epoch)
            for batch in loader:
                x0 = batch["latents"].to(device)                    # (B, C, 1+k, h, w), scaled
                t = torch.rand(len(x0), device=device).view(-1, 1, 1, 1, 1)
                noise = torch.randn_like(x0)
                v = model((1 - t) * x0 + t * noise, t.flatten(), batch["caption"])
                loss = F.mse_loss(v, noise - x0)
                loss.backward(); opt.step(); opt.zero_grad()
        # sampling ends with: video = codec.decode(vae, x0 / data.scaling_factor + data.shift_factor)
    """

    def __init__(self, out_dir: str | os.PathLike[str], *, scale: bool = False, sample: bool = False,
                 shuffle: bool = True, seed: int = 0, shuffle_buffer: int = 64) -> None:
        super().__init__()
        self.root = Path(out_dir).expanduser()
        try:
            self.meta = json.loads((self.root / "meta.json").read_text())
        except (OSError, ValueError) as e:
            raise InputError(f"{self.root} is not a latent dataset (meta.json: {e})") from None
        if sample and "logvar" not in self.meta.get("fields", []):
            raise InputError(f"{self.root} stores only the posterior mean: encode with --sample to sample latents")
        index = self.root / "index.json"
        if index.exists():
            self.index = json.loads(index.read_text())
            self.shards = [str(self.root / s["name"]) for s in self.index["shards"]]
        else:  # an unfinished dataset: the shards written so far
            self.index = None
            self.shards = sorted(str(p) for p in self.root.glob("shard-*.tar"))
        if not self.shards:
            raise InputError(f"{self.root} holds no shards")
        self.scale, self.sample, self.shuffle = scale, sample, shuffle
        self.seed, self.shuffle_buffer, self.epoch = int(seed), shuffle_buffer, 0
        self.scaling_factor = float(self.meta["scaling_factor"])
        self.shift_factor = float(self.meta.get("shift_factor") or 0.0)

    @property
    def num_clips(self) -> int | None:
        """Clips in the whole dataset (all ranks), from index.json."""
        return None if self.index is None else self.index["clips"]

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's shuffle (call before iterating; workers copy the dataset then)."""
        self.epoch = int(epoch)

    def loader(self, batch_size: int, *, num_workers: int = 0, **kwargs: Any) -> DataLoader:
        """A DataLoader over this dataset with :func:`collate_latents`."""
        return DataLoader(self, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_latents, **kwargs)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch, n = self.epoch, len(self.shards)
        order = np.random.default_rng([self.seed, 0, epoch]).permutation(n) if self.shuffle else np.arange(n)
        index, count = _partition()
        groups = ((int(order[j]), number, members) for j in range(index, n, count)
                  for number, (_, members) in enumerate(tar_groups(self.shards[int(order[j])], "latent shard")))
        if self.shuffle and self.shuffle_buffer > 0:
            groups = _buffer_shuffle(groups, self.shuffle_buffer, np.random.default_rng([self.seed, 1, epoch, index]))
        for shard, number, members in groups:
            yield self._decode(members, epoch, shard, number)

    def _decode(self, members: dict[str, bytes], epoch: int, shard: int, number: int) -> dict[str, Any]:
        from safetensors.torch import load

        tensors = load(members["latents.safetensors"])
        meta = json.loads(members["json"])
        x = tensors["mean"]
        if self.sample:
            seed = int(np.random.SeedSequence([self.seed, 2, epoch, shard, number]).generate_state(1)[0])
            noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=x.dtype)
            x = x + torch.exp(0.5 * tensors["logvar"].clamp(-30.0, 20.0)) * noise
        if self.scale:
            x = (x - self.shift_factor) * self.scaling_factor
        return {**meta, "latents": x, "caption": meta.get("caption")}


# ------------------------------------------------------------------------------------------ CLI
def add_parser(sub: argparse._SubParsersAction, parents: Sequence[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add ``encode-dataset`` to the ``cvvae`` subcommands (``parents``: cli's ``common`` and ``model``)."""
    from cvvae.cli import _Help

    p = sub.add_parser(
        "encode-dataset", parents=list(parents), formatter_class=_Help,
        help="encode a video dataset to latent shards for diffusion training (torchrun for many processes)",
        description="Encode every clip of a folder, CSV/JSONL manifest or webdataset shards into webdataset tar "
        "shards of unscaled latents (KEY.latents.safetensors + KEY.json). Re-running the same command resumes "
        "(finished shards are kept); under torchrun every process encodes its share: "
        "`torchrun --nproc_per_node N --no-python cvvae encode-dataset ...`. Read with "
        "cvvae.data.latents.LatentDataset.")
    p.add_argument("source", help="folder, CSV/JSONL manifest (path, caption, extra columns), or webdataset shards "
                   "('data/shard-*.tar', quoted)")
    p.add_argument("-o", "--output", type=Path, required=True, help="output folder (created; reused to resume)")
    p.add_argument("--frames", type=int, help="frames per clip, 1 + 4k (default 17; with --buckets each bucket "
                   "sets its own)")
    p.add_argument("--stride", type=int, default=1, help="frame step within a clip")
    p.add_argument("--size", type=int, help="short-side resize then centre crop SIZE x SIZE, a multiple of 8 "
                   "(default 256; 0 keeps each video's size)")
    p.add_argument("--buckets", help="comma-separated FRAMESxHEIGHTxWIDTH buckets, e.g. 17x256x256,17x192x320: each "
                   "video goes to the bucket of the closest aspect ratio, resized to cover it, centre-cropped")
    p.add_argument("--clips-per-video", type=int, default=1, help="clips drawn per video (random starts)")
    kept = p.add_mutually_exclusive_group()
    kept.add_argument("--sample", action="store_true", help="store the posterior mean and logvar (so training can "
                      "sample latents)")
    kept.add_argument("--mean", action="store_true", help="store the posterior mean only (the default)")
    p.add_argument("--batch-size", type=int, default=1, help="clips of one shape encoded together")
    p.add_argument("--num-workers", type=int, default=4, help="DataLoader processes decoding clips (0: decode in "
                   "the main process)")
    p.add_argument("--shard-size", type=int, default=1000, help="clips per output shard")
    p.add_argument("--seed", type=int, default=0, help="seed of the clip starts (clip i of video v is a function of "
                   "seed, v, i)")
    p.set_defaults(func=run)
    return p


def _model_id_of(args: argparse.Namespace) -> str:
    """``--weights`` (absolute when it is a local path, so that resuming from another folder matches) + subfolder."""
    from cvvae.cli import _model_id

    weights = os.path.abspath(os.path.expanduser(args.weights)) if args.weights and os.path.exists(
        os.path.expanduser(args.weights)) else args.weights
    return _model_id(argparse.Namespace(weights=weights, subfolder=args.subfolder))


def run(args: argparse.Namespace) -> dict[str, Any]:
    """``cvvae encode-dataset``: sets up torch.distributed under torchrun, encodes, prints the summary (rank 0)."""
    from cvvae.cli import _load_model, _report

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
        model = _load_model(args, bundled_default=False)
        frames = 17 if args.frames is None else args.frames
        size = 256 if args.size is None else (args.size or None)  # --size 0: keep each video's size
        summary = encode_dataset(
            model, args.source, args.output, frames=frames, stride=args.stride, size=size,
            buckets=args.buckets or None, clips_per_video=args.clips_per_video, sample=args.sample,
            batch_size=args.batch_size, num_workers=args.num_workers, shard_size=args.shard_size, dtype=args.dtype,
            seed=args.seed, model_id=_model_id_of(args), progress=not (args.quiet or args.json))
    finally:
        if own_group:
            dist.destroy_process_group()
    if "out_dir" in summary:  # rank 0
        s = summary
        _report(args, s, [
            f"{s['out_dir']}: {s['clips']} clips in {s['shards']} shards, {s['skipped']} skipped (see skipped.jsonl)",
            (f"{s['clips_written']} clips encoded in {s['seconds']} s ({s['clips_per_s']} clips/s) by "
             f"{s['world_size']} process(es); {s['shards_reused']} shards kept from earlier runs")])
    return summary
