"""Encode a video dataset to latent shards once (``cvvae encode-dataset``), on one process or many.

Every clip of a folder, CSV/JSONL manifest or webdataset shards is encoded with the VAE and stored, unscaled,
in webdataset tar shards (`shards.py` has the layout; `latents.LatentDataset` reads them back).

Jobs. The item list (a folder sorted, a manifest in row order, shards sorted then in stored order) times
``clips_per_video``: job ``j`` is clip ``j % clips_per_video`` of item ``j // clips_per_video``; its clip is
a pure function of ``(seed, item, clip)`` (`plan.py`), so any process computes any job identically. A file that
gives no clip (corrupt, truncated, too short for the clip at the asked stride; an image when ``frames > 1``) is
recorded in the shard's sidecar with its reason and never stops the run. Shard numbers are global (not per rank),
so a run can be resumed with any number of processes.

Atomicity. Shards are written under hidden temporary names and renamed when complete. Re-running the same
command redoes only the missing shards: no duplicates and no lost clips, also after ``kill -9``.

Processes. Under ``torchrun`` every rank runs the same call: rank 0 checks/writes ``meta.json`` and lists
the missing shards, which are dealt round-robin (one broadcast at the start, nothing in the hot loop).
Without an initialised process group (``RANK``/``WORLD_SIZE`` only) shard ``n`` is done by rank ``n % world``.
At the end rank 0 waits until every shard file exists, then writes ``skipped.jsonl`` and ``index.json``. The
wait is bounded: every rank keeps a status file (``.progress-rankN``) fresh from a background thread and marks
it failed when it stops on an error, so rank 0 ends with a clear error when another rank failed, or when a
rank's status has not changed for ``rank_timeout`` seconds (a killed process). All ranks must see ``OUT_DIR``
on a shared file system.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, Dataset

from .. import __version__
from ..errors import InputError
from ..io.files import write_atomic
from ..runtime import DTYPE_NAMES, compute_dtype
from .clips import ClipError
from .plan import Bucket, ClipPlan, digest, parse_buckets
from .shards import FORMAT, FORMAT_VERSION, ShardWriter, clip_key, read_sidecar, shard_name
from .sources import Item, list_source

if TYPE_CHECKING:
    from ..model import CVVAE

__all__ = ["encode_dataset"]

logger = logging.getLogger("cvvae.data")

# meta.json keys that may differ between runs into one folder; every other key must match.
_FREE_KEYS = frozenset({"cvvae_version", "source"})


def encode_dataset(model: CVVAE, source: str | os.PathLike[str] | Sequence[str], out_dir: str | os.PathLike[str], *,
                   frames: int = 17, stride: int = 1, size: int | None = 256,
                   buckets: Sequence[Bucket] | str | None = None, clips_per_video: int = 1, sample: bool = False,
                   batch_size: int = 1, num_workers: int = 0, shard_size: int = 1000, dtype: str | torch.dtype = "fp32",
                   seed: int = 0, model_id: str = "", progress: bool = True,
                   rank_timeout: float = 600.0) -> dict[str, Any]:
    """Encode every clip of ``source`` into latent shards in ``out_dir`` (see the module docstring).

    Args:
        source: a folder, a CSV/JSONL manifest (``path``, ``caption``, extra columns kept), or webdataset
            shards (a ``.tar`` path or glob, or a list of them).
        frames, stride: clip length (1 + 4k) and frame step; the start is random (seeded) per clip. Videos
            shorter than ``stride * (frames - 1) + 1`` frames are skipped ("too short").
        size: short-side resize then centre crop ``size x size`` (a multiple of 8); None keeps each video's size.
        buckets: ``[(T, H, W), ...]`` or ``"17x256x256,17x192x320"``: each video goes to the bucket of the
            closest aspect ratio (log H/W), is resized to cover it and centre-cropped. Overrides ``frames``
            and ``size``.
        clips_per_video: clips drawn from each item.
        sample: store the posterior's logvar next to its mean (to sample latents when training).
        batch_size: clips of one shape encoded together; num_workers: DataLoader processes decoding clips.
        shard_size: jobs per shard; dtype: compute precision (``codec.encode``); seed: clip selection.
        model_id: recorded in meta.json (and checked on re-runs); progress: a bar on rank 0.
        rank_timeout: seconds rank 0 waits for a rank whose status stopped changing before it gives up.

    Returns rank 0's summary (``clips``, ``skipped``: the whole dataset; ``clips_written``: this run, all
    ranks; ``shards``, ``shards_reused``, ``seconds``, ``clips_per_s``); other ranks return their own counts.
    Raises :class:`InputError` when ``out_dir`` holds a dataset made with other settings, or another rank failed.
    """
    t0 = time.perf_counter()
    if not rank_timeout > 0:
        raise InputError(f"rank_timeout must be a positive number of seconds, got {rank_timeout!r}")
    plan = _plan(frames, stride, size, buckets, clips_per_video, seed)
    for name, value, low in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0),
                             ("shard_size", shard_size, 1)):
        if not isinstance(value, int) or value < low:
            raise InputError(f"{name} must be an integer >= {low}, got {value!r}")
    out = Path(out_dir).expanduser()
    if not out.parent.is_dir():
        raise InputError(f"output folder's parent does not exist: {out.parent}")
    weights = next(model.parameters())
    compute = compute_dtype(dtype, weights.dtype, weights.device)
    rank, world, has_group = _rank_world()
    items = list_source(source)
    if not items:
        raise InputError(f"{source}: no videos or images found")
    n_jobs = len(items) * clips_per_video
    meta = _meta(model, plan, items, source, compute, sample, shard_size, model_id)
    out.mkdir(exist_ok=True)
    missing, todo = _start(out, meta, rank, world, has_group)
    status = _Status(out, rank, world, sum(len(_shard_jobs(n, shard_size, n_jobs)) for n in missing), progress)
    try:
        jobs = [j for n in todo for j in _shard_jobs(n, shard_size, n_jobs)]
        if jobs:
            _encode_jobs(model, _Jobs(items, jobs, plan), out, shard_size, batch_size, num_workers, compute, sample,
                         status)
        if rank != 0:
            status.finish("done")
            return dict(rank=rank, shards_done=len(todo), clips_written=status.counts["clips"],
                        skipped=status.counts["skipped"], seconds=round(time.perf_counter() - t0, 2))
        status.start()
        status.wait_for(missing, rank_timeout)
    except BaseException as e:
        status.finish("failed", f"{type(e).__name__}: {e}".splitlines()[0])
        raise
    status.finish("done")
    summary = _finish(out, meta, missing)
    seconds = time.perf_counter() - t0
    return dict(out_dir=str(out), shards=meta["shards"], shards_reused=meta["shards"] - len(missing),
                clips=summary["clips"], skipped=summary["skipped"], clips_written=summary["written"],
                seconds=round(seconds, 2), world_size=world,
                clips_per_s=round(summary["written"] / seconds, 3) if seconds > 0 else None)


def _plan(frames: int | None, stride: int, size: int | None, buckets: Sequence[Bucket] | str | None,
          clips_per_video: int, seed: int) -> ClipPlan:
    if buckets is not None:
        buckets = tuple(parse_buckets(buckets))
        frames, size = None, None
    else:
        if not isinstance(frames, int) or frames < 1 or (frames - 1) % 4:
            raise InputError(f"frames must be 1 + 4k (1, 5, 9, 17, ...), got {frames!r}")
        if size is not None and (size < 8 or size % 8):
            raise InputError(f"size must be a multiple of 8 (latents are 8x smaller), got {size!r}")
    for name, value in (("stride", stride), ("clips_per_video", clips_per_video)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InputError(f"{name} must be an integer >= 1, got {value!r}")
    return ClipPlan(frames, stride, size, buckets, int(seed), clips_per_video)


def _meta(model: CVVAE, plan: ClipPlan, items: list[Item], source: Any, compute: torch.dtype, sample: bool,
          shard_size: int, model_id: str) -> dict[str, Any]:
    from ..model.chunking import tile_size

    cfg, n_jobs = model.config, len(items) * plan.clips_per_video
    return dict(format=FORMAT, version=FORMAT_VERSION, model=model_id, z_channels=cfg.z_channels,
                scaling_factor=cfg.scaling_factor, shift_factor=cfg.shift_factor, dtype=DTYPE_NAMES[compute],
                tile_spatial_size=tile_size(model), chunk_mode=model.chunk_mode,
                blend_overlap=model.blend_overlap if model.chunk_mode == "blend" else None, frames=plan.frames,
                stride=plan.stride, size=plan.size,
                buckets=[list(b) for b in plan.buckets] if plan.buckets else None,
                clips_per_video=plan.clips_per_video, fields=["mean", "logvar"] if sample else ["mean"],
                seed=plan.seed, shard_size=shard_size, items=len(items), items_digest=digest(items), jobs=n_jobs,
                shards=-(-n_jobs // shard_size),
                source=str(source) if isinstance(source, (str, os.PathLike)) else [str(s) for s in source],
                cvvae_version=__version__)


def _start(out: Path, meta: dict[str, Any], rank: int, world: int, has_group: bool) -> tuple[list[int], list[int]]:
    """Rank 0 checks (or writes) meta.json and lists the missing shards; one broadcast tells every rank.
    Returns (all missing shards, this rank's share)."""
    missing: list[int] = []
    error = None
    if rank == 0:  # status files of an earlier run must not speak for this one (see _Status.wait_for)
        for stale in out.glob(".progress-rank*"):
            if stale.name != ".progress-rank0":
                stale.unlink(missing_ok=True)
    if rank == 0 or not has_group:
        error = _check_meta(out, meta)
        missing = [n for n in range(meta["shards"]) if not (out / shard_name(n)).exists()]
        if error is None and rank == 0 and not (out / "meta.json").exists():
            write_atomic(out / "meta.json", json.dumps(meta, indent=2))
    if has_group:
        box = [error, missing, meta]
        torch.distributed.broadcast_object_list(box, src=0)
        error, missing = box[0], box[1]
        if error is None and box[2]["items_digest"] != meta["items_digest"]:
            error = f"rank {rank} lists other items in {meta['source']} than rank 0: every rank must see the same source"
        todo = missing[rank::world]
    else:
        todo = [n for n in missing if n % world == rank]
    if error is not None:
        raise InputError(error)
    return missing, todo


def _finish(out: Path, meta: dict[str, Any], missing: list[int]) -> dict[str, int]:
    """Rank 0, once every shard exists: merge the sidecars into skipped.jsonl, write index.json, clean up."""
    shards, skipped_lines, written, redone = [], [], 0, set(missing)
    for n in range(meta["shards"]):
        records = read_sidecar(out, n)
        skipped_lines += records
        jobs = len(_shard_jobs(n, meta["shard_size"], meta["jobs"]))
        shards.append(dict(name=shard_name(n), jobs=jobs, clips=jobs - len(records), skipped=len(records)))
        written += jobs - len(records) if n in redone else 0
    total = sum(s["clips"] for s in shards)
    write_atomic(out / "skipped.jsonl", "".join(json.dumps(r, default=str) + "\n" for r in skipped_lines))
    index = dict(format=FORMAT, version=FORMAT_VERSION, shards=shards, clips=total, skipped=len(skipped_lines),
                 jobs=meta["jobs"])
    write_atomic(out / "index.json", json.dumps(index, indent=2))
    for stale in [*out.glob(".*.partial"), *out.glob(".progress-rank*")]:
        stale.unlink(missing_ok=True)
    return dict(clips=total, skipped=len(skipped_lines), written=written)


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
    old = {"chunk_mode": "official", "blend_overlap": None, **old}  # written before cvvae recorded them
    diffs = [f"{k}: {old.get(k)!r} there, {meta.get(k)!r} now" if k != "items_digest" else "the source lists "
             "other files" for k in sorted(set(old) | set(meta)) if k not in _FREE_KEYS and old.get(k) != meta.get(k)]
    if diffs:
        return (f"{out} was written by a different encode-dataset command ({'; '.join(diffs)}): resuming would mix "
                "two datasets; use a new output folder, or the same settings to resume")
    return None


def _shard_jobs(n: int, shard_size: int, n_jobs: int) -> range:
    return range(n * shard_size, min((n + 1) * shard_size, n_jobs))


class _Jobs(Dataset):
    """Map-style dataset over this rank's jobs: each gives its clip or a skip record (decoded in workers)."""

    def __init__(self, items: list[Item], jobs: list[int], plan: ClipPlan) -> None:
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


def _encode_jobs(model: CVVAE, jobs: _Jobs, out: Path, shard_size: int, batch_size: int, num_workers: int,
                 dtype: torch.dtype, sample: bool, status: _Status) -> None:
    """Decode clips in DataLoader workers, encode batches of equal shape, write shards as they complete."""
    from .. import codec

    loader = DataLoader(jobs, batch_size=None, shuffle=False, num_workers=num_workers, collate_fn=_identity,
                        prefetch_factor=4 if num_workers else None)
    writer: ShardWriter | None = None
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
        status.add(clips=len(records))

    def commit() -> None:
        for shape in list(pending):
            flush(shape)
        writer.commit()

    records = iter(loader)  # forks the workers (if any) before the status thread runs
    status.start()
    try:
        for record in records:
            n = record["job"] // shard_size
            if writer is None or writer.n != n:
                if writer is not None:
                    commit()
                writer = ShardWriter(out, n)
            if "clip" not in record:
                logger.info("skipped %s: %s: %s", record["path"], record["reason"], record["detail"])
                item, clip = divmod(record["job"], jobs.plan.clips_per_video)
                writer.skip(dict(key=clip_key(n, record["job"]), **record, item=item, clip=clip))
                status.add(skipped=1)
                continue
            shape = tuple(record["clip"]["video"].shape)
            pending.setdefault(shape, []).append(record)
            if len(pending[shape]) >= batch_size:
                flush(shape)
        if writer is not None:
            commit()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise


def _clip_meta(record: dict[str, Any], key: str, shape: torch.Size, plan: ClipPlan) -> dict[str, Any]:
    clip = {k: v for k, v in record["clip"].items() if k != "video"}
    job = record["job"]
    _, frames, height, width = record["clip"]["video"].shape
    return {**clip, "key": key, "job": job, "item": job // plan.clips_per_video, "clip": job % plan.clips_per_video,
            "crop": list(clip["crop"]), "orig_size": list(clip["orig_size"]),
            "bucket": list(clip["bucket"]) if clip.get("bucket") else None,
            "num_frames": frames, "height": height, "width": width, "latent_shape": list(shape)}


class _Status:
    """This rank's counts and state in ``.progress-rankN``, rewritten every few seconds by a background thread
    (so it stays fresh while a long batch encodes); rank 0 sums the counts into one bar and watches the others.

    The thread starts (:meth:`start`) after the DataLoader has forked its workers: a process must not fork while
    a thread of its own may hold a lock."""

    BEAT = 2.0  # seconds between writes

    def __init__(self, out: Path, rank: int, world: int, total: int, show: bool) -> None:
        self.out, self.rank, self.world = out, rank, world
        self.counts = {"jobs": 0, "clips": 0, "skipped": 0}
        self.state, self.error = "running", None
        self.bar = None
        if rank == 0 and show:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="encode-dataset", unit="clip", file=sys.stderr, dynamic_ncols=True,
                            smoothing=0.05)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._polled = 0.0
        self._write()

    def path(self, rank: int) -> Path:
        return self.out / f".progress-rank{rank}"

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._beat, name="cvvae-status", daemon=True)
            self._thread.start()

    def add(self, clips: int = 0, skipped: int = 0) -> None:
        with self._lock:
            self.counts["jobs"] += clips + skipped
            self.counts["clips"] += clips
            self.counts["skipped"] += skipped
        if time.monotonic() - self._polled > 0.5:
            self._show()

    def _beat(self) -> None:
        while not self._stop.wait(self.BEAT):
            self._write()

    def _write(self) -> None:
        with self._lock:
            record = {**self.counts, "state": self.state, "error": self.error, "time": time.time()}
        try:
            write_atomic(self.path(self.rank), json.dumps(record))
        except (OSError, InputError):  # the folder went away: the main thread will hit it and report
            pass

    def finish(self, state: str, error: str | None = None) -> None:
        """Stop the thread; record the final state ("done" or "failed", with the error) for rank 0."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            self.state, self.error = state, error
        self._write()
        if self.bar is not None:
            if state == "done":
                self.bar.update(self.bar.total - self.bar.n)
            self.bar.close()
            self.bar = None

    def _others(self) -> dict[int, dict[str, Any]]:
        status = {}
        for r in range(1, self.world):
            try:
                status[r] = json.loads(self.path(r).read_text())
            except (OSError, ValueError):
                pass
        return status

    def _show(self, others: dict[int, dict[str, Any]] | None = None) -> None:
        self._polled = time.monotonic()
        if self.bar is not None:
            others = self._others() if others is None else others
            done = self.counts["jobs"] + sum(s.get("jobs", 0) for s in others.values())
            if done > self.bar.n:
                self.bar.update(min(done, self.bar.total) - self.bar.n)

    def wait_for(self, missing: list[int], timeout: float) -> None:
        """Rank 0: wait until every missing shard exists; raise when another rank failed, its status did not
        change for ``timeout`` seconds (rank 0's clock), or every rank finished while shards are still missing.
        (Rank 0 deleted the other ranks' status files of earlier runs when it started: see `_start`.)"""
        waiting, seen = missing, {}
        changed = {r: time.monotonic() for r in range(1, self.world)}
        while waiting := [n for n in waiting if not (self.out / shard_name(n)).exists()]:
            others, now = self._others(), time.monotonic()
            self._show(others)
            for r in range(1, self.world):
                s = others.get(r)
                if s is not None and s != seen.get(r):
                    seen[r], changed[r] = s, now
                if s is not None and s.get("state") == "failed":
                    raise InputError(f"rank {r} failed ({s.get('error')}); {len(waiting)} shard(s) are missing: "
                                     "re-run the same command to finish them")
                if (s is None or s.get("state") != "done") and now - changed[r] > timeout:
                    raise InputError(f"rank {r} has not reported for {timeout:g} s and {len(waiting)} shard(s) are "
                                     "missing: is it still running? Re-run the same command to finish them")
            if all(others.get(r, {}).get("state") == "done" for r in range(1, self.world)) \
                    and now - max(changed.values(), default=0.0) > 30:
                raise InputError(f"every rank finished but {len(waiting)} shard(s) are missing (e.g. "
                                 f"{shard_name(waiting[0])}): do all ranks write to the same folder? Re-run the same "
                                 "command to finish them")
            time.sleep(0.5)
