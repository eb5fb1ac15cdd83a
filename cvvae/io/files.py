"""Finishing atomic writes: a temporary file or folder renamed into place with ordinary permissions."""

from __future__ import annotations

import os
from pathlib import Path


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
