"""Camera-motion clips synthesised from photographs (cvvae.data.synth): known motion, a pure function of the
photograph and the seed, and a held-out split by photograph."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from cvvae.data.synth import MOTIONS, heldout_photo, synth_clip, synth_folder
from cvvae.io.video import probe, read_frames

from .media import sample


@pytest.mark.parametrize("kind", MOTIONS)
def test_each_motion_moves_and_is_reproducible(kind):
    photo = next(read_frames(sample("images/astronaut.png")))
    a = synth_clip(photo, kind, 9, 64, np.random.default_rng(1))
    b = synth_clip(photo, kind, 9, 64, np.random.default_rng(1))
    assert a.shape == (9, 64, 64, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    assert np.abs(a[-1].astype(int) - a[0].astype(int)).mean() > 2  # the camera moved


def test_the_first_frame_keeps_both_halves_and_their_values():
    """A half-black, half-grey photo: the first frame of a pan sees both halves with their values (no darkening or
    clipping from the area shrink and the bilinear resampling)."""
    photo = np.zeros((100, 100, 3), np.uint8)
    photo[:, 50:] = 200  # left half black, right half grey
    frame = synth_clip(photo, "pan", 2, 32, np.random.default_rng(0))[0]
    assert frame.min() == 0 and frame.max() >= 199  # both halves in view, values kept


def test_folder_split_by_photograph(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg"):
        shutil.copy(sample(f"images/{name}"), photos)
    records = synth_folder(photos, tmp_path / "clips", clips_per_photo=2, frames=5, size=32, heldout=0.5)
    assert len(records) == 8 and json.loads((tmp_path / "clips" / "clips.json").read_text()) == records
    for r in records:
        assert r["split"] == ("heldout" if heldout_photo(r["photo"], 0.5) else "train")
        assert probe(tmp_path / "clips" / r["clip"]).num_frames == 5
    by_photo = {}
    for r in records:
        by_photo.setdefault(r["photo"], set()).add(r["split"])
    assert all(len(splits) == 1 for splits in by_photo.values())  # no photograph in both splits
    assert heldout_photo("x.png", 0.0) is False and heldout_photo("x.png", 1.0) is True
