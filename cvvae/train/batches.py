"""Training batches: a pure function of (seed, rank, step) for folders and manifests, so that resuming at any
step is exact; a seeded stream for webdataset shards.
"""

from __future__ import annotations

import os
from typing import Iterator

import numpy as np
import torch

from ..data import (ClipDataset, ClipError, ClipSpec, MixedLoader, ShardClipDataset, collate, is_shards, list_items,
                    read_clip)
from ..errors import ConfigError
from .config import DataConfig, TrainConfig


class StepBatches(torch.utils.data.Dataset):
    """Batch `step` of rank `rank` as a pure function of (seed, rank, step), so resuming at any step
    is exact and costs nothing, and DataLoader workers can decode batches ahead in any order.

    Each batch is all images or all video clips (image_ratio of them images), items drawn with
    replacement. Unreadable, truncated or too-short files are skipped, redrawn and counted in
    batch["skipped"] (with batch["skipped_paths"]).
    """

    def __init__(self, cfg: DataConfig, seed: int, rank: int) -> None:
        def items(source: str | None, kind: str) -> list:
            return list_items(os.path.expanduser(source), kind=kind) if source else []

        self.videos, self.images = items(cfg.videos, "video"), items(cfg.images, "image")
        if not self.videos and not self.images:
            raise ConfigError("no training data: set data.videos and/or data.images to folders or manifests")
        self.cfg, self.seed, self.rank = cfg, seed, rank
        self.video_spec = ClipSpec(frames=cfg.frames, stride=tuple(cfg.stride), short_side=cfg.short_side, crop=cfg.crop)
        self.image_spec = ClipSpec(frames=1, stride=1, short_side=cfg.short_side, crop=cfg.crop)

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, step: int) -> dict:
        rng = np.random.default_rng([self.seed, self.rank, step])
        images = bool(self.images) and (not self.videos or rng.random() < self.cfg.image_ratio)
        pool, spec = (self.images, self.image_spec) if images else (self.videos, self.video_spec)
        n = self.cfg.image_batch if images else self.cfg.video_batch
        samples, skipped = [], []
        while len(samples) < n:
            item = pool[int(rng.integers(len(pool)))]
            try:
                samples.append(read_clip(item, spec, rng))
            except ClipError as e:
                skipped.append(f"{item['path']}: {e}")
                if len(skipped) > 20 * n:
                    raise ConfigError(f"no readable clips in the training data (last: {skipped[-1]})") from None
        batch = collate(samples)
        batch.update(skipped=len(skipped), skipped_paths=skipped)
        return batch


def _shard_batches(cfg: TrainConfig, start: int) -> Iterator[dict]:
    """Batches streamed from webdataset shards (plus folders/manifests for the other kind).

    Shards cannot be read at random, so here a resumed run draws a fresh, seeded order
    (seed + step) instead of replaying the interrupted one; folders and manifests resume exactly.
    """
    d = cfg.data
    seed = cfg.seed + 1_000_003 * start
    specs = {"videos": ClipSpec(frames=d.frames, stride=tuple(d.stride), short_side=d.short_side, crop=d.crop),
             "images": ClipSpec(frames=1, stride=1, short_side=d.short_side, crop=d.crop)}
    sources = {}
    for name, source in (("videos", d.videos), ("images", d.images)):
        if is_shards(source):
            sources[name] = ShardClipDataset(source, specs[name], seed=seed, shuffle_buffer=256)
        elif source:
            items = list_items(os.path.expanduser(source), kind=name[:-1])
            sources[name] = ClipDataset(items, specs[name], seed=seed)
    weights = {"images": d.image_ratio, "videos": 1 - d.image_ratio}
    loader = MixedLoader(sources, {k: weights[k] for k in sources},
                         {"images": d.image_batch, "videos": d.video_batch}, seed=seed, num_workers=d.num_workers)
    for batch in loader:
        yield {**batch, "skipped": 0}  # shard skips are counted by the datasets (loader.stats())


def batches(cfg: TrainConfig, rank: int, start: int) -> Iterator[dict]:
    """Training batches from `start` to `cfg.steps`, decoded by DataLoader workers."""
    if is_shards(cfg.data.videos) or is_shards(cfg.data.images):
        return _shard_batches(cfg, start)
    data = StepBatches(cfg.data, cfg.seed, rank)
    workers = cfg.data.num_workers
    loader = torch.utils.data.DataLoader(data, batch_size=None, sampler=range(start, cfg.steps), num_workers=workers,
                                         prefetch_factor=2 if workers else None)
    return iter(loader)

