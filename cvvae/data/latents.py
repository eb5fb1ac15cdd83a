"""Read a latent dataset written by ``cvvae encode-dataset`` (`encode.py`; layout in `shards.py`) to train a
latent diffusion model on it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from ..errors import InputError
from .clips import _buffer_shuffle, _partition, collate
from .sources import tar_groups

__all__ = ["LatentDataset", "collate_latents"]


def collate_latents(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack ``latents`` to ``(B, C, t, h, w)``; every other key becomes a list."""
    return collate(samples, key="latents")


class LatentDataset(IterableDataset):
    """Clips of a folder written by :func:`encode_dataset`, streamed shard by shard.

    Yields ``{"latents": (C, 1+k, h, w) float32, "caption": str | None, **metadata}`` (metadata: ``key``,
    ``path``, ``start``, ``stride``, ``fps``, ``crop``, ``orig_size``, ``bucket``, ``num_frames``, extra
    manifest columns...). ``scale=True`` gives ``(x - shift_factor) * scaling_factor`` (the SD3 convention;
    shift 0 when the model has none), what a latent diffusion model trains on; ``sample=True`` draws
    ``mean + exp(logvar / 2) * noise`` (needs ``--logvar`` at encoding), seeded by (seed, epoch, clip).

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
            raise InputError(f"{self.root} stores only the posterior mean: encode with --logvar to sample latents")
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

