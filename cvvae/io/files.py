"""Atomic outputs: every file or folder cvvae writes appears complete or not at all.

One writer for the whole package: the content goes to a hidden temporary sibling (``.NAME.XXXX.partial``),
is flushed to disk, and is renamed into place with the permissions a plain ``open()``/``mkdir()`` would give;
on any error (or Ctrl-C, or SIGTERM through the CLI) the temporary is deleted and the destination is untouched.

- :func:`write_atomic` for bytes or text held in memory (configs, indexes, small tensors files);
- :class:`AtomicFile` (``atomic_file``) for writers that need a path (safetensors' ``save_file``, a tar);
- :func:`atomic_dir` for folders (``save_pretrained``, reports), optionally replacing an existing one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import InputError


def write_atomic(path: str | os.PathLike[str], data: bytes | str) -> None:
    """Write ``data`` (text is UTF-8 encoded) to ``path`` atomically and durably (fsync before the rename)."""
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())


class AtomicFile:
    """A temporary path next to ``dest``: :meth:`commit` renames it to ``dest``, :meth:`discard` deletes it.

    As a context manager it yields the temporary path and commits when the block ends normally (else discards).
    """

    def __init__(self, dest: str | os.PathLike[str], *, keep_suffix: bool = False) -> None:
        self.dest = Path(dest)
        if not self.dest.parent.is_dir():
            raise InputError(f"cannot write {self.dest}: the folder {self.dest.parent} does not exist")
        # keep_suffix: writers that pick a format by the name's suffix (PyAV) see the destination's
        suffix = ".partial" + (self.dest.suffix if keep_suffix else "")
        fd, name = tempfile.mkstemp(prefix=f".{self.dest.name}.", suffix=suffix, dir=self.dest.parent)
        os.close(fd)
        self.tmp = Path(name)

    def commit(self) -> None:
        publish(self.tmp, self.dest)

    def discard(self) -> None:
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> Path:
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.commit()
        finally:
            self.discard()  # nothing left to delete after a commit


atomic_file = AtomicFile


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str], *, replace: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``path``; when the block ends normally, it becomes ``path``.

    An existing ``path`` must be an empty folder, unless ``replace`` is true: then the old folder is swapped
    out only once the new one is complete.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise InputError(f"output folder's parent does not exist: {path.parent}")
    if path.exists() and not path.is_dir():
        raise InputError(f"output {path} exists and is not a folder")
    if path.exists() and not replace and any(path.iterdir()):
        raise InputError(f"output folder {path} exists and is not empty")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    old = path.with_name(f".{path.name}.{os.getpid()}.old")
    try:
        yield tmp
        if not path.exists():
            publish(tmp, path)
        else:
            path.rename(old)
            try:
                publish(tmp, path)
            except BaseException:
                old.rename(path)
                raise
            shutil.rmtree(old, ignore_errors=True)  # only once the new folder is in place
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish(tmp: str | os.PathLike[str], dest: str | os.PathLike[str]) -> None:
    """Rename the finished `tmp` (file or folder) to `dest`, first giving it, and everything in it, the modes a
    plain open()/mkdir() would: tempfile.mkstemp/mkdtemp and safetensors create private (0600/0700) entries."""
    tmp = Path(tmp)
    for p in [tmp, *(tmp.rglob("*") if tmp.is_dir() else [])]:
        if not p.is_symlink():
            os.chmod(p, ordinary_mode(p.is_dir()))
    os.replace(tmp, dest)


def ordinary_mode(folder: bool) -> int:
    """0o777 (folders) or 0o666 (files) less the process umask."""
    return (0o777 if folder else 0o666) & ~_umask()


def _umask() -> int:
    try:  # Linux reports it without changing it (os.umask can only be read by setting it, racing other threads)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        umask = os.umask(0o22)
        os.umask(umask)
        return umask
