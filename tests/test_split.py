"""The train / held-out split of the sample media (cvvae/data/split.py)."""

import json

import numpy as np
import pytest

from cvvae import InputError
from cvvae.data.split import main, split_media
from cvvae.io.video import VideoWriter, probe, read_video


def _media(tmp_path, frames=40):
    media = tmp_path / "media"
    (media / "videos").mkdir(parents=True)
    rng = np.random.default_rng(0)
    clip = rng.integers(0, 256, size=(frames, 48, 64, 3), dtype=np.uint8)
    with VideoWriter(media / "videos" / "clip.mkv", fps=10, codec="ffv1", pix_fmt="bgr0") as w:
        for f in clip:
            w.write(f)
    with VideoWriter(media / "videos" / "carphone_distorted.mkv", fps=10, codec="ffv1", pix_fmt="bgr0") as w:
        w.write(clip[0])
    with VideoWriter(media / "photo.png", fps=1) as w:
        w.write(clip[0])
    return media, clip


def test_split_cuts_in_time_with_a_gap_losslessly(tmp_path):
    media, clip = _media(tmp_path)
    record = split_media(media, tmp_path / "out", short_side=256, heldout=0.25, gap=4)
    (video,) = record["videos"]
    assert video["ranges"] == {"train": (0, 26), "heldout": (30, 40)}  # 10 held out, 4 dropped, 26 kept
    train = read_video(tmp_path / "out" / video["train"])
    held = read_video(tmp_path / "out" / video["heldout"])
    np.testing.assert_array_equal(train, clip[:26])  # smaller than short_side: kept as is, lossless
    np.testing.assert_array_equal(held, clip[30:])
    assert [i["train"] for i in record["images"]] == ["train/images/photo.png"]
    assert json.loads((tmp_path / "out" / "split.json").read_text())["videos"][0]["source"] == "clip.mkv"


def test_split_resizes_to_the_short_side_and_is_idempotent(tmp_path):
    media, _ = _media(tmp_path)
    out = tmp_path / "out"
    split_media(media, out, short_side=24)
    held = out / "heldout" / "videos" / "clip.mkv"
    info = probe(held)
    assert (info.height, info.width) == (24, 32)
    stamp = held.stat().st_mtime_ns
    split_media(media, out, short_side=24)  # same settings and sources: nothing rewritten
    assert held.stat().st_mtime_ns == stamp
    split_media(media, out, short_side=16)  # other settings: redone
    assert probe(held).height == 16


def test_split_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(InputError, match="no such media folder"):
        split_media(tmp_path / "missing")
    media, _ = _media(tmp_path, frames=5)
    with pytest.raises(InputError, match="too few to split"):
        split_media(media, tmp_path / "out", gap=8)
    assert main([str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_split_leaves_photo_split_and_unseen_folders_out_and_drops_stale_files(tmp_path):
    # wallpapers/ and motion/ are split by photograph (cvvae.data.synth): cutting them in time would put a
    # held-out photograph's scene in the training half; unseen/ holds whole held-out videos
    media, clip = _media(tmp_path)
    for sub in ("motion/heldout", "wallpapers/mate", "unseen"):
        (media / sub).mkdir(parents=True)
    for name in ("motion/heldout/mate-Garden-0-pan.mkv", "unseen/cockatoo.mkv"):
        with VideoWriter(media / name, fps=10, codec="ffv1", pix_fmt="bgr0") as w:
            for f in clip:
                w.write(f)
    with VideoWriter(media / "wallpapers" / "mate" / "Garden.png", fps=1) as w:
        w.write(clip[0])
    out = tmp_path / "out"
    (out / "train" / "videos").mkdir(parents=True)
    (out / "train" / "videos" / "stale.mkv").write_bytes(b"from an earlier split")
    record = split_media(media, out, short_side=24)
    assert record["sources"] == ["photo.png", "videos/clip.mkv"]
    assert sorted(p.name for p in (out / "train" / "videos").iterdir()) == ["clip.mkv"]
    assert sorted(p.name for p in (out / "train" / "images").iterdir()) == ["photo.png"]
