"""Where clips come from: folders, CSV/JSONL manifests and webdataset tar shards.

An *item* is a dict ``{"path": str, "caption": str | None, **metadata}``. Folders and manifests are
listed eagerly with :func:`list_items`; tar shards are read lazily, one sample at a time, with
:func:`iter_shard_samples` (a shard is never unpacked to disk as a whole).
"""

from __future__ import annotations

import csv
import glob
import json
import os
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cvvae.errors import InputError
from cvvae.io.video import IMAGE_SUFFIXES

__all__ = [
    "IMAGE_EXTENSIONS",
    "MEDIA_EXTENSIONS",
    "VIDEO_EXTENSIONS",
    "ShardSample",
    "expand_shards",
    "is_image_item",
    "is_shards",
    "iter_shard_samples",
    "list_items",
    "list_source",
    "read_members",
    "tar_items",
]

VIDEO_EXTENSIONS = frozenset({".mp4", ".avi", ".webm", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg"})
IMAGE_EXTENSIONS = IMAGE_SUFFIXES  # the single list of what cvvae.io reads as an image
MEDIA_EXTENSIONS = VIDEO_EXTENSIONS | IMAGE_EXTENSIONS
_MANIFEST_SUFFIXES = frozenset({".csv", ".jsonl", ".ndjson"})

Item = dict[str, Any]


def is_image_item(item: Item | str | os.PathLike[str]) -> bool:
    """Whether an item (or path) is an image by its suffix."""
    path = item["path"] if isinstance(item, dict) else item
    return Path(str(path)).suffix.lower() in IMAGE_EXTENSIONS


def list_items(source: str | os.PathLike[str] | Sequence[Any], *, kind: str | None = None) -> list[Item]:
    """Items of a folder (recursive, sorted), a ``.csv``/``.jsonl`` manifest, a media file, or a list of those.

    A list may also hold item dicts (with a ``path``). Manifests need a ``path`` column (relative
    paths are resolved against the manifest's folder); ``caption`` is optional and every other column
    is kept as metadata. ``kind="video"`` or ``"image"`` keeps only that kind (by suffix).
    """
    if kind not in (None, "video", "image"):
        raise InputError(f"kind must be None, 'video' or 'image', got {kind!r}")
    items = _items_of(source)
    if kind is not None:
        items = [item for item in items if is_image_item(item) == (kind == "image")]
    return items


def _items_of(source: Any) -> list[Item]:
    if isinstance(source, dict):
        if "path" not in source:
            raise InputError(f"an item needs a 'path', got keys {sorted(source)}")
        return [{"caption": None, **source, "path": str(source["path"])}]
    if isinstance(source, (str, os.PathLike)):
        return _items_of_path(Path(source).expanduser())
    if isinstance(source, Sequence):
        return [item for part in source for item in _items_of(part)]
    raise InputError(f"a source is a folder, a manifest, a media file or a list of those, got {type(source).__name__}")


def _items_of_path(path: Path) -> list[Item]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in MEDIA_EXTENSIONS and p.is_file())
        return [{"path": str(p), "caption": None} for p in files]
    if not path.is_file():
        raise InputError(f"{path} not found")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _manifest_items(path, _read_csv(path))
    if suffix in _MANIFEST_SUFFIXES:
        return _manifest_items(path, _read_jsonl(path))
    if suffix in MEDIA_EXTENSIONS:
        return [{"path": str(path), "caption": None}]
    raise InputError(f"{path}: expected a folder, a .csv/.jsonl manifest or a video/image file")


def _read_csv(path: Path) -> list[dict[str, Any]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{number} is not valid JSON: {e.msg}") from None
            if not isinstance(row, dict):
                raise InputError(f"{path}:{number} must be a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def _manifest_items(manifest: Path, rows: list[dict[str, Any]]) -> list[Item]:
    items = []
    for number, row in enumerate(rows, 1):
        if not row.get("path"):
            raise InputError(f"{manifest}: row {number} has no 'path' (columns: {sorted(row)})")
        path = Path(str(row["path"])).expanduser()
        caption = row.get("caption")
        items.append({**row, "path": str(path if path.is_absolute() else manifest.parent / path),
                      "caption": caption if caption not in ("", None) else None})
    return items


# --- webdataset shards ----------------------------------------------------------------------------


@dataclass
class ShardSample:
    """One sample of a tar shard: its media member's bytes, suffix and caption/metadata."""

    shard: str
    key: str
    suffix: str | None  # ".mp4", ".png"...; None when the sample has no video or image member
    data: bytes = b""
    caption: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def path(self) -> str:
        """A readable name for logs and skip records: ``shard.tar#key``."""
        return f"{self.shard}#{self.key}"


def is_shards(source: Any) -> bool:
    """Whether ``source`` names webdataset shards: a ``.tar`` path or glob, or a non-empty list of them."""
    if isinstance(source, (str, os.PathLike)):
        return str(source).endswith(".tar")
    return isinstance(source, Sequence) and bool(source) and all(is_shards(s) for s in source)


def list_source(source: str | os.PathLike[str] | Sequence[str]) -> list[Item]:
    """Items of a folder, a CSV/JSONL manifest (:func:`list_items`), or webdataset shards (:func:`tar_items`)."""
    if is_shards(source):
        return [item for shard in expand_shards(source) for item in tar_items(shard)]
    return list_items(source)


def tar_items(shard: str) -> list[Item]:
    """One item per sample of a tar shard (members adjacent by key), from the headers only, for random access
    with :func:`read_members`. An unreadable shard gives an item with an ``_error``."""
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


def read_members(item: Item) -> dict[str, bytes]:
    """The member bytes of a tar sample listed by :func:`tar_items` (a seek per member, no scan)."""
    try:
        with tarfile.open(item["_tar"], "r:*") as tar:
            members = {}
            for ext, offset, size in item["_members"]:
                tar.fileobj.seek(offset)
                members[ext] = tar.fileobj.read(size)
            return members
    except (tarfile.TarError, OSError, EOFError) as e:
        raise InputError(f"cannot read {item['path']}: {e}") from None


def expand_shards(shards: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[str]:
    """Shard paths from a glob pattern, a path or a list of those (each pattern sorted)."""
    patterns = [shards] if isinstance(shards, (str, os.PathLike)) else list(shards)
    paths: list[str] = []
    for pattern in patterns:
        pattern = os.path.expanduser(str(pattern))
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise InputError(f"no shard matches {pattern}")
        paths.extend(matches)
    if not paths:
        raise InputError("no shards given")
    return paths


def _split_name(name: str) -> tuple[str, str]:
    """Webdataset convention: the key is the path up to the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower() if dot else ""


def tar_groups(path: str, what: str = "shard") -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {ext: bytes})`` of a webdataset tar in stored order, streamed (members of a sample
    must be adjacent). Raises :class:`InputError` if the tar cannot be read (groups already
    yielded stay valid)."""
    try:
        with tarfile.open(path, "r|*") as tar:
            key, members = None, {}
            for member in tar:
                if not member.isfile():
                    continue
                name_key, ext = _split_name(member.name)
                if name_key != key and members:
                    yield key, members
                    members = {}
                key = name_key
                members[ext] = tar.extractfile(member).read()
            if members:
                yield key, members
    except (tarfile.TarError, OSError, EOFError) as e:
        raise InputError(f"cannot read {what} {path}: {e}") from None


def iter_shard_samples(shard: str) -> Iterator[ShardSample]:
    """Samples of one tar shard in stored order, streamed; see :func:`tar_groups`."""
    for key, members in tar_groups(shard):
        yield make_sample(shard, key, members)


def make_sample(shard: str, key: str, members: dict[str, bytes]) -> ShardSample:
    media = [ext for ext in members if "." + ext.rsplit(".", 1)[-1] in MEDIA_EXTENSIONS]
    # Prefer a video member over an image (a thumbnail) when a sample has both.
    media.sort(key=lambda ext: "." + ext.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS)
    sample = ShardSample(shard, key, None)
    if media:
        sample.suffix, sample.data = "." + media[0].rsplit(".", 1)[-1], members[media[0]]
    info = _json_member(members.get("json"))
    if isinstance(info, dict):
        sample.metadata = {k: v for k, v in info.items() if k not in ("path", "caption")}
        sample.caption = info.get("caption") if isinstance(info.get("caption"), str) else None
    if "txt" in members:
        sample.caption = members["txt"].decode("utf-8", errors="replace").strip()
    return sample


def _json_member(data: bytes | None) -> Any:
    if data is None:
        return None
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


@contextmanager
def as_temp_file(data: bytes, suffix: str) -> Iterator[Path]:
    """Write ``data`` to a private temporary file (in RAM where ``/dev/shm`` exists) for PyAV to read."""
    folder = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    fd, name = tempfile.mkstemp(suffix=suffix, prefix="cvvae-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        yield Path(name)
    finally:
        os.unlink(name)
