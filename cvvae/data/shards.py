"""The latent shard format written by `cvvae.data.encode` and read by `cvvae.data.latents`.

Layout of a dataset folder::

    meta.json                    model, clip settings, stored fields, source listing (written once; a re-run
                                 with other settings is refused)
    shard-000000.tar             jobs [0, shard_size): per clip ``KEY.latents.safetensors`` + ``KEY.json``
    shard-000000.skipped.jsonl   the shard's skipped clips, one JSON object a line (path, reason, detail)
    ...
    skipped.jsonl, index.json    all skips, and the shard list with clip counts (rank 0, at the end)

Shard ``n`` holds jobs ``[n * shard_size, (n + 1) * shard_size)``; its members are keyed ``f"{n:06d}_{j:09d}"``.
A shard and its sidecar are written under hidden ``.NAME.XXXX.partial`` names and renamed when complete
(sidecar first, then the tar: the tar's existence marks the shard done).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError
from ..io.files import AtomicFile, write_atomic

FORMAT, FORMAT_VERSION = "cvvae-latents", 1


def shard_name(n: int) -> str:
    """File name of global shard ``n``."""
    return f"shard-{n:06d}.tar"


def sidecar_name(n: int) -> str:
    """File name of shard ``n``'s skip records."""
    return f"shard-{n:06d}.skipped.jsonl"


def clip_key(n: int, job: int) -> str:
    """Webdataset key of job ``job`` in shard ``n``."""
    return f"{n:06d}_{job:09d}"


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # mtime 0: a redone shard is byte-identical
    tar.addfile(info, io.BytesIO(data))


class ShardWriter:
    """One shard being written under a hidden temporary name; :meth:`commit` renames it into place, :meth:`abort`
    deletes it."""

    def __init__(self, out: Path, n: int) -> None:
        self.out, self.n = out, n
        self.target = AtomicFile(out / shard_name(n))
        self.file = open(self.target.tmp, "wb")
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
        write_atomic(self.out / sidecar_name(self.n), "".join(json.dumps(r, default=str) + "\n" for r in self.skipped))
        self.target.commit()

    def abort(self) -> None:
        self.file.close()
        self.target.discard()


def read_sidecar(out: Path, n: int) -> list[dict[str, Any]]:
    """Shard ``n``'s skip records."""
    path = out / sidecar_name(n)
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as e:
        raise InputError(f"{path} is missing or unreadable ({e}): delete {shard_name(n)} too and re-run the same "
                         "command to redo that shard") from None
