"""Finishing atomic writes: a temporary file or folder renamed into place with ordinary permissions."""

from __future__ import annotations

import os
from pathlib import Path


def publish(tmp: str | os.PathLike[str], dest: str | os.PathLike[str]) -> None:
    """Rename the finished `tmp` (file or folder) to `dest`, first giving it, and everything in it, the modes a
    plain open()/mkdir() would: tempfile.mkstemp/mkdtemp and safetensors create private (0600/0700) entries."""
    tmp = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    for p in [tmp, *(tmp.rglob("*") if tmp.is_dir() else [])]:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)
    os.replace(tmp, dest)
